"""Capability-based dispatch: each backend says what it can run and, when it cannot, why.

Backends in priority order: ``cuda`` (C++/CUDA), ``triton``, ``cpu`` (C++), ``reference`` (PyTorch).
The dispatcher picks the first with no reasons against the given inputs; ``backend=`` or the
``DAGAN_FAST_BACKEND`` environment variable (read at every call) forces one. Nothing is swapped
globally at import time.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ._extension import extension, has_kernel

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PRIORITY = ("cuda", "triton", "cpu", "reference")


class BackendError(RuntimeError):
    """No backend can run an op on the given inputs, or a forced backend cannot; lists every reason."""


@dataclass
class OpKernels:
    """One backend's implementation of one op: ``forward(*args)`` and ``backward(grad, *args, mask)``.

    ``reasons(*tensors) -> [str]``: the op-specific limits of this kernel (shapes, features), read by dispatch
    with the op's tensor operands, so automatic selection falls back instead of the kernel raising.
    ``backward_via``: the backend whose backward kernel runs this op's backward (when this backend has a
    forward only), the reference when that one cannot run the inputs. ``epilogue``: a forward that also
    applies an op-specific epilogue while storing (attention: ``gamma * out + residual``), or None.
    """

    forward: Callable
    backward: Optional[Callable]
    reasons: Optional[Callable[..., List[str]]] = None
    backward_via: Optional[str] = None
    epilogue: Optional[Callable] = None


class BackendInfo(NamedTuple):
    """Status of one backend in this install: usable at all, ops implemented, and the why."""

    available: bool
    ops: Tuple[str, ...]
    detail: str


class Backend:
    """A backend: a name, the ops it implements, and the reasons it cannot run given inputs."""

    name = ""
    dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES

    def __init__(self) -> None:
        self.kernels: Dict[str, OpKernels] = {}

    def register(self, op: str, forward: Callable, backward: Optional[Callable], *,
                 not_supported_reasons: Optional[Callable[..., List[str]]] = None,
                 backward_via: Optional[str] = None) -> None:
        """Adds ``op``'s kernels; see ``OpKernels`` for the keyword arguments. Exactly one of ``backward`` and
        ``backward_via`` is given."""
        if (backward is None) == (backward_via is None):
            raise ValueError(f"{self.name}.register({op!r}): give either a backward kernel or backward_via")
        self.kernels[op] = OpKernels(forward, backward, not_supported_reasons, backward_via)

    def register_epilogue(self, op: str, forward: Callable) -> None:
        """Declares that this backend's ``op`` forward can fuse an epilogue (``OpKernels.epilogue``)."""
        self.kernels[op].epilogue = forward

    def backward_kernel(self, op: str, tensors: Sequence[torch.Tensor]) -> Tuple[str, Callable]:
        """(backend name, backward function) that runs ``op``'s backward on these inputs: this backend's own
        kernel, or the one ``backward_via`` names when it supports them, else the reference's."""
        kernels = self.kernels[op]
        if kernels.backward is not None:
            return self.name, kernels.backward
        via = BACKENDS[kernels.backward_via]
        if not via.not_supported_reasons(op, tensors):
            return via.name, via.kernels[op].backward
        return "reference", BACKENDS["reference"].kernels[op].backward

    def backward_notes(self) -> List[str]:
        """One line per op whose backward another backend runs (reported by ``info``)."""
        return [f"{op} backward runs the {k.backward_via} kernel (the reference where {k.backward_via} cannot)"
                for op, k in sorted(self.kernels.items()) if k.backward_via is not None]

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run anything in this process, or None."""
        return None

    def device_reason(self, device: torch.device) -> Optional[str]:
        return None

    def op_reason(self, op: str) -> Optional[str]:
        return None if op in self.kernels else f"has no '{op}' kernel in this version"

    def not_supported_reasons(self, op: str, tensors: Sequence[torch.Tensor]) -> List[str]:
        """Every reason this backend cannot run ``op`` on ``tensors`` (empty list: it can)."""
        reasons = []
        for reason in (self.unavailable_reason(), self.op_reason(op)):
            if reason:
                reasons.append(reason)
        if tensors:
            device_reason = self.device_reason(tensors[0].device)
            if device_reason:
                reasons.append(device_reason)
            dtype = tensors[0].dtype
            if dtype not in self.dtypes:
                reasons.append(f"does not take {dtype} (takes {', '.join(str(d) for d in self.dtypes)})")
            kernels = self.kernels.get(op)
            if not reasons and kernels is not None and kernels.reasons is not None:
                reasons.extend(kernels.reasons(*tensors))
        return reasons

    def auto_reasons(self, op: str, tensors: Sequence[torch.Tensor]) -> List[str]:
        """Extra reasons that keep the backend out of automatic selection (it still runs when forced)."""
        return []

    def implemented_ops(self) -> Tuple[str, ...]:
        return tuple(sorted(op for op in self.kernels if self.op_reason(op) is None))

    def info(self) -> BackendInfo:
        reason = self.unavailable_reason()
        ops = self.implemented_ops()
        if reason:
            return BackendInfo(False, ops, reason)
        if not ops:
            return BackendInfo(False, ops, "no kernels in this version")
        return BackendInfo(True, ops, "; ".join([self.describe(), *self.backward_notes()]))

    def describe(self) -> str:
        return ""


class ReferenceBackend(Backend):
    name = "reference"

    def describe(self) -> str:
        return ("pure PyTorch on any device: the spec and the fallback (differentiable, float64-capable; "
                f"on CPU tensors ATen's {torch.backends.cpu.get_cpu_capability()} path)")


class CppCpuBackend(Backend):
    name = "cpu"

    def unavailable_reason(self) -> Optional[str]:
        ext = extension()
        return None if ext.loaded else ext.error

    def op_reason(self, op: str) -> Optional[str]:
        reason = super().op_reason(op)
        if reason is None and not has_kernel(f"{op}_fwd", "CPU"):
            reason = f"the compiled library has no CPU kernel for '{op}' (rebuild the package)"
        return reason

    def device_reason(self, device: torch.device) -> Optional[str]:
        return None if device.type == "cpu" else f"runs on CPU tensors, got {device.type}"

    def describe(self) -> str:
        from ._cpu import cpu_capability_summary

        return (f"C++ CPU kernels from {extension().path} (torch threads: {torch.get_num_threads()}; "
                f"{cpu_capability_summary()})")


class CudaBackend(Backend):
    name = "cuda"

    def unavailable_reason(self) -> Optional[str]:
        ext = extension()
        if not ext.loaded:
            return ext.error
        if not ext.cuda_compiled:
            return "the compiled library was built without CUDA kernels (no nvcc, or DAGAN_FAST_CUDA=0)"
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            return (f"CUDA kernels compiled (sm {ext.cuda_archs}) but no CUDA device: "
                    f"torch.cuda.is_available() is False (torch {torch.__version__}, {build})")
        return None

    def op_reason(self, op: str) -> Optional[str]:
        reason = super().op_reason(op)
        if reason is None and not has_kernel(f"{op}_fwd", "CUDA"):
            reason = f"the compiled library has no CUDA kernel for '{op}'"
        return reason

    def device_reason(self, device: torch.device) -> Optional[str]:
        return None if device.type == "cuda" else f"runs on CUDA tensors, got {device.type}"

    def describe(self) -> str:
        return f"CUDA kernels (sm {extension().cuda_archs}) on {torch.cuda.get_device_name()}"


def triton_interpret() -> bool:
    """Whether TRITON_INTERPRET=1: Triton kernels then run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not installed or fails to import ({exc.__class__.__name__}: {exc})"
    return None


@functools.lru_cache(maxsize=None)
def _load_triton_kernels() -> Optional[str]:
    """Imports dagan_fast.ops.triton, whose modules register their kernels with the triton backend.
    Deferred to first use: importing triton costs ~0.4 s, and TRITON_INTERPRET must be set before
    the kernels are defined."""
    try:
        importlib.import_module("dagan_fast.ops.triton")
    except Exception as exc:
        return f"the Triton kernels fail to load ({exc.__class__.__name__}: {exc})"
    return None


class TritonBackend(Backend):
    name = "triton"
    # bf16 is broken in the Triton interpreter; on a GPU it works.
    interpreter_dtypes = (torch.float16, torch.float32, torch.float64)

    def unavailable_reason(self) -> Optional[str]:
        if not torch.cuda.is_available() and not triton_interpret():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU through the interpreter)"
        error = _triton_import_error() or _load_triton_kernels()
        if error:
            return error
        if not self.kernels:
            return "no Triton kernels in this version"
        return None

    def auto_reasons(self, op: str, tensors: Sequence[torch.Tensor]) -> List[str]:
        if tensors and tensors[0].device.type == "cpu":
            return ["the Triton interpreter runs only when asked for (backend='triton')"]
        return []

    def device_reason(self, device: torch.device) -> Optional[str]:
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return f"runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), got {device.type}"

    def not_supported_reasons(self, op: str, tensors: Sequence[torch.Tensor]) -> List[str]:
        reasons = super().not_supported_reasons(op, tensors)
        if tensors and tensors[0].device.type == "cpu" and tensors[0].dtype not in self.interpreter_dtypes:
            reasons.append(f"the Triton interpreter does not take {tensors[0].dtype}")
        return reasons

    def describe(self) -> str:
        mode = "interpreter on the CPU" if triton_interpret() and not torch.cuda.is_available() else "GPU"
        return f"Triton kernels ({mode})"


BACKENDS: Dict[str, Backend] = {
    b.name: b for b in (CudaBackend(), TritonBackend(), CppCpuBackend(), ReferenceBackend())
}


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(PRIORITY)}") from None


def select_backend(op: str, tensors: Sequence[torch.Tensor], backend: Optional[str] = None) -> Backend:
    """The backend that runs ``op`` on ``tensors``: ``backend`` or $DAGAN_FAST_BACKEND if given, else
    the first in priority order that supports the inputs. Raises BackendError with every reason."""
    forced = backend or os.environ.get("DAGAN_FAST_BACKEND", "").strip() or None
    if forced is not None:
        chosen = get_backend(forced)
        reasons = chosen.not_supported_reasons(op, tensors)
        if reasons:
            source = "backend=" if backend else "DAGAN_FAST_BACKEND="
            raise BackendError(f"{op}: {source}{forced!r} cannot run these inputs: " + "; ".join(reasons))
        return chosen
    all_reasons = []
    for name in PRIORITY:
        candidate = BACKENDS[name]
        reasons = candidate.not_supported_reasons(op, tensors)
        reasons = reasons or candidate.auto_reasons(op, tensors)
        if not reasons:
            return candidate
        all_reasons.append(f"{name}: " + "; ".join(reasons))
    raise BackendError(f"{op}: no backend can run these inputs:\n  " + "\n  ".join(all_reasons))


def available_backends() -> Dict[str, BackendInfo]:
    """Every backend with whether it can run here, the ops it implements, and why (not)."""
    return {name: BACKENDS[name].info() for name in PRIORITY}
