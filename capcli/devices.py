"""One place that picks the device and the autocast context (minGPT's device='auto', nanoGPT's ctx)."""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from capcli.config import DEVICES
from capcli.errors import CapcliError

# Images per encoder forward on a CPU: small batches keep the activations in the caches, and larger ones gain
# nothing (`python benchmarks/sweeps.py encoder`).
CPU_BATCH = 4


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; an explicit device must exist."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():  # under torchrun / accelerate launch: this process's own GPU
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.split(":")[0] not in DEVICES:
        raise CapcliError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CapcliError("--device cuda asked for, but PyTorch sees no CUDA GPU; use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CapcliError("--device mps asked for, but MPS is not available; use --device auto or cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str = "auto"):
    """`auto`: bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32 everywhere else. `bf16` asks for
    bf16 autocast on any device (it pays on CPUs with AVX512-BF16 or AMX, and moves the loss slightly);
    `fp32` turns autocast off."""
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()
