"""Keypoint detector + generator training of DaGAN or DaGAN++ with the depth network frozen (DaGAN
paper eq. 10, DaGAN++ paper eq. 14): ``python -m training.train --config tiny --steps 500 --out runs/tiny``
(``--config daganpp`` / ``daganpp_tiny`` for DaGAN++).

Per step (the official order): the generator pass (depth of source/driving without gradient,
keypoints, generator, perceptual + LSGAN + feature matching + equivariance + keypoint-distance
losses), one Adam step of the keypoint detector and the generator; then one Adam step of the
discriminator on the real driving frame and the detached generated one.

Data: ``--data DIR`` (sub-folders of frames or video files, ``training.data.VideoClips``), or by
default synthetic clips of the bundled faces (``training.synthetic``). Batches and every random draw
(frames, augmentation, equivariance transform) depend on (seed, step) alone, so a resumed run
continues exactly as an uninterrupted one.

DaGAN++ (config "model_class": "DaGANpp") trains with DaGAN's losses and a DaGAN discriminator (the
DaGAN++ paper, sections 3.4-3.5, follows DaGAN's training); DaGAN++ has no discriminator of its own, so
the trainer builds one from the config's top-level "discriminator" section and owns it.

Outputs in ``--out``: ``checkpoint.safetensors`` (the model in dagan_fast's format: for DaGAN the whole
model, discriminator included, read by ``DaGAN.load``; for DaGAN++ a plain DaGANpp file read by
``DaGANpp.load`` / ``dagan_fast.checkpoints.load``), ``checkpoint_discriminator.safetensors`` (DaGAN++ only:
the trainer's discriminator, with its parameters in the metadata), ``checkpoint_state.pt`` (optimiser and
scheduler states and the step; plain tensors and numbers, read with ``torch.load(weights_only=True)``),
``log.csv`` (one row per logged step). A run resumes from ``--out`` when its checkpoint exists
(``--fresh`` to start over).

Several processes: ``torchrun --nproc_per_node=N -m training.train ...`` (gloo on the CPU, NCCL on
GPUs): the generator and discriminator losses run under DistributedDataParallel (gradients averaged
over ranks), BatchNorm becomes SyncBatchNorm on GPUs, each rank draws its own slice of every step's
batch (``StepBatchSampler``; --batch-size is per rank), and only rank 0 logs (its own losses), shows
progress and writes checkpoints.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from dagan_fast.checkpoints import load_checked, load_depth_networks, read_metadata, save as save_model
from dagan_fast.models.dagan import DEFAULT_DISCRIMINATOR, DaGAN
from dagan_fast.models.daganpp import DaGANpp
from dagan_fast.models.discriminator import MultiScaleDiscriminator

from .configs import available, load_config, validate_config
from .data import Augment, PairDataset, StepBatchSampler, VideoClips
from .losses import (ImagePyramid, PerceptualLoss, Transform, VGG19Features, equivariance_losses,
                     feature_matching_loss, keypoint_distance_loss, lsgan_discriminator_loss,
                     lsgan_generator_loss)
from .synthetic import SyntheticClips

Tensor = torch.Tensor
KP = Dict[str, Tensor]

MODEL_FILE = "checkpoint.safetensors"
STATE_FILE = "checkpoint_state.pt"
DISCRIMINATOR_FILE = "checkpoint_discriminator.safetensors"
DISCRIMINATOR_KEY = "dagan_fast.discriminator"
LOG_FILE = "log.csv"
GENERATOR_LOSSES = ("perceptual", "reconstruction_l1", "gen_gan", "feature_matching", "equivariance_value",
                    "equivariance_jacobian", "kp_distance")


def _detach_kp(kp: KP) -> KP:
    return {k: v.detach() for k, v in kp.items()}


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The CPU torch.Generator for the random draws of ``step`` on ``rank`` (equivariance transforms)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank, 1]).generate_state(1)[0]))


class GeneratorFullModel(nn.Module):
    """The generator side of a training step. ``model``: a DaGAN or DaGANpp (depth networks frozen by the
    caller), ``train``: the config's "train" section, ``vgg``: ``VGG19Features``, ``discriminator``: the
    MultiScaleDiscriminator of the GAN and feature-matching losses (default: ``model.discriminator``).
    forward(source (B,3,H,W), driving (B,3,H,W), generator) -> (weighted losses {name: scalar},
    generator output dict with "kp_source", "kp_driving")."""

    def __init__(self, model: DaGAN, train: Dict[str, Any], vgg: VGG19Features,
                 discriminator: Optional[MultiScaleDiscriminator] = None):
        super().__init__()
        self.model = model
        self.weights = train["loss_weights"]
        self.transform_params = train["transform_params"]
        self.margin = train.get("kp_distance_margin", 0.2)
        self.perceptual = PerceptualLoss(vgg, train["scales"], self.weights["perceptual"])
        self.discriminator = discriminator if discriminator is not None else model.discriminator
        if self.weights.get("generator_gan", 0) and self.discriminator is None:
            raise ValueError("loss_weights.generator_gan > 0 needs a discriminator: model.discriminator in a DaGAN "
                             "config, the top-level 'discriminator' section in a DaGANpp one")
        self.disc_pyramid = ImagePyramid(self.discriminator.scales) if self.discriminator is not None else None

    def depth(self, image: Tensor) -> Tensor:
        """Frozen depth (B,1,H,W), no gradient."""
        with torch.no_grad():
            return self.model.depth(image)

    def forward(self, source: Tensor, driving: Tensor, generator: Optional[torch.Generator] = None):
        m, w = self.model, self.weights
        depth_s, depth_d = self.depth(torch.cat([source, driving])).chunk(2)
        # Two detector passes, as the official code: BatchNorm statistics per frame batch.
        kp_s = m.kp_detector(torch.cat([source, depth_s], dim=1))
        kp_d = m.kp_detector(torch.cat([driving, depth_d], dim=1))
        out = m.generator(source, kp_driving=kp_d, kp_source=kp_s, source_depth=depth_s, driving_depth=depth_d)
        out["kp_source"], out["kp_driving"] = kp_s, kp_d
        generated = out["prediction"]
        losses: Dict[str, Tensor] = {"perceptual": self.perceptual(generated, driving)}
        if w.get("reconstruction_l1", 0):
            # Not in the official losses: a direct pixel term for configs trained without ImageNet VGG weights.
            losses["reconstruction_l1"] = w["reconstruction_l1"] * (generated - driving).abs().mean()

        if w.get("generator_gan", 0):
            kp_cond = _detach_kp(kp_d)
            fake = self.discriminator(self.disc_pyramid(generated), kp=kp_cond)
            real = self.discriminator(self.disc_pyramid(driving), kp=kp_cond)
            losses["gen_gan"] = lsgan_generator_loss(fake, w["generator_gan"])
            if sum(w.get("feature_matching", [])):
                losses["feature_matching"] = feature_matching_loss(real, fake, w["feature_matching"])

        if w.get("equivariance_value", 0) or w.get("equivariance_jacobian", 0):
            transform = Transform(driving.shape[0], generator=generator, dtype=driving.dtype, device=driving.device,
                                  **self.transform_params)
            transformed = transform.transform_frame(driving)
            kp_t = m.kp_detector(torch.cat([transformed, self.depth(transformed)], dim=1))
            value, jacobian = equivariance_losses(kp_d, kp_t, transform)
            if w.get("equivariance_value", 0):
                losses["equivariance_value"] = w["equivariance_value"] * value
            if w.get("equivariance_jacobian", 0) and jacobian is not None:
                losses["equivariance_jacobian"] = w["equivariance_jacobian"] * jacobian

        if w.get("kp_distance", 0):
            losses["kp_distance"] = w["kp_distance"] * (keypoint_distance_loss(kp_s["value"], self.margin)
                                                        + keypoint_distance_loss(kp_d["value"], self.margin))
        return losses, out


class DiscriminatorFullModel(nn.Module):
    """The discriminator side (holding only the discriminator, so that DistributedDataParallel sees
    exactly the parameters this loss trains): forward(driving (B,3,H,W), generated (B,3,H,W),
    kp_driving) -> {"disc_gan": weighted LSGAN loss} with ``generated`` and the keypoints detached."""

    def __init__(self, discriminator: nn.Module, train: Dict[str, Any]):
        super().__init__()
        self.discriminator = discriminator
        self.weight = train["loss_weights"].get("discriminator_gan", 0)
        self.pyramid = ImagePyramid(discriminator.scales)

    def forward(self, driving: Tensor, generated: Tensor, kp_driving: KP) -> Dict[str, Tensor]:
        kp = _detach_kp(kp_driving)
        real = self.discriminator(self.pyramid(driving), kp=kp)
        fake = self.discriminator(self.pyramid(generated.detach()), kp=kp)
        return {"disc_gan": lsgan_discriminator_loss(real, fake, self.weight)}


def _dist_info():
    """(rank, world_size): from torch.distributed when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def setup_distributed(device: str) -> str:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on the
    CPU; returns the device of this rank ("cuda:<LOCAL_RANK>" for GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or torch.distributed.is_initialized():
        return device
    use_cuda = torch.device(device).type == "cuda"
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then renamed over it: a crash mid-write
    leaves the previous checkpoint intact."""
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_torch_save(obj, path: str) -> None:
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def discriminator_params(section: Dict[str, Any]) -> Dict[str, Any]:
    """A DaGANpp config's "discriminator" section over ``DEFAULT_DISCRIMINATOR`` (DaGAN's): the keyword
    arguments of ``MultiScaleDiscriminator`` besides num_kp / num_channels (taken from the model)."""
    if not isinstance(section, dict):
        raise ValueError(f"discriminator: must be a dict of MultiScaleDiscriminator parameters, got "
                         f"{type(section).__name__}")
    unknown = sorted(set(section) - set(DEFAULT_DISCRIMINATOR))
    if unknown:
        raise ValueError(f"discriminator: unknown keys {unknown} (known: {', '.join(sorted(DEFAULT_DISCRIMINATOR))})")
    return {**copy.deepcopy(DEFAULT_DISCRIMINATOR), **copy.deepcopy(section)}


def build_model(config: Dict[str, Any]) -> Tuple[DaGAN, Optional[MultiScaleDiscriminator]]:
    """The config's model and the discriminator its GAN losses train: for DaGAN its own
    ``model.discriminator`` (or None); for DaGANpp a separate ``MultiScaleDiscriminator`` built from the
    top-level "discriminator" section (None when that is null), conditioned on the model's num_kp."""
    config = validate_config(copy.deepcopy(config))
    if config["model_class"] == "DaGANpp":
        model = DaGANpp(config["model"])
        section = config["discriminator"]
        if section is None:
            return model, None
        return model, MultiScaleDiscriminator(num_kp=model.cfg.num_kp, num_channels=model.cfg.num_channels,
                                              **discriminator_params(section))
    model = DaGAN(config["model"])
    return model, model.discriminator


def build_clips(config: Dict[str, Any], data: Optional[str] = None, seed: int = 0):
    """The clip source: ``VideoClips(data)`` at the config's size, or the config's synthetic clips."""
    size = config["data"]["size"]
    if data is not None:
        return VideoClips(data, size=size)
    synthetic = config["data"].get("synthetic", {})
    return SyntheticClips(size=size, seed=seed, **synthetic)


class Trainer:
    """Owns the model (DaGAN or DaGANpp, per the config's "model_class"), its discriminator, the losses,
    the optimisers and the run directory.

    ``config``: a loaded config (``training.configs.load_config``); ``clips``: a clip source
    (``training.data``); ``out``: the run directory; ``vgg``: VGG19 weights file or None;
    ``depth``: a depth network file from ``training.train_depth`` (or a dagan_fast model file) whose depth
    networks to use (None: random init, only sensible for tests). ``seed`` fixes the initial weights and all draws.
    """

    PROGRESS_DESC = "train"

    def __init__(self, config: Dict[str, Any], clips, out: str, *, vgg: Optional[str] = None,
                 depth: Optional[str] = None, seed: int = 0, device: str = "cpu", batch_size: Optional[int] = None):
        config = validate_config(copy.deepcopy(config))
        self.config, self.out, self.seed = config, out, seed
        self.device = torch.device(device)
        self.rank, self.world_size = _dist_info()
        self.is_main = self.rank == 0
        train = config["train"]
        self.batch_size = batch_size or train["batch_size"]
        torch.manual_seed(seed)
        model, discriminator = build_model(config)
        if depth is not None:
            load_depth_networks(model, depth)
        model.image_size = int(config["data"]["size"])  # recorded in the model file: the size it runs at
        self.model = model.to(self.device)
        # DaGAN's discriminator is part of the model (and its file); DaGANpp's is the trainer's alone.
        self.separate_discriminator = discriminator is not None and discriminator is not model.discriminator
        self.discriminator = discriminator.to(self.device) if discriminator is not None else None
        self.model.train()
        if self.discriminator is not None:
            self.discriminator.train()
        for net in (self.model.depth_encoder, self.model.depth_decoder):
            net.eval()
            net.requires_grad_(False)
        uses_gan = self.discriminator is not None and bool(train["loss_weights"].get("generator_gan", 0))
        if self.world_size > 1 and self.device.type == "cuda":
            # batch statistics over the global batch (SyncBatchNorm runs on GPUs only)
            self.model.kp_detector = nn.SyncBatchNorm.convert_sync_batchnorm(self.model.kp_detector)
            self.model.generator = nn.SyncBatchNorm.convert_sync_batchnorm(self.model.generator)
        self.gen_full = GeneratorFullModel(self.model, train, VGG19Features(vgg), self.discriminator).to(self.device)
        self.disc_full = DiscriminatorFullModel(self.discriminator, train).to(self.device) if uses_gan else None
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Without the GAN terms the discriminator takes no part in the generator's loss.
            self.gen_full = DDP(self.gen_full, device_ids=ids, find_unused_parameters=not uses_gan)
            if self.disc_full is not None:
                self.disc_full = DDP(self.disc_full, device_ids=ids)
        betas = tuple(train.get("betas", (0.5, 0.999)))
        self.optimizers = {
            "kp_detector": torch.optim.Adam(self.model.kp_detector.parameters(), lr=train["lr_kp_detector"], betas=betas),
            "generator": torch.optim.Adam(self.model.generator.parameters(), lr=train["lr_generator"], betas=betas),
        }
        if self.disc_full is not None:
            self.optimizers["discriminator"] = torch.optim.Adam(self.discriminator.parameters(),
                                                                lr=train["lr_discriminator"], betas=betas)
        self.schedulers = {name: torch.optim.lr_scheduler.MultiStepLR(opt, train.get("lr_milestones", []), gamma=0.1)
                           for name, opt in self.optimizers.items()}
        aug = config["data"].get("augmentation")
        self.dataset = PairDataset(clips, Augment(**aug) if aug else None, seed=seed,
                                   repeats=config["data"].get("repeats", 1))
        self.step = 0

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: Dict[str, Tensor]) -> Dict[str, float]:
        """One generator + discriminator update on batch {"source", "driving"} (B,3,H,W); advances
        ``step``; returns the losses as floats (gradients stay on the parameters until the next step)."""
        source = batch["source"].to(self.device, non_blocking=True)
        driving = batch["driving"].to(self.device, non_blocking=True)
        self.model.train()
        if self.discriminator is not None:
            self.discriminator.train()
        for net in (self.model.depth_encoder, self.model.depth_decoder):
            net.eval()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        losses, generated = self.gen_full(source, driving, step_generator(self.seed, self.step, self.rank))
        total = sum(losses.values())
        total.backward()
        self.optimizers["kp_detector"].step()
        self.optimizers["generator"].step()
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["generator_total"] = float(total.detach())
        if self.disc_full is not None:
            self.optimizers["discriminator"].zero_grad(set_to_none=True)
            d_losses = self.disc_full(driving, generated["prediction"], generated["kp_driving"])
            sum(d_losses.values()).backward()
            self.optimizers["discriminator"].step()
            values.update({k: float(v.detach()) for k, v in d_losses.items()})
        for sched in self.schedulers.values():
            sched.step()
        self.step += 1
        return values

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_files(self) -> Tuple[str, ...]:
        if self.separate_discriminator:
            return MODEL_FILE, DISCRIMINATOR_FILE, STATE_FILE
        return MODEL_FILE, STATE_FILE

    def _discriminator_metadata(self) -> str:
        params = {**discriminator_params(self.config["discriminator"]), "num_kp": self.model.cfg.num_kp,
                  "num_channels": self.model.cfg.num_channels}
        return json.dumps(params, sort_keys=True)

    def save_checkpoint(self) -> None:
        """Writes ``checkpoint.safetensors`` (the model alone: a file ``dagan_fast.checkpoints.load`` reads),
        ``checkpoint_discriminator.safetensors`` (DaGANpp runs) and, last, ``checkpoint_state.pt`` in ``out``
        (rank 0 only)."""
        if not self.is_main:
            return
        os.makedirs(self.out, exist_ok=True)
        save_model(self.model, os.path.join(self.out, MODEL_FILE))
        if self.separate_discriminator:
            from safetensors.torch import save_file

            tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.discriminator.state_dict().items()}
            metadata = {DISCRIMINATOR_KEY: self._discriminator_metadata()}
            _atomic_write(os.path.join(self.out, DISCRIMINATOR_FILE),
                          lambda tmp: save_file(tensors, tmp, metadata=metadata))
        state = {"step": self.step, "seed": self.seed,
                 "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
                 "schedulers": {k: v.state_dict() for k, v in self.schedulers.items()}}
        _atomic_torch_save(state, os.path.join(self.out, STATE_FILE))

    def has_checkpoint(self) -> bool:
        """Whether ``out`` holds every checkpoint file of this run (model, state, DaGANpp's discriminator)."""
        return all(os.path.exists(os.path.join(self.out, f)) for f in self._checkpoint_files())

    def load_checkpoint(self) -> None:
        """Restores weights (model and, for DaGANpp, the discriminator), optimiser and scheduler states and
        the step from ``out``; ValueError when the files hold another model class or discriminator."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        state = torch.load(os.path.join(self.out, STATE_FILE), map_location=self.device, weights_only=True)
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"checkpoint in {self.out} was trained with seed {state['seed']}, not {self.seed}: "
                             f"the data order would change; pass --seed {state['seed']}")
        model_path = os.path.join(self.out, MODEL_FILE)
        read_metadata(model_path, type(self.model).__name__)
        tensors = load_file(model_path, device=str(self.device))
        load_checked(self.model, tensors, model_path, "model")
        if self.separate_discriminator:
            disc_path = os.path.join(self.out, DISCRIMINATOR_FILE)
            with safe_open(disc_path, framework="pt") as f:
                stored = (f.metadata() or {}).get(DISCRIMINATOR_KEY)
            expected = self._discriminator_metadata()
            if stored is None or json.loads(stored) != json.loads(expected):
                raise ValueError(f"{disc_path}: discriminator parameters {stored} differ from the config's "
                                 f"{expected}; resume with the run's own config or pass --fresh")
            load_checked(self.discriminator, load_file(disc_path, device=str(self.device)), disc_path,
                         "discriminator")
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        for k, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][k])
        self.step = int(state["step"])

    # ------------------------------------------------------------------ the loop
    def loader(self, num_steps: int) -> torch.utils.data.DataLoader:
        """Batches for steps ``step`` .. ``num_steps - 1`` of this rank."""
        sampler = StepBatchSampler(len(self.dataset), self.batch_size, num_steps, seed=self.seed,
                                   start_step=self.step, rank=self.rank, world_size=self.world_size)
        workers = self.config["train"].get("num_workers", 0)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=workers,
                                           pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _prepare_log(self) -> str:
        """log.csv with rows from a crashed run's steps >= the resumed step dropped."""
        path = os.path.join(self.out, LOG_FILE)
        if os.path.exists(path):
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            kept = [r for r in rows if int(r["step"]) <= self.step]
            if len(kept) != len(rows):
                with open(path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
                    writer.writeheader()
                    writer.writerows(kept)
        return path

    def fit(self, num_steps: int, progress: bool = True, checkpoint_every: Optional[int] = None,
            log_every: Optional[int] = None) -> List[Dict[str, float]]:
        """Trains until ``step == num_steps``; logs every ``log_every`` steps, checkpoints every
        ``checkpoint_every`` steps and at the end. Returns every step's losses (this call's)."""
        train = self.config["train"]
        checkpoint_every = checkpoint_every or train.get("checkpoint_every", 1000)
        log_every = log_every or train.get("log_every", 10)
        history: List[Dict[str, float]] = []
        log_path = self._prepare_log() if self.is_main else None
        if self.is_main:
            os.makedirs(self.out, exist_ok=True)
        bar = None
        if progress and self.is_main:
            from tqdm import tqdm
            bar = tqdm(total=num_steps, initial=self.step, desc=self.PROGRESS_DESC, dynamic_ncols=True)
        start = time.time()
        for batch in self.loader(num_steps):
            values = self.train_step(batch)
            if not all(math.isfinite(v) for v in values.values()):
                raise FloatingPointError(f"step {self.step}: non-finite loss {values}")
            history.append(values)
            if self.is_main:
                if self.step % log_every == 0 or self.step == num_steps:
                    self._log(log_path, values, time.time() - start)
                if self.step % checkpoint_every == 0:
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(**self._progress_postfix(values))
        if bar is not None:
            bar.close()
        if self.is_main and (not self.has_checkpoint() or self.step % checkpoint_every):
            self.save_checkpoint()
        return history

    def _progress_postfix(self, values: Dict[str, float]) -> Dict[str, str]:
        """The losses the progress bar shows."""
        return {"G": f"{values['generator_total']:.3f}", "P": f"{values['perceptual']:.3f}"}

    def _learning_rates(self) -> Dict[str, str]:
        """The learning-rate columns of log.csv."""
        return {"lr_generator": f"{self.optimizers['generator'].param_groups[0]['lr']:.6g}"}

    def _log(self, path: str, values: Dict[str, float], elapsed: float) -> None:
        row = {"step": self.step, **{k: f"{v:.6g}" for k, v in sorted(values.items())},
               **self._learning_rates(), "seconds": f"{elapsed:.1f}"}
        exists = os.path.exists(path)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row.keys()))
            if not exists:
                writer.writeheader()
            writer.writerow(row)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help=f"bundled config name ({', '.join(available())}) or a JSON file")
    p.add_argument("--data", default=None, help="folder of face videos (sub-folders of frames or video files); "
                                                "default: synthetic clips of the bundled faces")
    p.add_argument("--steps", type=int, default=None, help="train until this step (default: the config's)")
    p.add_argument("--out", default="runs/train", help="run directory (checkpoints, log.csv)")
    p.add_argument("--batch-size", type=int, default=None, help="per-rank batch size (default: the config's)")
    p.add_argument("--vgg", default=None, help="torchvision VGG19 state_dict file for the perceptual loss")
    p.add_argument("--depth", default=None, help="depth network to use, frozen: the depth.safetensors of "
                   "`python -m training.train_depth`, or any dagan_fast model file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m training.train``."""
    args = parse_args(argv)
    config = load_config(args.config)
    device = setup_distributed(args.device)
    clips = build_clips(config, args.data, args.seed)
    trainer = Trainer(config, clips, args.out, vgg=args.vgg, depth=args.depth, seed=args.seed, device=device,
                      batch_size=args.batch_size)
    if trainer.has_checkpoint() and not args.fresh:
        trainer.load_checkpoint()
        if trainer.is_main:
            print(f"resumed from {args.out} at step {trainer.step}", file=sys.stderr)
    steps = args.steps if args.steps is not None else config["train"]["steps"]
    trainer.fit(steps, progress=not args.no_progress)
    if trainer.is_main:
        print(f"step {trainer.step}: model in {os.path.join(args.out, MODEL_FILE)}, log in "
              f"{os.path.join(args.out, LOG_FILE)}", file=sys.stderr)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
