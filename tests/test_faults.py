"""Nothing lost, nothing garbage: builds killed at random points, damaged artifacts, full or read-only
disks, and artifacts written by other versions.

Each fault is injected for real where that is cheap (SIGKILL, truncating and flipping bytes on disk,
a tiny tmpfs that really fills up, a read-only remount) and by monkeypatching the lowest layer that
would raise otherwise (a file object whose write() raises ENOSPC), so every error travels through the
code a real one would.
"""
import contextlib
import errno
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import loadspec
from loadspec import store as stores
from loadspec.cli import main
from loadspec.errors import LoadspecError, UsageError
from loadspec.store import Store

PROMPT = "What is the capital of France? Paris is"
RECOVERY = ("--force", "pull")  # every refusal of a damaged artifact names both ways back


# --------------------------------------------------------------------------- helpers
def run_cli(*args, env=None):
    """(exit code, stdout + stderr, the exception if it was not a clean exit)."""
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    crash = result.exception if result.exception is not None and not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.output, crash  # click >= 8.2: output holds stdout and stderr as a terminal shows them


def assert_clean_error(code, output, crash, *fragments, exit_code=None):
    assert crash is None, f"crashed: {crash!r}\n{output}"
    assert code != 0 and "Traceback" not in output, output
    if exit_code is not None:
        assert code == exit_code, output
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} not in {output!r}"


def logits_of(model, tokenizer):
    with torch.no_grad():
        return model(tokenizer(PROMPT, return_tensors="pt").input_ids).logits


def close_indexes():
    """Drop this process's open index connections (before unmounting a cache, or after a fault)."""
    for path in list(stores._indexes):
        with contextlib.suppress(Exception):
            stores._indexes.pop(path).close()


def check_invariants(cache):
    """Nothing partial is visible: every artifact folder is whole and verifies; every name points to one."""
    store = Store(cache)
    for folder in store.artifacts.iterdir():
        assert store.has(folder.name), f"visible artifact without manifest: {sorted(p.name for p in folder.iterdir())}"
        assert store.verify(folder.name) == [], f"visible artifact {folder.name} is damaged"
    for name, ref in store.refs().items():
        assert store.has(ref["fingerprint"]), f"name {name} points to missing artifact {ref['fingerprint']}"
    return store


@pytest.fixture(scope="module")
def spec_text(checkpoint):
    return f'name = "tiny"\n[model]\nsource = "{checkpoint("llama")}"\n[target]\ngpu = "cpu"\n[load]\nquant = "nf4"\n'


@pytest.fixture(scope="module")
def reference(spec_text, tmp_path_factory):
    """Logits of a clean build, to tell right weights from wrong ones."""
    folder = tmp_path_factory.mktemp("reference")
    spec = folder / "tiny.toml"
    spec.write_text(spec_text)
    loadspec.build(spec, cache_dir=folder / "cache", progress=False)
    return logits_of(*loadspec.load("tiny", cache_dir=folder / "cache"))


@pytest.fixture
def built(spec_text, tmp_path):
    """(spec path, cache, store, fingerprint, artifact folder) of a fresh build."""
    spec = tmp_path / "tiny.toml"
    spec.write_text(spec_text)
    cache = tmp_path / "cache"
    result = loadspec.build(spec, cache_dir=cache, progress=False)
    store = Store(cache)
    return spec, cache, store, result.plan.fingerprint, result.path


def rewrite(folder, name, data, *, update_manifest=True):
    """Replace one artifact file; with update_manifest the manifest agrees (an artifact consistent with itself,
    as another version or a broken writer would leave it), otherwise it is plain damage."""
    (folder / name).write_bytes(data)
    if update_manifest:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


# --------------------------------------------------------------------------- 1. crashes
PER_TENSOR_S = 0.004  # the worker's builds sleep this long per tensor written ...
COMMIT_WINDOW_S = 0.04  # ... and this long just before and just after the commit rename
TRIALS = 24


def _build_until_killed(spec, cache, force, marks, ready):
    """A worker: build `spec`, slowed down so that a kill lands mid-build; write a mark at each phase.

    The slowing is done here, by wrapping the real functions in this process only (no hook in loadspec):
    the build runs the code it always runs, just with pauses between the steps.
    """
    import loadspec.builder as builder
    from loadspec import shards
    from loadspec.store import Store as WorkerStore

    torch.set_num_threads(1)

    def mark(phase):
        with open(marks, "a") as handle:
            handle.write(phase + "\n")

    add, close, write_artifact, commit = shards.ShardWriter.add, shards.ShardWriter.close, builder.write_artifact, WorkerStore.commit
    write_tokenizer = builder.write_tokenizer

    def slow_add(self, name, tensor):
        time.sleep(PER_TENSOR_S)
        add(self, name, tensor)
        mark("writing weights")

    def marked_tokenizer(*args, **kwargs):
        write_tokenizer(*args, **kwargs)
        mark("tokenizer written")

    def marked_close(self):
        names = close(self)
        mark("shards closed, hashing")
        return names

    def marked_write(*args, **kwargs):
        manifest = write_artifact(*args, **kwargs)
        mark("staged complete, not committed")
        time.sleep(COMMIT_WINDOW_S)
        return manifest

    def marked_commit(self, *args, **kwargs):
        final = commit(self, *args, **kwargs)
        mark("committed, not named")
        time.sleep(COMMIT_WINDOW_S)
        return final

    shards.ShardWriter.add, shards.ShardWriter.close = slow_add, marked_close
    builder.write_artifact, builder.write_tokenizer, WorkerStore.commit = marked_write, marked_tokenizer, marked_commit
    mark("planning")
    ready.set()
    loadspec.build(spec, cache_dir=cache, force=force, progress=False)
    mark("done")


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "transformers.models.llama.modeling_llama",
                                "transformers.tokenization_utils_tokenizers", "bitsandbytes", "diskcache", "sqlite3",
                                "loadspec.api", "loadspec.builder", "loadspec.loader", "loadspec.quant", "test_faults"])
    return ctx


def test_builds_killed_at_random_points_never_leave_a_visible_partial(forkserver, spec_text, reference, tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(spec_text)
    cache = tmp_path / "cache"

    def start(force, marks):
        ready = forkserver.Event()
        process = forkserver.Process(target=_build_until_killed, args=(str(spec), str(cache), force, str(marks), ready))
        process.start()
        assert ready.wait(timeout=120), "worker never started"
        return process

    # calibrate: how long one slowed build takes from the worker's start signal to its end
    process = start(False, tmp_path / "calibrate.marks")
    began = time.perf_counter()
    process.join(timeout=120)
    span = time.perf_counter() - began
    assert process.exitcode == 0
    Store(cache).remove_name("tiny")  # start the trials from an empty cache

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    landed: dict[str, int] = {}
    for trial in range(TRIALS):
        ref = Store(cache).ref("tiny")
        force = bool(ref) and Store(cache).has(ref["fingerprint"])  # once built, kill forced rebuilds (swap windows)
        marks = tmp_path / f"trial{trial}.marks"
        process = start(force, marks)
        time.sleep(rng.uniform(0, span * 1.05))
        process.kill()  # SIGKILL: no finally blocks, no cleanup
        process.join(timeout=60)
        phase = (marks.read_text().splitlines() or ["(none)"])[-1] if marks.exists() else "(none)"
        landed[phase] = landed.get(phase, 0) + 1
        check_invariants(cache)
    print(f"seed {seed}; {TRIALS} SIGKILLs landed after: {landed}")
    mid_build = sum(n for phase, n in landed.items() if phase not in ("done", "committed, not named"))
    assert mid_build >= TRIALS // 2, landed  # most kills hit a build in progress
    assert {"writing weights", "shards closed, hashing", "staged complete, not committed"} & set(landed), landed

    store = Store(cache)
    leftovers = sorted(p.name for p in store.tmp.iterdir())
    assert leftovers, "a killed build leaves its staging folder in tmp/ (for gc)"
    built = loadspec.build(spec, cache_dir=cache, progress=False)  # the next build succeeds
    assert torch.equal(logits_of(*loadspec.load("tiny", cache_dir=cache)), reference)
    removed = store.gc()
    assert set(leftovers) <= {r.path.name for r in removed if r.why == "unfinished build"}
    assert list(store.tmp.iterdir()) == [], "gc left something in tmp/"
    assert [p.name for p in store.artifacts.iterdir()] == [built.plan.fingerprint]
    assert store.verify(built.plan.fingerprint) == []


# --------------------------------------------------------------------------- 2. corruption
def _flip(path, tensor="model.norm.weight"):
    """Change one mantissa bit of a 16-bit weight in place (same size; the logits move, nothing else breaks)."""
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        begin, end = json.loads(handle.read(length))[tensor]["data_offsets"]
        at = 8 + length + (begin + end) // 2 // 2 * 2
        handle.seek(at)
        byte = handle.read(1)
        handle.seek(at)
        handle.write(bytes([byte[0] ^ 0x40]))


def _truncate(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _flip_tensor_byte(folder):
    _flip(folder / "model.safetensors")


def _flip_header_byte(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    at = data.index(b'"data_offsets":[') + len(b'"data_offsets":[')
    data[at] = ord("9") if data[at] != ord("9") else ord("8")  # same size, wrong offsets
    path.write_bytes(bytes(data))


def _delete_tokenizer(folder):
    (folder / "tokenizer.json").unlink()


def _delete_shard(folder):
    (folder / "model.safetensors").unlink()


def _manifest_size(folder):
    edit_json(folder / "manifest.json", lambda m: m["files"]["model.safetensors"].update(size=m["files"]["model.safetensors"]["size"] + 1))


def _manifest_emptied(folder):
    edit_json(folder / "manifest.json", lambda m: m.update(files={}))


def _manifest_garbage(folder):
    (folder / "manifest.json").write_text("{not json")


def _manifest_path_entry(folder):
    edit_json(folder / "manifest.json", lambda m: m["files"].update({"../../outside": {"size": 1, "sha256": "0" * 64}}))


def _unlisted_shard(folder):
    shutil.copyfile(folder / "model.safetensors", folder / "model-evil.safetensors")


def _edit_plan(folder):
    edit_json(folder / "plan.json", lambda p: p.update(dtype="float16"))


DAMAGE = {  # name: (damage, what verify says about which file, what load says)
    "truncated shard": (_truncate, "model.safetensors: size", "model.safetensors has"),
    "flipped byte in tensor data": (_flip_tensor_byte, "model.safetensors: contents changed", "model.safetensors: contents changed"),
    "flipped byte in the header": (_flip_header_byte, "model.safetensors: contents changed", "model.safetensors: contents changed"),
    "missing tokenizer file": (_delete_tokenizer, "tokenizer.json: missing", "tokenizer.json is missing"),
    "missing shard": (_delete_shard, "model.safetensors: missing", "model.safetensors is missing"),
    "manifest size edited": (_manifest_size, "model.safetensors: size", "the manifest says"),
    "manifest emptied": (_manifest_emptied, "not listed in the manifest", "manifest.json lists no files"),
    "manifest not JSON": (_manifest_garbage, "manifest.json is damaged", "manifest.json is damaged"),
    "manifest names a path": (_manifest_path_entry, None, "not a plain file name"),
    "unlisted extra shard": (_unlisted_shard, "model-evil.safetensors: not listed", "not listed in manifest.json"),
    "plan.json edited": (_edit_plan, "plan.json: ", "plan.json"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damage_is_named_by_verify_and_refused_by_load(case, built, reference):
    damage, verify_says, load_says = DAMAGE[case]
    spec, cache, store, fingerprint, folder = built
    damage(folder)
    code, output, crash = run_cli("verify", "tiny", "--cache-dir", cache)
    if verify_says is not None:
        assert_clean_error(code, output, crash, verify_says, exit_code=1)
    code, output, crash = run_cli("load", "tiny", "--cache-dir", cache)
    assert_clean_error(code, output, crash, load_says, *RECOVERY, exit_code=1)
    with pytest.raises(LoadspecError, match="--force"):
        loadspec.load("tiny", cache_dir=cache)
    # recovery as the message says: build --force gives back the right weights
    assert run_cli("build", spec, "--cache-dir", cache, "--force", "-q")[0] == 0
    assert torch.equal(logits_of(*loadspec.load("tiny", cache_dir=cache)), reference)


def _offsets_outside(folder):
    """A shard whose header sends a tensor past the end of the file, at the same file size, with a manifest that
    agrees (as a broken writer or a hostile copy would produce): the hash is right, the structure is not."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + length])
    key = next(k for k in header if k != "__metadata__")
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin, len(data) + 4096]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    rewrite(folder, "model.safetensors", data[:8] + text + b" " * (length - len(text)) + data[8 + length:])


def test_header_offsets_outside_the_file_refused_even_with_a_matching_manifest(built):
    spec, cache, store, fingerprint, folder = built
    _offsets_outside(folder)
    assert store.verify(fingerprint) == []  # the hashes agree with the manifest: only the structure is wrong
    code, output, crash = run_cli("load", "tiny", "--cache-dir", cache)
    assert_clean_error(code, output, crash, "model.safetensors", "outside", *RECOVERY, exit_code=1)


def test_manifest_hash_edited_alone_never_gives_wrong_weights(built, reference):
    """The files are intact, only the manifest's sha256 changed: verify says so; a load returns the right weights
    (nothing it reads changed), and a full verify refuses because file and manifest disagree."""
    spec, cache, store, fingerprint, folder = built
    edit_json(folder / "manifest.json", lambda m: m["files"]["model.safetensors"].update(sha256="0" * 64))
    assert store.verify(fingerprint) == ["model.safetensors: contents changed (sha256 differs from the manifest)"]
    assert torch.equal(logits_of(*loadspec.load("tiny", cache_dir=cache)), reference)
    with pytest.raises(LoadspecError, match="model.safetensors: contents changed"):
        loadspec.load("tiny", cache_dir=cache, verify=True)


def test_same_size_change_with_restored_mtime_needs_full_verify(built, reference, monkeypatch):
    """The documented trade-off. A load re-hashes only files whose size, mtime or inode changed since they were
    last hashed (at commit, by the build or the pull): any ordinary write is caught (test above) at the cost of
    one stat per file. A change that keeps size *and* mtime (bit rot, or someone restoring the mtime) is not:
    then only a full re-hash sees it: loadspec.load(verify=True), $LOADSPEC_VERIFY=1, load --verify, or verify."""
    spec, cache, store, fingerprint, folder = built
    path = folder / "model.safetensors"
    before = path.stat()
    _flip(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    wrong = logits_of(*loadspec.load("tiny", cache_dir=cache))  # the cheap path cannot see it: by design
    assert not torch.equal(wrong, reference)
    with pytest.raises(LoadspecError, match="model.safetensors: contents changed.*--force"):
        loadspec.load("tiny", cache_dir=cache, verify=True)
    monkeypatch.setenv("LOADSPEC_VERIFY", "1")
    with pytest.raises(LoadspecError, match="model.safetensors: contents changed"):
        loadspec.load("tiny", cache_dir=cache)
    monkeypatch.delenv("LOADSPEC_VERIFY")
    code, output, crash = run_cli("load", "tiny", "--cache-dir", cache, "--verify")
    assert_clean_error(code, output, crash, "contents changed", *RECOVERY, exit_code=1)
    code, output, crash = run_cli("verify", "tiny", "--cache-dir", cache)
    assert_clean_error(code, output, crash, "model.safetensors: contents changed", exit_code=1)


def test_an_artifact_is_hashed_once_then_trusted_while_unchanged(built, monkeypatch):
    """The cost side of the trade-off: a load after a build or pull re-hashes nothing; a file touched since is
    re-hashed once and, if it still matches, trusted again."""
    spec, cache, store, fingerprint, folder = built
    hashed = []
    real = stores.sha256_file
    monkeypatch.setattr(stores, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    loadspec.load("tiny", cache_dir=cache)
    assert hashed == []
    os.utime(folder / "config.json")  # touched, not changed
    loadspec.load("tiny", cache_dir=cache)
    loadspec.load("tiny", cache_dir=cache)
    assert hashed == ["config.json"]


# --------------------------------------------------------------------------- 4. disk full / read-only
class _FillingFile:
    """A real file whose write() fails with ENOSPC once `budget` bytes were written, as a full disk does."""

    def __init__(self, handle, budget):
        self._handle, self._budget = handle, budget

    def write(self, data):
        size = len(memoryview(data).cast("B"))
        if size > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget -= size
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def _disk_that_fills(budget):
    real_open = open

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return _FillingFile(handle, budget) if "w" in mode and "b" in mode else handle

    return fake_open


def assert_nothing_partial(cache, name="tiny"):
    store = Store(cache)
    assert [p for p in store.artifacts.iterdir()] == [], "an artifact appeared"
    assert [p for p in store.tmp.iterdir() if not p.name.endswith(".pull")] == [], "a staging folder was left"
    assert store.ref(name) is None


def test_disk_full_mid_build_is_one_clear_line_and_nothing_partial(spec_text, tmp_path, monkeypatch):
    from loadspec import shards

    spec = tmp_path / "tiny.toml"
    spec.write_text(spec_text)
    cache = tmp_path / "cache"
    monkeypatch.setattr(shards, "open", _disk_that_fills(50_000), raising=False)  # the shard fills the disk mid-way
    code, output, crash = run_cli("build", spec, "--cache-dir", cache, "-q")
    assert_clean_error(code, output, crash, "disk is full", str(cache.resolve()), exit_code=1)
    assert output.strip().count("\n") == 0, f"not one line: {output!r}"
    assert_nothing_partial(cache)
    monkeypatch.undo()
    assert run_cli("build", spec, "--cache-dir", cache, "-q")[0] == 0  # space again: the build goes through


def built_and_pushed(spec_text, tmp_path):
    """The tiny spec built in its own cache and pushed to tmp_path/remote; returns the spec's path."""
    spec = tmp_path / "tiny.toml"
    spec.write_text(spec_text)
    loadspec.build(spec, cache_dir=tmp_path / "builder", progress=False)
    loadspec.api.push("tiny", remote=str(tmp_path / "remote"), cache_dir=tmp_path / "builder", progress=False)
    return spec


def test_disk_full_mid_pull_blames_the_cache_not_the_remote(spec_text, tmp_path, monkeypatch):
    from loadspec import remote as remotes

    built_and_pushed(spec_text, tmp_path)
    cache = tmp_path / "node"
    monkeypatch.setattr(remotes, "open", _disk_that_fills(10_000), raising=False)
    code, output, crash = run_cli("pull", "tiny", "--remote", tmp_path / "remote", "--cache-dir", cache, "-q", "--workers", "1")
    assert_clean_error(code, output, crash, "disk is full", str(cache.resolve()), exit_code=1)
    assert output.strip().count("\n") == 0, f"not one line: {output!r}"
    assert_nothing_partial(cache)
    monkeypatch.undo()
    assert run_cli("pull", "tiny", "--remote", tmp_path / "remote", "--cache-dir", cache, "-q")[0] == 0
    assert Store(cache).verify(Store(cache).ref("tiny")["fingerprint"]) == []


def test_cache_not_writable_is_one_clear_line(spec_text, tmp_path, monkeypatch):
    """Permission denied where builds are staged (chmod 0o555 for a normal user; simulated for root, whom
    permissions do not stop)."""
    spec = tmp_path / "tiny.toml"
    spec.write_text(spec_text)
    cache = tmp_path / "cache"
    Store(cache)
    if os.geteuid() != 0:
        (cache / "tmp").chmod(0o555)
    else:
        real_mkdir = Path.mkdir

        def refuse(self, *args, **kwargs):
            if str(self).startswith(str(cache.resolve() / "tmp") + os.sep):  # a new staging folder
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refuse)
    try:
        code, output, crash = run_cli("build", spec, "--cache-dir", cache, "-q")
    finally:
        (cache / "tmp").chmod(0o755)
    assert_clean_error(code, output, crash, "not writable", str(cache.resolve()), exit_code=1)
    assert output.strip().count("\n") == 0, f"not one line: {output!r}"
    assert_nothing_partial(cache)


def _mount(path, options):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def _umount(path):
    close_indexes()
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs folder (root only; skipped elsewhere)."""
    mounted = []

    def mount(options):
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        path = tmp_path / f"mnt{len(mounted)}"
        if not _mount(path, options):
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        _umount(path)


def test_real_full_disk_during_build_and_pull(spec_text, tmp_path, tmpfs):
    spec = built_and_pushed(spec_text, tmp_path)
    disk = tmpfs("size=2m")
    cache = disk / "cache"
    Store(cache).index["warm"] = 1  # the index exists; what fills up is the artifact
    ballast = disk / "ballast"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    ballast.write_bytes(b"\0" * (free - 96 * 1024))  # leaves room for the tokenizer, not for the weights
    code, output, crash = run_cli("build", spec, "--cache-dir", cache, "-q")
    assert_clean_error(code, output, crash, str(cache), exit_code=1)
    assert "disk is full" in output or "no space" in output.lower(), output
    assert output.strip().count("\n") == 0, f"not one line: {output!r}"
    assert_nothing_partial(cache)
    code, output, crash = run_cli("pull", "tiny", "--remote", tmp_path / "remote", "--cache-dir", cache, "-q")
    assert_clean_error(code, output, crash, str(cache), exit_code=1)
    assert "disk is full" in output, output
    assert_nothing_partial(cache)
    ballast.unlink()
    assert run_cli("pull", "tiny", "--remote", tmp_path / "remote", "--cache-dir", cache, "-q")[0] == 0
    assert run_cli("build", spec, "--cache-dir", cache, "-q")[0] == 0  # a cache hit on the pulled artifact
    check_invariants(cache)


def test_real_read_only_cache(spec_text, tmp_path, tmpfs):
    spec = built_and_pushed(spec_text, tmp_path)
    disk = tmpfs("size=8m")
    cache = disk / "cache"
    assert run_cli("build", spec, "--cache-dir", cache, "-q")[0] == 0
    close_indexes()
    if subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode != 0:
        pytest.skip("cannot remount read-only here")
    for args in (["build", spec, "--force"], ["load", "tiny"], ["gc"], ["pull", "tiny", "--remote", tmp_path / "remote"]):
        code, output, crash = run_cli(*args, "--cache-dir", cache)
        assert_clean_error(code, output, crash, str(cache), exit_code=1)
        assert "not writable" in output, output
        close_indexes()
    code, output, crash = run_cli("build", spec, "--cache-dir", disk / "fresh")
    assert_clean_error(code, output, crash, str(disk / "fresh"), "Read-only", exit_code=1)


# --------------------------------------------------------------------------- 5. version skew
def _set_format(folder, version):
    """An artifact of artifact format `version`, consistent with itself (as that version would have written it)."""
    plan = json.loads((folder / "plan.json").read_text())
    plan["format_version"] = version
    rewrite(folder, "plan.json", json.dumps(plan, sort_keys=True, separators=(",", ":")).encode())
    edit_json(folder / "manifest.json", lambda m: m.update(format_version=version))


def test_older_format_refused_on_load_and_rebuilt_only_with_force(built, reference):
    spec, cache, store, fingerprint, folder = built
    _set_format(folder, 0)
    code, output, crash = run_cli("load", "tiny", "--cache-dir", cache)
    assert_clean_error(code, output, crash, "older artifact format 0", "reads format 1", "--force", exit_code=1)
    code, output, crash = run_cli("build", spec, "--cache-dir", cache, "-q")  # not silently reused
    assert_clean_error(code, output, crash, "format 0", "pass --force", exit_code=2)
    with pytest.raises(UsageError, match="pass --force"):
        loadspec.load(spec, cache_dir=cache)
    code, output, crash = run_cli("build", spec, "--cache-dir", cache, "--force", "-q")
    assert code == 0 and output.startswith("built:"), output
    assert torch.equal(logits_of(*loadspec.load("tiny", cache_dir=cache)), reference)


def test_newer_format_says_upgrade(built):
    spec, cache, store, fingerprint, folder = built
    _set_format(folder, 2)
    edit_json(folder / "plan.json", lambda p: p.update(a_field_from_the_future=True))  # this version cannot parse it
    rewrite(folder, "plan.json", (folder / "plan.json").read_bytes())
    code, output, crash = run_cli("load", "tiny", "--cache-dir", cache)
    assert_clean_error(code, output, crash, "format 2", "Upgrade loadspec", "--force", exit_code=1)
    code, output, crash = run_cli("inspect", "tiny", "--cache-dir", cache)
    assert_clean_error(code, output, crash, "plan.json", "format 2", exit_code=1)


def test_format_bump_in_this_loadspec_asks_for_force(built, reference, monkeypatch):
    """This loadspec writes format 2 (the fingerprint changes with it); the name's artifact is format 1."""
    from loadspec import plan as plans

    spec, cache, store, fingerprint, folder = built
    monkeypatch.setattr(plans, "FORMAT_VERSION", 2)
    code, output, crash = run_cli("load", "tiny", "--cache-dir", cache)
    assert_clean_error(code, output, crash, "older artifact format 1", "--force", exit_code=1)
    code, output, crash = run_cli("build", spec, "--cache-dir", cache, "-q")
    assert_clean_error(code, output, crash, "artifact format 1", "writes format 2", "pass --force", exit_code=2)
    assert [p.name for p in store.artifacts.iterdir()] == [fingerprint]  # nothing built behind the user's back
    code, output, crash = run_cli("build", spec, "--cache-dir", cache, "--force", "-q")
    assert code == 0, output
    assert torch.equal(logits_of(*loadspec.load("tiny", cache_dir=cache)), reference)
    assert [r.why for r in store.gc()] == ["no name points to it"]  # the old one is an orphan now


def test_artifact_claiming_a_bitsandbytes_without_the_format(built, reference):
    spec, cache, store, fingerprint, folder = built
    edit_json(folder / "manifest.json", lambda m: m["versions"].update(bitsandbytes="0.39.1"))
    code, output, crash = run_cli("load", "tiny", "--cache-dir", cache)
    assert_clean_error(code, output, crash, "bitsandbytes 0.39.1", ">= 0.41", "--force", exit_code=1)
    code, output, crash = run_cli("build", spec, "--cache-dir", cache, "-q")
    assert_clean_error(code, output, crash, "bitsandbytes 0.39.1", "pass --force", exit_code=2)
    assert run_cli("build", spec, "--cache-dir", cache, "--force", "-q")[0] == 0
    assert torch.equal(logits_of(*loadspec.load("tiny", cache_dir=cache)), reference)


def test_installed_bitsandbytes_too_old_to_read_it(built, monkeypatch):
    from importlib import metadata

    spec, cache, store, fingerprint, folder = built
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.40.2" if name == "bitsandbytes" else real(name))
    code, output, crash = run_cli("load", "tiny", "--cache-dir", cache)
    assert_clean_error(code, output, crash, "bitsandbytes 0.40.2 is installed", "pip install -U bitsandbytes", exit_code=1)
    assert run_cli("build", spec, "--cache-dir", cache, "-q")[0] == 0  # building (here: a cache hit) needs no bitsandbytes


def test_transformers_that_does_not_know_the_model(built):
    spec, cache, store, fingerprint, folder = built
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama_from_the_future"
    rewrite(folder, "config.json", json.dumps(config).encode())
    code, output, crash = run_cli("load", "tiny", "--cache-dir", cache)
    assert_clean_error(code, output, crash, "llama_from_the_future", "Upgrade transformers", exit_code=1)


def test_a_skeleton_that_fails_leaves_the_weights_unread(built, monkeypatch):
    from loadspec import reader
    from loadspec.loader import IncompatibleArtifact

    spec, cache, store, fingerprint, folder = built
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama_from_the_future"
    rewrite(folder, "config.json", json.dumps(config).encode())
    real, returned = reader.read_tensors, []
    monkeypatch.setattr(reader, "read_tensors", lambda *a, **k: returned.append(real(*a, **k)) or returned[-1])
    with pytest.raises(IncompatibleArtifact, match="llama_from_the_future"):
        loadspec.load("tiny", cache_dir=cache)
    assert returned == [{}]  # the reading thread was told to stop before it read anything
