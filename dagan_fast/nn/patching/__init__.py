"""``patch(model)``: run the DaGAN / FOMM models people already have through dagan_fast's fused ops,
without changing their classes' code, weights or calling code.

    import dagan_fast
    report = dagan_fast.nn.patch(generator)     # or the full model, DataParallel / DDP wrappers included
    print(report)
    ...                                         # train / animate exactly as before
    dagan_fast.nn.unpatch(generator)            # the original forwards again

Recognised by structure (official-interfaces.md: attributes, methods, forward signatures, output keys):
DenseMotionNetwork (DaGAN's and FOMM's; ``ops=("motion",)``), FOMM's OcclusionAwareGenerator and DaGAN's
DepthAwareGenerator / SPADEDepthAwareGenerator (the feature warp x occlusion and the deformed image;
``"warp"``), DaGAN's DepthAwareAttention (flash attention, no (B,N,N) map; ``"attention"``). Weights,
buffers, ``state_dict()`` keys, parameters (an optimizer built before keeps working), train()/eval() and
autograd are untouched; outputs equal the original forwards' within float32 rounding, forward and backward.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from ... import ops
from . import _dispatch, _forwards
from . import _recognise as R

__all__ = ["PatchEntry", "PatchReport", "patch", "unpatch"]

OPS = ("warp", "attention", "motion")
_OP_NAMES = {"motion": "sparse_motion_inputs + dense_motion", "warp": "warp_occlusion",
             "attention": "cross_modal_attention"}


@dataclass
class PatchEntry:
    """One recognised module: ``path`` in the tree ("" for the root), ``kind`` (the official class it was
    recognised as), ``class_name`` (its actual class), ``ops`` (the fused ops its forward now runs),
    ``reason`` (why it was left alone; None when patched), ``notes``, and ``fallbacks``: a live count of
    the call-time reasons for which the patched forward ran the original computation instead."""

    path: str
    kind: str
    class_name: str
    ops: str = ""
    reason: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    fallbacks: Dict[str, int] = field(default_factory=dict)

    @property
    def patched(self) -> bool:
        return self.reason is None


@dataclass
class PatchReport:
    """What ``patch`` did: ``patched`` and ``left_alone`` entries (``PatchEntry``). Truthy when anything
    was patched; ``str(report)`` is a readable table; ``report.fallbacks()`` the call-time fallbacks so far."""

    patched: List[PatchEntry] = field(default_factory=list)
    left_alone: List[PatchEntry] = field(default_factory=list)
    ops: Tuple[str, ...] = OPS
    backend: Optional[str] = None
    keep_attention_map: bool = False

    def __bool__(self) -> bool:
        return bool(self.patched)

    def __len__(self) -> int:
        return len(self.patched)

    def fallbacks(self) -> Dict[str, Dict[str, int]]:
        """{path: {reason: count}} for patched modules whose forward fell back at call time."""
        return {e.path or "<root>": dict(e.fallbacks) for e in self.patched if e.fallbacks}

    def __str__(self) -> str:
        opts = f"ops={self.ops}" + (f", backend={self.backend!r}" if self.backend else "") + \
               (", keep_attention_map=True" if self.keep_attention_map else "")
        lines = [f"dagan_fast.patch ({opts}): {len(self.patched)} patched, {len(self.left_alone)} left alone"]
        if not self.patched and not self.left_alone:
            lines.append("  no DaGAN / FOMM module recognised (see official-interfaces.md for what is)")
        width = max([len(e.path or "<root>") for e in self.patched + self.left_alone] + [4])
        if self.patched:
            lines.append("  patched:")
            for e in self.patched:
                cls = e.class_name if e.class_name == e.kind else f"{e.class_name} (as {e.kind})"
                lines.append(f"    {e.path or '<root>':<{width}}  {cls}: {e.ops}")
                lines.extend(f"    {'':<{width}}    note: {n}" for n in e.notes)
                lines.extend(f"    {'':<{width}}    fell back {c}x: {r}" for r, c in e.fallbacks.items())
        if self.left_alone:
            lines.append("  left alone:")
            for e in self.left_alone:
                cls = e.class_name if e.class_name == e.kind else f"{e.class_name} (as {e.kind})"
                lines.append(f"    {e.path or '<root>':<{width}}  {cls}: {e.reason}")
        return "\n".join(lines)


def _is_dagan_fast_module(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "dagan_fast"


def _check_options(ops_: Iterable[str], backend: Optional[str]) -> Tuple[str, ...]:
    if isinstance(ops_, str):
        ops_ = (ops_,)
    chosen = tuple(ops_)
    unknown = [o for o in chosen if o not in OPS]
    if unknown:
        raise ValueError(f"patch: unknown op(s) {unknown}; choose from {OPS}")
    if backend is not None:
        names = tuple(ops.available_backends())
        if backend not in names:
            raise ValueError(f"patch: unknown backend {backend!r}; choose one of {names} or None (fastest)")
    return chosen


def patch(module: nn.Module, *, ops: Iterable[str] = OPS, backend: Optional[str] = None,
          keep_attention_map: bool = False, channels_last: Optional[bool] = None,
          cache_source: bool = True, fast_conv: Optional[bool] = None) -> PatchReport:
    """Rebinds, on every module of ``module``'s tree recognised as an official DaGAN / FOMM module, the
    forward to one running dagan_fast's fused ops. Returns a ``PatchReport`` (what was patched, and what
    was recognised but left alone, with the reason).

    module: any nn.Module (a generator, a full training model, DataParallel / DistributedDataParallel).
    ops: which fused families to use: "motion" (DenseMotionNetwork), "warp" (the generators' warp x
    occlusion), "attention" (DepthAwareAttention). backend: force a dagan_fast.ops backend ("cpu",
    "cuda", "triton", "reference"; None: the fastest per call). keep_attention_map: DaGAN's attention
    also returns its (B,N,N) map; since that map is then built anyway, attention modules keep their
    original forward (with the default False the flash op runs and the map returned is None).
    channels_last: run patched generators' convolutions in channels_last (NHWC) memory format: their 4-d
    conv weights (and those of their patched DenseMotionNetwork / DepthAwareAttention) are converted in place
    (``p.data``: same Parameter objects, values and state_dict), the encoders get channels_last inputs, and
    every output comes back in the original's layout; None: on for CPU float32 / bfloat16 generators that are
    in eval mode when patched (oneDNN runs NHWC 3x3 convolutions faster there; in train mode its NHWC BatchNorm
    statistics move conv gradients by up to ~16%, so training stays NCHW unless True), False: off. unpatch restores the original formats.
    cache_source: with no autograd graph needed (torch.no_grad(), or nothing involved requires grad), the
    generators reuse their source-only results (image and depth encoders, the attention query) while the
    source image / depth tensors and those sub-networks' weights are unchanged (identity, ``_version``,
    shape, stride, dtype, device; parameter and buffer ``_version``); one entry per generator.
    fast_conv: the patched generators' plain ``nn.Conv2d`` instances become ``FastConv2d`` (3x3 stride 1:
    Winograd F(4x4,3x3) where it measures faster), ``NarrowConv2d`` (other stride-1 ones with 1-4 output
    channels, such as the last 7x7 convolution to RGB: a direct kernel vectorised over input channels where it
    measures faster) or ``PackedConv2d`` (the rest: oneDNN with the weight packed once), in place (a class
    swap: same Parameters, state_dict and train/eval). On CPU float32 tensors; the packed ones also bfloat16,
    and only without autograd. With autograd the Winograd-capable ones choose per shape between Winograd and
    oneDNN for the forward, the input gradient and the filter gradient, keeping NCHW activations NCHW; the
    narrow ones choose for the forward (their gradients run oneDNN); anything else runs
    ``nn.Conv2d.forward``. Results differ from the direct convolution by float32 rounding (Winograd: ~1e-5
    relative). None: on for generators whose weights are on the CPU (either mode); unpatch restores the
    classes.

    Patching a patched module again is a no-op (its entries say so). A tree with nothing recognisable gives
    an empty report and a warning. ``unpatch(module)`` restores the original forwards.
    """
    chosen = _check_options(ops, backend)
    report = PatchReport(ops=chosen, backend=backend, keep_attention_map=bool(keep_attention_map))
    if not isinstance(module, nn.Module):
        raise TypeError(f"patch: expected a torch.nn.Module, got {type(module).__name__}")
    already = 0
    for path, m in module.named_modules():
        rec = None
        for recognise in R.RECOGNISERS:
            rec = recognise(m)
            if rec is not None:
                break
        if rec is None:
            continue
        entry = PatchEntry(path, rec.kind, type(m).__name__, _OP_NAMES[R.OP_FAMILY[rec.kind]], notes=list(rec.notes))
        state = m.__dict__.get(_dispatch.STATE_ATTR)
        if state is not None:
            entry.reason = "already patched (unpatch first to change options)"
            already += 1
        elif _is_dagan_fast_module(m):
            entry.reason = "a dagan_fast module: runs the fused ops already"
        elif isinstance(m, _script_types()):
            entry.reason = "a TorchScript module: its forward cannot be rebound"
        elif "forward" in m.__dict__:
            entry.reason = "its forward is overridden on the instance (another patch?)"
        elif rec.reason is not None:
            entry.reason = rec.reason
        elif R.OP_FAMILY[rec.kind] not in chosen:
            entry.reason = f"{R.OP_FAMILY[rec.kind]!r} not in ops={chosen}"
        elif rec.kind == R.ATTENTION and keep_attention_map:
            entry.reason = ("keep_attention_map=True: the (B,N,N) map is built anyway, so the original "
                            "forward runs (exact)")
        if entry.reason is not None:
            report.left_alone.append(entry)
            continue
        if rec.kind in (R.DAGAN_GENERATOR, R.SPADE_GENERATOR) and "attention" in chosen and not keep_attention_map:
            entry.notes.append("out['attention'] is None: the (B,N,N) map is not built "
                               "(patch(..., keep_attention_map=True) keeps it)")
        st = _forwards.PatchState(rec.kind, path, _forwards.FORWARDS[rec.kind], rec.keys, rec.extra_params,
                                  backend, bool(keep_attention_map), bool(cache_source))
        entry.fallbacks = st.fallbacks  # live view
        st.owner = _dispatch.install(m)
        m.__dict__[_dispatch.STATE_ATTR] = st
        report.patched.append(entry)
    _attention_notes(report)
    for e in report.patched:
        if e.kind in (R.FOMM_GENERATOR, R.DAGAN_GENERATOR, R.SPADE_GENERATOR):
            _channels_last(module, e, report, channels_last)
            _fast_convolutions(module, e, report, fast_conv)
            if cache_source:
                e.notes.append("source-side cache: encoders" + (" and attention query" if e.kind != R.FOMM_GENERATOR
                                                                else "") + " reused under no_grad while the "
                               "source tensors and their weights are unchanged")
    if not report.patched and not already:
        why = "; ".join(f"{e.path or '<root>'}: {e.reason}" for e in report.left_alone)
        warnings.warn(f"dagan_fast.patch: nothing patched in {type(module).__name__}"
                      + (f" (recognised but left alone: {why})" if why else
                         ": no DaGAN / FOMM DenseMotionNetwork, generator or DepthAwareAttention recognised"),
                      UserWarning, stacklevel=2)
    return report


def _cpu_inference_default(gen: nn.Module) -> bool:
    """The default of channels_last: a generator in eval mode whose weights are CPU float32/bf16.
    Inference only: oneDNN's NHWC train-mode BatchNorm rounds its batch statistics coarsely enough to move the
    small gradients of the convolutions ahead of it by up to ~16% (see tests/test_patch.py)."""
    params = list(gen.parameters())
    return bool(params) and not gen.training and all(
        p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16) for p in params)


def _cpu_default(gen: nn.Module) -> bool:
    """The default of fast_conv: a generator whose weights are CPU float32/bf16, in either mode (its training
    path keeps NCHW activations NCHW, so train-mode BatchNorm rounds as unpatched)."""
    params = list(gen.parameters())
    return bool(params) and all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16) for p in params)


def _children_left_alone(gen: nn.Module, entry: PatchEntry, report: PatchReport) -> List[str]:
    """Names (inside ``gen``) of recognised sub-modules that were not patched: their original forwards may
    rely on their formats and classes, so the generator-wide conversions leave them be."""
    prefix = f"{entry.path}." if entry.path else ""
    patched_paths = {e.path for e in report.patched}
    return [name for name, m in gen.named_modules()
            if name and any(r(m) is not None for r in R.RECOGNISERS) and f"{prefix}{name}" not in patched_paths]


def _fast_convolutions(root: nn.Module, entry: PatchEntry, report: PatchReport, wanted: Optional[bool]) -> None:
    """Swaps the classes of the generator's plain convolutions to FastConv2d / NarrowConv2d / PackedConv2d (see
    ``patch``); records them for unpatch."""
    from ...models.fast_conv import (FastConv2d, NarrowConv2d, _eligible as winograd_eligible, _narrow_eligible,
                                     fast_convolutions_available)
    from ...models.packed_conv import PackedConv2d, packed_convolutions_available

    gen = root.get_submodule(entry.path) if entry.path else root
    if not (_cpu_default(gen) if wanted is None else wanted):
        return
    if not (fast_convolutions_available() and packed_convolutions_available()):
        entry.notes.append("fast_conv: not available here (needs the compiled op library and oneDNN)")
        return
    st = gen.__dict__[_dispatch.STATE_ATTR]
    skip = _children_left_alone(gen, entry, report)
    counts = {FastConv2d: 0, NarrowConv2d: 0, PackedConv2d: 0}
    for name, m in gen.named_modules():
        if type(m) is not nn.Conv2d or m.padding_mode != "zeros" or not isinstance(m.padding, tuple) \
                or any(name.startswith(s + ".") for s in skip):
            continue
        cls = FastConv2d if winograd_eligible(m) else NarrowConv2d if _narrow_eligible(m) else PackedConv2d
        st.retyped.append((m, type(m)))
        m.__class__ = cls
        counts[cls] += 1
    if st.retyped:
        entry.notes.append(f"fast_conv: {counts[FastConv2d]} 3x3 convolutions Winograd-capable, "
                           f"{counts[NarrowConv2d]} with 1-4 output channels on the narrow direct kernel, "
                           f"{counts[PackedConv2d]} others pre-packed for oneDNN (CPU float32; the first two kinds "
                           f"also in training, the packed ones without autograd; unpatch restores their classes)")


def _channels_last(root: nn.Module, entry: PatchEntry, report: PatchReport, wanted: Optional[bool]) -> None:
    """Converts, in place, the 4-d (conv) weights of the generator at ``entry.path`` to channels_last: its own
    sub-networks and its patched DenseMotionNetwork / DepthAwareAttention (a child left alone keeps its
    formats: its original forward may rely on them). Records the converted parameters for unpatch."""
    gen = root.get_submodule(entry.path) if entry.path else root
    st = gen.__dict__[_dispatch.STATE_ATTR]
    if not (_cpu_inference_default(gen) if wanted is None else wanted):
        return
    skip = _children_left_alone(gen, entry, report)
    prefix = f"{entry.path}." if entry.path else ""
    patched_paths = {e.path for e in report.patched}
    states = [st]
    for name, m in gen.named_modules():
        if name and f"{prefix}{name}" in patched_paths:
            states.append(m.__dict__[_dispatch.STATE_ATTR])
    converted = []
    for name, p in gen.named_parameters():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if p.dim() == 4 and p.is_contiguous() and not p.is_contiguous(memory_format=torch.channels_last):
            p.data = p.data.contiguous(memory_format=torch.channels_last)
            converted.append(p)
    if not converted:
        return
    st.converted = converted
    for s_ in states:
        s_.restore_layout = True
    entry.notes.append(f"channels_last: {len(converted)} conv weights stored NHWC (same Parameters and values; "
                       f"unpatch restores them), outputs returned contiguous"
                       + (f"; left in their formats: {', '.join(skip)}" if skip else ""))


def _attention_notes(report: PatchReport) -> None:
    """Keep the generator note about out['attention'] only where its AttnModule was patched."""
    patched_attention = {e.path for e in report.patched if e.kind == R.ATTENTION}
    for e in report.patched:
        if e.kind in (R.DAGAN_GENERATOR, R.SPADE_GENERATOR):
            attn = f"{e.path}.AttnModule" if e.path else "AttnModule"
            if attn not in patched_attention:
                e.notes = [n for n in e.notes if not n.startswith("out['attention']")]


def _script_types():
    import torch.jit
    return (torch.jit.ScriptModule,)


def unpatch(module: nn.Module) -> List[str]:
    """Restores the original forward of every patched module in ``module``'s tree; returns their paths.
    Unpatched trees are fine (returns [])."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"unpatch: expected a torch.nn.Module, got {type(module).__name__}")
    restored = []
    for path, m in module.named_modules():
        st = m.__dict__.pop(_dispatch.STATE_ATTR, None)
        if st is not None:
            for p in st.converted:  # back to the original (plain contiguous) format, values unchanged
                p.data = p.data.contiguous()
            for conv, cls in st.retyped:
                conv.__class__ = cls
                for cache in ("_pack_cache", "_winograd_cache"):
                    conv.__dict__.pop(cache, None)
            st.converted, st.retyped, st.source_cache = [], [], None
            _dispatch.release(m)
            restored.append(path)
    return restored
