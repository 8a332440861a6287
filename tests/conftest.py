"""Shared fixtures: tiny fixed-seed checkpoints for every family, specs written on the fly, fresh interpreters."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # makes tools/ importable

from tools.fixtures import make_checkpoint  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family) -> folder of a tiny random-weight checkpoint, built once per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    built = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_checkpoint(family, root / family)
        return built[family]

    return get


@pytest.fixture
def write_spec(tmp_path):
    """write_spec(source, name=..., **sections) -> path of a spec file targeting the CPU."""

    def write(source, name="tiny", load=None, target="cpu", tokenizer=None, model=None, lora=None, train=None) -> Path:
        lines = [f'name = "{name}"', "[model]", f'source = "{source}"',
                 *(f"{k} = {_toml(v)}" for k, v in (model or {}).items()), "[target]", f'gpu = "{target}"']
        for section, values in (("load", load), ("tokenizer", tokenizer), ("lora", lora), ("train", train)):
            if values:
                lines.append(f"[{section}]")
                lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        path = tmp_path / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


def _toml(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


@pytest.fixture
def graph_nodes():
    """count(tensor) -> {autograd node class name: how many} over the graph that produced `tensor`."""
    def count(tensor) -> dict[str, int]:
        counts, seen, todo = {}, set(), [tensor.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            counts[type(node).__name__] = counts.get(type(node).__name__, 0) + 1
            todo.extend(next_node for next_node, _ in node.next_functions)
        return counts
    return count


@pytest.fixture
def fresh_python():
    """run(code, *args, **env) -> (the dict its `print("RESULT", json.dumps(...))` line carries, its stderr), from a
    fresh interpreter given `args` and os.environ updated by `env` (None removes a variable); a failure fails the test."""
    def run(code: str, *args, **env):
        environ = {key: value for key, value in {**os.environ, **env}.items() if value is not None}
        out = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=environ, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))[7:]), out.stderr
    return run
