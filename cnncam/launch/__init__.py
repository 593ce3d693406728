"""Submitting cnncam work to Slurm (or running it locally): executors, tasks, job records.

Kept import-light on purpose: :mod:`cnncam.config` imports :mod:`cnncam.launch.params`
to validate the ``slurm`` section, so nothing here may import torch or submitit eagerly.
"""

from __future__ import annotations
