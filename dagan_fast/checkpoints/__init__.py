"""Model files: the authors' DaGAN checkpoints (``load_official``), our safetensors format (``save`` /
``load``, any model class in ``dagan_fast.models.registry``) and the bundled model (``pretrained``)."""
from . import pretrained
from .io import (CONFIG_KEY, FORMAT_KEY, FORMAT_VERSION, IMAGE_SIZE_KEY, MODEL_KEY, VERSION_KEY, CheckpointError,
                 CheckpointMismatchError, check_state_dict, detect_generator, detect_resnet_layers, load,
                 load_checked, load_depth_networks, load_official, read_metadata, read_official, save,
                 strip_prefix)

__all__ = [
    "CheckpointError", "CheckpointMismatchError", "load_official", "read_official", "save", "load",
    "read_metadata", "load_checked", "check_state_dict", "load_depth_networks", "strip_prefix",
    "detect_generator", "detect_resnet_layers", "pretrained", "FORMAT_KEY", "FORMAT_VERSION", "MODEL_KEY",
    "CONFIG_KEY", "VERSION_KEY", "IMAGE_SIZE_KEY",
]
