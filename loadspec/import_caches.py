"""Answers transformers recomputes at every import, kept in $LOADSPEC_CACHE (~/.cache/loadspec) until their inputs change.

- `importlib.metadata.packages_distributions()`, which transformers calls when imported, reads the file list of
  every installed distribution (1.4 s of `-X importtime` on the H100 image, whose CUDA packages have long RECORD
  files). Its answer is keyed by `sys.path` and each of its folders' modification time, which changes whenever a
  distribution is installed, upgraded or removed there.
- `transformers.utils.import_utils.define_import_structure(path)` reads every `.py` file of the model
  zoo (about 1,500) to find their `__all__`; transformers calls it twice on that folder while importing
  (0.35 s each on the CPU box, 0.45-0.57 s on the H100 machine). Its answer is keyed by the path, and by the
  relative path, modification time and size of every file and folder under it (a 20-30 ms walk), so an
  upgrade or an edit of any file computes it afresh. `transformers.processing_utils`, which every model
  family's code imports, runs transformers' `__init__` again: it must be imported while the cache is in place.
Each answer is a JSON file written whole and renamed into place, so a reader never sees half of one; a
read-only cache only means computing it each time, as transformers would.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import json
import os
import sys
import tempfile
from pathlib import Path

PACKAGE_MAP_FILE = "packages_distributions.json"
IMPORT_STRUCTURE_FOLDER = "import-structure"
IMPORT_UTILS = "transformers.utils.import_utils"


def _remembered(path: Path, key, compute, encode=lambda answer: answer, decode=lambda stored: stored):
    """compute()'s answer, read from `path` when it was kept there under the same `key`, else computed and kept."""
    try:
        stored = json.loads(path.read_text())
        if stored["key"] == key:
            return decode(stored["answer"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    answer = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".partial-", suffix=".json", delete=False) as handle:
            json.dump({"key": key, "answer": encode(answer)}, handle)
        os.replace(handle.name, path)
    except OSError:
        pass
    return answer


def _package_map_key() -> list:
    """sys.path with each entry's modification time: any install, upgrade or removal there changes it."""
    key = []
    for entry in sys.path:
        try:
            key.append([entry, os.stat(entry or ".").st_mtime_ns])
        except OSError:
            key.append([entry, None])
    return key


@contextlib.contextmanager
def cached_package_map():
    """While inside, `importlib.metadata.packages_distributions()` answers from its kept result when
    nothing on sys.path changed since it was computed (and computes and keeps it otherwise)."""
    from .store import cache_root

    real = importlib.metadata.packages_distributions
    path = cache_root() / PACKAGE_MAP_FILE

    def cached():
        answer = _remembered(path, _package_map_key(), real)
        return {package: list(names) for package, names in answer.items()}

    importlib.metadata.packages_distributions = cached
    try:
        yield
    finally:
        importlib.metadata.packages_distributions = real


def _tree_key(folder: str) -> str:
    """A digest of every file's and folder's relative path, modification time and size under `folder`."""
    digest = hashlib.sha256()
    start = len(os.path.join(folder, ""))
    for parent, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if name != "__pycache__")
        for name in sorted(files) + folders:
            path = os.path.join(parent, name)
            stat = os.stat(path)
            digest.update(f"{path[start:]}\0{stat.st_mtime_ns}\0{stat.st_size}\n".encode())
    return digest.hexdigest()


def _encode_structure(structure: dict) -> list:
    return [[sorted(backends), [[module, sorted(names)] for module, names in modules.items()]]
            for backends, modules in structure.items()]


def _decode_structure(stored: list) -> dict:
    return {frozenset(backends): {module: set(names) for module, names in modules} for backends, modules in stored}


def _remembering(define_import_structure):
    """define_import_structure, answering from the cache when nothing under the folder changed (each folder is
    walked once: transformers asks about its model zoo under two names)."""
    from .store import cache_root

    tree_keys: dict[str, str] = {}

    @functools.lru_cache
    def cached(module_path, prefix=None):
        folder = os.path.dirname(module_path) if os.path.isfile(module_path) else str(module_path)
        try:
            if folder not in tree_keys:
                tree_keys[folder] = _tree_key(folder)
            key = [str(module_path), prefix, tree_keys[folder]]
        except OSError:  # a file vanished or cannot be read meanwhile: let transformers look for itself
            return define_import_structure(module_path, prefix)
        where = hashlib.sha256(f"{module_path}\0{prefix}".encode()).hexdigest()[:24]
        return _remembered(cache_root() / IMPORT_STRUCTURE_FOLDER / f"{where}.json", key,
                           lambda: define_import_structure(module_path, prefix), _encode_structure, _decode_structure)

    cached.__wrapped__ = define_import_structure
    return cached


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds module `name` as the other finders would, and calls `patch(module)` right after it runs."""

    def __init__(self, name: str, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            self.patch(module)

        spec.loader.exec_module = exec_module  # this loader object belongs to this one spec
        return spec


@contextlib.contextmanager
def cached_import_structure():
    """While inside, a first import of transformers reads its model zoo's import structure from the cache
    (and computes and keeps it when any file there changed). Nothing changes when transformers is already imported."""
    patched = []

    def patch(module):
        real = getattr(module, "define_import_structure", None)
        if callable(real):  # another transformers may not have it: then nothing is kept
            patched.append((module, real))
            module.define_import_structure = _remembering(real)

    finder = None
    if IMPORT_UTILS not in sys.modules:
        finder = _PatchAfterImport(IMPORT_UTILS, patch)
        sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        if finder is not None:
            sys.meta_path.remove(finder)
        for module, real in patched:  # later callers (one model family's package each) compute it as before
            module.define_import_structure = real
