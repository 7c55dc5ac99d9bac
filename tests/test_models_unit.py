"""Unit tests of dagan_fast.models, dagan_fast.nn.CrossModalAttention and dagan_fast.checkpoints.

- every official key list (docs/official-keys) loads strictly into our modules, shapes included;
- official-layout files round-trip through ``from_official`` (detection, extras, ``module.``);
- wrong files give errors naming the file and listing keys;
- our safetensors format round-trips bit-exactly;
- ``optimize_for_inference`` equals the unfolded model (fp32 within 1e-5; fp64 to ~1e-10 on a
  network whose BatchNorm statistics are calibrated, i.e. every layer is active);
- input validation, output shapes, source broadcasting and reuse, relative motion, attention.
Images are 128x128 (the smallest size the networks take) to keep the suite fast on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dagan_fast
from dagan_fast import DaGAN, checkpoints
from dagan_fast.checkpoints import CheckpointError, CheckpointMismatchError
from dagan_fast.models import (AntiAliasInterpolation2d, DepthAwareGenerator, DepthDecoder, KPDetector,
                               MultiScaleDiscriminator, ResnetEncoder, SPADEDepthAwareGenerator, SPADEResnetBlock,
                               SpectralNormConv2d, convex_hull_area, normalize_kp)
from dagan_fast.nn import CrossModalAttention

KEYS_DIR = Path(os.environ.get("DAGAN_FAST_OFFICIAL_KEYS", "/work/shared/docs/official-keys"))
SIZE = 128

# Narrow networks (same structure) for the tests of the wrapper's logic: seconds instead of minutes.
TINY = dict(kp_detector={"block_expansion": 8, "max_features": 64},
            generator_params={"block_expansion": 8, "max_features": 32, "num_bottleneck_blocks": 2},
            dense_motion_params={"block_expansion": 8, "max_features": 64})

needs_keys = pytest.mark.skipif(not KEYS_DIR.is_dir(), reason=f"official key lists not found at {KEYS_DIR}")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def read_keys(name: str):
    """{key: (shape, dtype)} from an official key list ("key<TAB>(shape)<TAB>torch.dtype" lines)."""
    out = {}
    for line in (KEYS_DIR / name).read_text().splitlines():
        if not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        dims = tuple(int(d) for d in re.findall(r"\d+", shape))
        out[key] = (dims, getattr(torch, dtype.replace("torch.", "")))
    return out


def tensors_for(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (shape, dtype) in keys.items():
        if dtype.is_floating_point:
            sd[key] = torch.randn(shape, generator=g, dtype=dtype)
        else:
            sd[key] = torch.randint(0, 100, shape, generator=g, dtype=dtype)
    return sd


def smooth_images(seed: int, batch: int = 1, size: int = SIZE) -> torch.Tensor:
    """Smooth random images in [0,1] (face-like frequency content, unlike white noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size // 16, size // 16, generator=g)
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def randomize_(model: DaGAN, seed: int = 0, calibrate: bool = False) -> DaGAN:
    """Random weights with non-trivial BatchNorm statistics, attention gamma and Jacobian head.

    ``calibrate``: He-initialised convolutions and BatchNorm statistics measured on smooth images, so
    every layer works at unit scale (a demanding, chaotic network: use it in float64). Otherwise the
    default PyTorch initialisation with random statistics (a tame network, fine in float32).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("AttnModule.gamma"):
                p.fill_(0.5)
            elif name.endswith("jacobian.weight"):
                p.normal_(0, 0.003 if calibrate else 0.01, generator=g)
            elif name.endswith("jacobian.bias"):
                continue
            elif calibrate and (p.dim() == 4 or name.endswith("weight_orig")):
                p.normal_(0, (2.0 / p[0].numel()) ** 0.5, generator=g)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            if isinstance(m, SpectralNormConv2d):
                # u, v near the top singular vectors, as after training (random ones make sigma ~ 0)
                w = m.weight_orig.flatten(1)
                v = F.normalize(torch.randn(w.shape[1], generator=g, dtype=w.dtype), dim=0)
                for _ in range(20):
                    u = F.normalize(w @ v, dim=0)
                    v = F.normalize(w.t() @ u, dim=0)
                m.weight_u.copy_(u)
                m.weight_v.copy_(v)
        if calibrate:
            bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            images = smooth_images(100, batch=2).to(next(model.parameters()).dtype)
            model(images, images.flip(0))
            model.eval()
            for m in bns:
                m.momentum = 0.1
    return model.eval()


def save_official(model: DaGAN, directory: Path, *, fc_in: int = 512, with_discriminator: bool = False):
    """Writes ``model`` in the authors' layout: checkpoint (.pth.tar, ``module.`` prefixes, optimizer and
    epoch entries), encoder.pth (with height/width/use_stereo and an unused encoder.fc), depth.pth."""
    prefixed = lambda m: {f"module.{k}": v.clone() for k, v in m.state_dict().items()}  # noqa: E731
    ckpt = {"generator": prefixed(model.generator), "kp_detector": prefixed(model.kp_detector), "epoch": 149,
            "optimizer_generator": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0, 1]}]}}
    if with_discriminator:
        ckpt["discriminator"] = prefixed(model.discriminator)
    enc = {k: v.clone() for k, v in model.depth_encoder.state_dict().items()}
    enc.update({"encoder.fc.weight": torch.randn(1000, fc_in), "encoder.fc.bias": torch.randn(1000),
                "height": 256, "width": 256, "use_stereo": False})
    paths = (directory / "model.pth.tar", directory / "encoder.pth", directory / "depth.pth")
    torch.save(ckpt, paths[0])
    torch.save(enc, paths[1])
    torch.save(model.depth_decoder.state_dict(), paths[2])
    return paths


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def plain_model():
    torch.manual_seed(0)
    return randomize_(DaGAN(generator="plain", **TINY), seed=1)


@pytest.fixture(scope="module")
def images():
    return smooth_images(1), smooth_images(2), smooth_images(3)


# --------------------------------------------------------------------------------------------
# strict loading of the official key lists
# --------------------------------------------------------------------------------------------
def _check_module_against(module: torch.nn.Module, key_file: str, drop=()):
    keys = {k: v for k, v in read_keys(key_file).items() if k not in drop}
    ours = {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}
    assert sorted(set(keys) - set(ours)) == [], "missing in our module"
    assert sorted(set(ours) - set(keys)) == [], "ours but not in the official file"
    assert {k: v for k, v in ours.items()} == keys
    result = module.load_state_dict(tensors_for(keys), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@needs_keys
@pytest.mark.parametrize("layers", [18, 50])
def test_depth_keys_load_strict(layers):
    enc = ResnetEncoder(layers)
    _check_module_against(enc, f"ResnetEncoder{layers}_keys.txt", drop=("encoder.fc.weight", "encoder.fc.bias"))
    _check_module_against(DepthDecoder(enc.num_ch_enc), f"DepthDecoder{layers}_keys.txt")


@needs_keys
def test_kp_detector_keys_load_strict():
    _check_module_against(KPDetector(), "KPDetector_keys.txt")


@needs_keys
@pytest.mark.parametrize("cls,key_file", [(DepthAwareGenerator, "DepthAwareGenerator_keys.txt"),
                                          (SPADEDepthAwareGenerator, "SPADEDepthAwareGenerator_keys.txt")])
def test_generator_keys_load_strict(cls, key_file):
    _check_module_against(cls(), key_file)


@needs_keys
def test_discriminator_keys_load_strict():
    _check_module_against(MultiScaleDiscriminator(scales=(1,), block_expansion=32, num_blocks=4, max_features=512,
                                                  num_kp=15, use_kp=True), "MultiScaleDiscriminator_keys.txt")


@needs_keys
@pytest.mark.parametrize("generator,layers", [("plain", 18), ("spade", 50)])
def test_official_key_files_through_from_official(tmp_path, generator, layers):
    """Files built only from the key lists (random tensors of the listed shapes) load end to end."""
    gen_file = "DepthAwareGenerator_keys.txt" if generator == "plain" else "SPADEDepthAwareGenerator_keys.txt"
    ckpt = {"generator": {f"module.{k}": v for k, v in tensors_for(read_keys(gen_file), 1).items()},
            "kp_detector": {f"module.{k}": v for k, v in tensors_for(read_keys("KPDetector_keys.txt"), 2).items()},
            "discriminator": {f"module.{k}": v
                              for k, v in tensors_for(read_keys("MultiScaleDiscriminator_keys.txt"), 3).items()}}
    enc = tensors_for(read_keys(f"ResnetEncoder{layers}_keys.txt"), 4)
    enc.update(height=256, width=256, use_stereo=False)
    torch.save(ckpt, tmp_path / "c.pth.tar")
    torch.save(enc, tmp_path / "e.pth")
    torch.save(tensors_for(read_keys(f"DepthDecoder{layers}_keys.txt"), 5), tmp_path / "d.pth")
    model = DaGAN.from_official(tmp_path / "c.pth.tar", tmp_path / "e.pth", tmp_path / "d.pth",
                                load_discriminator=True)
    assert model.config["generator"] == generator and model.config["depth_layers"] == layers
    assert model.config["num_kp"] == 15 and not model.training
    assert torch.equal(model.generator.state_dict()["first.conv.weight"], ckpt["generator"]["module.first.conv.weight"])
    assert model.discriminator is not None


# --------------------------------------------------------------------------------------------
# from_official
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("generator,layers,num_kp", [("plain", 18, 15), ("spade", 50, 10)])
def test_from_official_detects_and_loads(tmp_path, generator, layers, num_kp):
    torch.manual_seed(0)
    model = DaGAN(generator=generator, depth_layers=layers, num_kp=num_kp)
    paths = save_official(model, tmp_path, fc_in=512 if layers == 18 else 2048)
    loaded = DaGAN.from_official(*paths)
    assert loaded.config["generator"] == generator
    assert loaded.config["depth_layers"] == layers
    assert loaded.config["num_kp"] == num_kp
    assert not loaded.training and loaded.discriminator is None
    assert_same_state(loaded, model)
    # explicit choices that agree are accepted
    DaGAN.from_official(*paths, generator=generator, depth_layers=layers, num_kp=num_kp)


def test_from_official_with_discriminator(tmp_path):
    model = DaGAN(discriminator=True)
    paths = save_official(model, tmp_path, with_discriminator=True)
    loaded = DaGAN.from_official(*paths, load_discriminator=True)
    assert_same_state(loaded.discriminator, model.discriminator)
    assert loaded.config["discriminator"]["scales"] == [1]
    assert DaGAN.from_official(*paths).discriminator is None


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    plain = save_official(DaGAN(generator="plain"), d)
    d50 = tmp_path_factory.mktemp("official50")
    r50 = save_official(DaGAN(generator="spade", depth_layers=50), d50, fc_in=2048)
    return plain, r50


def test_depth_file_as_checkpoint(official_files):
    ckpt, enc, dec = official_files[0]
    with pytest.raises(CheckpointError) as info:
        DaGAN.from_official(enc, enc, dec)
    msg = str(info.value)
    assert str(enc) in msg and "no 'generator'/'kp_detector'" in msg and "depth encoder file" in msg
    with pytest.raises(CheckpointError, match="depth decoder file"):
        DaGAN.from_official(dec, enc, dec)


def test_swapped_depth_files(official_files):
    ckpt, enc, dec = official_files[0]
    with pytest.raises(CheckpointError, match=r"depth encoder .*depth decoder file"):
        DaGAN.from_official(ckpt, dec, enc)
    with pytest.raises(CheckpointError, match=r"depth encoder .*DaGAN checkpoint"):
        DaGAN.from_official(ckpt, ckpt, dec)


def test_truncated_and_garbage_files(official_files, tmp_path):
    ckpt, enc, dec = official_files[0]
    data = Path(ckpt).read_bytes()
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError) as info:
        DaGAN.from_official(truncated, enc, dec)
    assert str(truncated) in str(info.value) and "truncated" in str(info.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="garbage.pth"):
        DaGAN.from_official(ckpt, garbage, dec)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        DaGAN.from_official(ckpt, enc, tmp_path / "nope.pth")


def test_resnet50_depth_with_resnet18_expectation(official_files):
    ckpt, enc, dec = official_files[1]
    with pytest.raises(CheckpointMismatchError) as info:
        DaGAN.from_official(ckpt, enc, dec, depth_layers=18)
    err = info.value
    msg = str(err)
    assert str(enc) in msg and "ResNet-50" in msg
    assert "missing keys" in msg and "unexpected keys" in msg and "shape mismatches" in msg
    assert "encoder.layer1.0.conv3.weight" in err.unexpected
    assert any(k == "encoder.layer1.0.conv1.weight" for k, _, _ in err.mismatched)
    assert re.search(r"\.\.\. and \d+ more", msg)  # long lists are truncated with a count
    assert isinstance(err, ValueError)


def test_mixed_depth_encoder_and_decoder(official_files):
    ckpt18, enc18, dec18 = official_files[0]
    _, _, dec50 = official_files[1]
    with pytest.raises(CheckpointMismatchError) as info:
        DaGAN.from_official(ckpt18, enc18, dec50)
    assert str(dec50) in str(info.value) and "2048 channels" in str(info.value)


def test_wrong_generator_and_num_kp(official_files):
    ckpt, enc, dec = official_files[0]
    with pytest.raises(CheckpointMismatchError) as info:
        DaGAN.from_official(ckpt, enc, dec, generator="spade")
    msg = str(info.value)
    assert str(ckpt) in msg and "DepthAwareGenerator" in msg and "decoder.compress.weight" in msg
    with pytest.raises(CheckpointMismatchError, match="num_kp=10 was asked for, but the file has 15"):
        DaGAN.from_official(ckpt, enc, dec, num_kp=10)
    with pytest.raises(ValueError, match="generator must be"):
        DaGAN.from_official(ckpt, enc, dec, generator="fast")
    with pytest.raises(ValueError, match="depth_layers must be"):
        DaGAN.from_official(ckpt, enc, dec, depth_layers=19)


def test_missing_and_unexpected_generator_keys(official_files, tmp_path):
    ckpt, enc, dec = official_files[0]
    raw = torch.load(ckpt, weights_only=True)
    del raw["generator"]["module.final.bias"]
    raw["generator"]["module.extra.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.pth.tar"
    torch.save(raw, bad)
    with pytest.raises(CheckpointMismatchError) as info:
        DaGAN.from_official(bad, enc, dec)
    assert info.value.missing == ["final.bias"] and info.value.unexpected == ["extra.weight"]
    assert str(bad) in str(info.value)


# --------------------------------------------------------------------------------------------
# our format
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("generator,layers", [("plain", 18), ("spade", 50)])
def test_safetensors_round_trip_bit_exact(tmp_path, generator, layers):
    torch.manual_seed(0)
    model = randomize_(DaGAN(generator=generator, depth_layers=layers, num_kp=10, discriminator=True), seed=3)
    path = tmp_path / "m.safetensors"
    checkpoints.save(model, path)
    loaded = DaGAN.load(path)
    assert loaded.config == model.config
    assert_same_state(loaded, model)
    assert not loaded.training
    meta = checkpoints.read_metadata(path)
    assert meta[checkpoints.FORMAT_KEY] == str(checkpoints.FORMAT_VERSION)
    assert meta[checkpoints.VERSION_KEY] == dagan_fast.__version__


def test_round_trip_same_outputs(tmp_path, plain_model, images):
    path = tmp_path / "m.safetensors"
    plain_model.save(path)
    loaded = DaGAN.load(path)
    with torch.no_grad():
        a = plain_model.animate(*images)["prediction"]
        b = loaded.animate(*images)["prediction"]
    assert torch.equal(a, b)


def test_load_rejects_foreign_files(tmp_path, official_files):
    from safetensors.torch import save_file

    ckpt = official_files[0][0]
    with pytest.raises(CheckpointError, match="not a dagan_fast model file.*from_official"):
        DaGAN.load(ckpt)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a dagan_fast model"):
        DaGAN.load(foreign)
    newer = tmp_path / "newer.safetensors"
    save_file({"x": torch.zeros(2)}, newer, metadata={checkpoints.FORMAT_KEY: "99", checkpoints.CONFIG_KEY: "{}"})
    with pytest.raises(CheckpointError, match="newer"):
        DaGAN.load(newer)
    with pytest.raises(CheckpointError, match="safetensors file, not a PyTorch checkpoint"):
        DaGAN.from_official(newer, *official_files[0][1:])


def test_save_refuses_folded_model(tmp_path):
    model = DaGAN(**TINY).optimize_for_inference()
    with pytest.raises(ValueError, match="before optimizing"):
        checkpoints.save(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_convert_command(tmp_path, official_files, capsys):
    from dagan_fast.cli.convert import add_convert_parser, run_convert

    parser = argparse.ArgumentParser()
    add_convert_parser(parser.add_subparsers(dest="command"))
    ckpt, enc, dec = official_files[0]
    out = tmp_path / "model.safetensors"
    args = parser.parse_args(["convert", "--checkpoint", str(ckpt), "--depth-encoder", str(enc), "--depth-decoder",
                              str(dec), "--out", str(out)])
    assert args.handler(args) == 0
    assert "Wrote" in capsys.readouterr().out
    assert_same_state(DaGAN.load(out), DaGAN.from_official(ckpt, enc, dec))
    from dagan_fast.cli import CommandError

    with pytest.raises(CommandError, match="exists"):
        run_convert(args)
    args = parser.parse_args(["convert", "--checkpoint", str(enc), "--depth-encoder", str(enc), "--depth-decoder",
                              str(dec), "--out", str(tmp_path / "x.safetensors")])
    with pytest.raises(CommandError, match="depth encoder file"):
        run_convert(args)


# --------------------------------------------------------------------------------------------
# optimize_for_inference
# --------------------------------------------------------------------------------------------
def _fold_diffs(model, images, dtype):
    model = model.to(dtype)
    s, d, i = (x.to(dtype) for x in images)
    folded = copy.deepcopy(model).optimize_for_inference()
    with torch.no_grad():
        a = model.animate(s, d, i)
        b = folded.animate(s, d, i)
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in ("prediction", "deformation", "occlusion_map",
                                                             "depth_source", "depth_driving", "mask")}
    diffs["kp"] = float((a["kp_norm"]["value"] - b["kp_norm"]["value"]).abs().max())
    for key in ("prediction", "deformed", "mask", "deformation"):
        assert b[key].is_contiguous(), key  # channels-last inside, plain layout outside
    return diffs, a, folded


@pytest.mark.parametrize("generator", ["plain", "spade"])
def test_optimize_for_inference_fp32(generator, images):
    torch.manual_seed(0)
    model = randomize_(DaGAN(generator=generator), seed=5)
    diffs, out, folded = _fold_diffs(model, images, torch.float32)
    assert out["prediction"].std() > 1e-3  # not a constant output
    assert max(diffs.values()) <= 1e-5, diffs
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and "norm1" not in n for n, m in folded.named_modules())
    assert not any(isinstance(m, SpectralNormConv2d) for m in folded.modules())
    assert folded.depth_decoder.scales == (0,)
    assert folded.generator.first.conv.weight.is_contiguous(memory_format=torch.channels_last)  # CPU default


@pytest.mark.slow
@pytest.mark.parametrize("generator", ["plain", "spade"])
def test_optimize_for_inference_fp64_calibrated(generator, images):
    """Folding is exact algebra: on a network with every layer active the difference is fp64 rounding."""
    torch.manual_seed(0)
    model = randomize_(DaGAN(generator=generator).double(), seed=6, calibrate=True)
    diffs, out, _ = _fold_diffs(model, images, torch.float64)
    assert out["prediction"].std() > 0.05
    assert max(diffs.values()) <= 1e-9, diffs


def test_folded_model_refuses_training():
    model = DaGAN(**TINY).optimize_for_inference()
    assert model.optimize_for_inference() is model
    model.eval()  # still fine
    with pytest.raises(RuntimeError, match="optimize_for_inference"):
        model.train()
    with pytest.raises(RuntimeError, match="optimize_for_inference"):
        model.generator.train()


def test_fold_conv_bn_exact_in_fp64():
    from dagan_fast.models.blocks import DownBlock2d, ResBlock2d, SameBlock2d, UpBlock2d

    torch.manual_seed(0)
    for block in (SameBlock2d(5, 7), DownBlock2d(5, 7), UpBlock2d(5, 7), ResBlock2d(5)):
        block = block.double()
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.1, 3)
                m.weight.data.normal_()
                m.bias.data.normal_()
        block.eval()
        x = torch.randn(2, 5, 8, 8, dtype=torch.float64)
        with torch.no_grad():
            ref = block(x)
            block.fold_batchnorm()
            assert torch.allclose(block(x), ref, rtol=0, atol=1e-12)


def test_spectral_norm_matches_torch():
    torch.manual_seed(0)
    ref = torch.nn.utils.spectral_norm(torch.nn.Conv2d(6, 4, 3, padding=1))
    ours = SpectralNormConv2d(6, 4, 3, padding=1)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 5, 5)
    ref.train(), ours.train()
    assert torch.allclose(ours(x), ref(x), atol=1e-6)  # one power iteration each
    assert torch.allclose(ours.weight_u, ref.weight_u) and torch.allclose(ours.weight_v, ref.weight_v)
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-6)
        assert torch.allclose(ours.to_conv2d()(x), ref(x), atol=1e-6)


# --------------------------------------------------------------------------------------------
# forward, animate, shapes, validation
# --------------------------------------------------------------------------------------------
def test_output_shapes(plain_model, images):
    s, d, i = images
    with torch.no_grad():
        out = plain_model(s, d)
    K = 15
    h = SIZE // 4
    assert out["prediction"].shape == (1, 3, SIZE, SIZE)
    assert out["deformation"].shape == (1, h, h, 2)
    assert out["occlusion_map"].shape == (1, 1, h, h)
    assert out["mask"].shape == (1, K + 1, h, h)
    assert out["sparse_deformed"].shape == (1, K + 1, 3, h, h)
    assert out["deformed"].shape == (1, 3, SIZE, SIZE)
    assert out["depth_source"].shape == out["depth_driving"].shape == (1, 1, SIZE, SIZE)
    for kp in (out["kp_source"], out["kp_driving"]):
        assert kp["value"].shape == (1, K, 2) and kp["jacobian"].shape == (1, K, 2, 2)
    assert "attention" not in out
    assert ((out["prediction"] >= 0) & (out["prediction"] <= 1)).all()
    assert torch.allclose(out["mask"].sum(1), torch.ones(1, h, h), atol=1e-5)


def test_absolute_equals_relative_with_identity_reference(plain_model, images):
    """animate(relative, driving_initial = source) moves kp_source by kp_d - kp_s: the absolute motion."""
    s, d, _ = images
    with torch.no_grad():
        a = plain_model(s, d)
        b = plain_model.animate(s, d, s)
        c = plain_model.animate(s, d, relative=False)
    assert torch.allclose(a["prediction"], b["prediction"], atol=1e-5)
    assert torch.equal(a["prediction"], c["prediction"])


def test_batch_broadcast_and_prepared_source(plain_model, images):
    s, d, i = images
    d2 = torch.cat([d, i])
    with torch.no_grad():
        batched = plain_model.animate(s, d2, i)
        single = [plain_model.animate(s, d2[k:k + 1], i) for k in range(2)]
        prepared = plain_model.prepare_source(s)
        reused = plain_model.animate(prepared, d2, plain_model.keypoints(i))
    for k in range(2):
        assert torch.allclose(batched["prediction"][k:k + 1], single[k]["prediction"], atol=1e-5)
    assert torch.allclose(reused["prediction"], batched["prediction"], atol=1e-5)


def test_return_attention(plain_model, images):
    s, d, _ = images
    with torch.no_grad():
        out = plain_model(s, d, return_attention=True)
        ref = plain_model(s, d)
    n = (SIZE // 4) ** 2
    assert out["attention"].shape == (1, n, n)
    assert torch.allclose(out["attention"].sum(-1), torch.ones(1, n), atol=1e-5)
    assert torch.allclose(out["prediction"], ref["prediction"], atol=1e-5)


@pytest.mark.parametrize("bad,exc,pattern", [
    (lambda x: x[:, :2], ValueError, "source must have 3 channels"),
    (lambda x: x[0], ValueError, r"source must be 4-D .*unsqueeze\(0\)"),
    (lambda x: (x * 255).to(torch.uint8), TypeError, r"source has dtype torch.uint8.*/ 255"),
    (lambda x: x.masked_fill(torch.zeros_like(x, dtype=torch.bool).index_fill_(3, torch.tensor([3]), True),
                             float("nan")), ValueError, "source contains NaN"),
    (lambda x: x[..., :120, :], ValueError, "source is 120x128.*multiples of 128"),
    (lambda x: x * 255, ValueError, r"source must be in \[0,1\].*divide by 255"),
    (lambda x: x.double(), TypeError, "source has dtype torch.float64 but the model's weights are torch.float32"),
    (lambda x: x.numpy(), TypeError, "source must be a torch.Tensor"),
    (lambda x: x.permute(0, 2, 3, 1)[:, :, :3], ValueError, "channels last"),
])
def test_input_validation(plain_model, images, bad, exc, pattern):
    s, d, _ = images
    with pytest.raises(exc, match=pattern):
        plain_model(bad(s), d)


def test_batch_and_reference_validation(plain_model, images):
    s, d, i = images
    with pytest.raises(ValueError, match="source has batch size 2 but driving has 3"):
        plain_model(torch.cat([s, s]), torch.cat([d, d, d]))
    with pytest.raises(ValueError, match="needs driving_initial"):
        plain_model.animate(s, d)
    with pytest.raises(ValueError, match="driving_initial must have 3 channels"):
        plain_model.animate(s, d, i[:, :1])


# --------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------
def test_normalize_kp_and_hull():
    assert convex_hull_area([[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5]]) == pytest.approx(1.0)
    assert convex_hull_area([[0, 0], [1, 1], [2, 2]]) == 0.0
    g = torch.Generator().manual_seed(0)
    mk = lambda: {"value": torch.rand(1, 5, 2, generator=g) * 2 - 1,  # noqa: E731
                  "jacobian": torch.eye(2) + 0.1 * torch.randn(1, 5, 2, 2, generator=g)}
    src, drv, ini = mk(), mk(), mk()
    out = normalize_kp(src, drv, ini, use_relative_movement=True, use_relative_jacobian=True)
    assert torch.allclose(out["value"], src["value"] + drv["value"] - ini["value"])
    expected_jac = drv["jacobian"] @ torch.linalg.inv(ini["jacobian"]) @ src["jacobian"]
    assert torch.allclose(out["jacobian"], expected_jac, atol=1e-6)
    # adapt scale: a source twice as wide as the initial driving frame moves twice as far
    ini2 = {"value": src["value"] / 2, "jacobian": ini["jacobian"]}
    out = normalize_kp(src, drv, ini2, adapt_movement_scale=True, use_relative_movement=True)
    assert torch.allclose(out["value"], src["value"] + 2 * (drv["value"] - ini2["value"]), atol=1e-5)
    assert normalize_kp(src, drv, ini)["value"] is drv["value"]


def test_antialias_matches_official_formula():
    torch.manual_seed(0)
    down = AntiAliasInterpolation2d(4, 0.25)
    assert down.weight.shape == (4, 1, 13, 13)
    assert torch.allclose(down.weight.sum((1, 2, 3)), torch.ones(4))
    x = torch.rand(2, 4, 128, 96)
    ref = F.conv2d(F.pad(x, (6, 6, 6, 6)), down.weight, groups=4)[:, :, ::4, ::4]
    assert torch.allclose(down(x), ref, atol=1e-6) and down(x).shape == (2, 4, 32, 24)


def test_cross_modal_attention_matches_naive():
    torch.manual_seed(0)
    attn = CrossModalAttention(64)
    with torch.no_grad():
        attn.gamma.fill_(0.7)
    src, feat = torch.randn(2, 64, 8, 6), torch.randn(2, 64, 8, 6)
    with torch.no_grad():
        q = F.relu(attn.query_conv(src)).flatten(2).transpose(1, 2)
        k = F.relu(attn.key_conv(feat)).flatten(2)
        v = F.relu(attn.value_conv(feat)).flatten(2)
        amap = torch.softmax(torch.bmm(q, k), dim=-1)  # DaGAN: no 1/sqrt(d)
        ref = 0.7 * torch.bmm(v, amap.transpose(1, 2)).view(2, 64, 8, 6) + feat
        out = attn(src, feat)
        out2, amap2 = attn(src, feat, return_attention=True)
    assert attn.query_conv.out_channels == 8 and attn.scale == 1.0
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(out2, ref, atol=1e-5)
    assert torch.allclose(attn.attention_map(src, feat), amap, atol=1e-6) and torch.allclose(amap2, amap, atol=1e-6)
    with pytest.raises(ValueError, match="max_tokens"):
        attn.attention_map(src, feat, max_tokens=10)


def test_depth_decoder_scales_and_kp_detector_shapes():
    torch.manual_seed(0)
    enc = ResnetEncoder(18).eval()
    dec = DepthDecoder(enc.num_ch_enc).eval()
    x = torch.rand(1, 3, 128, 64)
    with torch.no_grad():
        feats = enc(x)
        assert [f.shape[1] for f in feats] == [64, 64, 128, 256, 512]
        all_scales = dec(feats)
        only0 = dec(feats, scales=(0,))
    assert sorted(all_scales) == [("disp", s) for s in range(4)]
    assert all_scales[("disp", 1)].shape == (1, 1, 64, 32)
    assert list(only0) == [("disp", 0)] and torch.equal(only0[("disp", 0)], all_scales[("disp", 0)])
    kp = KPDetector().eval()
    with torch.no_grad():
        out = kp(torch.rand(2, 4, 128, 128))
    assert out["value"].shape == (2, 15, 2) and out["jacobian"].shape == (2, 15, 2, 2)
    assert torch.allclose(out["jacobian"], torch.eye(2).expand(2, 15, 2, 2))  # official init: identity


def test_discriminator_forward():
    torch.manual_seed(0)
    disc = MultiScaleDiscriminator(scales=(1,), num_kp=15)
    x = torch.rand(2, 3, 128, 128)
    kp = {"value": torch.rand(2, 15, 2) * 2 - 1}
    out = disc(x, kp)
    assert [f.shape[1] for f in out["feature_maps_1"]] == [64, 128, 256, 512]
    assert out["prediction_map_1"].shape == (2, 1, 10, 10)
    assert torch.equal(disc({"prediction_1": x}, kp)["prediction_map_1"], out["prediction_map_1"])


def test_spade_block_inference_conversion():
    torch.manual_seed(0)
    block = SPADEResnetBlock(16, 8, label_nc=7).eval()
    x, seg = torch.randn(1, 16, 8, 8), torch.rand(1, 7, 32, 32)
    with torch.no_grad():
        ref = block(x, seg)
        block.to_inference()
        assert torch.allclose(block(x, seg), ref, atol=1e-5)
    assert not any(isinstance(m, SpectralNormConv2d) for m in block.modules())


def test_package_exports():
    assert dagan_fast.DaGAN is DaGAN
    assert "DaGAN" in dagan_fast.__all__
