"""Many processes, one cache: exactly one build (or download) with locks; never a partial artifact without.

The workers are separate processes started by a forkserver that imported torch and
transformers once (a spawn per worker would spend most of the test importing them on a
2-core machine); each worker has its own interpreter state, store and index connection.
"""
import importlib.util
import multiprocessing
import os
import traceback
from pathlib import Path

import pytest
import torch

import loadspec
from loadspec.store import Store

QUANT = "nf4" if importlib.util.find_spec("loadspec.quant") else "none"
WORKERS = 8
PROMPT = "What is the capital of France? Paris is"


def _worker(target, cache, remote, env, barrier, out):
    """One process: wait for all, then load `target` (a spec path or a name); write logits or the traceback."""
    os.environ.update(env)
    torch.set_num_threads(1)
    if env.get("FETCH_LOG"):
        from loadspec import remote as remotes

        real = remotes.fetch_file

        def logged(remote_, relative, blob, entry, bar):
            real(remote_, relative, blob, entry, bar)
            with open(env["FETCH_LOG"], "a") as handle:
                handle.write(relative + "\n")

        remotes.fetch_file = logged
    barrier.wait(timeout=300)
    try:
        model, tokenizer = loadspec.load(target, cache_dir=cache, remote=remote)
        with torch.no_grad():
            logits = model(tokenizer(PROMPT, return_tensors="pt").input_ids).logits
        torch.save(logits, Path(out) / f"{os.getpid()}.pt")
    except BaseException:
        (Path(out) / f"{os.getpid()}.error").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "transformers", "transformers.models.llama.modeling_llama",
                                "transformers.tokenization_utils_tokenizers", "bitsandbytes", "accelerate", "diskcache",
                                "sqlite3", "loadspec.api", "loadspec.builder", "loadspec.loader", "loadspec.remote",
                                "loadspec.quant", "test_concurrency"])
    return ctx


def run_all(context, target, cache, out, env, remote=None):
    """Start WORKERS processes on one target; return (the logits each wrote, the errors)."""
    out.mkdir()
    barrier = context.Barrier(WORKERS)
    processes = [context.Process(target=_worker, args=(str(target), str(cache), remote, env, barrier, str(out)))
                 for _ in range(WORKERS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    errors = [p.read_text() for p in out.glob("*.error")]
    assert all(p.exitcode == 0 for p in processes), errors or [p.exitcode for p in processes]
    return [torch.load(p) for p in sorted(out.glob("*.pt"))], errors


def check_cache(cache, name):
    """Exactly one sound artifact, the name pointing to it, nothing left in tmp/."""
    store = Store(cache)
    fingerprint = store.ref(name)["fingerprint"]
    assert [p.name for p in store.artifacts.iterdir()] == [fingerprint]
    assert store.verify(fingerprint) == []
    assert list(store.tmp.iterdir()) == []
    return store, fingerprint


@pytest.mark.parametrize("locks", [True, False], ids=["locks", "no-locks"])
def test_eight_processes_build_and_load_one_spec(locks, context, checkpoint, write_spec, tmp_path):
    spec = write_spec(checkpoint("llama"), name="shared", load={"quant": QUANT})
    cache, log = tmp_path / "cache", tmp_path / "builds.log"
    env = {"LOADSPEC_BUILD_LOG": str(log), "LOADSPEC_NO_LOCKS": "" if locks else "1"}
    logits, errors = run_all(context, spec, cache, tmp_path / "out", env)
    assert not errors and len(logits) == WORKERS
    assert all(torch.equal(l, logits[0]) for l in logits)
    builds = log.read_text().splitlines()
    if locks:
        assert len(builds) == 1, builds
    else:  # several may build; the first rename wins and the others throw their copy away
        assert 1 <= len(builds) <= WORKERS
        print(f"without locks: {len(builds)} build(s) for {WORKERS} processes")
    check_cache(cache, "shared")


@pytest.mark.parametrize("locks", [True, False], ids=["locks", "no-locks"])
def test_eight_processes_pull_on_miss_from_a_shared_folder(locks, context, checkpoint, write_spec, tmp_path):
    spec = write_spec(checkpoint("llama"), name="pulled", load={"quant": QUANT})
    remote = str(tmp_path / "remote")
    built = loadspec.build(spec, cache_dir=tmp_path / "builder", progress=False)
    loadspec.api.push("pulled", remote=remote, cache_dir=tmp_path / "builder", progress=False)
    files = Store(tmp_path / "builder").manifest(built.plan.fingerprint)["files"]
    expected = None
    model, tokenizer = loadspec.load("pulled", cache_dir=tmp_path / "builder")
    with torch.no_grad():
        expected = model(tokenizer(PROMPT, return_tensors="pt").input_ids).logits

    cache, log = tmp_path / "node-cache", tmp_path / "fetches.log"
    env = {"FETCH_LOG": str(log), "LOADSPEC_NO_LOCKS": "" if locks else "1", "HF_HUB_OFFLINE": "1"}
    logits, errors = run_all(context, "pulled", cache, tmp_path / "out", env, remote=remote)
    assert not errors and len(logits) == WORKERS
    assert all(torch.equal(l, expected) for l in logits)
    fetched = log.read_text().splitlines()
    if locks:
        assert sorted(f.rsplit("/", 1)[1] for f in fetched) == sorted(files)  # each file downloaded once
    else:
        assert len(fetched) >= len(files)
        print(f"without locks: {len(fetched) / len(files):.1f} downloads per file for {WORKERS} processes")
    check_cache(cache, "pulled")
