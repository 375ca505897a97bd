"""Where the frozen base runs and in what precision: ``model.device`` and ``model.dtype``.

Only the frozen base takes the compute dtype. Everything DP-SGD and the wire touch
stays float32: LoRA adapters (PEFT upcasts them, ``autocast_adapter_dtype``), the
reward and value heads, per-sample gradients, clipping and noise, and every array a
client sends. A bfloat16 GPU partner and a float32 CPU partner therefore train the
same tensors and are charged the same epsilon.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """``auto`` is CUDA if present, else MPS, else CPU; anything else must exist here."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"model.device is {spec!r} but this machine has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"model.device is {spec!r} but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"model.device is {spec!r} but MPS is not available here")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that supports it, float16 on an older one, float32
    elsewhere (CPU matmuls in 16 bits are slow, and MPS lacks some bfloat16 kernels)."""
    if spec != "auto":
        return DTYPES[spec]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def model_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's (first) parameter."""
    return next(module.parameters()).device


def noise_generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on ``device``: Opacus draws the noise where the gradients are."""
    return torch.Generator(device=device).manual_seed(seed)
