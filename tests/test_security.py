"""Security: no pickle is ever loaded without an explicit opt-in (and then only through torch.load(weights_only=True)),
hub tokens never reach plans, manifests, logs, error messages or the cache, names cannot escape the cache
directory, and the source's own Python code runs only when the spec says trust_remote_code = true."""
import ast
import json
import logging
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import loadspec
from loadspec.cli import main
from loadspec.errors import UsageError
from loadspec.store import Store

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is the capital of France? Paris is"
TOKEN = "hf_SENTINELtoken0123456789abcdef"  # $HF_TOKEN
OTHER_TOKEN = "hf_OTHERsentinel9876543210fedcba"  # the variable a spec names with token_env


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    crash = result.exception if result.exception is not None and not isinstance(result.exception, SystemExit) else None
    assert crash is None, f"{args}: crashed with {crash!r}\n{result.output}"
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def logits_of(model, tokenizer):
    with torch.no_grad():
        return model(tokenizer(PROMPT, return_tensors="pt").input_ids).logits


# --------------------------------------------------------------------------- pickle
UNPICKLERS = ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve")


def test_no_unpickling_anywhere_in_the_code():
    """Every torch.load passes weights_only=True (a literal) and lives in the one opt-in reader; nothing calls
    pickle/dill/joblib/marshal, imports their loaders by name, or asks numpy for allow_pickle."""
    files = sorted((ROOT / "loadspec").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    assert files
    torch_loads = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in UNPICKLERS, f"{where}: from {node.module} import ..."
                assert not (node.module == "torch" and any(a.name == "load" for a in node.names)), f"{where}: from torch import load"
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if func == "torch.load":
                value = keywords.get("weights_only")
                assert isinstance(value, ast.Constant) and value.value is True, f"{where}: torch.load without weights_only=True"
                torch_loads.append(where)
            assert func.split(".")[0] not in UNPICKLERS, f"{where}: calls {func}"
            assert not (func.endswith(".load") and getattr(keywords.get("allow_pickle"), "value", False)), f"{where}: allow_pickle"
            if "weights_only" in keywords:
                assert getattr(keywords["weights_only"], "value", None) is True, f"{where}: weights_only not True"
    assert torch_loads and all(w.startswith("loadspec/source.py") for w in torch_loads), torch_loads


@pytest.fixture(scope="module")
def pickled(checkpoint, tmp_path_factory):
    """The llama fixture with its weights in pytorch_model.bin (written by torch.save) instead of safetensors."""
    folder = tmp_path_factory.mktemp("pickled") / "llama-bin"
    shutil.copytree(checkpoint("llama"), folder, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    torch.save(load_file(checkpoint("llama") / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


class _Payload:
    """Unpickling this runs code (writes a file); torch.save pickles it like any object."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return exec, (f"open({str(self.sentinel)!r}, 'w').write('pwned')",)


def test_pickle_checkpoint_refused_without_opt_in(pickled, write_spec):
    code, output = run_cli("plan", write_spec(pickled, name="p"))
    assert code == 2 and "pytorch_model.bin" in output and "allow_pickle = true" in output and "weights_only=True" in output


def test_pickle_opt_in_reads_through_weights_only(pickled, checkpoint, write_spec, tmp_path, monkeypatch):
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    spec = write_spec(pickled, name="from-bin", model={"allow_pickle": True})
    code, output = run_cli("build", spec, "--cache-dir", tmp_path / "cache", "-q")
    assert code == 0, output
    assert calls and all(k.get("weights_only") is True for k in calls), calls
    converted = logits_of(*loadspec.load("from-bin", cache_dir=tmp_path / "cache"))
    loadspec.build(write_spec(checkpoint("llama"), name="from-safetensors"), cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(converted, logits_of(*loadspec.load("from-safetensors", cache_dir=tmp_path / "cache")))
    artifact = Store(tmp_path / "cache").artifact_path(Store(tmp_path / "cache").ref("from-bin")["fingerprint"])
    assert not list(artifact.glob("*.bin")), "the artifact holds safetensors only"


def test_hostile_pickle_refused_even_with_opt_in(pickled, write_spec, tmp_path):
    folder = tmp_path / "hostile"
    shutil.copytree(pickled, folder, ignore=shutil.ignore_patterns("*.bin"))
    sentinel = tmp_path / "PWNED"
    torch.save({"model.embed_tokens.weight": _Payload(sentinel)}, folder / "pytorch_model.bin")
    spec = write_spec(folder, name="hostile", model={"allow_pickle": True})
    for command in (("plan", spec), ("build", spec, "--cache-dir", tmp_path / "cache")):
        code, output = run_cli(*command)
        assert code == 2 and "refused" in output and "weights_only=True" in output, output
    assert not sentinel.exists(), "the pickle's code ran"
    assert not list((tmp_path / "cache" / "artifacts").iterdir())


# --------------------------------------------------------------------------- tokens
class _Hub(BaseHTTPRequestHandler):
    """A hub that knows no repository and records the Authorization headers it receives."""

    seen: list = []

    def _reply(self):
        type(self).seen.append(self.headers.get("Authorization"))
        body = json.dumps({"error": "Repository not found"}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = _reply

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Hub.seen = []
    from huggingface_hub import constants

    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)  # read by loadspec's hub remote ...
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # ... and by huggingface_hub when it was imported
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield _Hub
    server.shutdown()


def test_tokens_never_reach_plans_manifests_logs_errors_or_the_cache(hub, checkpoint, write_spec, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("MY_HUB_TOKEN", OTHER_TOKEN)
    log = tmp_path / "builds.log"
    monkeypatch.setenv("LOADSPEC_BUILD_LOG", str(log))
    caplog.set_level(logging.DEBUG)
    cache = tmp_path / "cache"
    local = write_spec(checkpoint("llama"), name="tok", model={"token_env": "MY_HUB_TOKEN"})
    hub_spec = write_spec("some-org/private-model", name="hubbed", model={"token_env": "MY_HUB_TOKEN"})
    default_env = write_spec("some-org/gated-model", name="gated")
    outputs, codes = [], []
    for command in (("plan", local), ("plan", local, "--json"), ("build", local, "--cache-dir", cache), ("ls", "--cache-dir", cache),
                    ("inspect", "tok", "--cache-dir", cache), ("verify", "tok", "--cache-dir", cache),
                    ("load", "tok", "--cache-dir", cache),
                    ("plan", hub_spec), ("build", hub_spec, "--cache-dir", cache), ("plan", default_env),
                    ("push", "tok", "--remote", "hf://some-org/artifacts", "--cache-dir", cache),
                    ("pull", "tok", "--remote", "hf://some-org/artifacts", "--cache-dir", tmp_path / "node")):
        code, output = run_cli(*command)
        outputs.append(output)
        codes.append(code)
    assert codes[:7] == [0] * 7, outputs[:7]
    assert all(code in (1, 2) and output.startswith("error: ") for code, output in zip(codes[7:], outputs[7:])), outputs[7:]
    assert f"Bearer {OTHER_TOKEN}" in hub.seen and f"Bearer {TOKEN}" in hub.seen  # the tokens were really in play
    planned = loadspec.plan_spec(local).plan
    haystacks = {"plan": planned.to_json(), "explain": planned.explain(), "cli output": "\n".join(outputs),
                 "log records": caplog.text, "build log": log.read_text()}
    for path in [*cache.rglob("*"), *(tmp_path / "node").rglob("*")]:
        if path.is_file():  # artifacts, manifests, plan.json, the diskcache index (SQLite), locks
            haystacks[str(path)] = path.read_bytes().decode("latin-1")
    for where, text in haystacks.items():
        for secret in (TOKEN, OTHER_TOKEN, TOKEN[3:15], OTHER_TOKEN[3:15]):
            assert secret not in text, f"a token leaked into {where}"
    assert '"token_env"' not in planned.to_json() or "MY_HUB_TOKEN" in planned.to_json()  # at most the variable's name


# --------------------------------------------------------------------------- names and paths
BAD_NAMES = ["../../outside", "../outside/keep.txt", "/etc/passwd", "a/../../b", "..", ".", "./tok", "tok/", "-rf", "x" * 200]


@pytest.fixture
def cache_with_canary(checkpoint, write_spec, tmp_path):
    cache = tmp_path / "area" / "cache"
    outside = tmp_path / "area" / "outside"
    outside.mkdir(parents=True)
    (outside / "keep.txt").write_text("keep me")
    built = loadspec.build(write_spec(checkpoint("llama"), name="tok"), cache_dir=cache, progress=False)
    return cache, outside, built


def _intact(cache, outside, built):
    assert (outside / "keep.txt").read_text() == "keep me"
    assert Store(cache).verify(built.plan.fingerprint) == []


@pytest.mark.parametrize("command", ["rm", "inspect", "verify", "load", "push"])
def test_names_cannot_escape_the_cache(command, cache_with_canary, tmp_path, monkeypatch):
    cache, outside, built = cache_with_canary
    monkeypatch.chdir(tmp_path / "area" / "cache")  # relative names would resolve next to the canary
    extra = ["--remote", tmp_path / "remote"] if command == "push" else []
    for name in BAD_NAMES:
        code, output = run_cli(command, "--cache-dir", cache, *extra, "--", name)
        spec_file = command == "load" and Path(name).is_file()  # load takes a spec file too: then it is parsed as one
        assert code == 2 and ("problem in the spec" if spec_file else "not an artifact name") in output, (name, output)
        _intact(cache, outside, built)
    assert not (tmp_path / "remote").exists()


@pytest.mark.parametrize("fingerprint", ["../../outside", "../outside", "/tmp", "..", "ABC", 7, None])
def test_a_tampered_index_cannot_point_outside_the_cache(fingerprint, cache_with_canary):
    cache, outside, built = cache_with_canary
    Store(cache).index["ref:evil"] = {"fingerprint": fingerprint, "spec": "", "target": "cpu", "created": ""}
    for command in ("rm", "inspect", "verify", "load"):
        code, output = run_cli(command, "evil", "--cache-dir", cache)
        assert code == 1 and "not a fingerprint" in output and "damaged index" in output, output
        _intact(cache, outside, built)
    code, output = run_cli("gc", "--cache-dir", cache)
    assert code == 0
    _intact(cache, outside, built)


def test_api_refuses_bad_names_too(cache_with_canary):
    cache, outside, built = cache_with_canary
    for name in ("../../outside", "/nonexistent/artifact", "a/b"):
        with pytest.raises(UsageError, match="not an artifact name"):
            loadspec.load(name, cache_dir=cache)
        with pytest.raises(UsageError, match="not an artifact name"):
            Store(cache).remove_name(name)
    _intact(cache, outside, built)


# --------------------------------------------------------------------------- trust_remote_code
@pytest.fixture(scope="module")
def custom_code(checkpoint, tmp_path_factory):
    """The llama fixture whose tokenizer_config.json asks for its own Python class (auto_map), as hub repos with
    custom code do; importing that code writes a sentinel file."""
    root = tmp_path_factory.mktemp("custom")
    folder = root / "llama-custom"
    shutil.copytree(checkpoint("llama"), folder)
    sentinel = root / "CODE_RAN"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["custom_tok.CustomTokenizer", "custom_tok.CustomTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "custom_tok.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n"
                                          "from transformers import PreTrainedTokenizerFast\n\n\n"
                                          "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return folder, sentinel


@pytest.fixture
def trust_calls(monkeypatch):
    """Every trust_remote_code that transformers' Auto* entry points receive, by entry point."""
    import transformers

    seen = []
    for cls_name, method in (("AutoTokenizer", "from_pretrained"), ("AutoConfig", "from_pretrained"),
                             ("AutoModelForCausalLM", "from_config"), ("AutoModelForCausalLM", "from_pretrained")):
        cls = getattr(transformers, cls_name)
        real = getattr(cls, method)

        def spy(*args, _real=real, _where=f"{cls_name}.{method}", **kwargs):
            seen.append((_where, kwargs.get("trust_remote_code")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, method, spy)
    return seen


def test_remote_code_never_runs_unless_the_spec_says_so(custom_code, write_spec, tmp_path, trust_calls):
    folder, sentinel = custom_code
    spec = write_spec(folder, name="custom")
    built = loadspec.build(spec, cache_dir=tmp_path / "cache", progress=False)
    assert built.plan.source["trust_remote_code"] is False
    loadspec.load("custom", cache_dir=tmp_path / "cache")
    assert not sentinel.exists(), "the source's Python code ran without trust_remote_code"
    assert not list(built.path.glob("*.py"))
    assert trust_calls and all(value is not True for _, value in trust_calls), trust_calls
    assert ("AutoTokenizer.from_pretrained", False) in trust_calls  # said explicitly, not left to a default


def test_trust_remote_code_is_recorded_and_passed_through(custom_code, write_spec, tmp_path, trust_calls):
    folder, sentinel = custom_code
    spec = write_spec(folder, name="custom-trusted", model={"trust_remote_code": True})
    planned = loadspec.plan_spec(spec)
    assert planned.plan.source["trust_remote_code"] is True
    assert "trust_remote_code" in planned.plan.to_json()
    code, output = run_cli("plan", spec, "--json")
    assert json.loads(output)["source"]["trust_remote_code"] is True
    built = loadspec.build(spec, cache_dir=tmp_path / "cache", progress=False)
    assert sentinel.exists(), "the spec allowed the source's code; the builder should have passed that on"
    assert ("AutoTokenizer.from_pretrained", True) in trust_calls
    assert json.loads((built.path / "plan.json").read_text())["source"]["trust_remote_code"] is True
