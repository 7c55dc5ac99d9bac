"""Self-supervised training of the face depth network (DaGAN++ section 3.2, eq. 1-8):
``python -m training.train_depth --config depth_tiny --steps 2000 --out runs/depth``.

Per step: a batch of triplets (previous, target, next) of consecutive frames; the depth network gives
the target's disparity at 4 scales, the pose network gives for (target, previous) and (target, next)
the relative pose, the intrinsics and the uncertainty map; each source frame is reprojected into the
target view at every scale (disparity upsampled to full resolution, as monodepth2). Loss (eq. 7),
averaged over the scales: per pixel the source with the smaller photometric error Pe (monodepth2's
minimum reprojection) and that pair's uncertainty U, lambda1 mean(M_a Pe / U) + lambda3 mean(M_a log U)
with the auto-mask M_a, plus lambda2 times the edge-aware smoothness of each scale's disparity divided
by 2^scale. One Adam step on the depth and pose networks together.

Data, determinism, resume, logging and torchrun work as in ``training.train`` (``--data DIR`` or
synthetic clips; batches and random draws from (seed, step); ``--fresh`` to start over; rank 0 logs
and writes). Outputs in ``--out``: ``depth.safetensors`` (a ``FaceDepthNetwork`` in dagan_fast's
format, what ``python -m training.train --depth`` reads), ``pose.safetensors`` (pose network weights,
its config in the metadata), ``depth_state.pt`` (optimiser and scheduler states and the step, read with
``torch.load(weights_only=True)``), ``log.csv``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dagan_fast.checkpoints import save as save_model
from dagan_fast.models.depth import FaceDepthNetwork

from .configs import load_config
from .data import Augment, TripletDataset
from .depth import (PoseNetwork, disp_to_depth, photometric_error, reproject, select_min_reprojection,
                    smoothness_loss, uncertainty_loss)
from .train import (Trainer, _atomic_torch_save, _atomic_write, _dist_info, build_clips, setup_distributed,
                    step_generator)

Tensor = torch.Tensor

DEPTH_FILE = "depth.safetensors"
POSE_FILE = "pose.safetensors"
STATE_FILE = "depth_state.pt"
LOG_FILE = "log.csv"
POSE_CONFIG_KEY = "dagan_fast.pose_config"
# monodepth2 adds this much noise to the identity error so that flat regions do not tie.
IDENTITY_NOISE = 1e-5


class DepthFullModel(nn.Module):
    """Depth + pose networks and the loss of eq. 7 (what DistributedDataParallel wraps).
    ``train``: the config's "train" section. forward(frames (B,3,3,H,W) = previous, target, next;
    identity_noise (B,1,H,W)) -> ({"photometric", "uncertainty", "smoothness"}: weighted scalar losses,
    {"mask": fraction of pixels the auto-mask keeps, "uncertainty_mean", "focal": mean fx / W,
    "translation": mean |t|}: detached scalar tensors)."""

    def __init__(self, depth: FaceDepthNetwork, pose: PoseNetwork, train: Dict[str, Any]):
        super().__init__()
        self.depth, self.pose = depth, pose
        weights = train["loss_weights"]
        self.lambda_photometric = weights["photometric"]
        self.lambda_smoothness = weights["smoothness"]
        self.lambda_uncertainty = weights["uncertainty"]
        self.scales = tuple(train.get("scales", (0, 1, 2, 3)))
        self.alpha = train.get("ssim_alpha", 0.85)
        self.min_depth, self.max_depth = train.get("min_depth", 0.1), train.get("max_depth", 100.0)

    def forward(self, frames: Tensor, identity_noise: Tensor):
        if frames.dim() != 5 or frames.shape[1:3] != (3, 3):
            raise ValueError(f"frames must be (B,3,3,H,W) (previous, target, next), got {tuple(frames.shape)}")
        previous, target, following = frames.unbind(1)
        h, w = target.shape[2:]
        if h % 32 or w % 32 or min(h, w) < 64:
            # the decoder's reflection padding needs a bottleneck (1/32 scale) of at least 2x2
            raise ValueError(f"frames: H and W must be multiples of 32 and at least 64, got {h}x{w}")
        disparities = self.depth.disparities(target, self.scales)
        # Both pairs in one pose pass; the pose maps target-camera points into each source camera.
        sources = torch.cat([previous, following])
        targets = torch.cat([target, target])
        pose = self.pose(targets, sources)
        identity = photometric_error(targets, sources, self.alpha).chunk(2)
        uncertainties = pose["uncertainty"].chunk(2)

        losses = {"photometric": target.new_zeros(()), "uncertainty": target.new_zeros(()),
                  "smoothness": target.new_zeros(())}
        mask_fraction = target.new_zeros(())
        for scale in self.scales:
            disp = disparities[("disp", scale)]
            full = disp if scale == 0 else F.interpolate(disp, size=(h, w), mode="bilinear", align_corners=False)
            depth = disp_to_depth(full, self.min_depth, self.max_depth)
            reconstructed = reproject(sources, torch.cat([depth, depth]), pose["K"], pose["R"], pose["t"])
            errors = photometric_error(targets, reconstructed, self.alpha).chunk(2)
            error, uncertainty, mask = select_min_reprojection(errors, uncertainties, identity, identity_noise)
            photometric, log_uncertainty = uncertainty_loss(error, uncertainty, mask, self.lambda_photometric,
                                                            self.lambda_uncertainty)
            losses["photometric"] = losses["photometric"] + photometric / len(self.scales)
            losses["uncertainty"] = losses["uncertainty"] + log_uncertainty / len(self.scales)
            # monodepth2: the smoothness of each scale at its own resolution, weighted down by 2^scale
            image = target if scale == 0 else F.interpolate(target, size=disp.shape[2:], mode="area")
            losses["smoothness"] = losses["smoothness"] + (self.lambda_smoothness * smoothness_loss(disp, image)
                                                           / 2 ** scale / len(self.scales))
            mask_fraction = mask_fraction + mask.mean() / len(self.scales)
        # tensors, not floats: converting here would synchronise the GPU once per statistic
        stats = {"mask": mask_fraction, "uncertainty_mean": pose["uncertainty"].mean(),
                 "focal": pose["K"][:, 0, 0].mean() / w, "translation": pose["t"].norm(dim=1).mean()}
        stats = {k: v.detach() for k, v in stats.items()}
        return losses, stats


class DepthTrainer(Trainer):
    """Owns the depth and pose networks, the optimiser and the run directory; shares ``training.train.Trainer``'s
    step-seeded data loader, training loop (``fit``) and log handling, with its own model, step and checkpoints.

    ``config``: a loaded depth config (``depth_tiny``, ``depth_dagan``); ``clips``: a clip source
    (``training.data``); ``out``: the run directory; ``seed`` fixes the initial weights and all draws."""

    def __init__(self, config: Dict[str, Any], clips, out: str, *, seed: int = 0, device: str = "cpu",
                 batch_size: Optional[int] = None):
        # Trainer.__init__ builds a DaGAN; only its loader and log helpers are shared, so it is not called.
        self.config, self.out, self.seed = config, out, seed
        self.device = torch.device(device)
        self.rank, self.world_size = _dist_info()
        self.is_main = self.rank == 0
        model, train, data = config["model"], config["train"], config["data"]
        self.batch_size = batch_size or train["batch_size"]
        torch.manual_seed(seed)
        depth = FaceDepthNetwork({"depth_layers": model["depth_layers"], "depth_width": model["depth_width"]})
        pose = PoseNetwork(model.get("pose_layers", 18), model["pose_width"])
        if self.world_size > 1 and self.device.type == "cuda":
            # batch statistics over the global batch (SyncBatchNorm runs on GPUs only)
            depth = nn.SyncBatchNorm.convert_sync_batchnorm(depth)
            pose = nn.SyncBatchNorm.convert_sync_batchnorm(pose)
        self.depth_net, self.pose_net = depth.to(self.device), pose.to(self.device)
        self.full = DepthFullModel(self.depth_net, self.pose_net, train).to(self.device)
        self.full.train()
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.full = DDP(self.full, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        params = list(self.depth_net.parameters()) + list(self.pose_net.parameters())
        self.optimizer = torch.optim.Adam(params, lr=train["lr"], betas=tuple(train.get("betas", (0.9, 0.999))))
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, train.get("lr_milestones", []),
                                                              gamma=train.get("lr_gamma", 0.1))
        aug = data.get("augmentation")
        self.dataset = TripletDataset(clips, Augment(**aug) if aug else None, seed=seed,
                                      repeats=data.get("repeats", 1), stride=data.get("stride", 1))
        self.step = 0

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: Dict[str, Tensor]) -> Dict[str, float]:
        """One Adam step on batch {"frames": (B,3,3,H,W)}; advances ``step``; returns the weighted losses,
        their "total" and the statistics as floats."""
        frames = batch["frames"].to(self.device, non_blocking=True)
        b, _, _, h, w = frames.shape
        noise = torch.randn(b, 1, h, w, generator=step_generator(self.seed, self.step, self.rank))
        self.full.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses, stats = self.full(frames, (IDENTITY_NOISE * noise).to(self.device))
        total = sum(losses.values())
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["total"] = float(total.detach())
        values.update({k: float(v) for k, v in stats.items()})
        return values

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Writes ``depth.safetensors``, ``pose.safetensors`` and ``depth_state.pt`` in ``out`` (rank 0 only)."""
        if not self.is_main:
            return
        os.makedirs(self.out, exist_ok=True)
        save_model(self.depth_net, os.path.join(self.out, DEPTH_FILE))
        from safetensors.torch import save_file

        pose = {k: v.detach().to("cpu").contiguous() for k, v in self.pose_net.state_dict().items()}
        metadata = {POSE_CONFIG_KEY: json.dumps(self.pose_net.config, sort_keys=True)}
        _atomic_write(os.path.join(self.out, POSE_FILE), lambda tmp: save_file(pose, tmp, metadata=metadata))
        state = {"step": self.step, "seed": self.seed, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        _atomic_torch_save(state, os.path.join(self.out, STATE_FILE))

    def has_checkpoint(self) -> bool:
        """Whether ``out`` holds all three checkpoint files."""
        return all(os.path.exists(os.path.join(self.out, f)) for f in (DEPTH_FILE, POSE_FILE, STATE_FILE))

    def load_checkpoint(self) -> None:
        """Restores both networks, the optimiser and scheduler states and the step from ``out``."""
        from safetensors.torch import load_file

        state = torch.load(os.path.join(self.out, STATE_FILE), map_location=self.device, weights_only=True)
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"checkpoint in {self.out} was trained with seed {state['seed']}, not {self.seed}: "
                             f"the data order would change; pass --seed {state['seed']}")
        for net, name in ((self.depth_net, DEPTH_FILE), (self.pose_net, POSE_FILE)):
            net.load_state_dict(load_file(os.path.join(self.out, name), device=str(self.device)), strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])

    # ------------------------------------------------------------------ the loop (Trainer.fit)
    PROGRESS_DESC = "depth"

    def _progress_postfix(self, values: Dict[str, float]) -> Dict[str, str]:
        return {"L": f"{values['total']:.4f}", "P": f"{values['photometric']:.4f}", "M": f"{values['mask']:.2f}"}

    def _learning_rates(self) -> Dict[str, str]:
        return {"lr": f"{self.optimizer.param_groups[0]['lr']:.6g}"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(prog="python -m training.train_depth", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="depth_tiny",
                   help="bundled config name (depth_tiny, depth_dagan) or a JSON file")
    p.add_argument("--data", default=None, help="folder of face videos (sub-folders of frames or video files); "
                                                "default: synthetic clips of the bundled faces")
    p.add_argument("--steps", type=int, default=None, help="train until this step (default: the config's)")
    p.add_argument("--out", default="runs/depth", help="run directory (checkpoints, log.csv)")
    p.add_argument("--batch-size", type=int, default=None, help="per-rank batch size (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m training.train_depth``."""
    args = parse_args(argv)
    config = load_config(args.config)
    device = setup_distributed(args.device)
    clips = build_clips(config, args.data, args.seed)
    trainer = DepthTrainer(config, clips, args.out, seed=args.seed, device=device, batch_size=args.batch_size)
    if trainer.has_checkpoint() and not args.fresh:
        trainer.load_checkpoint()
        if trainer.is_main:
            print(f"resumed from {args.out} at step {trainer.step}", file=sys.stderr)
    steps = args.steps if args.steps is not None else config["train"]["steps"]
    trainer.fit(steps, progress=not args.no_progress)
    if trainer.is_main:
        print(f"step {trainer.step}: depth network in {os.path.join(args.out, DEPTH_FILE)}, log in "
              f"{os.path.join(args.out, LOG_FILE)}", file=sys.stderr)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
