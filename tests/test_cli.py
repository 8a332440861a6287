"""The `loadspec` command as a user types it: messages, exit codes, no tracebacks."""
import pytest
from click.testing import CliRunner

from loadspec.cli import main


@pytest.fixture
def run(tmp_path):
    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")

    return invoke


BAD_SPECS = {
    "unknown key": ('name = "x"\n[model]\nsource = "a/b"\n[load]\nquantize = "nf4"\n', ["s.toml:5", "Did you mean 'quant'?"]),
    "typo in value": ('name = "x"\n[model]\nsource = "a/b"\n[load]\nquant = "nf44"\n', ["s.toml:5", "Did you mean 'nf4'?"]),
    "wrong type": ('name = "x"\n[model]\nsource = "a/b"\n[load]\nmax_seq_length = "4096"\n', ["s.toml:5", "whole number"]),
    "negative length": ('name = "x"\n[model]\nsource = "a/b"\n[load]\nmax_seq_length = -1\n', ["s.toml:5", "between 0"]),
    "unknown quant": ('name = "x"\n[model]\nsource = "a/b"\n[load]\nquant = "gptq"\n', ["s.toml:5", "not one of"]),
    "missing source": ('name = "x"\n[model]\nrevision = "main"\n', ["model.source", "missing"]),
    "malformed TOML": ('name = "x"\n[model\nsource = "a/b"\n', ["s.toml:2", "not valid TOML"]),
}


@pytest.mark.parametrize("case", BAD_SPECS)
def test_bad_spec_exit_2_with_line_and_no_traceback(case, run, tmp_path):
    text, expected = BAD_SPECS[case]
    spec = tmp_path / "s.toml"
    spec.write_text(text)
    for command in ("plan", "build"):
        code, output = run(command, spec, *(["--cache-dir", tmp_path / "c"] if command == "build" else []))
        assert code == 2, output
        assert "Traceback" not in output
        for fragment in expected:
            assert fragment in output


def test_two_problems_both_listed(run, tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('name = "x"\n[model]\nsource = "a/b"\n[load]\nquant = "nf5"\ndtype = "bf16"\n')
    code, output = run("plan", spec)
    assert code == 2 and "2 problems" in output and "s.toml:5" in output and "s.toml:6" in output


def test_missing_spec_file(run, tmp_path):
    code, output = run("plan", tmp_path / "nope.toml")
    assert code == 2 and "no such spec file" in output


def test_plan_targets(run, checkpoint, write_spec):
    spec = write_spec(checkpoint("llama"))
    code, output = run("plan", spec, "--target", "t4")
    dtype_line = next(line for line in output.splitlines() if line.strip().startswith("dtype"))
    assert code == 0 and dtype_line.split()[1] == "float16"
    code, output = run("plan", spec, "--target", "h100")
    dtype_line = next(line for line in output.splitlines() if line.strip().startswith("dtype"))
    assert code == 0 and dtype_line.split()[1] == "bfloat16" and "capability 9.0" in output
    code, output = run("plan", spec, "--json")
    assert code == 0 and __import__("json").loads(output)["quant"]["method"] == "nf4"


def test_build_twice_then_manage(run, checkpoint, write_spec, tmp_path):
    spec = write_spec(checkpoint("granite"), name="g")
    cache = tmp_path / "cache"
    code, output = run("build", spec, "--cache-dir", cache, "-q")
    assert code == 0 and output.startswith("built: g")
    code, output = run("build", spec, "--cache-dir", cache)
    assert code == 0 and "cache hit" in output and "dtype" in output
    code, output = run("ls", "--cache-dir", cache)
    assert code == 0 and "g " in output and "MiB" in output
    code, output = run("inspect", "g", "--cache-dir", cache)
    assert code == 0 and "model.safetensors" in output and "sha256" in output
    code, output = run("verify", "g", "--cache-dir", cache)
    assert code == 0 and "every file matches" in output
    code, output = run("load", "g", "--cache-dir", cache)
    assert code == 0 and "forward ok" in output and "finite=True" in output
    code, output = run("load", "g", "--cache-dir", cache, "--prompt", "What is the capital", "--max-new-tokens", "3")
    assert code == 0
    code, output = run("rm", "g", "--cache-dir", cache, "--dry-run")
    assert code == 0 and "would remove" in output
    code, output = run("rm", "g", "--cache-dir", cache)
    assert code == 0 and "removed 2 item(s)" in output
    code, output = run("gc", "--cache-dir", cache, "--dry-run")
    assert code == 0 and "nothing to remove" in output


def test_verify_fails_loudly_on_damage(run, checkpoint, write_spec, tmp_path):
    spec = write_spec(checkpoint("qwen2"), name="q")
    cache = tmp_path / "cache"
    run("build", spec, "--cache-dir", cache, "-q")
    shard = next((cache / "artifacts").glob("*/model.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, output = run("verify", "q", "--cache-dir", cache)
    assert code == 1 and "model.safetensors: contents changed" in output and "--force" in output


def test_load_unknown_name_says_how_to_build(run, tmp_path):
    code, output = run("load", "missing-model", "--cache-dir", tmp_path)
    assert code == 2 and "loadspec build" in output and "Traceback" not in output


def test_gpu_plan_on_cpu_machine_is_refused_with_fix(run, checkpoint, write_spec, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    spec = write_spec(checkpoint("llama"), name="gpuplan", target="h100")
    run("build", spec, "--cache-dir", tmp_path, "-q")
    code, output = run("load", "gpuplan", "--cache-dir", tmp_path)
    assert code == 2 and "--device cpu" in output
    code, output = run("load", "gpuplan", "--cache-dir", tmp_path, "--device", "cpu")
    assert code == 0 and "forward ok" in output


def test_help_teaches(run):
    code, output = run("--help")
    assert code == 0 and "loadspec build" in output and "loadspec.load" in output
    code, output = run("build", "--help")
    assert code == 0 and "--target" in output and "cache hit" in output
