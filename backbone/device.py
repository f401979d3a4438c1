"""Where and at what precision a model runs: one resolver for every command, config and API call.

`device` is "cpu", "cuda" or "cuda:N" (None or "auto": CUDA when available, else CPU). `dtype` is the compute
precision: "float32", "bfloat16" (CPU and CUDA; fast on CPUs with AVX-512 or AMX, emulated and slow on
AVX2-only ones) or "float16" (CUDA only: on CPU fp16 is slow and, in training, underflows without a GradScaler).
Weights stay float32 unless a caller casts a frozen base on purpose; lower precision runs as autocast.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 or AMX). Without them (an AVX2-only CPU) bf16 is
    emulated, many times slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


class DeviceError(ValueError):
    """A device or dtype this machine cannot run; the message says what to pass instead."""


def resolve_device(requested: str | torch.device | None = None) -> torch.device:
    """The torch.device for `requested`, checked against this machine."""
    if isinstance(requested, torch.device):
        requested = str(requested)
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {requested!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"device {requested!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {requested!r}: CUDA is not available on this machine; use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"device {requested!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device


def resolve_dtype(requested: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute dtype for `requested` on `device` (None: float32)."""
    if isinstance(requested, torch.dtype):
        name = next((k for k, v in DTYPES.items() if v == requested), str(requested))
    else:
        name = _ALIASES.get(requested or "float32", requested or "float32")
    if name not in DTYPES:
        raise DeviceError(f"dtype {requested!r} is not supported; use one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise DeviceError("dtype float16 runs on CUDA only; on CPU use bfloat16 (or float32)")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support; use float16")
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bfloat16():
        warnings.warn("this CPU has no native bfloat16 (needs AVX-512 or AMX), so bfloat16 runs many times slower "
                      "than float32 here; use --dtype float32", RuntimeWarning, stacklevel=2)
    return dtype


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` on `device`, or nothing for float32 (so float32 runs exactly as without it)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
