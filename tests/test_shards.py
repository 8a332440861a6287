"""The streaming safetensors writer produces ordinary files that safetensors and transformers read, and their sha256."""
import errno
import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loadspec.shards import ShardWriter


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "b.absmax": torch.randint(0, 255, (100,), generator=g, dtype=torch.uint8),
        "c.scale": torch.randn(7, generator=g),
        "d.empty": torch.zeros(0, dtype=torch.float16),
        "e.weight": torch.randn(128, 64, generator=g).half(),
    }


def test_single_shard_round_trips(tmp_path):
    data = tensors()
    writer = ShardWriter(tmp_path, list(data))
    for name, t in data.items():
        writer.add(name, t)
    assert writer.close() == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(data)
    assert all(torch.equal(loaded[n], data[n]) and loaded[n].dtype == data[n].dtype for n in data)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def _written_in_small_shards(folder, data):
    """`data` through a ShardWriter with 10 kB shards; returns (writer, file names)."""
    writer = ShardWriter(folder, list(data), max_shard_bytes=10_000)
    for name, t in data.items():
        writer.add(name, t)
    return writer, writer.close()


def test_rolls_over_into_indexed_shards(tmp_path):
    data = tensors()
    _, files = _written_in_small_shards(tmp_path, data)
    assert files[-1] == "model.safetensors.index.json" and len(files) >= 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(data)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in data.values())
    for name, file in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / file)[name], data[name])
    assert not list(tmp_path.glob("*.partial"))


def test_abort_leaves_nothing(tmp_path):
    writer = ShardWriter(tmp_path, ["x"])
    writer.add("x", torch.ones(10))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_header_overflow_is_detected(tmp_path):
    writer = ShardWriter(tmp_path, ["x"])
    for i in range(40):  # many more names than the reserve was sized for
        writer.add(f"unexpected.{i}.with.a.rather.long.name", torch.ones(1))
    with pytest.raises(RuntimeError, match="exceeds"):
        writer.close()


def test_digests_are_the_files_sha256(tmp_path):
    writer, files = _written_in_small_shards(tmp_path, tensors())
    assert writer.digests == {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in files}


class _FullDisk:
    """A real file whose writes fail with ENOSPC once `budget` bytes went through, as on a full disk."""

    def __init__(self, handle, budget):
        self._handle, self._budget = handle, budget

    def write(self, data):
        self._budget -= len(memoryview(data).cast("B"))
        if self._budget < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)


def test_a_shard_threads_write_error_reaches_the_caller_and_abort_cleans_up(tmp_path, monkeypatch):
    from loadspec import shards

    real_open = open
    monkeypatch.setattr(shards, "open", lambda path, mode: _FullDisk(real_open(path, mode), 30_000), raising=False)
    data = tensors()
    writer = ShardWriter(tmp_path, [f"{name}.{i}" for i in range(20) for name in data], max_shard_bytes=40_000)
    with pytest.raises(OSError) as failure:
        for i in range(20):  # far more than the disk takes
            for name, t in data.items():
                writer.add(f"{name}.{i}", t)
        writer.close()
    assert failure.value.errno == errno.ENOSPC
    writer.abort()
    assert list(tmp_path.iterdir()) == []
