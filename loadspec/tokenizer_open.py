"""Open an artifact's saved tokenizer without parsing its tokenizer.json twice.

transformers' `from_pretrained` parses tokenizer.json into a `tokenizers.Tokenizer`, then its
tokenizer's `__init__` deep-copies that object (serialising it and parsing the result again),
although nothing else holds it: for a 49k-token BPE tokenizer that copy took 0.14 s of a 0.25 s
open on the CPU box, all of it holding Python's lock. While `open_saved_tokenizer` runs, that
copy hands the fresh object over instead, for the opening thread only; every other deep copy,
and every other thread's, is a real one.
"""
from __future__ import annotations

import contextlib
import copy
import threading
from pathlib import Path

_open_lock = threading.Lock()  # one shortcut installed at a time: concurrent opens take turns


def open_saved_tokenizer(folder: Path, *, trust_remote_code: bool):
    """The tokenizer saved in `folder`, as `AutoTokenizer.from_pretrained` returns it."""
    from transformers import AutoTokenizer

    with _open_lock, _backend_parsed_once():
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


class _CopyExceptFreshBackend:
    """Stands in for the `copy` module inside transformers' tokenizer code: `deepcopy` of a `tokenizers.Tokenizer`
    in `thread` returns it as it is; everything else is the real `copy`."""

    def __init__(self, thread: int, backend_type: type):
        self._thread, self._backend_type = thread, backend_type

    def deepcopy(self, value, memo=None):
        if type(value) is self._backend_type and threading.get_ident() == self._thread:
            return value
        return copy.deepcopy(value, memo)

    def __getattr__(self, name: str):
        return getattr(copy, name)


@contextlib.contextmanager
def _backend_parsed_once():
    """While inside, transformers' tokenizer keeps the backend it was handed in this thread (see the module's
    docstring); a transformers without that module, or not using `copy` there, is left alone."""
    try:
        from tokenizers import Tokenizer
        from transformers import tokenization_utils_tokenizers as module
    except ImportError:
        module = None
    if module is None or getattr(module, "copy", None) is not copy:
        yield
        return

    module.copy = _CopyExceptFreshBackend(threading.get_ident(), Tokenizer)
    try:
        yield
    finally:
        module.copy = copy
