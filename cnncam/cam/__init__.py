"""Batched class activation maps: one engine, each method only its formula.

``CamEngine`` (context manager) / ``compute_cams`` produce raw ``(N, K, h, w)`` maps on the
model's device for every (method, layer); ``viz`` turns them into pictures, ``faithfulness``
scores them, ``activations`` records feature maps and first-layer filters.
"""

from __future__ import annotations

from cnncam.cam.activations import first_conv_filters as first_conv_filters
from cnncam.cam.activations import first_layers as first_layers
from cnncam.cam.activations import record_activations as record_activations
from cnncam.cam.engine import CamBatch as CamBatch
from cnncam.cam.engine import CamEngine as CamEngine
from cnncam.cam.engine import compute_cams as compute_cams
from cnncam.cam.faithfulness import DeletionInsertion as DeletionInsertion
from cnncam.cam.faithfulness import deletion_insertion as deletion_insertion
from cnncam.cam.faithfulness import energy_in_box as energy_in_box
from cnncam.cam.faithfulness import pointing_game as pointing_game
from cnncam.cam.layers import auto_layer as auto_layer
from cnncam.cam.layers import probe_model as probe_model
from cnncam.cam.layers import resolve_layers as resolve_layers
from cnncam.cam.methods import METHODS as METHODS
from cnncam.cam.methods import CamInputs as CamInputs
from cnncam.cam.methods import run_method as run_method
from cnncam.cam.targets import resolve_targets as resolve_targets
from cnncam.cam.viz import colorize as colorize
from cnncam.cam.viz import denormalize as denormalize
from cnncam.cam.viz import normalize as normalize
from cnncam.cam.viz import overlay as overlay
from cnncam.cam.viz import to_uint8 as to_uint8
from cnncam.cam.viz import upsample as upsample
