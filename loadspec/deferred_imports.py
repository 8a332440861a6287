"""Import transformers' model code and bitsandbytes without the parts a load never runs.

A fresh process spends most of its start in imports. Some of them do nothing for a load:
- transformers' assisted generation imports `sklearn.metrics` (and with it scipy and pandas) for one
  function, `roc_curve`, whenever scikit-learn is installed (`-X importtime` on the H100 image: 7.4 s);
- its object-detection losses import `scipy.optimize` for one function, `linear_sum_assignment`;
- bitsandbytes wraps its CPU fallbacks in `torch.compile` at import time, which imports torch's
  inductor compiler stack (2.9 s there).
While they are imported here, `sklearn.metrics` and `scipy.optimize` are stand-ins whose attributes import the real module
on first use, and `torch.compile` of a plain function returns a wrapper that compiles on first call
(torch.compile itself compiles only at the first call, so nothing changes but when the import happens).

What does run but need not be recomputed every time is read from `import_caches`.

Python's cyclic garbage collector runs full collections while these imports build some 400k objects that
live as long as the process, finding almost nothing to free (on the CPU box: 0.4 s of a 2.3 s import). It is
paused during them, and when they were this process's first, what exists then is frozen (`gc.freeze`): every
later full collection, in the load and through training, would otherwise walk those objects again (0.15 s each).
Frozen objects are still freed by reference counting; only cycles among them are never collected.

Nothing is deferred when the library was already imported. `LOADSPEC_DEFER_IMPORTS=0` turns this off.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import inspect
import os
import sys
import types

from .import_caches import cached_import_structure, cached_package_map

DEFERRED_MODULES = ("sklearn.metrics", "scipy.optimize")


def import_model_libraries(*, bitsandbytes: bool) -> None:
    """Import transformers' model classes (and bitsandbytes when the model needs it), deferring what loads never use."""
    defer = os.environ.get("LOADSPEC_DEFER_IMPORTS", "1") != "0"
    first = "transformers.modeling_utils" not in sys.modules
    with collection_paused(freeze=first) if defer else contextlib.nullcontext(), \
            deferred_modules(DEFERRED_MODULES) if defer else contextlib.nullcontext(), \
            cached_package_map() if defer else contextlib.nullcontext(), \
            cached_import_structure() if defer else contextlib.nullcontext():
        import transformers.modeling_utils  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (these import transformers.generation)
        # every model family's code imports it, and it runs transformers' __init__ once more as a module of its own
        import transformers.processing_utils  # noqa: F401
        if bitsandbytes:
            with compile_on_first_call() if defer else contextlib.nullcontext():
                import bitsandbytes  # noqa: F401


@contextlib.contextmanager
def collection_paused(*, freeze: bool):
    """No cyclic garbage collection while inside; it is back on after, unless the caller had turned it off. With
    `freeze`, once the body has finished without an error, every object alive is frozen out of later collections."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        if freeze:
            gc.freeze()
    finally:
        if was_enabled:
            gc.enable()


class _StandIn(types.ModuleType):
    """Takes a module's place in sys.modules while others import it; what they take from it resolves later."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Resolved(self.__name__, attr)


class _Resolved:
    """`module.attr`, looked up (and the module imported) the first time it is called or read."""

    def __init__(self, module: str, attr: str):
        self._where = (module, attr)

    def _target(self):
        module, attr = self._where
        if isinstance(sys.modules.get(module), _StandIn):
            del sys.modules[module]  # still deferring: let the real import replace the stand-in
        return getattr(importlib.import_module(module), attr)

    def __call__(self, *args, **kwargs):
        return self._target()(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._target(), name)

    def __repr__(self) -> str:
        return "<deferred {}.{}>".format(*self._where)


@contextlib.contextmanager
def deferred_modules(names):
    """While inside, importing any of `names` (not yet imported) gives a stand-in; afterwards the real
    module imports normally, and what was taken from the stand-in resolves to it on first use."""
    placed = [name for name in names if name not in sys.modules]
    for name in placed:
        sys.modules[name] = _StandIn(name)
    try:
        yield
    finally:
        for name in placed:
            if isinstance(sys.modules.get(name), _StandIn):
                del sys.modules[name]


@contextlib.contextmanager
def compile_on_first_call():
    """While inside, `torch.compile(function, ...)` (or its decorator form) returns a wrapper that calls
    the real `torch.compile` on its first call; modules and anything else go straight to torch.compile."""
    import torch

    real = torch.compile

    def deferred(target=None, **options):
        if target is None:
            return lambda function: deferred(function, **options)
        if not inspect.isfunction(target):
            return real(target, **options)
        compiled = None

        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = real(target, **options)
            return compiled(*args, **kwargs)

        call.__wrapped__ = target
        call.__name__, call.__qualname__, call.__doc__ = target.__name__, target.__qualname__, target.__doc__
        return call

    torch.compile = deferred
    try:
        yield
    finally:
        torch.compile = real
