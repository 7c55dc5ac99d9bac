"""The fused forwards that ``patch`` binds, one per recognised kind, and the per-instance patch state.

Each forward computes what the official forward computes (official-interfaces.md), calling the module's
own submodules (so their weights, hooks, train/eval behaviour and autograd are the module's) and replacing
only the hot glue by ``dagan_fast.ops``:

- DenseMotionNetwork: heatmaps + deformed sources -> ``ops.sparse_motion_inputs`` (the hourglass input,
  (B,(K+1)(C+1),h,w), official interleaved order); mask softmax + motion mixture -> ``ops.dense_motion``.
- generators: ``deform_input`` + occlusion product -> ``ops.warp_occlusion`` (the deformation bilinearly
  resized to the features first when sizes differ, as ``deform_input`` does); the ``deformed`` image too.
- DepthAwareAttention: ``gamma * softmax(Q K^T) V + feat`` -> ``ops.cross_modal_attention`` (flash, no
  (B,N,N) map; the tuple's map is None).

Before anything runs, a forward checks what could make it differ from the original (autocast, dtypes,
devices, shapes, non-finite inputs, near-singular driving Jacobians, extra arguments) and then runs the
original forward instead, recording why (``PatchState.fallbacks``). Inside the generators each fused step
has the original expression as a local fallback, so a late problem (e.g. non-finite features) never
re-runs submodules.
"""
from __future__ import annotations

import inspect
import threading
import warnings
from collections import Counter
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ... import ops
from ...ops.layout import is_channels_last
from . import _dispatch
from . import _recognise as R

Tensor = torch.Tensor
_FALLBACK = object()


class PatchState:
    """Per-instance patch state (in the instance ``__dict__``, shared with DataParallel replicas).

    kind: recognised kind; forward: the fused forward ``fn(module, state, arguments) -> output or
    _FALLBACK``; keys: output keys to produce; extra_params: non-official forward parameters and their
    defaults; backend: forced ops backend or None; fallbacks: Counter of call-time fallback reasons."""

    def __init__(self, kind: str, path: str, forward: Callable, keys, extra_params: Dict[str, object],
                 backend: Optional[str], keep_attention_map: bool, cache_source: bool = False):
        self.kind, self.path, self.forward = kind, path, forward
        self.keys = frozenset(keys)
        self.extra_params = dict(extra_params)
        self.backend, self.keep_attention_map = backend, keep_attention_map
        self.fallbacks: Counter = Counter()
        self.cache_source = cache_source
        # channels_last execution: the 4-d conv weights this patch converted (restored by unpatch), and
        # whether 4-d outputs are made contiguous again (returned in the layout the original returns)
        self.converted: list = []
        self.retyped: list = []   # (conv module, its original class) swapped by fast_conv (restored by unpatch)
        self.restore_layout = False
        self.source_cache = None  # (key, held source tensors, results) of the last source-side computation
        self.cache_hits = 0
        self.owner: Optional[type] = None  # the class whose forward dispatcher serves this instance
        self._lock = threading.Lock()
        self._signature = None

    def __getstate__(self):  # picklable (torch.save of a whole patched model): no lock, no signature cache
        d = dict(self.__dict__)
        d.pop("_lock", None)
        d["_signature"] = None
        d["forward"] = self.forward.__name__
        d["source_cache"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.__dict__.setdefault("retyped", [])
        self._lock = threading.Lock()
        self.forward = FORWARDS_BY_NAME[d["forward"]]

    def record(self, reason: str) -> None:
        with self._lock:
            first = reason not in self.fallbacks
            self.fallbacks[reason] += 1
        if first:
            warnings.warn(f"dagan_fast.patch: {self.path or type(self).__name__} ({self.kind}) ran its original "
                          f"forward/expression: {reason}", RuntimeWarning, stacklevel=4)

    def call(self, module, original: Callable, args, kwargs):
        if self._signature is None:
            self._signature = inspect.signature(original)
        try:
            bound = self._signature.bind(module, *args, **kwargs)
        except TypeError:
            return original(module, *args, **kwargs)  # the original raises its own error
        bound.apply_defaults()
        arguments = bound.arguments
        for name, default in self.extra_params.items():
            if name in arguments and arguments[name] is not default and not _same_default(arguments[name], default):
                self.record(f"called with the non-official argument {name!r}")
                return original(module, *args, **kwargs)
        out = self.forward(module, self, arguments)
        if out is _FALLBACK:
            out = original(module, *args, **kwargs)
        return _plain_layout(out) if self.restore_layout and self.kind != R.ATTENTION else out


def _same_default(value, default) -> bool:
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return False
    try:
        return bool(value == default)
    except Exception:
        return False


def _plain_layout(out):
    """4-d channels_last (not plain contiguous) tensors of an output dict / tuple / tensor made contiguous: the
    layout the original forward returns, so that callers' ``.view`` keeps working."""
    if isinstance(out, torch.Tensor):
        return out.contiguous() if is_channels_last(out) else out
    if isinstance(out, dict):
        plain = {k: _plain_layout(v) for k, v in out.items()}
        if all(plain[k] is v for k, v in out.items()):
            return out
        out = out.copy()  # the same dict type
        out.update(plain)
        return out
    if isinstance(out, tuple):
        return tuple(_plain_layout(v) for v in out)
    return out


def _to_channels_last(x):
    return x.contiguous(memory_format=torch.channels_last) if isinstance(x, torch.Tensor) and x.dim() == 4 else x


# ------------------------------------------------------------------------------------------ source cache
def _tensor_key(t: Tensor) -> tuple:
    return (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad)


def _modules_key(modules) -> tuple:
    key = []
    for m in modules:
        key.append(m.training)
        for t in list(m.parameters()) + list(m.buffers()):
            key.append((id(t), t.data_ptr(), t._version))
    return tuple(key)


def _cacheable(sources, modules) -> bool:
    """Source-side results may be reused only where no autograd graph through them is needed: grad disabled,
    or neither the source inputs nor the sub-networks' parameters require grad. Never while compiling."""
    if torch.compiler.is_compiling():
        return False
    if not all(isinstance(t, torch.Tensor) and not t.is_inference() for t in sources):
        return False  # inference tensors keep no version counter
    if not torch.is_grad_enabled():
        return True
    return not any(t.requires_grad for t in sources) and \
        not any(p.requires_grad for m in modules for p in m.parameters())


def _source_side(state: "PatchState", sources, modules, compute: Callable):
    """``compute()`` (a tuple of source-only results), or the results cached by the previous call when the
    key matches: the identity (data_ptr; the cache holds the tensors, so the address is not reused by another
    tensor), ``_version``, shape, stride, dtype and device of every source input, and the train/eval mode and
    ``_version`` of every parameter and buffer of the sub-networks (taken before computing, so a train-mode
    BatchNorm update, which bumps its running statistics, never hits)."""
    if not (state.cache_source and _cacheable(sources, modules)):
        return compute()
    key = (torch.is_grad_enabled(),) + tuple(_tensor_key(t) for t in sources) + _modules_key(modules)
    entry = state.source_cache
    if entry is not None and entry[0] == key:
        state.cache_hits += 1
        return entry[2]
    state.source_cache = None
    results = compute()
    state.source_cache = (key, tuple(sources), results)
    return results


# ------------------------------------------------------------------------------------------ checks
def _checks_possible(t: Tensor) -> bool:
    """Value checks sync the device; skipped while compiling or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return t.device.type != "meta"


def _autocast_on(t: Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(t.device.type)
    except TypeError:  # older torch: no device argument
        return torch.is_autocast_enabled() if t.is_cuda else torch.is_autocast_cpu_enabled()


def _tensor_reason(name: str, t, ndim: int, ref: Optional[Tensor] = None) -> Optional[str]:
    if not isinstance(t, torch.Tensor):
        return f"{name} is not a tensor"
    if t.dtype not in R.FLOAT_DTYPES:
        return f"unsupported dtype {t.dtype} of {name}"
    if t.dim() != ndim:
        return f"{name} is {t.dim()}-D, not {ndim}-D"
    if ref is not None and (t.dtype != ref.dtype or t.device != ref.device):
        return f"{name} is {t.dtype} on {t.device}, the image {ref.dtype} on {ref.device}"
    return None


@torch.no_grad()
def _finite_flags(tensors) -> Tensor:
    """One boolean tensor: every element of every tensor finite (a sum per tensor, exact check on overflow)."""
    sums = torch.stack([t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).double()
                        for t in tensors])
    return torch.isfinite(sums).all()


@torch.no_grad()
def _all_finite(tensors) -> bool:
    tensors = [t for t in tensors if t is not None and t.numel()]
    if not tensors or not _checks_possible(tensors[0]):
        return True
    if bool(_finite_flags(tensors)):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)  # a sum may overflow where no element is inf


# ------------------------------------------------------------------------------------------ dense motion
def _keypoints(kp_source, kp_driving):
    """(kp_s, jac_s, kp_d, jac_d) as the official create_sparse_motions reads them: the Jacobians only
    when the driving dict has one (then the source's is required)."""
    if "jacobian" in kp_driving:
        return kp_source["value"], kp_source["jacobian"], kp_driving["value"], kp_driving["jacobian"]
    return kp_source["value"], None, kp_driving["value"], None


@torch.no_grad()
def _motion_reason(module, source: Tensor, kp_source, kp_driving) -> Optional[str]:
    reason = _tensor_reason("source_image", source, 4)
    if reason:
        return reason
    if _autocast_on(source):
        return "autocast is enabled (the original's ops follow autocast's casting rules)"
    if not (isinstance(kp_source, dict) and isinstance(kp_driving, dict)) or "value" not in kp_source \
            or "value" not in kp_driving or ("jacobian" in kp_driving and "jacobian" not in kp_source):
        return "keypoints are not official keypoint dicts"
    B, K = source.shape[0], module.num_kp
    kp_s, jac_s, kp_d, jac_d = _keypoints(kp_source, kp_driving)
    for name, t, shape in (("kp_source value", kp_s, (B, K, 2)), ("kp_driving value", kp_d, (B, K, 2)),
                           ("kp_source jacobian", jac_s, (B, K, 2, 2)), ("kp_driving jacobian", jac_d, (B, K, 2, 2))):
        if t is None:
            continue
        reason = _tensor_reason(name, t, len(shape), source)
        if reason:
            return reason
        if tuple(t.shape) != shape:
            return f"{name} is {tuple(t.shape)}, expected {shape} (batch {B}, num_kp {K})"
    if not _checks_possible(source):
        return None
    flags = [_finite_flags([source, kp_s, kp_d] + ([jac_s, jac_d] if jac_d is not None else []))]
    if jac_d is not None:
        det = jac_d[..., 0, 0] * jac_d[..., 1, 1] - jac_d[..., 0, 1] * jac_d[..., 1, 0]
        flags.append((det.abs() >= ops.reference.JACOBIAN_DET_FLOOR).all())
    if not bool(torch.stack(flags).all()):
        if jac_d is not None and not bool(flags[1]):
            return (f"a driving Jacobian has |det| < {ops.reference.JACOBIAN_DET_FLOOR:g} (the fused ops floor it; "
                    f"the original inverts it)")
        if not _all_finite([source, kp_s, kp_d, jac_s, jac_d]):
            return "non-finite values in the image or keypoints"
    return None


def dense_motion_forward(self, state: PatchState, a: dict):
    """DenseMotionNetwork.forward(source_image (B,C,H,W), kp_driving, kp_source) -> {"sparse_deformed":
    (B,K+1,C,h,w), "mask": (B,K+1,h,w), "deformation": (B,h,w,2), "occlusion_map": (B,1,h,w) (with an
    occlusion head), "sparse_motion": (B,K+1,h,w,2) (only if the original returns it)}, (h,w) = (H,W) *
    scale_factor."""
    source_image, kp_driving, kp_source = a["source_image"], a["kp_driving"], a["kp_source"]
    reason = _motion_reason(self, source_image, kp_source, kp_driving)
    if reason:
        state.record(reason)
        return _FALLBACK
    if self.scale_factor != 1:
        source_image = self.down(source_image)
    B, C, h, w = source_image.shape
    K = self.num_kp
    kp_s, jac_s, kp_d, jac_d = _keypoints(kp_source, kp_driving)
    with ops.skip_value_checks():  # checked above, in one sync
        inputs = ops.sparse_motion_inputs(source_image, kp_s, jac_s, kp_d, jac_d, float(self.kp_variance),
                                          backend=state.backend)
    out = {"sparse_deformed": inputs.view(B, K + 1, C + 1, h, w)[:, :, 1:]}
    motions = None
    if "sparse_motion" in state.keys:
        motions = out["sparse_motion"] = self.create_sparse_motions(source_image, kp_driving, kp_source)
    prediction = self.hourglass(inputs)
    mask_logits = self.mask(prediction)
    if _tensor_reason("mask logits", mask_logits, 4, kp_s) is None and not _autocast_on(mask_logits) \
            and _all_finite([mask_logits]):
        with ops.skip_value_checks():
            deformation, mask = ops.dense_motion(mask_logits, kp_s, jac_s, kp_d, jac_d, backend=state.backend)
    else:  # the original expression
        state.record("mask logits non-finite or of another dtype: the original mixture")
        if motions is None:
            motions = self.create_sparse_motions(source_image, kp_driving, kp_source)
        mask = F.softmax(mask_logits, dim=1)
        deformation = (motions.permute(0, 1, 4, 2, 3) * mask.unsqueeze(2)).sum(dim=1).permute(0, 2, 3, 1)
    out["mask"] = mask
    out["deformation"] = deformation
    if self.occlusion is not None:
        out["occlusion_map"] = torch.sigmoid(self.occlusion(prediction))
    return out


# ------------------------------------------------------------------------------------------ generators
def _resize_grid(deformation: Tensor, size) -> Tensor:
    """(B,h,w,2) -> (B,H,W,2) as deform_input resizes it (bilinear, align_corners False), else itself."""
    if tuple(deformation.shape[1:3]) == tuple(size):
        return deformation
    d = F.interpolate(deformation.permute(0, 3, 1, 2), size=tuple(size), mode="bilinear")
    return d.permute(0, 2, 3, 1)


def _warp(state: PatchState, inp: Tensor, deformation: Tensor, occlusion: Optional[Tensor]) -> Tensor:
    """deform_input(inp, deformation) [* occlusion resized to inp's size] through ops.warp_occlusion, or
    the original expression where the op could differ (autocast, dtypes, devices, non-finite values)."""
    grid = _resize_grid(deformation, inp.shape[2:])
    if occlusion is not None and tuple(occlusion.shape[2:]) != tuple(inp.shape[2:]):
        occlusion = F.interpolate(occlusion, size=inp.shape[2:], mode="bilinear")
    reason = (_tensor_reason("features", inp, 4) or _tensor_reason("deformation", grid, 4, inp)
              or (_tensor_reason("occlusion map", occlusion, 4, inp) if occlusion is not None else None))
    if reason is None and _autocast_on(inp):
        reason = "autocast is enabled"
    if reason is None and occlusion is not None and occlusion.shape[1] != 1:
        reason = f"occlusion map has {occlusion.shape[1]} channels"
    if reason is None and grid.shape[0] != inp.shape[0]:
        reason = "deformation and features differ in batch"
    if reason is None and _checks_possible(inp):
        # inf in the grid reads zeros in both; NaN anywhere takes the original path
        grid_ok = not bool(torch.isnan(grid).any())
        if not grid_ok or not _all_finite([inp, occlusion]):
            reason = "non-finite features, deformation or occlusion"
    if reason is not None:
        state.record(reason + ": the original grid_sample")
        out = F.grid_sample(inp, grid)
        return out * occlusion if occlusion is not None else out
    with ops.skip_value_checks():
        return ops.warp_occlusion(inp, grid, occlusion, backend=state.backend)


def generator_forward(self, state: PatchState, a: dict):
    """OcclusionAwareGenerator / DepthAwareGenerator / SPADEDepthAwareGenerator forward -> the official dict:
    "mask", "sparse_deformed", "occlusion_map" (with occlusion), "deformed" (B,C,H,W), "prediction"
    (B,C,H,W), and for DaGAN "attention" (None unless the attention module computes it); "deformation"
    (B,h,w,2) only where the original forward returns it."""
    source_image, kp_driving, kp_source = a["source_image"], a["kp_driving"], a["kp_source"]
    dagan = state.kind in (R.DAGAN_GENERATOR, R.SPADE_GENERATOR)
    encoder_input = _to_channels_last(source_image) if state.converted else source_image
    depth = (_to_channels_last(a["source_depth"]) if state.converted else a["source_depth"]) if dagan else None
    attn = self.AttnModule if dagan else None
    fused_query = dagan and _query_reusable(attn)
    modules = [self.first, self.down_blocks] + ([self.src_first, self.src_down_blocks] if dagan else []) \
        + ([attn.query_conv] if fused_query else [])

    def source_side():
        enc = self.first(encoder_input)
        for block in self.down_blocks:
            enc = block(enc)
        if not dagan:
            return enc, None, None
        src = self.src_first(depth)
        for block in self.src_down_blocks:
            src = block(src)
        query = _activation(attn, attn.query_conv(src)) if fused_query and _attention_reason(src, enc) is None \
            else None
        return enc, src, query

    out, src_out, query = _source_side(state, [source_image] + ([a["source_depth"]] if dagan else []), modules,
                                       source_side)
    output_dict = {}
    dense_motion = self.dense_motion_network(source_image=source_image, kp_driving=kp_driving, kp_source=kp_source)
    output_dict["mask"] = dense_motion["mask"]
    output_dict["sparse_deformed"] = dense_motion["sparse_deformed"]
    occlusion_map = dense_motion.get("occlusion_map")
    if occlusion_map is not None:
        output_dict["occlusion_map"] = occlusion_map
    deformation = dense_motion["deformation"]
    if "deformation" in state.keys:
        output_dict["deformation"] = deformation
    out = _warp(state, out, deformation, occlusion_map)
    if dagan:
        if query is not None and _attention_reason(src_out, out) is None:
            # the patched attention with the cached source-side query (no hooks on it: see _query_reusable)
            out, attention = _attention(attn, attn.__dict__[_dispatch.STATE_ATTR], src_out, out, query)
        else:
            out, attention = attn(src_out, out)
    output_dict["deformed"] = _warp(state, source_image, deformation, None)
    if dagan:
        output_dict["attention"] = attention
    if state.kind == R.SPADE_GENERATOR:
        deformed_image = output_dict["deformed"]
        if occlusion_map is not None:
            if tuple(deformed_image.shape[2:]) != tuple(occlusion_map.shape[2:]):
                occlusion_map = F.interpolate(occlusion_map, size=deformed_image.shape[2:], mode="bilinear")
            deformed_image = deformed_image * occlusion_map
        output_dict["prediction"] = self.decoder(out, deformed_image)
        return output_dict
    out = self.bottleneck(out)
    for block in self.up_blocks:
        out = block(out)
    out = self.final(out)
    output_dict["prediction"] = torch.sigmoid(out)
    return output_dict


# ------------------------------------------------------------------------------------------ attention
def _activation(self, x: Tensor) -> Tensor:
    act = getattr(self, "activation", None)
    return act(x) if act is not None else F.relu(x)


def _attention_reason(source, feat) -> Optional[str]:
    reason = _tensor_reason("source", source, 4) or _tensor_reason("feat", feat, 4, source)
    if reason is None and _autocast_on(source):
        reason = "autocast is enabled"
    if reason is None and source.shape != feat.shape:
        reason = f"source {tuple(source.shape)} and feat {tuple(feat.shape)} differ in shape"
    return reason


def _query_reusable(attn) -> bool:
    """Whether the generator may run ``attn``'s fused forward itself with a cached query: ``attn`` is patched
    here (the fused attention forward serves it) and has no hooks that a direct call would skip."""
    st = attn.__dict__.get(_dispatch.STATE_ATTR)
    if st is None or st.forward is not attention_forward or st.owner is None:
        return False
    if getattr(type(attn).forward, "_dagan_fast_original", None) is None \
            or st.owner is not _dispatch._owner(type(attn)):
        return False
    if attn._forward_hooks or attn._forward_pre_hooks or attn.query_conv._forward_hooks \
            or attn.query_conv._forward_pre_hooks:
        return False
    from torch.nn.modules import module as _m
    return not (_m._global_forward_hooks or _m._global_forward_pre_hooks)


def attention_forward(self, state: PatchState, a: dict):
    """DepthAwareAttention.forward(source (B,Cs,H,W), feat (B,C,H,W)) -> (gamma * softmax(Q K^T) V + feat
    (B,C,H,W), None): Q = ReLU(query_conv(source)), K, V from feat, no 1/sqrt(d), never a (B,N,N) map."""
    source, feat = a["source"], a["feat"]
    reason = _attention_reason(source, feat)
    if reason:
        state.record(reason)
        return _FALLBACK
    return _attention(self, state, source, feat)


def _attention(self, state: PatchState, source: Tensor, feat: Tensor, query: Optional[Tensor] = None):
    """The fused attention; ``query``: ReLU(query_conv(source)) when the caller has it already."""
    B, C, H, W = feat.shape
    if query is None:
        query = _activation(self, self.query_conv(source))
    key = _activation(self, self.key_conv(feat))
    value = _activation(self, self.value_conv(feat))
    gamma = self.gamma
    if (query.dtype != value.dtype or gamma.dtype != value.dtype or value.shape[1] != C
            or not _all_finite([query, key, value])):
        # the original expression from here (materialised, as the official code)
        state.record("non-finite projections or mixed dtypes: the original materialised attention")
        energy = torch.bmm(query.flatten(2).permute(0, 2, 1), key.flatten(2))
        attention = torch.softmax(energy, dim=-1)
        o = torch.bmm(value.flatten(2), attention.permute(0, 2, 1)).view(B, -1, H, W)
        return gamma * o + feat, attention
    q = query.flatten(2).transpose(1, 2).unsqueeze(1)   # (B,1,N,Dqk)
    k = key.flatten(2).transpose(1, 2).unsqueeze(1)     # (B,1,N,Dqk)
    v = value.flatten(2).transpose(1, 2).unsqueeze(1)   # (B,1,N,C)
    residual = feat.flatten(2).transpose(1, 2).unsqueeze(1)
    with ops.skip_value_checks():
        o = ops.cross_modal_attention(q.contiguous(), k.contiguous(), v.contiguous(), 1.0, residual=residual,
                                      gamma=gamma, backend=state.backend)
    o = o.squeeze(1).transpose(1, 2).reshape(B, C, H, W)  # channels_last strides
    if state.restore_layout and not is_channels_last(feat):
        o = o.contiguous()  # called directly with a plain feature map: the original's layout
    return o, None


FORWARDS = {R.DENSE_MOTION: dense_motion_forward, R.FOMM_GENERATOR: generator_forward,
            R.DAGAN_GENERATOR: generator_forward, R.SPADE_GENERATOR: generator_forward,
            R.ATTENTION: attention_forward}
FORWARDS_BY_NAME = {f.__name__: f for f in FORWARDS.values()}
