"""Hub sources offline: a real hub cache layout on disk, revisions pinned, tokens never stored, gated repos explained."""
import hashlib
import shutil

import huggingface_hub
import pytest
from huggingface_hub import constants

import loadspec
from loadspec.errors import UsageError

REPO = "acme/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SECRET = "hf_NotARealTokenButSecret0123456789"


@pytest.fixture
def hub_cache(tmp_path, checkpoint, monkeypatch):
    """HF_HUB_CACHE with models--acme--tiny-llama/{blobs, snapshots/<commit>, refs/main}, as huggingface_hub writes it."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in sorted(checkpoint("llama").iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(f"../../blobs/{blob.name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def spec(tmp_path, revision="main", token_env="HF_TOKEN", name="hub"):
    path = tmp_path / f"{name}.toml"
    path.write_text(f'name = "{name}"\n[model]\nsource = "{REPO}"\nrevision = "{revision}"\ntoken_env = "{token_env}"\n'
                    '[target]\ngpu = "cpu"\n')
    return path


def test_offline_revision_pinned_to_commit(hub_cache, tmp_path):
    plan = loadspec.plan_spec(spec(tmp_path)).plan
    assert plan.source["kind"] == "hub" and plan.source["revision"] == COMMIT
    assert f"hub {REPO} @ {COMMIT[:12]}" in plan.explain()
    assert loadspec.plan_spec(spec(tmp_path, revision=COMMIT, name="pinned")).plan.fingerprint == plan.fingerprint


def test_offline_missing_revision_says_how_to_fix(hub_cache, tmp_path):
    with pytest.raises(UsageError, match=r"HF_HUB_OFFLINE=1 is set and acme/tiny-llama@v2.0 is not in the local hub cache.*huggingface-cli download"):
        loadspec.plan_spec(spec(tmp_path, revision="v2.0"))
    shutil.rmtree(hub_cache / f"models--{REPO.replace('/', '--')}")
    with pytest.raises(UsageError, match="not in the local hub cache"):
        loadspec.plan_spec(spec(tmp_path))


def test_token_read_from_env_and_never_written(hub_cache, tmp_path, monkeypatch):
    seen = []
    real = huggingface_hub.snapshot_download

    def recording(*args, **kwargs):
        seen.append(kwargs.get("token"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    monkeypatch.setenv("MY_HUB_TOKEN", SECRET)
    built = loadspec.build(spec(tmp_path, token_env="MY_HUB_TOKEN"), cache_dir=tmp_path / "cache", progress=False)
    assert seen == [SECRET]  # the variable the spec names is what reaches huggingface_hub
    for file in (tmp_path / "cache").rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), f"token leaked into {file}"
    assert SECRET not in built.plan.to_json() and SECRET not in built.plan.explain()


def test_gated_repo_message(tmp_path, monkeypatch):
    import httpx
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        response = httpx.Response(403, request=httpx.Request("GET", f"https://huggingface.co/{REPO}"))
        raise GatedRepoError("Access to model acme/tiny-llama is restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UsageError, match=r"acme/tiny-llama is gated: accept its licence on the hub, then put a token in \$MY_TOK"):
        loadspec.plan_spec(spec(tmp_path, token_env="MY_TOK"))
