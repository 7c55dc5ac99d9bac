"""Checkpoints: the authors' files (``load_official``) and our own format (``save`` / ``load``).

Official files: ``DaGAN_vox_adv_256.pth.tar`` / ``SPADE_DaGAN_vox_adv_256.pth.tar`` (a dict with
``generator`` and ``kp_detector`` state_dicts, keys prefixed ``module.``), ``encoder.pth`` (monodepth2
ResnetEncoder plus ``height``/``width``/``use_stereo`` and an unused ``encoder.fc``) and ``depth.pth``
(DepthDecoder). They load with ``torch.load(weights_only=True)``, unchanged.

Our format: one safetensors file holding the full ``DaGAN`` state_dict (unfolded), with the config as
JSON in the metadata (``dagan_fast.config``) and a format version (``dagan_fast.format``).
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

Tensor = torch.Tensor
PathLike = Union[str, "os.PathLike[str]"]

FORMAT_KEY = "dagan_fast.format"
FORMAT_VERSION = 1
MODEL_KEY = "dagan_fast.model"
CONFIG_KEY = "dagan_fast.config"
VERSION_KEY = "dagan_fast.version"
IMAGE_SIZE_KEY = "dagan_fast.image_size"   # the side the model was trained at (optional)

DEPTH_ENCODER_EXTRAS = ("height", "width", "use_stereo", "encoder.fc.weight", "encoder.fc.bias")
LIST_LIMIT = 10


class CheckpointError(ValueError):
    """A file that cannot be used: unreadable, truncated, or not the kind of file expected."""


class CheckpointMismatchError(CheckpointError):
    """A state_dict that does not fit the model: ``missing``, ``unexpected`` keys and ``mismatched``
    (key, file shape, model shape), all listed in the message with the file name."""

    def __init__(self, message: str, path: str = "", missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 mismatched: Sequence[Tuple[str, tuple, tuple]] = ()):
        super().__init__(message)
        self.path = path
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _listing(items: Sequence[str], limit: int = LIST_LIMIT) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _looks_like_safetensors(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 31)


def _torch_load(path: PathLike, map_location, what: str):
    """torch.load(weights_only=True) with errors that name the file and say what went wrong."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{what} {path} is a directory, not a file")
    if _looks_like_safetensors(path):
        raise CheckpointError(f"{what} {path} is a safetensors file, not a PyTorch checkpoint; dagan_fast files "
                              "load with DaGAN.load(path)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # the loader raises many types for bad files; all mean "cannot use this file"
        detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc):
            raise CheckpointError(f"{what} {path} holds Python objects that torch.load(weights_only=True) refuses "
                                  f"(the official files hold only tensors, ints and dicts) ({detail})") from exc
        raise CheckpointError(f"could not read {what} {path}: the file is truncated, corrupt or not a PyTorch "
                              f"checkpoint ({detail})") from exc


def strip_prefix(state_dict: Dict[str, object], prefix: str = "module.") -> Dict[str, object]:
    """The state_dict with a leading ``prefix`` (DDP's ``module.``) removed from every key that has it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def _describe_contents(obj) -> str:
    """A guess at what a loaded file is, for error messages."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    keys = set(strip_prefix({str(k): None for k in obj}))
    if "encoder.conv1.weight" in keys or {"height", "width", "use_stereo"} & keys:
        return "a depth encoder file (encoder.pth); pass it as depth_encoder"
    if "decoder.0.conv.conv.weight" in keys:
        return "a depth decoder file (depth.pth); pass it as depth_decoder"
    if "first.conv.weight" in keys:
        return "a bare generator state_dict (the checkpoint must hold 'generator' and 'kp_detector')"
    if "kp.weight" in keys:
        return "a bare keypoint-detector state_dict (the checkpoint must hold 'generator' and 'kp_detector')"
    if "generator" in keys:
        return "a DaGAN checkpoint (.pth.tar); pass it as checkpoint"
    return "an unknown dict (top-level keys: " + _listing(sorted(map(str, keys)), 8) + ")"


def _state_dict(obj, path: str, what: str) -> Dict[str, object]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, not a state_dict")
    return strip_prefix({str(k): v for k, v in obj.items()})


def check_state_dict(module: torch.nn.Module, state_dict: Dict[str, object], path: str, part: str,
                     hint: str = "") -> None:
    """Raises CheckpointMismatchError (missing, unexpected, shape-mismatched keys; file named) unless
    ``state_dict`` fits ``module`` exactly."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = []
    for key, ref in expected.items():
        if key not in state_dict:
            continue
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            mismatched.append((key, type(value).__name__, tuple(ref.shape)))
        elif tuple(value.shape) != tuple(ref.shape):
            mismatched.append((key, tuple(value.shape), tuple(ref.shape)))
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{path}: the {part} weights do not fit dagan_fast's {type(module).__name__}",
             f"  missing keys ({len(missing)}): {_listing(missing) or 'none'}",
             f"  unexpected keys ({len(unexpected)}): {_listing(unexpected) or 'none'}",
             f"  shape mismatches ({len(mismatched)}): "
             f"{_listing([f'{k}: file {f} vs model {m}' for k, f, m in mismatched]) or 'none'}"]
    if hint:
        lines.append(f"  hint: {hint}")
    raise CheckpointMismatchError("\n".join(lines), path, missing, unexpected, mismatched)


def load_checked(module: torch.nn.Module, state_dict: Dict[str, object], path: str, part: str,
                 hint: str = "") -> None:
    """``check_state_dict`` then ``load_state_dict(strict=True)``."""
    check_state_dict(module, state_dict, path, part, hint)
    module.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------------------------
# detection from keys
# --------------------------------------------------------------------------------------------
def detect_generator(state_dict: Dict[str, object]) -> Optional[str]:
    """"spade" (has ``decoder.compress.weight``), "plain" (has ``bottleneck.r0...``) or None."""
    if "decoder.compress.weight" in state_dict:
        return "spade"
    if any(k.startswith("bottleneck.r0.") for k in state_dict):
        return "plain"
    return None


def detect_resnet_layers(state_dict: Dict[str, object]) -> Optional[int]:
    """ResNet depth (18, 34, 50, 101, 152) of a monodepth2 encoder state_dict, from its keys; None if
    the layout is none of these."""
    from ..models.depth import RESNET_LAYOUTS

    kind = "bottleneck" if "encoder.layer1.0.conv3.weight" in state_dict else "basic"
    counts = []
    for stage in range(1, 5):
        prefix = f"encoder.layer{stage}."
        indices = {int(k[len(prefix):].split(".")[0]) for k in state_dict
                   if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
        counts.append(max(indices) + 1 if indices else 0)
    for layers, (k, c) in RESNET_LAYOUTS.items():
        if k == kind and tuple(c) == tuple(counts):
            return layers
    return None


def _decoder_hint(decoder_sd: Dict[str, object]) -> str:
    w = decoder_sd.get("decoder.0.conv.conv.weight")
    if isinstance(w, torch.Tensor) and w.dim() == 4:
        enc = "ResNet-18/34" if w.shape[1] == 512 else "ResNet-50/101/152" if w.shape[1] == 2048 else "another"
        return f"this depth decoder takes {w.shape[1]} channels from the encoder ({enc}); pair it with its own encoder"
    return ""


# --------------------------------------------------------------------------------------------
# official files
# --------------------------------------------------------------------------------------------
def read_official(checkpoint: PathLike, depth_encoder: PathLike, depth_decoder: PathLike, map_location="cpu"):
    """Reads the three official files -> (checkpoint dict, encoder state_dict, decoder state_dict),
    ``module.`` stripped and the encoder's extras dropped; raises CheckpointError naming a wrong file."""
    ckpt_path, enc_path, dec_path = map(os.fspath, (checkpoint, depth_encoder, depth_decoder))
    ckpt = _torch_load(ckpt_path, map_location, "checkpoint")
    if not isinstance(ckpt, dict) or "generator" not in ckpt or "kp_detector" not in ckpt:
        raise CheckpointError(f"checkpoint {ckpt_path} has no 'generator'/'kp_detector' entries; it looks like "
                              f"{_describe_contents(ckpt)}. The checkpoint is DaGAN_vox_adv_256.pth.tar or "
                              "SPADE_DaGAN_vox_adv_256.pth.tar; the depth files go to depth_encoder (encoder.pth) "
                              "and depth_decoder (depth.pth).")
    parts = {"generator": _state_dict(ckpt["generator"], ckpt_path, "checkpoint's generator"),
             "kp_detector": _state_dict(ckpt["kp_detector"], ckpt_path, "checkpoint's kp_detector")}
    if isinstance(ckpt.get("discriminator"), dict):
        parts["discriminator"] = _state_dict(ckpt["discriminator"], ckpt_path, "checkpoint's discriminator")

    enc_raw = _torch_load(enc_path, map_location, "depth encoder")
    enc = _state_dict(enc_raw, enc_path, "depth encoder")
    if "encoder.conv1.weight" not in enc:
        raise CheckpointError(f"depth encoder {enc_path} has no 'encoder.conv1.weight'; it looks like "
                              f"{_describe_contents(enc_raw)}")
    for key in DEPTH_ENCODER_EXTRAS:
        enc.pop(key, None)

    dec_raw = _torch_load(dec_path, map_location, "depth decoder")
    dec = _state_dict(dec_raw, dec_path, "depth decoder")
    if "decoder.0.conv.conv.weight" not in dec:
        raise CheckpointError(f"depth decoder {dec_path} has no 'decoder.0.conv.conv.weight'; it looks like "
                              f"{_describe_contents(dec_raw)}")
    return parts, enc, dec


def load_official(checkpoint: PathLike, depth_encoder: PathLike, depth_decoder: PathLike, *,
                  generator: str = "auto", depth_layers: Union[str, int] = "auto", num_kp: Optional[int] = None,
                  map_location="cpu", load_discriminator: bool = False):
    """The authors' checkpoint + depth files -> ``DaGAN`` in eval mode, loaded strictly.

    ``generator``: "auto" | "plain" | "spade"; ``depth_layers``: "auto" | 18 | 50 (34, 101, 152 too);
    ``num_kp``: None (from ``kp.weight``) or the expected count. An explicit choice that disagrees with
    the files, or keys that do not fit, raise ``CheckpointMismatchError`` naming the file and listing
    missing keys, unexpected keys and shape mismatches. ``load_discriminator``: also build and load the
    checkpoint's ``discriminator`` (training only).
    """
    from ..models.generator import GENERATOR_KINDS
    from ..models.registry import model_class
    from ..models.depth import RESNET_LAYOUTS

    if generator not in ("auto", *GENERATOR_KINDS):
        raise ValueError(f"generator must be 'auto', 'plain' or 'spade', got {generator!r}")
    if depth_layers != "auto" and depth_layers not in RESNET_LAYOUTS:
        raise ValueError(f"depth_layers must be 'auto' or one of {sorted(RESNET_LAYOUTS)}, got {depth_layers!r}")
    if num_kp is not None and (not isinstance(num_kp, int) or num_kp < 1):
        raise ValueError(f"num_kp must be None or a positive int, got {num_kp!r}")
    ckpt_path, enc_path, dec_path = map(os.fspath, (checkpoint, depth_encoder, depth_decoder))
    parts, enc, dec = read_official(ckpt_path, enc_path, dec_path, map_location)
    gen_sd, kp_sd = parts["generator"], parts["kp_detector"]

    found_generator = detect_generator(gen_sd)
    if found_generator is None and generator == "auto":
        raise CheckpointError(f"checkpoint {ckpt_path}: its generator is neither DaGAN's DepthAwareGenerator (no "
                              "'bottleneck.r0.*') nor SPADEDepthAwareGenerator (no 'decoder.compress.weight'); "
                              f"generator keys start with: {_listing(sorted(gen_sd), 8)}")
    found_layers = detect_resnet_layers(enc)
    if found_layers is None and depth_layers == "auto":
        raise CheckpointError(f"depth encoder {enc_path}: not a ResNet-18/34/50/101/152 layout dagan_fast knows")
    kp_weight = kp_sd.get("kp.weight")
    found_kp = int(kp_weight.shape[0]) if isinstance(kp_weight, torch.Tensor) and kp_weight.dim() == 4 else None
    if found_kp is None and num_kp is None:
        raise CheckpointError(f"checkpoint {ckpt_path}: its kp_detector has no 'kp.weight' (K,C,7,7) to read num_kp "
                              "from")
    jac = kp_sd.get("jacobian.weight")
    chosen_kp = num_kp if num_kp is not None else found_kp
    config = {
        "generator": found_generator if generator == "auto" else generator,
        "depth_layers": found_layers if depth_layers == "auto" else int(depth_layers),
        "num_kp": chosen_kp,
        "estimate_jacobian": jac is not None,
        "single_jacobian_map": isinstance(jac, torch.Tensor) and jac.shape[0] == 4 and chosen_kp != 1,
    }
    if load_discriminator:
        if "discriminator" not in parts:
            raise CheckpointError(f"checkpoint {ckpt_path} has no 'discriminator' entry (load_discriminator=True)")
        config["discriminator"] = _discriminator_config(parts["discriminator"])
    model = model_class("DaGAN")(config)

    gen_hint = ""
    if found_generator and found_generator != config["generator"]:
        names = {"plain": "DepthAwareGenerator", "spade": "SPADEDepthAwareGenerator"}
        gen_hint = (f"generator={generator!r} was asked for, but the file holds a {names[found_generator]} "
                    f"({found_generator!r}); use generator='auto'")
    kp_hint = ""
    if found_kp is not None and found_kp != chosen_kp:
        kp_hint = f"num_kp={num_kp} was asked for, but the file has {found_kp} keypoints; use num_kp=None"
    layers_hint = ""
    if found_layers != config["depth_layers"]:
        layers_hint = (f"depth_layers={depth_layers!r} was asked for, but the file holds a "
                       f"{'ResNet-' + str(found_layers) if found_layers else 'different'} encoder; "
                       "use depth_layers='auto'")
    load_checked(model.depth_encoder, enc, enc_path, "depth encoder", layers_hint)
    load_checked(model.depth_decoder, dec, dec_path, "depth decoder", _decoder_hint(dec))
    load_checked(model.kp_detector, kp_sd, ckpt_path, "kp_detector", kp_hint)
    load_checked(model.generator, gen_sd, ckpt_path, "generator", gen_hint or kp_hint)
    if load_discriminator:
        load_checked(model.discriminator, parts["discriminator"], ckpt_path, "discriminator", kp_hint)
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model.eval()


def _discriminator_config(sd: Dict[str, object]) -> dict:
    """Discriminator parameters read from its keys (scales, spectral norm, blocks, widths)."""
    scales = sorted({k.split(".")[1] for k in sd if k.startswith("discs.")})
    if not scales:
        return {}
    first = scales[0]
    blocks = {int(k.split(".")[3]) for k in sd if k.startswith(f"discs.{first}.down_blocks.")}
    sn = f"discs.{first}.conv.weight_orig" in sd
    w0 = sd.get(f"discs.{first}.down_blocks.0.conv.weight" + ("_orig" if sn else ""))
    cfg = {"scales": [float(s.replace("-", ".")) if "-" in s else int(s) for s in scales], "sn": sn}
    if blocks:
        cfg["num_blocks"] = max(blocks) + 1
    if isinstance(w0, torch.Tensor):
        cfg["block_expansion"] = int(w0.shape[0]) // 2
    return cfg


# --------------------------------------------------------------------------------------------
# our format
# --------------------------------------------------------------------------------------------
def save(model, path: PathLike) -> None:
    """Writes ``model`` (a DaGAN, not folded) as one safetensors file: its state_dict, with the config
    (JSON), the format version, the dagan_fast version and, when the model has an ``image_size`` attribute
    (the side it was trained at), that size in the metadata. Written atomically."""
    from .._version import __version__

    path = os.fspath(path)
    if getattr(model, "inference_only", False):
        raise ValueError("checkpoints.save: this model went through optimize_for_inference(); save the model before "
                         "optimizing (files hold the unfolded weights) and optimize after DaGAN.load")
    from safetensors.torch import save_file

    tensors, seen = {}, {}
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ptr in seen:
            t = t.clone()  # safetensors refuses shared storage
        seen[ptr] = key
        tensors[key] = t
    metadata = {FORMAT_KEY: str(FORMAT_VERSION), MODEL_KEY: type(model).__name__,
                CONFIG_KEY: json.dumps(model.config, sort_keys=True), VERSION_KEY: __version__}
    image_size = getattr(model, "image_size", None)
    if image_size is not None:
        metadata[IMAGE_SIZE_KEY] = str(int(image_size))
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise




def read_metadata(path: PathLike, model: Optional[str] = None) -> Dict[str, str]:
    """The safetensors metadata of a dagan_fast file; CheckpointError if the file is not one, or holds
    another model than ``model`` ("DaGAN", "DaGANpp"; None: either)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path} is not a dagan_fast model file (not a readable safetensors file: "
                              f"{type(exc).__name__}: {exc}). Official DaGAN checkpoints (.pth.tar + encoder.pth + "
                              "depth.pth) load with DaGAN.from_official(...) or convert with `dagan-fast convert`") \
            from exc
    if FORMAT_KEY not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a dagan_fast model (no '{FORMAT_KEY}' in its "
                              "metadata); convert official checkpoints with `dagan-fast convert`")
    try:
        version = int(metadata[FORMAT_KEY])
    except ValueError:
        raise CheckpointError(f"{path}: bad format version {metadata[FORMAT_KEY]!r}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} uses dagan_fast format {version}, newer than this version reads "
                              f"({FORMAT_VERSION}); upgrade dagan_fast")
    from ..models.registry import model_names

    stored = metadata.setdefault(MODEL_KEY, "DaGAN")
    if stored not in model_names():
        raise CheckpointError(f"{path} holds a {stored!r} model; this version reads {', '.join(model_names())}")
    if model is not None and stored != model:
        raise CheckpointError(f"{path} holds a {stored!r} model, not {model} (load it with "
                              f"dagan_fast.{stored}.load or dagan_fast.checkpoints.load)")
    return metadata


def load(path: PathLike, map_location="cpu", model: Optional[str] = None):
    """Reads a file written by ``save`` -> the ``DaGAN``, ``DaGANpp`` or ``FaceDepthNetwork`` it holds, in
    eval mode (strict load, bit-exact weights), with ``image_size`` set when the file records the size the
    model was trained at. ``model``: require that class by name."""
    from safetensors.torch import load_file

    from ..models.registry import model_class

    path = os.fspath(path)
    metadata = read_metadata(path, model)
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: missing or unreadable config in the metadata ({exc})") from None
    device = str(map_location) if map_location is not None else "cpu"
    try:
        tensors = load_file(path, device=device)
    except Exception as exc:
        raise CheckpointError(f"could not read the tensors of {path}: truncated or corrupt "
                              f"({type(exc).__name__}: {exc})") from exc
    net = model_class(metadata[MODEL_KEY])(config)
    load_checked(net, tensors, path, "model")
    if IMAGE_SIZE_KEY in metadata:
        try:
            net.image_size = int(metadata[IMAGE_SIZE_KEY])
        except ValueError:
            raise CheckpointError(f"{path}: bad image size {metadata[IMAGE_SIZE_KEY]!r} in the metadata") from None
    return net.to(device).eval()


def load_depth_networks(model, path: PathLike) -> None:
    """Copies the depth network (``depth_encoder`` + ``depth_decoder``) of the dagan_fast file ``path`` (a
    FaceDepthNetwork from ``training.train_depth``, or a DaGAN / DaGAN++ model) into ``model``'s, in place.
    CheckpointMismatchError when the two depth networks differ in shape (e.g. another ResNet depth or width)."""
    path = os.fspath(path)
    source = load(path)
    for part in ("depth_encoder", "depth_decoder"):
        load_checked(getattr(model, part), getattr(source, part).state_dict(), path, part)
