"""Helpers shared by the Triton launchers: the poison switch, interpreter detection, the GPU's SM count,
and ``LaunchSpec``, the description of one kernel configuration a launcher can launch on a GPU.

Each launcher module exposes ``launch_specs()``: every (kernel, signature, constexprs, num_warps,
num_stages) its launchers can pick on a GPU, built from the same tile tables the launchers choose from.
``dagan_fast.ops.triton.aot`` compiles them ahead of time for sm_80 and sm_90 (tests/test_gpu_compile.py),
so a tile added to a table is compiled, and checked for spills and shared memory, without a GPU.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch
import triton.language as tl


def poison_enabled() -> bool:
    """Whether DAGAN_FAST_POISON is set to anything but "" or "0" (surrounding spaces ignored): launchers
    then fill fresh outputs with NaN first, so that an element a kernel forgets to write shows."""
    return os.environ.get("DAGAN_FAST_POISON", "").strip() not in ("", "0")


def interpreting(t: torch.Tensor) -> bool:
    """Whether ``t``'s kernels run through the Triton interpreter (CPU tensors, TRITON_INTERPRET=1)."""
    return t.device.type == "cpu"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA ``device`` (cached per device index)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# torch dtype -> (Triton pointer element type, accumulation dtype of the kernels)
TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# the dtypes a GPU launch is compiled for by the ahead-of-time check
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype):
    """The kernels' accumulation dtype for inputs of ``dtype``: fp64 for fp64, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@dataclass(frozen=True)
class LaunchSpec:
    """One configuration of one kernel as a launcher launches it on a GPU.

    kernel: the ``@triton.jit`` function (a JITFunction, or an InterpretedFunction under
    TRITON_INTERPRET=1; the ahead-of-time compiler imports the kernels without the interpreter).
    signature: argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr") for every argument.
    constexprs: values of the constexpr arguments. label: what distinguishes this spec, for reports.
    pointer_args, aligned_args: the pointers (16-byte aligned) and integers (multiples of 16) that the
    launch passes; Triton's runtime specializes on both, so the spec carries the same hints.
    """

    kernel: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any]
    num_warps: int
    num_stages: int
    label: str = ""
    pointer_args: Tuple[str, ...] = field(default=())
    aligned_args: Tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.kernel.__name__


def _describe(value: Any) -> str:
    if isinstance(value, tl.dtype):
        return str(value)
    return repr(value) if isinstance(value, str) else str(value)


def launch_spec(kernel, dtype: torch.dtype, pointers: Mapping[str, str], constexprs: Mapping[str, Any],
                num_warps: int, num_stages: int = 1, floats: Iterable[str] = (), units: Iterable[str] = ()) -> LaunchSpec:
    """A ``LaunchSpec`` for ``kernel`` launched on ``dtype`` inputs: ``pointers`` maps each pointer argument to its element type
    ("fp16", ...), ``floats`` names the float scalars; every other non-constexpr argument is an i32
    (sizes and strides; the runtime passes i64 only past 2**31, which needs no other tiles). ``units``
    names the integer arguments (innermost strides) that are 1 in this launch: Triton's runtime
    specializes an integer argument equal to 1 into the constant 1, and so does the spec. Every other
    integer is taken as a multiple of 16 (the runtime's divisibility specialization for the aligned
    shapes the models use: 64x64 maps, 256 channels, N = 4096): launches with other sizes run variants
    of the same tiles with scalar loads."""
    floats = set(floats)
    units = tuple(units)
    signature: Dict[str, str] = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    missing = set(pointers) - set(kernel.arg_names)
    if missing:
        raise ValueError(f"{kernel.__name__} has no arguments {sorted(missing)}")
    label = TRITON_TYPE[dtype] + ":" + ",".join(f"{k}={_describe(v)}" for k, v in constexprs.items())
    if units:
        label += ",unit=" + "/".join(units)
    constexprs = dict(constexprs)
    for name in units:
        if signature.get(name) != "i32":
            raise ValueError(f"{kernel.__name__}: {name} is not an integer argument")
        signature[name] = "constexpr"
        constexprs[name] = 1
    aligned = tuple(n for n, t in signature.items() if t == "i32")
    return LaunchSpec(kernel, signature, constexprs, num_warps, num_stages,
                      f"{label},warps={num_warps},stages={num_stages}", tuple(pointers), aligned)


def flag_variants(names: Tuple[str, ...], valid=lambda flags: True) -> Tuple[Dict[str, bool], ...]:
    """Every assignment of the boolean constexprs ``names`` that ``valid`` accepts, the all-True one first."""
    out = []
    for bits in range(2 ** len(names) - 1, -1, -1):
        flags = {n: bool(bits >> (len(names) - 1 - i) & 1) for i, n in enumerate(names)}
        if valid(flags):
            out.append(flags)
    return tuple(out)


def ptr_types(names: Iterable[str], dtype: torch.dtype, overrides: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Pointer argument -> element type: ``dtype``'s Triton type, except where ``overrides`` says."""
    t = TRITON_TYPE[dtype]
    overrides = overrides or {}
    return {n: overrides.get(n, t) for n in names}
