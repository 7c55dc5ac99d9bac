"""DaGAN++ through training/train.py: the bundled configs (``daganpp``: the paper's model with DaGAN's
training; ``daganpp_tiny``: CPU-sized), a few CPU steps of ``daganpp_tiny`` (finite decreasing losses,
gradients in every trainable parameter of the keypoint detector, generator and the trainer's own
discriminator), bit-exact resume, the user model file as a plain DaGANpp file, and the CLI."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_every_parameter_has_gradient
from dagan_fast import checkpoints
from dagan_fast.checkpoints import CheckpointError
from dagan_fast.models.dagan import DEFAULT_DISCRIMINATOR
from dagan_fast.models.daganpp import PAPER_PARAMETERS, DaGANpp, DaGANppConfig, make_daganpp_config
from dagan_fast.models.discriminator import MultiScaleDiscriminator
from training.configs import load_config
from training.train import DISCRIMINATOR_FILE, MODEL_FILE, STATE_FILE, Trainer, build_clips, build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(lr=None):
    cfg = load_config("daganpp_tiny")
    cfg["data"]["synthetic"] = {"num_clips": 2, "num_frames": 6}
    if lr is not None:
        for k in ("lr_generator", "lr_kp_detector", "lr_discriminator"):
            cfg["train"][k] = lr
    return cfg


def _trainer(cfg, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the random-VGG substitute warns
        return Trainer(cfg, build_clips(cfg, seed=0), str(out), batch_size=2)


def _write(tmp_path, name, cfg):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
def test_daganpp_config_is_the_paper_model_with_dagans_training():
    cfg = load_config("daganpp")
    dagan = load_config("dagan")
    assert cfg["model_class"] == "DaGANpp" and dagan["model_class"] == "DaGAN"
    assert make_daganpp_config(cfg["model"]) == DaGANppConfig()
    assert cfg["discriminator"] == DEFAULT_DISCRIMINATOR == dagan["model"]["discriminator"]
    assert cfg["train"] == dagan["train"] and cfg["data"] == dagan["data"]
    weights = cfg["train"]["loss_weights"]       # paper 3.5: lambda_P = lambda_E = lambda_D = 10
    assert weights["perceptual"] == [10] * 5 and weights["equivariance_value"] == 10
    assert weights["equivariance_jacobian"] == 10 and weights["kp_distance"] == 10
    assert cfg["train"]["kp_distance_margin"] == 0.2
    # counted on the meta device: no memory, no init
    with torch.device("meta"):
        model, disc = build_model(cfg)
    assert type(model) is DaGANpp and isinstance(disc, MultiScaleDiscriminator) and model.discriminator is None
    trainable = sum(p.numel() for net in (model.kp_detector, model.generator, disc) for p in net.parameters())
    assert abs(trainable / PAPER_PARAMETERS - 1) < 0.01, trainable


def test_daganpp_tiny_config_size():
    model, disc = build_model(load_config("daganpp_tiny"))
    assert model.cfg.num_kp == 10 and model.cfg.depth_width == 16 and 64 % model.size_multiple == 0
    trainable = sum(p.numel() for net in (model.kp_detector, model.generator, disc) for p in net.parameters())
    assert 2e5 < trainable < 1e6, trainable
    # the discriminator's keypoint heatmaps follow the model's keypoints
    first = disc.discs["1"].down_blocks[0].conv
    assert first.in_channels == 3 + 10


def test_config_errors_name_the_problem(tmp_path):
    base = load_config("daganpp_tiny")
    bad_class = {**base, "model_class": "DaGAN3"}
    with pytest.raises(ValueError, match="model_class must be one of"):
        load_config(_write(tmp_path, "a.json", bad_class))
    misplaced = json.loads(json.dumps(base))
    misplaced["model"]["discriminator"] = misplaced.pop("discriminator")
    with pytest.raises(ValueError, match="top-level 'discriminator'"):
        load_config(_write(tmp_path, "b.json", misplaced))
    dagan_with_section = {**load_config("tiny"), "discriminator": base["discriminator"]}
    with pytest.raises(ValueError, match="model.discriminator"):
        load_config(_write(tmp_path, "c.json", dagan_with_section))
    unknown = {**base, "discriminator": {**base["discriminator"], "channels": 3}}
    with pytest.raises(ValueError, match=r"discriminator: unknown keys \['channels'\]"):
        build_model(unknown)
    no_disc = {**base, "discriminator": None}
    assert build_model(no_disc)[1] is None
    with pytest.raises(ValueError, match="generator_gan > 0 needs a discriminator"):
        _trainer(no_disc, tmp_path / "run")


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def test_tiny_losses_finite_decreasing_and_gradients_everywhere(tmp_path):
    trainer = _trainer(_tiny(lr=1e-3), tmp_path)
    assert trainer.separate_discriminator and trainer.model.discriminator is None
    batch = torch.utils.data.default_collate([trainer.dataset[(0, 1)], trainer.dataset[(1, 2)]])
    history = []
    for step in range(6):
        values = trainer.train_step(batch)
        assert all(math.isfinite(v) for v in values.values()), values
        history.append(values)
        if step == 0:
            m = trainer.model
            assert_every_parameter_has_gradient((("kp_detector", m.kp_detector), ("generator", m.generator),
                                                 ("discriminator", trainer.discriminator)))
            assert all(p.grad is None for net in (m.depth_encoder, m.depth_decoder) for p in net.parameters())
    assert set(history[0]) == {"perceptual", "gen_gan", "feature_matching", "equivariance_value",
                               "equivariance_jacobian", "kp_distance", "disc_gan", "generator_total"}
    perceptual = [h["perceptual"] for h in history]
    assert perceptual[-1] < perceptual[0] and np.mean(perceptual[-2:]) < np.mean(perceptual[:2]), perceptual
    disc = [h["disc_gan"] for h in history]
    assert disc[-1] < disc[0], disc       # the discriminator learns too


def test_tiny_checkpoint_resume_bit_exact_and_plain_model_file(tmp_path):
    run_a = tmp_path / "a"
    a = _trainer(_tiny(), run_a)
    a.fit(2, progress=False, checkpoint_every=2, log_every=1)
    assert a.has_checkpoint() and torch.load(run_a / STATE_FILE, weights_only=True)["step"] == 2

    # the user's file: a plain DaGANpp, without the trainer's discriminator
    loaded = checkpoints.load(str(run_a / MODEL_FILE))
    assert type(loaded) is DaGANpp and loaded.cfg == a.model.cfg
    assert DaGANpp.load(str(run_a / MODEL_FILE)).cfg == a.model.cfg
    file_keys = set(load_file(str(run_a / MODEL_FILE)))
    assert not any(k.startswith("discriminator") for k in file_keys)
    assert file_keys == set(a.model.state_dict())
    for (k, v), (k2, v2) in zip(loaded.state_dict().items(), a.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    disc_file = load_file(str(run_a / DISCRIMINATOR_FILE))
    assert set(disc_file) == set(a.discriminator.state_dict())
    assert all(torch.equal(disc_file[k], v) for k, v in a.discriminator.state_dict().items())

    b = _trainer(_tiny(), run_a)
    initial = {k: v.clone() for k, v in b.discriminator.state_dict().items()}
    b.load_checkpoint()
    b.out = str(tmp_path / "b")
    assert b.step == 2
    changed = [k for k, v in b.discriminator.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed, "load_checkpoint left the discriminator at its initial weights"
    ha = a.fit(3, progress=False, checkpoint_every=100)
    hb = b.fit(3, progress=False, checkpoint_every=100)
    assert ha == hb and len(ha) == 1
    for net_a, net_b in ((a.model, b.model), (a.discriminator, b.discriminator)):
        for (k, v), (_, v2) in zip(net_a.state_dict().items(), net_b.state_dict().items()):
            assert torch.equal(v, v2), k
    for name in ("discriminator", "generator", "kp_detector"):
        sa, sb = a.optimizers[name].state_dict()["state"], b.optimizers[name].state_dict()["state"]
        assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa), name
    with open(run_a / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]

    # resuming with another discriminator or another model class fails with the reason
    other = _tiny()
    other["discriminator"]["kp_variance"] = 0.02
    with pytest.raises(ValueError, match="discriminator parameters"):
        _trainer(other, run_a).load_checkpoint()
    dagan = load_config("tiny")
    dagan["data"]["synthetic"] = {"num_clips": 2, "num_frames": 6}
    with pytest.raises(CheckpointError, match="'DaGANpp' model, not DaGAN"):
        _trainer(dagan, run_a).load_checkpoint()


def test_cli_trains_daganpp_tiny(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-W", "ignore", "-m", "training.train", "--config", "daganpp_tiny", "--steps", "2",
           "--out", str(out), "--batch-size", "2", "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(out / STATE_FILE, weights_only=True)["step"] == 2
    assert (out / DISCRIMINATOR_FILE).exists()
    model = checkpoints.load(str(out / MODEL_FILE), model="DaGANpp")
    assert model.cfg == make_daganpp_config(load_config("daganpp_tiny")["model"])
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2]
    assert all(math.isfinite(float(rows[0][k])) for k in ("generator_total", "disc_gan", "perceptual"))
