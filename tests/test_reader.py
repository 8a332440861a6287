"""The threaded reader returns exactly the stored tensors, on the devices asked for, and refuses damaged files."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from loadspec.errors import LoadspecError
from loadspec.reader import read_tensors


def sample():
    g = torch.Generator().manual_seed(1)
    return {
        "w.bf16": torch.randn(300, 70, generator=g).to(torch.bfloat16),
        "w.f32": torch.randn(33, 17, generator=g),
        "w.u8": torch.randint(0, 256, (1001,), generator=g, dtype=torch.uint8),
        "w.f16": torch.randn(5, 3, 2, generator=g).half(),
        "w.i64": torch.arange(9),
        "w.empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("chunk_bytes", [64, 1000, 1 << 20])
def test_reads_every_dtype_across_chunk_boundaries(tmp_path, chunk_bytes):
    data = sample()
    save_file(dict(list(data.items())[:3]), tmp_path / "a.safetensors")
    save_file(dict(list(data.items())[3:]), tmp_path / "b.safetensors")
    got = read_tensors([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], lambda key: "cpu", chunk_bytes=chunk_bytes, threads=3)
    assert set(got) == set(data)
    for key, tensor in data.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape
        assert torch.equal(got[key], tensor), key


def write_in_order(path, tensors: dict) -> None:
    """A safetensors file with the tensors in the given order, packed with no regard for alignment (as
    loadspec's own shards are: a 4-bit weight's quant-state blob has any length)."""
    header, blobs, offset = {}, [], 0
    for key, tensor in tensors.items():
        blob = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        dtype = {torch.uint8: "U8", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}[tensor.dtype]
        header[key] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_tensors_at_odd_file_offsets_come_back_aligned(tmp_path, device):
    g = torch.Generator().manual_seed(2)
    data = {"blob": torch.randint(0, 256, (3,), generator=g, dtype=torch.uint8), "f32": torch.randn(7, 5, generator=g),
            "odd": torch.randint(0, 256, (5,), generator=g, dtype=torch.uint8), "bf16": torch.randn(9, generator=g).bfloat16(),
            "i64": torch.arange(4) - 2}
    write_in_order(tmp_path / "odd.safetensors", data)
    on_host = {"odd"}  # on a GPU: a small host tensor inside the run rides along
    where = {key: "cpu" if key in on_host else device for key in data}
    got = read_tensors([tmp_path / "odd.safetensors"], where.__getitem__, chunk_bytes=16, threads=3)
    for key, tensor in data.items():
        assert got[key].device.type == torch.device(where[key]).type and got[key].dtype == tensor.dtype
        assert got[key].data_ptr() % (tensor.element_size() if where[key] == "cpu" else 256) == 0  # GPU: as kernels expect
        assert torch.equal(got[key].cpu(), tensor), key


def test_header_offsets_outside_file_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"x": torch.ones(10)}, path)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header["x"]["data_offsets"] = [0, 4000]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    with pytest.raises(LoadspecError, match="outside"):
        read_tensors([path], lambda key: "cpu")


def test_truncated_file_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"x": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LoadspecError, match="outside|truncated"):
        read_tensors([path], lambda key: "cpu")


@pytest.mark.gpu
def test_reads_to_gpu_and_host_in_one_pass(tmp_path):
    data = sample()
    save_file(data, tmp_path / "m.safetensors")
    got = read_tensors([tmp_path / "m.safetensors"], lambda key: "cpu" if key == "w.u8" else "cuda:0", chunk_bytes=4096)
    assert got["w.u8"].device.type == "cpu" and got["w.bf16"].device.type == "cuda"
    for key, tensor in data.items():
        assert torch.equal(got[key].cpu(), tensor), key


def test_iter_file_tensors_reads_named_tensors_in_file_order(tmp_path):
    from loadspec.reader import iter_file_tensors

    data = sample()
    save_file(data, tmp_path / "m.safetensors")
    got = list(iter_file_tensors(tmp_path / "m.safetensors", ["w.f32", "w.bf16", "w.empty"]))
    assert sorted(name for name, _ in got) == ["w.bf16", "w.empty", "w.f32"]
    for name, tensor in got:
        assert torch.equal(tensor, data[name]) and tensor.dtype == data[name].dtype


def test_staging_ring_makes_buffers_on_demand_and_reuses_them(monkeypatch):
    import threading

    from loadspec import reader

    monkeypatch.setattr(reader, "RING_SLOTS", 3)
    ring = reader.StagingRing(64, pinned=False)
    first = [ring.get() for _ in range(2)]
    assert ring._made == 2  # only what was asked for so far
    for staging in first:
        ring.put(staging)
    assert {id(ring.get()), id(ring.get())} == {id(s) for s in first}  # released buffers come back first
    third = ring.get()
    assert ring._made == 3 and third not in first
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(ring.get()))
    waiter.start()  # all three are out: the fourth request waits for a release instead of making a buffer
    waiter.join(0.2)
    assert waiter.is_alive() and ring._made == 3
    ring.put(third)
    waiter.join(5)
    assert waited == [third]


def test_staging_ring_prepare_makes_buffers_ahead_without_keeping_them(monkeypatch):
    from loadspec import reader

    monkeypatch.setattr(reader, "RING_SLOTS", 4)
    ring = reader.StagingRing(64, pinned=False)
    ring.prepare(6)  # capped at RING_SLOTS
    assert ring._made == 4
    made = [ring.get() for _ in range(4)]  # all free again, none made anew
    assert ring._made == 4 and len({id(s) for s in made}) == 4
    own = reader.StagingRing(64, pinned=False, slots=2)  # a ring of its own size (the shard writer's)
    own.prepare(6)
    assert own._made == 2


def test_reading_waits_for_go_and_reads_nothing_when_told_not_to(tmp_path):
    from concurrent.futures import Future, ThreadPoolExecutor

    save_file(sample(), tmp_path / "a.safetensors")
    with ThreadPoolExecutor(2) as pool:
        go, stop = Future(), Future()
        pending = pool.submit(read_tensors, [tmp_path / "a.safetensors"], lambda key: "cpu", go=go)
        abandoned = pool.submit(read_tensors, [tmp_path / "a.safetensors"], lambda key: "cpu", go=stop)
        with pytest.raises(TimeoutError):
            pending.result(timeout=0.3)  # ready, but not reading before it is told to
        go.set_result(True)
        stop.set_result(False)
        got = pending.result(timeout=30)
        assert abandoned.result(timeout=30) == {}
    assert torch.equal(got["w.f32"], sample()["w.f32"])


def test_runs_a_little_apart_are_read_in_full_chunks_each_feeding_every_run_it_covers():
    from pathlib import Path

    from loadspec.reader import RIDE_ALONG_BYTES, Run, _chunk_jobs

    gpu, a, b = torch.device("cuda:0"), Path("a"), Path("b")
    runs = [Run(a, 100, 1000, gpu, 0), Run(a, 1000, 1700, gpu, 1024),  # split only to land on an ALIGN boundary
            Run(a, 1750, 5000, gpu, 1792),  # after a 50-byte quant-state blob on the host
            Run(a, 5000 + RIDE_ALONG_BYTES + 1, 5000 + RIDE_ALONG_BYTES + 301, gpu, 5120),  # too far: a stretch of its own
            Run(b, 0, 900, gpu, 5376)]  # another file
    jobs = _chunk_jobs(runs, chunk_bytes=1024)
    covered = {id(run): [] for run in runs}
    for path, at, length, pieces in jobs:
        assert 0 < length <= 1024
        for run, begin, size in pieces:
            assert run.path == path and at <= begin and begin + size <= at + length and run.start <= begin and begin + size <= run.end
            covered[id(run)].append((begin, begin + size))
    for run in runs:  # every byte of every run, once, in order
        spans = covered[id(run)]
        assert spans[0][0] == run.start and spans[-1][1] == run.end
        assert all(left[1] == right[0] for left, right in zip(spans, spans[1:]))
    # the first stretch (100..5000) takes ceil(4900 / 1024) = 5 reads, not one or more per run
    assert [(path.name, at, length) for path, at, length, _ in jobs] == [
        ("a", 100, 1024), ("a", 1124, 1024), ("a", 2148, 1024), ("a", 3172, 1024), ("a", 4196, 804),
        ("a", 5000 + RIDE_ALONG_BYTES + 1, 300), ("b", 0, 900)]
    assert [len(pieces) for _, _, _, pieces in jobs][:3] == [2, 2, 1]  # a read feeds every run it covers


def test_staging_ring_hands_out_a_buffer_only_once_its_last_copies_are_done():
    """read_ahead puts a buffer back with its copies still running (their events recorded); whoever gets it next
    (read_tensors' threads too) must not refill it before those copies finish."""
    from loadspec import reader

    finished = []

    class Copy:  # stands in for a CUDA event of a copy still reading the buffer
        def synchronize(self):
            finished.append(self)

    ring = reader.StagingRing(64, pinned=False, slots=1)
    staging = ring.get()
    staging.events = [Copy(), Copy()]
    ring.put(staging)
    assert ring.get() is staging and len(finished) == 2 and staging.events == []
