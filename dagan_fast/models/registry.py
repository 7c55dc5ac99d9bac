"""The model classes a dagan_fast file may hold, by the name stored in its metadata.

A class registers itself with ``@register_model``; ``checkpoints.save`` stores ``type(model).__name__`` and
``checkpoints.load`` builds ``model_class(name)(config)``. Each class takes its JSON config dict as its only
constructor argument and exposes it as ``.config``.
"""
from __future__ import annotations

from typing import Dict, Tuple, Type

import torch.nn as nn

_MODELS: Dict[str, Type[nn.Module]] = {}


def register_model(cls: Type[nn.Module]) -> Type[nn.Module]:
    """Class decorator: makes ``cls`` loadable from files whose metadata names it."""
    _MODELS[cls.__name__] = cls
    return cls


def model_names() -> Tuple[str, ...]:
    """Names of every registered model class, in registration order."""
    return tuple(_MODELS)


def model_class(name: str) -> Type[nn.Module]:
    """The registered class called ``name``; KeyError listing the registered names otherwise."""
    try:
        return _MODELS[name]
    except KeyError:
        raise KeyError(f"no model class {name!r} is registered (known: {', '.join(_MODELS)})") from None
