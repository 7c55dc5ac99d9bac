"""Old import paths of public modules, kept working after the modules moved into subpackages.

``import dagan_fast.video`` (and ``from dagan_fast import video``) give the very module object that lives at
``dagan_fast.media.video`` now, so monkeypatching either name patches both. Each old path warns once with a
DeprecationWarning naming the new one.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module path -> new module path
MOVED = {
    "dagan_fast.video": "dagan_fast.media.video",
    "dagan_fast.face": "dagan_fast.media.face",
    "dagan_fast.synthetic": "dagan_fast.media.synthetic",
    "dagan_fast.smoothing": "dagan_fast.streaming.smoothing",
    "dagan_fast.pretrained": "dagan_fast.checkpoints.pretrained",
    "dagan_fast.convert": "dagan_fast.cli.convert",
    "dagan_fast.demo": "dagan_fast.cli.demo",
    "dagan_fast.ops_demo": "dagan_fast.cli.ops_demo",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._own = (module.__spec__, module.__loader__)
        return module

    def exec_module(self, module) -> None:
        # already executed under its new name; the import system set the alias' spec on it, put its own back
        module.__spec__, module.__loader__ = self._own


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves the old names in ``MOVED`` to their new modules."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    """Adds the finder once (idempotent)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


def moved_attribute(name: str):
    """``dagan_fast.<name>`` for an old top-level module name (module ``__getattr__`` hook), else None."""
    new = MOVED.get(f"dagan_fast.{name}")
    return importlib.import_module(f"dagan_fast.{name}") if new else None
