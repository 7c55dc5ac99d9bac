"""Structural recognition of the official DaGAN / FOMM modules (official-interfaces.md), never by
importing the authors' code: attributes, method names, forward signatures and, where the source is
available, a look at what the forward writes into its output dict and how it calls ``grid_sample`` /
``interpolate`` (``ast``; nothing is executed).

Each ``recognise_*`` returns ``None`` (not that kind of module), or a ``Recognised`` with either the
facts the patched forward needs or the reason it must be left alone.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# kinds
DENSE_MOTION = "DenseMotionNetwork"
FOMM_GENERATOR = "OcclusionAwareGenerator"
DAGAN_GENERATOR = "DepthAwareGenerator"
SPADE_GENERATOR = "SPADEDepthAwareGenerator"
ATTENTION = "DepthAwareAttention"

# the op family each kind runs through (the ``ops=`` names of ``patch``)
OP_FAMILY = {DENSE_MOTION: "motion", FOMM_GENERATOR: "warp", DAGAN_GENERATOR: "warp", SPADE_GENERATOR: "warp",
             ATTENTION: "attention"}

# forward parameters (after self) per kind, as official-interfaces.md gives them
SIGNATURES = {
    DENSE_MOTION: ("source_image", "kp_driving", "kp_source"),
    FOMM_GENERATOR: ("source_image", "kp_driving", "kp_source"),
    DAGAN_GENERATOR: ("source_image", "kp_driving", "kp_source", "source_depth", "driving_depth"),
    SPADE_GENERATOR: ("source_image", "kp_driving", "kp_source", "source_depth", "driving_depth"),
    ATTENTION: ("source", "feat"),
}

# output keys: the official ones, and the extra ones the patched forward can also produce exactly when the
# module's own forward writes them (``sparse_motion``: a DenseMotionNetwork variant that returns its
# (B,K+1,h,w,2) motions; ``deformation``: a generator that passes the dense motion field on)
_DM_KEYS = frozenset({"sparse_deformed", "mask", "deformation", "occlusion_map"})
_DM_EXTRA = frozenset({"sparse_motion"})
_FOMM_KEYS = frozenset({"mask", "sparse_deformed", "occlusion_map", "deformed", "prediction"})
_GEN_EXTRA = frozenset({"deformation"})
OFFICIAL_KEYS = {DENSE_MOTION: _DM_KEYS, FOMM_GENERATOR: _FOMM_KEYS,
                 DAGAN_GENERATOR: _FOMM_KEYS | {"attention"}, SPADE_GENERATOR: _FOMM_KEYS | {"attention"}}
PRODUCIBLE_KEYS = {DENSE_MOTION: _DM_KEYS | _DM_EXTRA, FOMM_GENERATOR: _FOMM_KEYS | _GEN_EXTRA,
                   DAGAN_GENERATOR: OFFICIAL_KEYS[DAGAN_GENERATOR] | _GEN_EXTRA,
                   SPADE_GENERATOR: OFFICIAL_KEYS[SPADE_GENERATOR] | _GEN_EXTRA}
_REQUIRED_KEYS = {DENSE_MOTION: {"mask", "deformation"}, FOMM_GENERATOR: {"prediction", "mask"},
                  DAGAN_GENERATOR: {"prediction", "mask"}, SPADE_GENERATOR: {"prediction", "mask"}}


@dataclass
class Recognised:
    """What recognition found. ``reason`` set: recognised, but must be left alone. ``keys``: the output
    keys the patched forward produces (subset of PRODUCIBLE_KEYS). ``extra_params``: forward parameters
    beyond the official ones (name -> default); a call that passes one falls back to the original."""

    kind: str
    reason: Optional[str] = None
    keys: FrozenSet[str] = frozenset()
    extra_params: Dict[str, object] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ helpers
def _is_conv(m, out_channels: Optional[int] = None, kernel: Optional[int] = None, padding: Optional[int] = None) -> bool:
    if not isinstance(m, nn.Conv2d):
        return False
    if out_channels is not None and m.out_channels != out_channels:
        return False
    if kernel is not None and tuple(m.kernel_size) != (kernel, kernel):
        return False
    if padding is not None and (m.padding != (padding, padding) or m.padding_mode != "zeros"):
        return False
    return tuple(m.stride) == (1, 1) and tuple(m.dilation) == (1, 1) and m.groups == 1


def _own_dtypes_reason(module: nn.Module) -> Optional[str]:
    for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if t is not None and t.is_floating_point() and t.dtype not in FLOAT_DTYPES:
            return f"unsupported dtype {t.dtype} of {name}"
    for child_name in ("mask", "occlusion", "query_conv", "key_conv", "value_conv"):
        child = getattr(module, child_name, None)
        if isinstance(child, nn.Module):
            for name, p in child.named_parameters():
                if not p.is_floating_point() or p.dtype not in FLOAT_DTYPES:
                    return f"unsupported dtype {p.dtype} of {child_name}.{name} (the fused ops take " \
                           f"float16, bfloat16, float32, float64)"
    return None


def _signature_reason(fn: Callable, expected: Sequence[str]) -> Tuple[Optional[str], Dict[str, object]]:
    """Checks that ``fn(self, ...)`` takes ``expected`` first (by name, positionally); other parameters must
    have defaults. Returns (reason or None, {extra name: default})."""
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError) as exc:
        return f"forward has no inspectable signature ({exc})", {}
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if names[:len(expected)] != list(expected):
        got = ", ".join(p.name for p in params)
        return f"forward({got}) is not the official forward({', '.join(expected)})", {}
    extra = {}
    for p in params:
        if p.name in expected:
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            extra[p.name] = () if p.kind == p.VAR_POSITIONAL else {}
        elif p.default is p.empty:
            return f"forward has an extra required parameter {p.name!r}", {}
        else:
            extra[p.name] = p.default
    return None, extra


def _function_ast(fn: Callable) -> Optional[ast.AST]:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None


def _called_self_methods(tree: ast.AST) -> Tuple[Set[str], Set[str]]:
    """(names called as ``self.name(...)``, names called as ``super().name(...)``)."""
    names, supers = set(), set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        value = node.func.value
        if isinstance(value, ast.Name) and value.id == "self":
            names.add(node.func.attr)
        elif isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super":
            supers.add(node.func.attr)
    return names, supers


def _super_function(cls: type, name: str) -> Optional[Callable]:
    for klass in cls.__mro__[1:]:
        if name in klass.__dict__:
            attr = klass.__dict__[name]
            attr = getattr(attr, "_dagan_fast_original", attr)
            return attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
    return None


def _method_trees(cls: type, fn: Callable, depth: int = 3) -> Optional[List[Tuple[str, ast.AST]]]:
    """The ASTs of ``fn`` and of the plain methods of ``cls`` it calls as ``self.name(...)`` (recursively);
    None when ``fn``'s source is unavailable."""
    tree = _function_ast(fn)
    if tree is None:
        return None
    out, seen, frontier = [("forward", tree)], {"forward"}, [tree]
    for _ in range(depth):
        nxt = []
        for t in frontier:
            names, supers = _called_self_methods(t)
            targets = [(n, inspect.getattr_static(cls, n, None)) for n in names - seen]
            targets += [(f"super().{n}", _super_function(cls, n)) for n in supers if f"super().{n}" not in seen]
            for name, attr in targets:
                seen.add(name)
                if isinstance(attr, (staticmethod, classmethod)):
                    attr = attr.__func__
                attr = getattr(attr, "_dagan_fast_original", attr)
                if inspect.isfunction(attr):
                    sub = _function_ast(attr)
                    if sub is not None:
                        out.append((name, sub))
                        nxt.append(sub)
        frontier = nxt
    return out


def _written_keys(trees: Sequence[Tuple[str, ast.AST]]) -> Set[str]:
    """String keys a function stores into a dict: ``d["k"] = ...``, ``d.update(k=..)``/``({"k": ..})``,
    dict literals and ``dict(k=...)``."""
    keys: Set[str] = set()
    for _, tree in trees:
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for target in targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Subscript) and isinstance(t.ctx, ast.Store):
                        s = t.slice
                        if isinstance(s, ast.Constant) and isinstance(s.value, str):
                            keys.add(s.value)
            if isinstance(node, ast.Dict):
                keys.update(k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
            if isinstance(node, ast.Call):
                fname = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                if fname in ("update", "dict"):
                    keys.update(kw.arg for kw in node.keywords if kw.arg)
    return keys


def _call_name(node: ast.Call) -> Optional[str]:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else (f.id if isinstance(f, ast.Name) else None)


def _const(node) -> Tuple[bool, object]:
    if isinstance(node, ast.Constant):
        return True, node.value
    return False, None


def _sampling_reason(trees: Sequence[Tuple[str, ast.AST]]) -> Optional[str]:
    """``grid_sample`` must use its defaults (bilinear, zeros, align_corners False) and ``interpolate``
    bilinear with align_corners False/None, as the official code does."""
    for where, tree in trees:
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            if name == "grid_sample":
                if len(node.args) > 2:
                    return f"{where}: grid_sample with positional mode arguments (cannot verify bilinear/zeros)"
                wanted = {"mode": ("bilinear",), "padding_mode": ("zeros",), "align_corners": (False, None)}
                for kw in node.keywords:
                    if kw.arg is None:
                        return f"{where}: grid_sample(**kwargs) (cannot verify its mode)"
                    if kw.arg in wanted:
                        ok, value = _const(kw.value)
                        if not ok or value not in wanted[kw.arg]:
                            shown = ast.unparse(kw.value) if hasattr(ast, "unparse") else "?"
                            return (f"non-default grid_sample {kw.arg}={shown} in {where} (the fused warp is "
                                    f"bilinear, zeros padding, align_corners=False)")
            elif name in ("interpolate", "upsample"):
                mode = None
                if len(node.args) > 3:
                    mode = node.args[3]
                for kw in node.keywords:
                    if kw.arg is None:
                        return f"{where}: {name}(**kwargs) (cannot verify its mode)"
                    if kw.arg == "mode":
                        mode = kw.value
                    if kw.arg == "align_corners":
                        ok, value = _const(kw.value)
                        if not ok or value not in (False, None):
                            return f"{where}: {name} with align_corners={ast.unparse(kw.value)} (official: False)"
                ok, value = _const(mode) if mode is not None else (True, "nearest")
                if not ok or value != "bilinear":
                    return f"{where}: {name} with mode={value!r} where the official code resizes bilinearly"
    return None


def _keys_check(kind: str, cls: type, forward: Callable, rec: Recognised) -> Optional[str]:
    trees = _method_trees(cls, forward)
    if trees is None:
        rec.keys = OFFICIAL_KEYS[kind]
        rec.notes.append("forward source unavailable: assumed the official forward and output keys")
        return None
    written = _written_keys(trees)
    unknown = written - PRODUCIBLE_KEYS[kind]
    if unknown:
        return (f"its forward also returns {', '.join(sorted(map(repr, unknown)))}, which the fused forward does "
                f"not compute")
    missing = _REQUIRED_KEYS[kind] - written
    if missing:
        return f"its forward does not write {', '.join(sorted(map(repr, missing)))}: not the official forward"
    rec.keys = frozenset(written)
    return None


def _forward_function(module: nn.Module) -> Callable:
    from . import _dispatch
    return _dispatch.original_forward(type(module))


# ------------------------------------------------------------------------------------------ recognisers
def recognise_dense_motion(module: nn.Module) -> Optional[Recognised]:
    """DaGAN's / FOMM's DenseMotionNetwork: hourglass, mask (7x7 -> K+1), occlusion (7x7 -> 1 or None),
    num_kp, scale_factor, kp_variance, down (when scale_factor != 1), the create_* methods."""
    needed = ("hourglass", "mask", "num_kp", "scale_factor", "kp_variance")
    if not all(hasattr(module, a) for a in needed) or not hasattr(module, "occlusion"):
        return None
    if not all(callable(getattr(module, m, None)) for m in
               ("create_heatmap_representations", "create_sparse_motions", "create_deformed_source_image")):
        return None
    rec = Recognised(DENSE_MOTION)
    num_kp = module.num_kp
    if not isinstance(num_kp, int) or num_kp < 1:
        rec.reason = f"num_kp = {num_kp!r} is not a positive int"
        return rec
    if not _is_conv(module.mask, num_kp + 1, 7, 3):
        rec.reason = f"mask is not a 7x7 padding-3 Conv2d to num_kp + 1 = {num_kp + 1} channels"
        return rec
    if module.occlusion is not None and not _is_conv(module.occlusion, 1):
        rec.reason = "occlusion is neither None nor a Conv2d to 1 channel"
        return rec
    if module.scale_factor != 1 and not isinstance(getattr(module, "down", None), nn.Module):
        rec.reason = f"scale_factor = {module.scale_factor} but no down module"
        return rec
    variance = module.kp_variance
    if isinstance(variance, bool) or not isinstance(variance, (int, float)) or not variance > 0:
        rec.reason = f"kp_variance = {variance!r} is not a positive number"
        return rec
    forward = _forward_function(module)
    rec.reason, rec.extra_params = _signature_reason(forward, SIGNATURES[DENSE_MOTION])
    rec.reason = rec.reason or _own_dtypes_reason(module) or _keys_check(DENSE_MOTION, type(module), forward, rec)
    if rec.reason is None:
        trees = _method_trees(type(module), forward) or []
        deform = _function_ast(getattr(type(module), "create_deformed_source_image"))
        rec.reason = _sampling_reason(trees + ([("create_deformed_source_image", deform)] if deform else []))
    return rec


def _generator_kind(module: nn.Module) -> Optional[str]:
    if not all(hasattr(module, a) for a in ("first", "down_blocks", "dense_motion_network")):
        return None
    if not callable(getattr(module, "deform_input", None)):
        return None
    decoder_parts = all(hasattr(module, a) for a in ("bottleneck", "up_blocks", "final"))
    if all(hasattr(module, a) for a in ("src_first", "src_down_blocks", "AttnModule")):
        if hasattr(module, "decoder") and not decoder_parts:
            return SPADE_GENERATOR
        return DAGAN_GENERATOR if decoder_parts else None
    return FOMM_GENERATOR if decoder_parts else None


def recognise_generator(module: nn.Module) -> Optional[Recognised]:
    """FOMM's OcclusionAwareGenerator, DaGAN's DepthAwareGenerator / SPADEDepthAwareGenerator."""
    kind = _generator_kind(module)
    if kind is None:
        return None
    rec = Recognised(kind)
    if module.dense_motion_network is None:
        rec.reason = "no dense_motion_network: the generator does not warp, nothing to fuse"
        return rec
    forward = _forward_function(module)
    rec.reason, rec.extra_params = _signature_reason(forward, SIGNATURES[kind])
    rec.reason = rec.reason or _keys_check(kind, type(module), forward, rec)
    if rec.reason is None:
        trees = _method_trees(type(module), forward) or []
        deform = _function_ast(getattr(type(module), "deform_input"))
        rec.reason = _sampling_reason(trees + ([("deform_input", deform)] if deform else []))
    return rec


def recognise_attention(module: nn.Module) -> Optional[Recognised]:
    """DaGAN's DepthAwareAttention: query_conv, key_conv, value_conv (1x1), scalar gamma,
    forward(source, feat) -> (gamma * softmax(Q K^T) V + feat, attention)."""
    if not all(hasattr(module, a) for a in ("query_conv", "key_conv", "value_conv", "gamma")):
        return None
    rec = Recognised(ATTENTION)
    q, k, v = module.query_conv, module.key_conv, module.value_conv
    if not all(_is_conv(c, kernel=1, padding=0) for c in (q, k, v)):
        rec.reason = "query_conv / key_conv / value_conv are not all plain 1x1 Conv2d"
        return rec
    if q.out_channels != k.out_channels or k.in_channels != v.in_channels or v.out_channels != v.in_channels:
        rec.reason = (f"projection shapes do not match DaGAN's (query {q.in_channels}->{q.out_channels}, key "
                      f"{k.in_channels}->{k.out_channels}, value {v.in_channels}->{v.out_channels})")
        return rec
    gamma = module.gamma
    if not isinstance(gamma, torch.Tensor) or gamma.numel() != 1:
        rec.reason = "gamma is not a one-element tensor"
        return rec
    activation = getattr(module, "activation", None)
    if activation is not None and type(activation) is not nn.ReLU:
        rec.reason = f"activation is {type(activation).__name__}, not ReLU"
        return rec
    softmax = getattr(module, "softmax", None)
    if softmax is not None and not (isinstance(softmax, nn.Softmax) and softmax.dim in (-1, 2)):
        rec.reason = "softmax is not nn.Softmax(dim=-1)"
        return rec
    forward = _forward_function(module)
    rec.reason, rec.extra_params = _signature_reason(forward, SIGNATURES[ATTENTION])
    rec.reason = rec.reason or _own_dtypes_reason(module)
    if rec.reason is None:
        tree = _function_ast(forward)
        if tree is None:
            rec.notes.append("forward source unavailable: assumed the official forward")
        elif any(isinstance(n, ast.Call) and _call_name(n) in ("sqrt", "rsqrt") for n in ast.walk(tree)):
            rec.reason = "its forward scales the energy (the official one does not)"
    return rec


RECOGNISERS = (recognise_generator, recognise_dense_motion, recognise_attention)
