"""Training configurations as JSON files (no YAML library is assumed): ``dagan`` (the official DaGAN
vox-adv-256 hyper-parameters), ``tiny`` (a CPU-trainable 64x64 DaGAN), ``daganpp`` (DaGAN++ as the paper
builds it, with DaGAN's optimiser, losses and discriminator) and ``daganpp_tiny`` (a CPU-trainable 64x64
DaGAN++).

Each holds "model", "data" (image size, augmentation, synthetic clips) and "train" (optimiser, losses,
logging); keys starting with "_" are comments. "model_class" picks the model: "DaGAN" (the default when
absent; "model" is a ``DaGAN`` config, see ``dagan_fast.models.dagan.make_config``, discriminator included
as ``model.discriminator``) or "DaGANpp" ("model" is a ``DaGANppConfig`` dict, see
``dagan_fast.models.daganpp.make_daganpp_config``; DaGAN++ has no discriminator of its own, so the one
the trainer adds is the top-level "discriminator" section: ``MultiScaleDiscriminator`` parameters over
``DEFAULT_DISCRIMINATOR``)."""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, List

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("model", "data", "train")
MODEL_CLASSES = ("DaGAN", "DaGANpp")


def available() -> List[str]:
    """Names of the bundled configurations."""
    return sorted(os.path.splitext(n)[0] for n in os.listdir(CONFIG_DIR) if n.endswith(".json"))


def validate_config(config: Dict[str, Any], where: str = "config") -> Dict[str, Any]:
    """Checks the sections and the model class of a config dict (``where`` names it in errors) and
    fills in "model_class" ("DaGAN" when absent) and, for DaGANpp, "discriminator" (None when absent).
    Returns ``config``, updated in place."""
    missing = [s for s in SECTIONS if s not in config]
    if missing:
        raise ValueError(f"{where}: missing sections {missing}")
    model_class = config.setdefault("model_class", "DaGAN")
    if model_class not in MODEL_CLASSES:
        raise ValueError(f"{where}: model_class must be one of {list(MODEL_CLASSES)}, got {model_class!r}")
    disc = config.get("discriminator")
    if model_class == "DaGAN":
        if "discriminator" in config:
            raise ValueError(f"{where}: a top-level 'discriminator' section is for model_class DaGANpp; DaGAN's "
                             "discriminator is part of the model: put it in model.discriminator")
        return config
    if "discriminator" in config["model"]:
        raise ValueError(f"{where}: DaGANpp has no discriminator of its own; move model.discriminator to a "
                         "top-level 'discriminator' section")
    if disc is not None and not isinstance(disc, dict):
        raise ValueError(f"{where}: 'discriminator' must be a dict of MultiScaleDiscriminator parameters or null, "
                         f"got {type(disc).__name__}")
    config.setdefault("discriminator", None)
    return config


def load_config(name_or_path: str) -> Dict[str, Any]:
    """A bundled configuration by name ("tiny", "dagan", "daganpp", "daganpp_tiny") or a JSON file by
    path -> dict with "model_class", the sections "model", "data", "train" and, for DaGANpp,
    "discriminator" ("_" comment keys dropped; see ``validate_config``)."""
    path = name_or_path
    if not os.path.exists(path):
        path = os.path.join(CONFIG_DIR, f"{name_or_path}.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"config {name_or_path!r}: not a file and not one of {available()}")
    with open(path) as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"config {path}: must hold a JSON object, got {type(config).__name__}")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return copy.deepcopy(validate_config(config, f"config {path}"))
