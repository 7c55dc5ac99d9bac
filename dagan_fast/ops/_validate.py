"""Argument checks shared by the public ops: every message names the argument, what it got and
what it needs. Value checks (NaN/inf) cost a reduction and a device sync; they are skipped while
tracing or capturing a CUDA graph, and inside ``skip_value_checks()``."""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional, Sequence

import torch

_state = threading.local()


@contextlib.contextmanager
def skip_value_checks() -> Iterator[None]:
    """Within this block the ops do not scan inputs for NaN/inf (hot loops that validated already)."""
    previous = getattr(_state, "skip", False)
    _state.skip = True
    try:
        yield
    finally:
        _state.skip = previous


def _value_checks_enabled(t: torch.Tensor) -> bool:
    if getattr(_state, "skip", False) or os.environ.get("DAGAN_FAST_CHECK_VALUES", "1") == "0":
        return False
    if torch.compiler.is_compiling() or isinstance(t, torch._subclasses.FakeTensor):
        return False
    if t.device.type == "meta":
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype} on {t.device}"


def tensor(op: str, name: str, value, ndim: int, shape_hint: str) -> torch.Tensor:
    """``value`` must be a floating tensor of rank ``ndim``; ``shape_hint`` like "(B,C,H,W)"."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor {shape_hint}, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(
            f"{op}: {name} must be a floating tensor (float16/bfloat16/float32/float64), got {value.dtype}; "
            f"convert it, e.g. {name}.float() (images: .float() / 255)"
        )
    if value.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {shape_hint}, got {describe(value)}")
    return value


def same_dtype_device(op: str, named: Sequence[tuple]) -> None:
    """All (name, tensor) pairs share the first one's dtype and device."""
    first_name, first = named[0]
    for name, t in named[1:]:
        if t is None:
            continue
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; move all inputs to one device"
            )
        if t.dtype != first.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; pass one floating dtype"
            )


def finite(op: str, name: str, t: Optional[torch.Tensor], allow_inf: bool = False) -> None:
    """Rejects NaN (and inf unless ``allow_inf``) in ``t``."""
    if t is None or t.numel() == 0 or not _value_checks_enabled(t):
        return
    # One sum is the cheap common path: it is finite whenever every element is (an overflow to inf
    # only sends us to the exact count below).
    if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return
    bad = torch.isnan(t) if allow_inf else ~torch.isfinite(t)
    count = int(bad.sum())
    if count:
        what = "NaN" if allow_inf else "NaN or inf"
        raise ValueError(f"{op}: {name} contains {count} {what} value(s) ({describe(t)}); inputs must be finite")


def real_scalar(op: str, name: str, value, *, positive: bool = False) -> float:
    """A finite real number (Python or NumPy scalar, not bool, not a tensor) as a float."""
    import numbers
    import math

    if isinstance(value, bool) or isinstance(value, torch.Tensor) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a finite real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        need = "a positive finite number" if positive else "finite"
        raise ValueError(f"{op}: {name} must be {need}, got {value!r}")
    return value


def size_match(op: str, what: str, got, expected, hint: str) -> None:
    if got != expected:
        raise ValueError(f"{op}: {what} is {got} but must be {expected} ({hint})")
