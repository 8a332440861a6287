"""The cache: atomic commits, names as refs, verify, rm and gc with dry runs."""
import os

import pytest

from loadspec.errors import UsageError
from loadspec.store import Store, cache_root


def publish(store, fingerprint, payload=b"weights"):
    with store.staging(fingerprint) as folder:
        (folder / "model.safetensors").write_bytes(payload)
        (folder / "manifest.json").write_text(
            '{"files": {"model.safetensors": {"size": %d, "sha256": "%s"}}}' % (len(payload), __import__("hashlib").sha256(payload).hexdigest()))
    return store.commit(folder, fingerprint)


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("LOADSPEC_CACHE", str(tmp_path / "env"))
    assert cache_root(tmp_path / "flag") == (tmp_path / "flag").resolve()
    assert cache_root() == (tmp_path / "env").resolve()
    monkeypatch.delenv("LOADSPEC_CACHE")
    assert str(cache_root()) == os.path.expanduser("~/.cache/loadspec")


def test_failed_build_leaves_nothing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with store.staging("f" * 24) as folder:
            (folder / "half.safetensors").write_bytes(b"x")
            raise KeyboardInterrupt
    assert list(store.tmp.iterdir()) == [] and not store.has("f" * 24)


def test_commit_race_keeps_the_first(tmp_path):
    store = Store(tmp_path)
    first = publish(store, "a" * 24, b"first")
    second = publish(store, "a" * 24, b"second")
    assert first == second and (first / "model.safetensors").read_bytes() == b"first"
    assert list(store.tmp.iterdir()) == []


def test_names_share_artifacts_and_rm_keeps_shared(tmp_path):
    store = Store(tmp_path)
    publish(store, "b" * 24)
    store.set_ref("one", "b" * 24)
    store.set_ref("two", "b" * 24)
    removed = store.remove_name("one")
    assert [r.why for r in removed] == ["name"] and store.has("b" * 24)
    dry = store.remove_name("two", dry_run=True)
    assert len(dry) == 2 and store.has("b" * 24) and store.ref("two")
    store.remove_name("two")
    assert not store.has("b" * 24) and store.ref("two") is None


def test_unknown_name_says_how_to_build(tmp_path):
    with pytest.raises(UsageError, match="loadspec build"):
        Store(tmp_path).resolve_name("nope")


def test_verify_names_the_damage(tmp_path):
    store = Store(tmp_path)
    folder = publish(store, "c" * 24, b"0123456789")
    assert store.verify("c" * 24) == []
    (folder / "model.safetensors").write_bytes(b"0123456780")
    assert store.verify("c" * 24) == ["model.safetensors: contents changed (sha256 differs from the manifest)"]
    (folder / "model.safetensors").write_bytes(b"01234")
    assert "size 5 bytes" in store.verify("c" * 24)[0]
    (folder / "model.safetensors").unlink()
    (folder / "stray.bin").write_bytes(b"")
    assert store.verify("c" * 24) == ["model.safetensors: missing", "stray.bin: not listed in the manifest"]


def test_gc_removes_dead_builds_and_orphans_dry_run_first(tmp_path):
    store = Store(tmp_path)
    publish(store, "d" * 24)
    publish(store, "e" * 24)
    store.set_ref("kept", "d" * 24)
    dead = store.tmp / ("9" * 24 + ".123.abcd")
    dead.mkdir()
    (dead / "partial").write_bytes(b"x" * 100)
    planned = store.gc(dry_run=True)
    assert {r.why for r in planned} == {"unfinished build", "no name points to it"}
    assert dead.exists() and store.has("e" * 24)
    store.gc()
    assert not dead.exists() and not store.has("e" * 24) and store.has("d" * 24)


def test_gc_spares_a_build_in_progress(tmp_path):
    store = Store(tmp_path)
    with store.build_lock("7" * 24):
        with store.staging("7" * 24) as folder:
            assert store.gc() == []
            assert folder.exists()


def test_a_load_waits_for_no_disk_write(checkpoint, write_spec, tmp_path):
    """Opening the index and recording the use ask the disk for nothing (no fsync): on a disk busy with other
    writes, each fsync can take a second. Also for an index an older loadspec made with SQLite's syncing on."""
    import shutil
    import subprocess
    import sys

    import diskcache

    import loadspec
    from loadspec import store as stores

    if shutil.which("strace") is None or subprocess.run(["strace", "-o", "/dev/null", "true"]).returncode != 0:
        pytest.skip("strace cannot trace processes here")
    cache = tmp_path / "cache"
    loadspec.build(write_spec(checkpoint("llama")), cache_dir=cache, progress=False)
    stores._indexes.pop((cache / "index").resolve(), None).close()
    with diskcache.Cache(str(cache / "index")) as old:  # as an older loadspec left it
        old.reset("sqlite_synchronous", 1)
    trace = tmp_path / "syncs.txt"
    code = f"import loadspec; model, tokenizer = loadspec.load('tiny', cache_dir={str(cache)!r}); print(type(model).__name__)"
    done = subprocess.run(["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync,syncfs,sync_file_range", "-o", str(trace),
                           sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "LlamaForCausalLM" in done.stdout, done.stderr[-2000:]
    assert [line for line in trace.read_text().splitlines() if "sync" in line] == []
    assert Store(cache).ref("tiny") is not None  # and the index still works for everything else


def test_a_damaged_index_is_reported_with_the_fix(tmp_path):
    from loadspec import store as stores
    from loadspec.errors import LoadspecError

    store = Store(tmp_path)
    store.index["ref:x"] = {"fingerprint": "a" * 24}
    stores._indexes.pop(store.root / "index").close()
    (store.root / "index" / "cache.db").write_bytes(b"not a database " * 512)
    for name in ("cache.db-wal", "cache.db-shm"):
        (store.root / "index" / name).unlink(missing_ok=True)
    with pytest.raises(LoadspecError, match="is damaged") as caught:
        Store(tmp_path).ref("x")
    assert str(store.root / "index") in str(caught.value) and "loadspec build" in str(caught.value)
    assert "artifacts beside it are not" in str(caught.value)
