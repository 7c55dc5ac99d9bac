"""Training configurations as JSON files (no YAML library is assumed): ``dagan`` (the official DaGAN
vox-adv-256 hyper-parameters) and ``tiny`` (a CPU-trainable 64x64 model). Each holds "model" (a
``DaGAN`` config, see ``dagan_fast.models.dagan.make_config``), "data" (image size, augmentation,
synthetic clips) and "train" (optimiser, losses, logging); keys starting with "_" are comments."""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, List

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("model", "data", "train")


def available() -> List[str]:
    """Names of the bundled configurations."""
    return sorted(os.path.splitext(n)[0] for n in os.listdir(CONFIG_DIR) if n.endswith(".json"))


def load_config(name_or_path: str) -> Dict[str, Any]:
    """A bundled configuration by name ("tiny", "dagan") or a JSON file by path -> dict with the
    sections "model", "data", "train" ("_" comment keys dropped)."""
    path = name_or_path
    if not os.path.exists(path):
        path = os.path.join(CONFIG_DIR, f"{name_or_path}.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"config {name_or_path!r}: not a file and not one of {available()}")
    with open(path) as f:
        config = json.load(f)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    missing = [s for s in SECTIONS if s not in config]
    if missing:
        raise ValueError(f"config {path}: missing sections {missing}")
    return copy.deepcopy(config)
