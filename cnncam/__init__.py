"""cnncam: train CNN image classifiers on Slurm and explain them with batched CAMs in HDF5."""

from __future__ import annotations

__version__ = "0.1.0"

from cnncam.config import RunConfig as RunConfig
from cnncam.config import load_config as load_config
from cnncam.errors import CnncamError as CnncamError
