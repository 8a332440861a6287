"""Remotes: prewarm on one node, load on another offline; verified, resumable pulls; refusals; gc budgets."""
import importlib.util
import json
import os
import socket
import time

import pytest
import torch
from click.testing import CliRunner

import loadspec
from loadspec import remote as remotes
from loadspec.cli import main
from loadspec.errors import LoadspecError, UsageError
from loadspec.store import Store

# the 4-bit quantizer is written by someone else; use it once it is there
QUANT = "nf4" if importlib.util.find_spec("loadspec.quant") else "none"
PROMPT = "What is the capital of France? Paris is"


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def logits(model, tokenizer):
    with torch.no_grad():
        return model(tokenizer(PROMPT, return_tensors="pt").input_ids).logits


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1, stopped at the end; yields its endpoint."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="artifacts")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def no_network(monkeypatch):
    """HF_HUB_OFFLINE=1 and no connection anywhere but 127.0.0.1 (the S3 test server)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    real_connect = socket.socket.connect

    def guarded(sock, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test: no network to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def built(checkpoint, write_spec, tmp_path):
    """A small artifact named 'tiny' in cache A, and the spec it came from."""
    spec = write_spec(checkpoint("llama"), name="tiny", load={"quant": QUANT})
    cache = tmp_path / "A"
    loadspec.build(spec, cache_dir=cache, progress=False)
    return spec, cache


@pytest.mark.parametrize("kind", ["folder", "file-url", "s3"])
def test_prewarm_on_one_node_load_offline_on_another(kind, checkpoint, write_spec, tmp_path, monkeypatch, request):
    if kind == "s3":
        monkeypatch.setenv("LOADSPEC_S3_ENDPOINT", request.getfixturevalue("s3_server"))
        url = f"s3://artifacts/{tmp_path.name}"
    else:
        url = str(tmp_path / "shared") if kind == "folder" else (tmp_path / "shared").as_uri()
    spec = write_spec(checkpoint("llama"), name="tiny", load={"quant": QUANT})
    node_a, node_b = tmp_path / "A", tmp_path / "B"

    code, output = cli("prewarm", spec, "--target", "cpu", "--remote", url, "--cache-dir", node_a, "-q")
    assert code == 0, output
    assert "built: tiny" in output and "pushed tiny" in output
    fingerprint = Store(node_a).ref("tiny")["fingerprint"]
    code, output = cli("prewarm", spec, "--target", "cpu", "--remote", url, "--cache-dir", node_a, "-q")
    assert code == 0 and "cache hit" in output and "already has artifact" in output, output
    expected = logits(*loadspec.load("tiny", cache_dir=node_a))

    request.getfixturevalue("no_network")
    monkeypatch.setenv("LOADSPEC_REMOTE", url)
    model, tokenizer = loadspec.load("tiny", cache_dir=node_b)  # no local artifact: pulled, then loaded
    assert torch.equal(logits(model, tokenizer), expected)
    store_b = Store(node_b)
    assert store_b.ref("tiny")["fingerprint"] == fingerprint and store_b.verify(fingerprint) == []
    assert [p.name for p in store_b.tmp.iterdir()] == []  # the resumable folder is gone once committed


def test_push_then_pull_cli_and_second_pull_is_a_hit(built, tmp_path):
    _, cache = built
    url = tmp_path / "shared"
    code, output = cli("push", "tiny", "--remote", url, "--cache-dir", cache, "-q")
    assert code == 0 and "pushed tiny" in output, output
    fingerprint = Store(cache).ref("tiny")["fingerprint"]
    ref = json.loads((url / "refs" / "tiny.json").read_text())
    assert ref["fingerprint"] == fingerprint and ref["target"] == "cpu" and ref["created"]
    assert sorted(p.name for p in (url / "artifacts" / fingerprint).iterdir()) == sorted(
        [*Store(cache).manifest(fingerprint)["files"], "manifest.json"])
    code, output = cli("pull", "tiny", "--remote", url, "--cache-dir", tmp_path / "B", "-q")
    assert code == 0 and "pulled tiny" in output, output
    code, output = cli("pull", "tiny", "--remote", url, "--cache-dir", tmp_path / "B", "-q")
    assert code == 0 and "already in the cache" in output
    code, output = cli("verify", "tiny", "--cache-dir", tmp_path / "B")
    assert code == 0 and "every file matches" in output


def test_interrupted_pull_leaves_nothing_visible_and_resumes(built, tmp_path, monkeypatch):
    _, cache = built
    url = str(tmp_path / "shared")
    loadspec.api.push("tiny", remote=url, cache_dir=cache, progress=False)
    fingerprint = Store(cache).ref("tiny")["fingerprint"]
    files = Store(cache).manifest(fingerprint)["files"]
    assert len(files) >= 3
    real_fetch = remotes.fetch_file
    fetched, verified = [], []

    def dies_after_first(remote, relative, blob, entry, bar):
        fetched.append(relative.rsplit("/", 1)[1])
        if verified:
            raise KeyboardInterrupt  # as if Ctrl-C (or a kill) arrived during the second file
        real_fetch(remote, relative, blob, entry, bar)
        verified.append(relative.rsplit("/", 1)[1])

    monkeypatch.setattr(remotes, "fetch_file", dies_after_first)
    node = Store(tmp_path / "B")
    with pytest.raises(KeyboardInterrupt):
        loadspec.api.pull("tiny", remote=url, cache_dir=node.root, workers=1, progress=False)
    assert verified and not node.has(fingerprint) and node.ref("tiny") is None
    assert list(node.artifacts.iterdir()) == []
    leftovers = [p.name for p in node.tmp.iterdir()]
    assert leftovers == [f"{fingerprint}.pull"]  # only the resumable folder, which gc sees as an unfinished build
    assert [r.why for r in node.gc(dry_run=True)] == ["unfinished build"]

    fetched.clear()
    monkeypatch.setattr(remotes, "fetch_file", lambda *a: (fetched.append(a[1].rsplit("/", 1)[1]), real_fetch(*a)))
    result = loadspec.api.pull("tiny", remote=url, cache_dir=node.root, workers=4, progress=False)
    assert not set(fetched) & set(verified), "a verified file was downloaded again"
    assert set(fetched) | set(verified) == set(files)
    assert result.copied == len(files) - len(verified) and result.kept == len(verified)
    assert node.has(fingerprint) and node.verify(fingerprint) == [] and node.ref("tiny")["fingerprint"] == fingerprint
    assert list(node.tmp.iterdir()) == []


def test_damaged_remote_file_is_refused_and_not_kept(built, tmp_path):
    _, cache = built
    url = tmp_path / "shared"
    loadspec.api.push("tiny", remote=str(url), cache_dir=cache, progress=False)
    fingerprint = Store(cache).ref("tiny")["fingerprint"]
    target = url / "artifacts" / fingerprint / "config.json"
    data = bytearray(target.read_bytes())
    data[10] ^= 1  # same size, other bytes
    target.write_bytes(bytes(data))
    node = Store(tmp_path / "B")
    with pytest.raises(LoadspecError, match="config.json does not match its manifest"):
        loadspec.api.pull("tiny", remote=str(url), cache_dir=node.root, progress=False)
    assert not node.has(fingerprint) and node.ref("tiny") is None
    blobs = {p.name for p in (node.tmp / f"{fingerprint}.pull").iterdir()}
    assert Store(cache).manifest(fingerprint)["files"]["config.json"]["sha256"] not in blobs
    assert not any(name.endswith(".part") for name in blobs)


def test_push_refuses_a_damaged_local_artifact(built, tmp_path):
    _, cache = built
    store = Store(cache)
    folder = store.artifact_path(store.ref("tiny")["fingerprint"])
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("{", "{ ", 1)[:-1])
    with pytest.raises(LoadspecError, match="config.json no longer match"):
        loadspec.api.push("tiny", remote=str(tmp_path / "shared"), cache_dir=cache, progress=False)
    assert not (tmp_path / "shared" / "refs").exists()


HOSTILE_FILES = ["../../outside.txt", "/etc/passwd", "sub/dir.bin", "a\\b.bin", "..", ".hidden", "manifest.json"]


@pytest.mark.parametrize("bad", HOSTILE_FILES)
def test_path_traversal_in_a_remote_manifest_is_refused(bad, tmp_path):
    url, fingerprint = tmp_path / "shared", "0123456789abcdef01234567"
    (url / "refs").mkdir(parents=True)
    (url / "refs" / "evil.json").write_text(json.dumps({"fingerprint": fingerprint, "target": "cpu", "created": ""}))
    (url / "artifacts" / fingerprint).mkdir(parents=True)
    manifest = {"fingerprint": fingerprint, "files": {bad: {"size": 1, "sha256": "0" * 64}}}
    (url / "artifacts" / fingerprint / "manifest.json").write_text(json.dumps(manifest))
    code, output = cli("pull", "evil", "--remote", url, "--cache-dir", tmp_path / "B", "-q")
    assert code == 1 and "refusing" in output and "would not stay a plain file" in output and "Traceback" not in output
    assert not (tmp_path / "outside.txt").exists() and not list((tmp_path / "B" / "artifacts").iterdir())


@pytest.mark.parametrize("fingerprint", ["../../../tmp/x", "0123456789ABCDEF01234567", "abc", 42])
def test_bad_fingerprint_in_a_remote_ref_is_refused(fingerprint, tmp_path):
    url = tmp_path / "shared"
    (url / "refs").mkdir(parents=True)
    (url / "refs" / "evil.json").write_text(json.dumps({"fingerprint": fingerprint}))
    with pytest.raises(LoadspecError, match="not 24 lowercase hex digits"):
        loadspec.api.pull("evil", remote=str(url), cache_dir=tmp_path / "B", progress=False)
    assert not list((tmp_path / "B" / "tmp").iterdir())


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", ""])
def test_bad_names_are_refused_before_any_path_is_built(name, tmp_path):
    with pytest.raises(UsageError, match="not an artifact name"):
        loadspec.api.pull(name, remote=str(tmp_path / "shared"), cache_dir=tmp_path / "B")


def test_missing_name_and_missing_remote_say_how(tmp_path, monkeypatch):
    monkeypatch.delenv("LOADSPEC_REMOTE", raising=False)
    with pytest.raises(UsageError, match="LOADSPEC_REMOTE"):
        loadspec.api.pull("tiny", cache_dir=tmp_path)
    with pytest.raises(UsageError, match="loadspec build"):
        loadspec.load("tiny", cache_dir=tmp_path)  # no remote: the store's own message
    monkeypatch.setenv("LOADSPEC_REMOTE", str(tmp_path / "shared"))
    with pytest.raises(UsageError, match="no artifact named 'tiny'.*loadspec push tiny"):
        loadspec.load("tiny", cache_dir=tmp_path)


def test_remote_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("LOADSPEC_S3_ENDPOINT", "http://127.0.0.1:9")
    s3 = remotes.open_remote("s3://bucket/some/prefix/")
    assert s3.root == "bucket/some/prefix" and not s3.local and s3.fs.endpoint_url == "http://127.0.0.1:9"
    monkeypatch.delenv("LOADSPEC_S3_ENDPOINT")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    assert remotes.open_remote("s3://bucket").fs.endpoint_url == "http://127.0.0.1:10"
    folder = remotes.open_remote(str(tmp_path / "x"))
    assert folder.local and folder.root == str(tmp_path / "x")
    assert remotes.open_remote((tmp_path / "x").as_uri()).root == str(tmp_path / "x")
    monkeypatch.setenv("LOADSPEC_REMOTE", "hf://datasets/org/repo@v1/team-a")
    hub = remotes.open_remote()
    assert isinstance(hub, remotes.HubRemote)
    assert (hub.repo_id, hub.repo_type, hub.revision, hub.prefix) == ("org/repo", "dataset", "v1", "team-a/")
    plain = remotes.open_remote("hf://org/repo")
    assert (plain.repo_id, plain.repo_type, plain.revision, plain.prefix) == ("org/repo", "model", None, "")
    for bad in ("hf://just-org", "hf://org/repo/../x", "s3://"):
        with pytest.raises(UsageError):
            remotes.open_remote(bad)


def test_hub_remote_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadspecError, match="HF_HUB_OFFLINE=1 is set.*folder or s3://"):
        loadspec.api.pull("tiny", remote="hf://org/repo", cache_dir=tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens: like no network
    import huggingface_hub.utils._http as hub_http

    monkeypatch.setattr(hub_http.time, "sleep", lambda seconds: None)  # skip the hub client's retry back-off
    started = time.perf_counter()
    code, output = cli("pull", "tiny", "--remote", "hf://org/repo", "--cache-dir", tmp_path, "-q")
    assert code == 1 and "cannot read refs/tiny.json on hub remote hf://org/repo" in output and "Traceback" not in output
    assert time.perf_counter() - started < 30


# --- housekeeping: gc by age and by size ---------------------------------------------------
def _artifact(store, fingerprint, size, name, used_days_ago):
    with store.staging(fingerprint) as folder:
        (folder / "model.safetensors").write_bytes(b"x" * size)
        (folder / "manifest.json").write_text("{}")
    store.commit(folder, fingerprint)
    store.set_ref(name, fingerprint)
    store.index[f"used:{fingerprint}"] = time.time() - used_days_ago * 86400


def test_gc_older_than_and_max_size_with_dry_run(tmp_path):
    store = Store(tmp_path)
    _artifact(store, "a" * 24, 3000, "old", 40)
    _artifact(store, "b" * 24, 2000, "middle", 10)
    _artifact(store, "c" * 24, 1000, "fresh", 0)
    store.set_ref("old-alias", "a" * 24)

    code, output = cli("gc", "--older-than", 30, "--dry-run", "--cache-dir", tmp_path)
    assert code == 0 and "would remove" in output and "not used for 30 days" in output and "index:old-alias" in output
    assert store.has("a" * 24) and store.ref("old")

    removed = store.gc(max_size=3500, dry_run=True)  # LRU first: old (3000) goes, then 3000 left fits
    assert [r.path.name for r in removed if r.size] == ["a" * 24]
    removed = store.gc(max_size=1500, dry_run=True)
    assert [r.path.name for r in removed if r.size] == ["a" * 24, "b" * 24]
    assert all(store.has(c * 24) for c in "abc")

    code, output = cli("gc", "--older-than", 30, "--cache-dir", tmp_path)
    assert code == 0 and "removed" in output
    assert not store.has("a" * 24) and store.ref("old") is None and store.ref("old-alias") is None
    code, output = cli("gc", "--max-size", "0.002MiB", "--cache-dir", tmp_path)
    assert code == 0 and "over the" in output
    assert not store.has("b" * 24) and store.has("c" * 24) and store.ref("fresh")
    code, output = cli("gc", "--max-size", "lots", "--cache-dir", tmp_path)
    assert code == 2 and "--max-size must look like 50GiB" in output
