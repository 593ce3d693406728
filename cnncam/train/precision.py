"""Mixed precision: autocast for bf16/fp16, GradScaler only for fp16.

bf16 has fp32's exponent range, so gradients do not underflow and need no loss
scaling (nanoGPT, timm's NativeScaler).  CPU autocast supports bf16 (and fp16 on
recent torch), which is how the CPU tests exercise these paths.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, mode: str, device: torch.device) -> None:
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


@contextlib.contextmanager
def numerics(deterministic: bool, device: torch.device) -> Iterator[None]:
    """Kernel choice for a training run; the previous global settings come back on exit.

    ``deterministic``: cuDNN autotuning off, ``torch.use_deterministic_algorithms(True)`` (an op
    without a deterministic kernel then raises) and cuBLAS's fixed workspace -- bit-identical GPU
    runs and resumes, at some speed.  Otherwise cuDNN autotunes (benchmark=True) on CUDA.
    CPU kernels are deterministic either way (for a fixed thread count).
    """
    saved = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if deterministic:
        # Read when cuBLAS creates its handle, i.e. at the first matmul: early enough here.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
