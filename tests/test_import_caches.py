"""Import caches: transformers' import-time answers are read back when nothing changed, and recomputed when anything did."""
import json
import os
import sys

import transformers
from transformers.utils import import_utils

from loadspec import import_caches

MODELS = os.path.join(os.path.dirname(transformers.__file__), "models")


def test_package_map_is_reused_until_an_install_changes_sys_path(tmp_path, monkeypatch):
    """transformers' packages_distributions() call answers from the cache, and an install is seen at once."""
    import importlib.metadata

    calls = []
    real = importlib.metadata.packages_distributions
    monkeypatch.setattr(importlib.metadata, "packages_distributions", lambda: calls.append(1) or real())
    counting = importlib.metadata.packages_distributions
    monkeypatch.setenv("LOADSPEC_CACHE", str(tmp_path / "cache"))
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    with import_caches.cached_package_map():
        first = importlib.metadata.packages_distributions()
        again = importlib.metadata.packages_distributions()
    assert first == again == real() and len(calls) == 1  # the second answer came from the cache file
    dist = site / "tinypkg-1.0.dist-info"  # "pip install tinypkg" into a folder on sys.path
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n")
    (dist / "top_level.txt").write_text("tinypkg\n")
    os.utime(site, ns=(os.stat(site).st_atime_ns, os.stat(site).st_mtime_ns + 10**9))  # coarse clocks: a distinct mtime
    with import_caches.cached_package_map():
        after = importlib.metadata.packages_distributions()
    assert after["tinypkg"] == ["tinypkg"] and len(calls) == 2
    assert importlib.metadata.packages_distributions is counting  # put back on exit


def _zoo(root):
    """A two-family model folder laid out as transformers' is: each family's files declare `__all__`."""
    for family, cls in (("alpha", "AlphaModel"), ("beta", "BetaModel")):
        (root / family).mkdir(parents=True)
        (root / family / "__init__.py").write_text("")
        (root / family / f"modeling_{family}.py").write_text(f"class {cls}: pass\n__all__ = [\"{cls}\"]\n")
        (root / family / f"configuration_{family}.py").write_text(f"__all__ = [\"{cls[:-5]}Config\"]\n")
    (root / "__init__.py").write_text("")
    return root / "__init__.py"


def _counting(calls):
    real = import_utils.define_import_structure.__wrapped__  # past transformers' own in-process lru_cache

    def define(module_path, prefix=None):
        calls.append(str(module_path))
        import_utils.create_import_structure_from_path.cache_clear()  # as in a new process
        return real(module_path, prefix)
    return define


def test_import_structure_is_read_back_until_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("LOADSPEC_CACHE", str(tmp_path / "cache"))
    init = _zoo(tmp_path / "zoo")
    calls = []
    first = import_caches._remembering(_counting(calls))(str(init))
    again = import_caches._remembering(_counting(calls))(str(init))  # a new process: its own lru_cache, the same disk cache
    assert len(calls) == 1 and again == first
    assert first[frozenset({"torch"})]["alpha.modeling_alpha"] == {"AlphaModel"}
    assert {type(key) for key in again} == {frozenset} and {type(v) for m in again.values() for v in m.values()} == {set}

    modeling = tmp_path / "zoo" / "beta" / "modeling_beta.py"  # an in-place edit (an editable install, a patch)
    modeling.write_text("class BetaModel: pass\nclass BetaHead: pass\n__all__ = [\"BetaModel\", \"BetaHead\"]\n")
    os.utime(modeling, ns=(modeling.stat().st_atime_ns, modeling.stat().st_mtime_ns + 10**9))
    edited = import_caches._remembering(_counting(calls))(str(init))
    assert len(calls) == 2 and edited[frozenset({"torch"})]["beta.modeling_beta"] == {"BetaModel", "BetaHead"}

    (tmp_path / "zoo" / "gamma").mkdir()  # a family added by an upgrade
    (tmp_path / "zoo" / "gamma" / "modeling_gamma.py").write_text("__all__ = [\"GammaModel\"]\n")
    added = import_caches._remembering(_counting(calls))(str(init))
    assert len(calls) == 3 and added[frozenset({"torch"})]["gamma.modeling_gamma"] == {"GammaModel"}


def test_cached_structure_of_the_real_model_zoo_equals_transformers_own(tmp_path, monkeypatch):
    monkeypatch.setenv("LOADSPEC_CACHE", str(tmp_path / "cache"))
    real = import_utils.define_import_structure.__wrapped__
    for args in ((os.path.join(MODELS, "__init__.py"), None), (MODELS, "models")):
        import_caches._remembering(real)(*args)
        assert import_caches._remembering(real)(*args) == real(*args)


def test_unreadable_cache_is_recomputed_and_a_read_only_one_is_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LOADSPEC_CACHE", str(tmp_path / "cache"))
    init = _zoo(tmp_path / "zoo")
    calls = []
    expected = import_caches._remembering(_counting(calls))(str(init))
    [kept] = (tmp_path / "cache" / import_caches.IMPORT_STRUCTURE_FOLDER).iterdir()
    kept.write_text('{"key": ')  # cut short by a crash of something else
    assert import_caches._remembering(_counting(calls))(str(init)) == expected and len(calls) == 2
    assert json.loads(kept.read_text())["key"][0] == str(init)  # rewritten whole
    monkeypatch.setenv("LOADSPEC_CACHE", "/proc/loadspec-cannot-write-here")
    assert import_caches._remembering(_counting(calls))(str(init)) == expected and len(calls) == 3


PROBE = """
import json, sys
from loadspec.deferred_imports import import_model_libraries
import_model_libraries(bitsandbytes=False)
import transformers
from transformers.utils import import_utils
scanned = import_utils.create_import_structure_from_path.cache_info().misses
print("RESULT", json.dumps(dict(scanned=scanned, llama=transformers.LlamaForCausalLM.__name__,
                                gemma_config=transformers.models.gemma.GemmaConfig.__name__,
                                restored=import_utils.define_import_structure.__module__)))
"""


def test_second_fresh_process_does_not_scan_the_model_zoo(tmp_path, fresh_python):
    cache = str(tmp_path / "cache")
    (first, _), (second, _) = fresh_python(PROBE, LOADSPEC_CACHE=cache), fresh_python(PROBE, LOADSPEC_CACHE=cache)
    plain, _ = fresh_python(PROBE, LOADSPEC_CACHE=cache, LOADSPEC_DEFER_IMPORTS="0")
    assert plain["scanned"] > 400 and first["scanned"] > 400  # every model family's folder, at least once
    assert second["scanned"] == 0  # none: both of transformers' calls were answered from the cache
    for result in (first, second, plain):  # names resolve lazily as before, and the original is back after the import
        assert (result["llama"], result["gemma_config"]) == ("LlamaForCausalLM", "GemmaConfig")
        assert result["restored"] == "transformers.utils.import_utils"


def test_patch_runs_right_after_the_module_and_only_for_it(tmp_path, monkeypatch):
    (tmp_path / "watched.py").write_text("def answer():\n    return 41\n")
    (tmp_path / "other.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("watched", "other"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    seen = []

    def patch(module):
        seen.append(module.__name__)
        real = module.answer
        module.answer = lambda: real() + 1

    finder = import_caches._PatchAfterImport("watched", patch)
    sys.meta_path.insert(0, finder)
    try:
        import other
        import watched
    finally:
        sys.meta_path.remove(finder)
    assert seen == ["watched"] and watched.answer() == 42 and other.VALUE == 1
