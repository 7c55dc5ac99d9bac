"""Which precision the ``Animator`` runs in: ``dtype="auto"`` and the validation of ``dtype`` arguments.

``dtype="auto"`` (the default of ``Animator`` and of ``dagan-fast animate/webcam``):

* on the CPU: ``torch.bfloat16`` where the CPU multiplies bfloat16 natively (AMX ``amx_bf16`` or
  ``avx512_bf16`` in ``/proc/cpuinfo``) and PyTorch dispatches its AVX-512 kernels here
  (``torch.backends.cpu.get_cpu_capability()`` is AVX512 or better, so ``ATEN_CPU_CAPABILITY=avx2`` emulates an
  AVX2-only machine and gets float32); ``torch.float32`` elsewhere. Measured on a Sapphire-Rapids-class CPU (2
  threads, batch 1, channels_last): a 256-channel 3x3 convolution at 64x64 runs ~9x faster in bfloat16
  (oneDNN AMX) than in float32.
* on CUDA: ``torch.float32`` (float16/bfloat16 stay opt-in there).

``DAGAN_FAST_DTYPE=float32|bfloat16|float16|float64|auto`` (also fp32/bf16/fp16/fp64) in the environment replaces
what ``"auto"`` picks (an explicit ``dtype=`` is never overridden); the test suite sets it to float32 so the
parity tests keep their float32 path.
"""
from __future__ import annotations

import os
from typing import FrozenSet, Optional, Tuple, Union

import torch

__all__ = ["DTYPE_NAMES", "cpu_bf16_support", "resolve_dtype", "parse_dtype"]

#: Accepted spellings of a dtype (``Animator(dtype=...)`` takes these strings, the torch dtypes and "auto").
DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
               "fp64": torch.float64, "float64": torch.float64, "double": torch.float64}
_ACCEPTED = "'auto', torch.float32, torch.bfloat16, torch.float16 (CUDA), torch.float64 or their names " \
            "('fp32', 'bf16', 'fp16', 'fp64', 'float32', ...)"
ENV_VAR = "DAGAN_FAST_DTYPE"


def _cpu_flags() -> FrozenSet[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read)."""
    from ..ops._cpu import cpu_flags

    return cpu_flags() or frozenset()


def cpu_bf16_support(capability: Optional[str] = None, flags: Optional[FrozenSet[str]] = None) -> Tuple[bool, str]:
    """(whether this CPU runs bfloat16 natively here, a one-line reason).

    ``capability``: ``torch.backends.cpu.get_cpu_capability()`` (default: asked); ``flags``: the CPU flags
    (default: /proc/cpuinfo). True where the flags have ``amx_bf16`` or ``avx512_bf16`` and the capability is
    AVX512 or above; where /proc/cpuinfo is missing (not Linux), an AMX capability alone decides."""
    cap = (capability if capability is not None else torch.backends.cpu.get_cpu_capability()).upper()
    flags = _cpu_flags() if flags is None else frozenset(flags)
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    if not flags and "AMX" in cap:
        native = ["amx (capability)"]
    if not native:
        return False, f"no native bfloat16 on this CPU (no amx_bf16/avx512_bf16; capability {cap})"
    if not cap.startswith("AVX512") and "AMX" not in cap:
        return False, f"CPU has {'+'.join(native)} but PyTorch dispatches {cap} kernels here (ATEN_CPU_CAPABILITY?)"
    if not torch.backends.mkldnn.is_available():
        return False, "this PyTorch build has no oneDNN (mkldnn) for bfloat16 convolutions"
    return True, f"CPU has {'+'.join(native)}, capability {cap}"


def parse_dtype(dtype: Union[None, str, torch.dtype], what: str = "Animator: dtype") -> Union[str, torch.dtype]:
    """``dtype`` as "auto" or a floating torch.dtype; None means "auto". TypeError/ValueError naming ``what``,
    what it got and what is accepted."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        if key == "auto":
            return "auto"
        if key in DTYPE_NAMES:
            return DTYPE_NAMES[key]
        raise ValueError(f"{what} must be {_ACCEPTED}; got the string {dtype!r}")
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point and dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            return dtype
        raise ValueError(f"{what} must be {_ACCEPTED}; got {dtype}")
    raise TypeError(f"{what} must be {_ACCEPTED}; got {type(dtype).__name__} {dtype!r}")


def resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device,
                  what: str = "Animator: dtype") -> Tuple[torch.dtype, str]:
    """(the compute dtype for ``device``, why it was chosen). ``dtype``: "auto"/None or a dtype (see
    ``parse_dtype``). float16 and bfloat16 run on CUDA; bfloat16 on the CPU too; float16 on the CPU is refused
    (ValueError: no fast CPU float16 convolutions)."""
    device = torch.device(device)
    parsed = parse_dtype(dtype, what)
    if parsed == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env.lower() != "auto":
            forced = parse_dtype(env, f"environment variable {ENV_VAR}")
            chosen, why = resolve_dtype(forced, device, f"environment variable {ENV_VAR}")
            return chosen, f"auto, set by {ENV_VAR}={env}"
        if device.type == "cpu":
            ok, reason = cpu_bf16_support()
            return (torch.bfloat16, f"auto: {reason}") if ok else (torch.float32, f"auto: {reason}")
        return torch.float32, f"auto: float32 on {device.type} (fp16/bf16 are opt-in there)"
    if parsed == torch.float16 and device.type != "cuda":
        raise ValueError(f"{what}=torch.float16 runs on a CUDA device only (device is {device}); on the CPU use "
                         "torch.bfloat16 (fast where the CPU has AMX/AVX512-BF16), torch.float32 or 'auto'")
    if parsed == torch.bfloat16 and device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what}=torch.bfloat16 runs on the CPU or CUDA only (device is {device})")
    if parsed == torch.bfloat16 and device.type == "cpu":
        ok, reason = cpu_bf16_support()
        return parsed, "requested" + ("" if ok else f" (slow here: {reason})")
    return parsed, "requested"
