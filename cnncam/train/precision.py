"""Mixed precision: autocast for bf16/fp16, GradScaler only for fp16.

bf16 has fp32's exponent range, so gradients do not underflow and need no loss
scaling (nanoGPT, timm's NativeScaler).  CPU autocast supports bf16 (and fp16 on
recent torch), which is how the CPU tests exercise these paths.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode = mode
        self.device_type = device.type
        self.dtype = DTYPES[mode]
        self.scaler = torch.amp.GradScaler(device.type, enabled=(mode == "fp16"))

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward_step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        clip: float | None,
    ) -> None:
        """scale → backward → unscale → clip → step → update (timm's NativeScaler order)."""
        self.scaler.scale(loss).backward()
        if clip is not None:
            # Clip the true gradients, not the scaled ones.
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)
