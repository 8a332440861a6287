"""The pipelined build writes the very bytes the previous sequential method wrote, hashes them right,
and leaves nothing behind when it stops half-way."""
import functools
import hashlib
import json

import pytest
import torch

import loadspec
from loadspec import builder, shards
from loadspec.api import plan_spec
from tools.bench_build import sequential_build

SMALL_SHARDS = 40_000  # bytes: the tiny checkpoints then span several shards


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(builder, "ShardWriter", functools.partial(shards.ShardWriter, max_shard_bytes=SMALL_SHARDS))


def build_and_reference(spec, tmp_path):
    """(the artifact folder, the folder the sequential method wrote for the same plan)."""
    built = loadspec.build(spec, cache_dir=tmp_path / "cache", progress=False)
    planned = plan_spec(spec)
    reference = tmp_path / "sequential"
    reference.mkdir()
    sequential_build(planned.plan, planned.source, reference, max_shard_bytes=SMALL_SHARDS)
    return built.path, reference


def assert_same_weight_files(artifact, reference):
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in artifact.glob("model*")) == names and len(names) > 3
    manifest = json.loads((artifact / "manifest.json").read_text())["files"]
    for name in names:
        data = (artifact / name).read_bytes()
        assert data == (reference / name).read_bytes(), f"{name} differs from the sequential method's"
        assert manifest[name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("load", [{"quant": "nf4"}, {"quant": "fp4"}, {"quant": "int8"}, {"quant": "none"},
                                  {"quant": "nf4", "dtype": "float16"}])
def test_files_equal_the_sequential_methods(load, checkpoint, write_spec, small_shards, tmp_path):
    spec = write_spec(checkpoint("llama"), name="same", load=load)
    assert_same_weight_files(*build_and_reference(spec, tmp_path))


def test_grown_vocabulary_files_equal_the_sequential_methods(checkpoint, write_spec, small_shards, tmp_path):
    spec = write_spec(checkpoint("llama"), name="grown", tokenizer={"added_tokens": ["<x1>", "<x2>"], "resize_vocab": 600})
    assert_same_weight_files(*build_and_reference(spec, tmp_path))


@pytest.mark.gpu
def test_gpu_files_equal_the_sequential_methods(checkpoint, write_spec, small_shards, tmp_path):
    """On a GPU: weights read straight into GPU memory and copied out through pinned buffers at their shard's end."""
    spec = write_spec(checkpoint("llama"), name="gpu-same", target="auto")
    assert_same_weight_files(*build_and_reference(spec, tmp_path))


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_build_stopped_half_way_leaves_no_shard(stop, checkpoint, write_spec, small_shards, tmp_path, monkeypatch):
    spec = write_spec(checkpoint("llama"), name="stopped")
    planned = plan_spec(spec)
    calls = []
    real = builder.quantize

    def quantize_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # several shards are written or being written by now
            raise stop("stopped")
        return real(*args, **kwargs)

    monkeypatch.setattr(builder, "quantize", quantize_then_stop)
    folder = tmp_path / "staged"
    folder.mkdir()
    with pytest.raises(stop):
        builder.write_artifact(planned.plan, planned.source, planned.skeleton, folder, progress=False)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(("model", ".shard"))]


def test_tensors_arrive_in_file_order_on_the_device_that_uses_them(checkpoint, write_spec):
    planned = plan_spec(write_spec(checkpoint("llama"), name="order"))
    source = planned.source
    names = set(source.tensors)
    got = list(builder._tensors(planned.plan, source, names, torch.device("cpu")))
    from loadspec.reader import read_layout

    _, header = read_layout(source.path / "model.safetensors")
    assert [name for name, _ in got] == sorted(names, key=lambda n: (header[n]["data_offsets"][0], n))
    from safetensors.torch import load_file

    stored = load_file(source.path / "model.safetensors")
    assert all(torch.equal(tensor, stored[name]) and tensor.device.type == "cpu" for name, tensor in got)
