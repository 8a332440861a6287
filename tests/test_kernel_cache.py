"""Compiled kernels in the artifact: kernels.json always says what was shipped and why; a matching GPU gets
the binaries unpacked into Triton's cache (atomically, never over an entry already there); anything else
falls back to compiling with a notice. The GPU tests prove the point: no compilation on the first step."""
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

import loadspec
from loadspec import kernel_cache
from loadspec.errors import LoadspecError
from loadspec.store import Store

GPU = {"name": "NVIDIA H100 80GB HBM3", "capability": [9, 0]}


def _artifact(tmp_path, entries: dict, gpu=GPU, triton=None, name="artifact"):
    folder = tmp_path / name
    folder.mkdir()
    with tarfile.open(folder / kernel_cache.KERNELS_TAR, "w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    record = {"compiled": True, "gpu": gpu, "triton": triton or kernel_cache._triton_version(), "variants": [{}] * 2}
    (folder / kernel_cache.KERNELS_JSON).write_text(json.dumps(record))
    return folder


@pytest.fixture
def triton_cache(tmp_path, monkeypatch):
    cache = tmp_path / "triton-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    monkeypatch.delenv("LOADSPEC_KERNEL_CACHE", raising=False)
    return cache


def test_cpu_build_records_why_nothing_was_compiled(checkpoint, write_spec, tmp_path):
    source = checkpoint("llama")
    built = loadspec.build(write_spec(source, name="k", load={"quant": "none"}, train={"kernels": True}),
                           cache_dir=tmp_path, progress=False)
    folder = Store(tmp_path).artifact_path(built.plan.fingerprint)
    record = json.loads((folder / "kernels.json").read_text())
    assert record["compiled"] is False and "the target is a CPU" in record["reason"]
    assert record["kernels"] == {p["kernel"]: p["version"] for p in built.plan.patches}
    assert "kernels.json" in json.loads((folder / "manifest.json").read_text())["files"]
    assert not (folder / kernel_cache.KERNELS_TAR).exists()
    assert "none in this artifact (the target is a CPU)" in kernel_cache.restore(folder)[1]


def test_kernels_off_is_the_reason_when_not_asked(checkpoint, write_spec, tmp_path):
    built = loadspec.build(write_spec(checkpoint("llama"), name="plain", load={"quant": "none"}, target="h100"),
                           cache_dir=tmp_path, progress=False)
    record = json.loads((Store(tmp_path).artifact_path(built.plan.fingerprint) / "kernels.json").read_text())
    assert record["compiled"] is False and record["reason"].startswith("[train] kernels is off")


def test_restore_unpacks_missing_entries_once(tmp_path, triton_cache, monkeypatch):
    monkeypatch.setattr(kernel_cache, "_gpu", lambda: dict(GPU))
    folder = _artifact(tmp_path, {"abcdefgh01/k.cubin": b"\x7fELF", "abcdefgh01/__grp__k.json": b"{}",
                                  "ijklmnop02/k.json": b"{}"})
    (triton_cache / "ijklmnop02").mkdir(parents=True)
    (triton_cache / "ijklmnop02" / "k.json").write_text("mine")
    line = kernel_cache.restore(folder)[1]
    assert line.startswith("compiled kernels: 1 restored")
    assert (triton_cache / "abcdefgh01" / "k.cubin").read_bytes() == b"\x7fELF"
    assert (triton_cache / "ijklmnop02" / "k.json").read_text() == "mine"  # an existing entry is never overwritten
    assert kernel_cache.restore(folder)[1].startswith("compiled kernels: 0 restored")
    assert sorted(p.name for p in triton_cache.iterdir()) == ["abcdefgh01", "ijklmnop02"]  # no staging left over


def test_restored_entries_are_cache_hits_for_triton(tmp_path, triton_cache, monkeypatch):
    """Triton's group files name their entry's files by absolute path (the build's staging cache, gone by load
    time): restored groups must point into this cache, or Triton's lookup misses and recompiles everything."""
    pytest.importorskip("triton")  # part of the install on Linux x86_64; the format under test is Triton's own
    from triton.runtime.cache import get_cache_manager

    monkeypatch.setattr(kernel_cache, "_gpu", lambda: dict(GPU))
    key = "ab" * 32
    build_cache = tmp_path / "build-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(build_cache))
    built = get_cache_manager(key)
    paths = {name: built.put(data, name, binary=True) for name, data in (("k.cubin", b"\x7fELF"), ("k.json", b"{}"))}
    built.put_group("k.json", paths)
    entry = Path(paths["k.json"]).parent
    folder = _artifact(tmp_path, {f"{entry.name}/{f.name}": f.read_bytes() for f in entry.iterdir()})
    shutil.rmtree(build_cache)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(triton_cache))
    assert kernel_cache.restore(folder)[1].startswith("compiled kernels: 1 restored")
    group = get_cache_manager(key).get_group("k.json")  # what triton.compile asks before compiling
    assert group == {name: str(triton_cache / entry.name / name) for name in ("k.cubin", "k.json")}
    assert Path(group["k.cubin"]).read_bytes() == b"\x7fELF"


def test_other_gpu_or_triton_falls_back_with_notice(tmp_path, triton_cache, monkeypatch):
    monkeypatch.setattr(kernel_cache, "_gpu", lambda: {"name": "NVIDIA A100", "capability": [8, 0]})
    folder = _artifact(tmp_path, {"abcdefgh01/k.cubin": b"x"})
    assert "but this is NVIDIA A100 (capability [8, 0])" in kernel_cache.restore(folder)[1]
    monkeypatch.setattr(kernel_cache, "_gpu", lambda: dict(GPU))
    other = _artifact(tmp_path, {"abcdefgh01/k.cubin": b"x"}, triton="2.0.0", name="old")
    assert "with triton 2.0.0" in kernel_cache.restore(other)[1] and "first step compiles" in kernel_cache.restore(other)[1]
    assert not triton_cache.exists()
    monkeypatch.setenv("LOADSPEC_KERNEL_CACHE", "0")
    assert "not restored ($LOADSPEC_KERNEL_CACHE=0)" in kernel_cache.restore(folder)[1]


@pytest.mark.parametrize("name", ["../evil/k.cubin", "abcdefgh01/../../x", "abcdefgh01/sub/k.cubin", "/abs/k"])
def test_hostile_archive_member_refused(tmp_path, triton_cache, monkeypatch, name):
    monkeypatch.setattr(kernel_cache, "_gpu", lambda: dict(GPU))
    folder = _artifact(tmp_path, {name: b"x"})
    with pytest.raises(LoadspecError, match="no Triton cache entry.*--force"):
        kernel_cache.restore(folder)[1]
    assert not (tmp_path / "evil").exists()


FIRST_STEP = """
import json, sys, torch, triton, loadspec
compiled = []
triton.knobs.compilation.listener = lambda **kw: compiled.append(kw["cache_hit"])
model, tok = loadspec.load(sys.argv[1], cache_dir=sys.argv[2], patch=True)
model.train()
ids = torch.randint(0, model.config.vocab_size, (1, 128), device="cuda")
model(input_ids=ids, labels=ids).loss.backward()
torch.cuda.synchronize()
print("RESULT", json.dumps({"variants": len(compiled), "misses": compiled.count(False)}))
"""


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_gpu_build_ships_kernels_and_first_step_compiles_nothing(checkpoint, write_spec, tmp_path, family, fresh_python):
    spec = write_spec(checkpoint(family), name="kc", load={"quant": "nf4"}, target="auto", train={"kernels": True},
                      lora={"r": 8})
    built = loadspec.build(spec, cache_dir=tmp_path / "cache", progress=False)
    folder = Store(tmp_path / "cache").artifact_path(built.plan.fingerprint)
    record = json.loads((folder / "kernels.json").read_text())
    assert record["compiled"] is True, record
    assert record["gpu"]["capability"] == list(torch.cuda.get_device_capability())
    assert {v["kernel"] for v in record["variants"]} >= {"_rmsnorm_fwd", "_rmsnorm_bwd"}
    cached, notice = fresh_python(FIRST_STEP, "kc", tmp_path / "cache", TRITON_CACHE_DIR=str(tmp_path / "triton-a"),
                                  TRITON_INTERPRET=None)
    print("NOTICE", cached, notice[-1500:].replace("\n", " | "))
    assert cached["variants"] > 0 and cached["misses"] == 0, cached
    assert "first step compiles" not in notice
    uncached, notice = fresh_python(FIRST_STEP, "kc", tmp_path / "cache", TRITON_CACHE_DIR=str(tmp_path / "triton-b"),
                                    TRITON_INTERPRET=None, LOADSPEC_KERNEL_CACHE="0")
    assert uncached["misses"] == uncached["variants"] > 0
    assert "not restored ($LOADSPEC_KERNEL_CACHE=0)" in notice
