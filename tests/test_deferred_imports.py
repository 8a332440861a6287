"""Deferred imports: what a load never runs is imported on first use, and behaves exactly as before."""
import subprocess
import sys
import textwrap

import torch

import loadspec
from loadspec import deferred_imports


def _package(tmp_path, monkeypatch):
    """slowpkg.metrics records each time it runs; consumer takes two names from it, as transformers does."""
    (tmp_path / "slowpkg").mkdir()
    (tmp_path / "slowpkg" / "__init__.py").write_text("")
    log = tmp_path / "ran.log"
    (tmp_path / "slowpkg" / "metrics.py").write_text(textwrap.dedent(f"""
        open({str(log)!r}, "a").write("ran\\n")
        def area(a, b): return a * b
        class table: rows = 3
    """))
    (tmp_path / "consumer.py").write_text("from slowpkg.metrics import area, table\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("slowpkg", "slowpkg.metrics", "consumer"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return log


def test_deferred_module_runs_only_when_used(tmp_path, monkeypatch):
    log = _package(tmp_path, monkeypatch)
    with deferred_imports.deferred_modules(["slowpkg.metrics"]):
        import consumer
    assert not log.exists() and "slowpkg.metrics" not in sys.modules
    assert consumer.area(3, 4) == 12 and consumer.table.rows == 3
    assert log.read_text() == "ran\n"  # imported once, on first use
    import slowpkg.metrics

    assert slowpkg.metrics.area is consumer.area._target()  # the real module, not the stand-in


def test_already_imported_module_is_left_alone(tmp_path, monkeypatch):
    log = _package(tmp_path, monkeypatch)
    import slowpkg.metrics

    with deferred_imports.deferred_modules(["slowpkg.metrics"]):
        import consumer
    assert consumer.area is slowpkg.metrics.area and log.read_text() == "ran\n"


def test_compile_deferred_until_first_call_and_same_result():
    calls = []

    def scale(x):
        calls.append(1)
        return x * 2 + 1

    with deferred_imports.compile_on_first_call():
        compiled = torch.compile(scale, backend="eager", dynamic=False)
        module = torch.compile(torch.nn.Linear(2, 2), backend="eager")
    assert not calls and compiled.__wrapped__ is scale and compiled.__name__ == "scale"
    x = torch.arange(4.0)
    assert torch.equal(compiled(x), x * 2 + 1) and torch.equal(compiled(x), x * 2 + 1)
    assert isinstance(module, torch.nn.Module)  # modules go straight to torch.compile
    assert torch.compile is not None and "deferred" not in torch.compile.__qualname__


PROBE = """
import json, sys, torch
from loadspec.deferred_imports import import_model_libraries
import_model_libraries(bitsandbytes=True)
import bitsandbytes.functional as F
from transformers.generation import candidate_generator
from transformers.loss import loss_for_object_detection
heavy = {name: name in sys.modules for name in ("sklearn", "scipy.optimize", "torch._inductor.compile_fx")}
torch.manual_seed(0)  # NF4's largest error on unseeded random weights occasionally reached the bound
w = torch.randn(64, 64, dtype=torch.bfloat16)
packed, state = F.quantize_4bit(w, quant_type="nf4")
error = float((F.dequantize_4bit(packed, state) - w).abs().max())
fpr, tpr, _ = candidate_generator.roc_curve([0, 1, 1, 0], [0.1, 0.9, 0.6, 0.4])
rows, cols = loss_for_object_detection.linear_sum_assignment([[4, 1], [2, 8]])
print("RESULT", json.dumps(dict(heavy=heavy, error=error, auc_points=len(fpr), tpr_last=float(tpr[-1]), assignment=cols.tolist())))
"""


def test_fresh_process_skips_sklearn_and_inductor_but_both_still_work(fresh_python):
    (deferred, _), (eager, _) = fresh_python(PROBE), fresh_python(PROBE, LOADSPEC_DEFER_IMPORTS="0")
    assert deferred["heavy"] == {"sklearn": False, "scipy.optimize": False, "torch._inductor.compile_fx": False}
    assert eager["heavy"] == {"sklearn": True, "scipy.optimize": True, "torch._inductor.compile_fx": True}  # what it saves
    for result in (deferred, eager):  # bitsandbytes' 4-bit round trip and transformers' helpers behave the same
        assert 0 < result["error"] < 0.5 and result["tpr_last"] == 1.0 and result["assignment"] == [1, 0]
    assert deferred["auc_points"] == eager["auc_points"]


def test_load_in_fresh_process_does_not_import_sklearn(checkpoint, write_spec, tmp_path):
    spec = write_spec(checkpoint("llama"), name="fresh", load={"quant": "nf4"})
    loadspec.build(spec, cache_dir=tmp_path / "cache", progress=False)
    code = ("import sys, loadspec; m, tok = loadspec.load('fresh', cache_dir=sys.argv[1]); "
            "m(**tok('hello', return_tensors='pt')); print('RESULT', 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "RESULT False"


GC_PROBE = """
import gc, json, sys
runs = []
gc.callbacks.append(lambda phase, info: phase == "start" and runs.append(info["generation"]))
if sys.argv[1] == "preimported":
    import transformers.modeling_utils
if sys.argv[1] == "user_disabled":
    gc.disable()
from loadspec.deferred_imports import import_model_libraries
before = len(runs)
import_model_libraries(bitsandbytes=True)
import transformers.modeling_utils as mu
print("RESULT", json.dumps(dict(
    collections_during_import=len(runs) - before, enabled=gc.isenabled(), frozen=gc.get_freeze_count(),
    library_class_collectable=any(o is mu.PreTrainedModel for g in range(3) for o in gc.get_objects(g)))))
"""


def test_fresh_import_runs_no_collection_and_freezes_what_it_made(fresh_python):
    result, _ = fresh_python(GC_PROBE, "fresh")
    assert result["collections_during_import"] == 0 and result["enabled"]
    assert result["frozen"] > 100_000 and not result["library_class_collectable"]  # no later collection walks them


def test_already_imported_libraries_are_not_frozen(fresh_python):
    result, _ = fresh_python(GC_PROBE, "preimported")
    assert result["frozen"] == 0 and result["library_class_collectable"] and result["enabled"]


def test_collection_the_user_turned_off_stays_off(fresh_python):
    result, _ = fresh_python(GC_PROBE, "user_disabled")
    assert not result["enabled"] and result["collections_during_import"] == 0


def test_no_pause_or_freeze_when_deferring_is_off(fresh_python):
    result, _ = fresh_python(GC_PROBE, "fresh", LOADSPEC_DEFER_IMPORTS="0")
    assert result["frozen"] == 0 and result["collections_during_import"] > 0


def test_failed_import_turns_collection_back_on_and_freezes_nothing():
    import gc

    try:
        with deferred_imports.collection_paused(freeze=True):
            assert not gc.isenabled()
            raise ImportError("no module named transformers")
    except ImportError:
        pass
    assert gc.isenabled() and gc.get_freeze_count() == 0
