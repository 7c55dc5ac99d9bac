"""How a patched instance gets its fused forward.

The instance carries its patch state in ``__dict__`` (attribute ``_dagan_fast_patch``), and its class's
``forward`` is wrapped, once, by a dispatcher: instances with a state run the fused forward, every other
instance (never patched, or unpatched) runs the original function unchanged. Binding a method on the
instance alone would not survive ``nn.DataParallel``: its replicas copy the instance ``__dict__``, so a
bound method would run the original module's parameters on every device; the state, copied the same way,
makes each replica run the fused forward on its own parameters. When the last patched instance of a class
is unpatched, the class attribute is restored exactly (or deleted, if the class inherited its forward).
"""
from __future__ import annotations

import functools
import threading
import weakref
from typing import Callable, Dict

STATE_ATTR = "_dagan_fast_patch"
_lock = threading.Lock()
_MISSING = object()


class _ClassPatch:
    def __init__(self, cls: type, own, original: Callable):
        self.cls, self.own, self.original = cls, own, original
        self.instances: "weakref.WeakSet" = weakref.WeakSet()


_PATCHED: Dict[type, _ClassPatch] = {}


def original_forward(cls: type) -> Callable:
    """The forward function ``cls`` had before any dispatcher was installed (on it or a base class)."""
    fn = getattr(cls, "forward")
    return getattr(fn, "_dagan_fast_original", fn)


def _owner(cls: type) -> type:
    """The class whose ``forward`` attribute instances of ``cls`` see (cls or the base it inherits from)."""
    for klass in cls.__mro__:
        if "forward" in klass.__dict__:
            return klass
    return cls


def install(module) -> type:
    """Makes ``type(module).forward`` dispatch on the instance state (idempotent), counts ``module``, and
    returns the class whose dispatcher serves it (the state's ``owner``: a dispatcher of another class, reached
    through ``super().forward``, runs the original, so a subclass's own forward keeps its meaning)."""
    with _lock:
        cls = type(module)
        fn = getattr(cls, "forward")
        if getattr(fn, "_dagan_fast_original", None) is not None:
            owner = _owner(cls)
            _PATCHED[owner].instances.add(module)
            return owner
        original = fn
        own = cls.__dict__.get("forward", _MISSING)

        @functools.wraps(original)
        def forward(self, *args, **kwargs):
            state = self.__dict__.get(STATE_ATTR)
            if state is None or state.owner is not cls:
                return original(self, *args, **kwargs)
            return state.call(self, original, args, kwargs)

        forward._dagan_fast_original = original
        setattr(cls, "forward", forward)
        record = _ClassPatch(cls, own, original)
        record.instances.add(module)
        _PATCHED[cls] = record
        return cls


def release(module) -> None:
    """Uncounts ``module``; restores its class's forward when no patched instance is left."""
    with _lock:
        cls = _owner(type(module))
        record = _PATCHED.get(cls)
        if record is None:
            return
        record.instances.discard(module)
        if len(record.instances):
            return
        current = cls.__dict__.get("forward", _MISSING)
        if getattr(current, "_dagan_fast_original", None) is record.original:  # nobody replaced it since
            if record.own is _MISSING:
                delattr(cls, "forward")
            else:
                setattr(cls, "forward", record.own)
        del _PATCHED[cls]
