"""Read safetensors files straight into device memory.

Every tensor gets an aligned slot in one arena per device (a single allocation, no
per-tensor allocator traffic). The files' data regions are read in chunks by several
threads with positional reads into a small ring of pinned host buffers, allocated once per
process and reused; each chunk's bytes go to their slots with asynchronous copies on the
reading thread's own CUDA stream while other threads read the next chunks. Without CUDA
the same path runs with ordinary host buffers.
"""
from __future__ import annotations

import json
import os
import queue
import struct
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import torch

from .errors import LoadspecError

ALIGN = 256  # slot alignment in an arena: enough for any dtype and for fast copies
CHUNK_BYTES = 16 * 1024 * 1024
RING_SLOTS = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@attrs.frozen
class Slot:
    key: str
    start: int  # absolute byte range in the file
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: torch.device
    offset: int  # byte offset in the device's arena


def read_layout(path: Path) -> tuple[int, dict]:
    """(byte offset where tensor data starts, header entries) of a safetensors file, checked against its size."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (size,)
        if length + 8 > size or length > MAX_HEADER_BYTES:
            raise LoadspecError(f"{path.name}: header length {length} is impossible for the {size}-byte file (truncated, or not safetensors)")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LoadspecError(f"{path.name}: the safetensors header is not valid JSON ({exc})") from None
    header.pop("__metadata__", None)
    base = 8 + length
    for key, entry in header.items():
        begin, end = entry.get("data_offsets", (0, -1))
        if entry.get("dtype") not in DTYPES or not 0 <= begin <= end or base + end > size:
            raise LoadspecError(f"{path.name}: tensor {key!r} has offsets {entry.get('data_offsets')} outside the "
                                f"{size - base}-byte data region, or an unknown dtype (file damaged or not safetensors)")
    return base, header


class _Staging:
    """One reusable host buffer of the ring, with the events its last copies must finish before reuse."""

    def __init__(self, size: int, pinned: bool):
        self.tensor = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        self.array = self.tensor.numpy()
        self.events: list = []


_rings: dict[tuple[int, bool], queue.Queue] = {}
_rings_lock = threading.Lock()


def _ring(size: int, pinned: bool) -> queue.Queue:
    """The process-wide ring of staging buffers of `size` bytes (pinning is expensive: done once)."""
    with _rings_lock:
        if (size, pinned) not in _rings:
            ring: queue.Queue = queue.Queue()
            for _ in range(RING_SLOTS):
                ring.put(_Staging(size, pinned))
            _rings[size, pinned] = ring
        return _rings[size, pinned]


def read_tensors(files: list[Path], place: Callable[[str], torch.device], *, threads: int = 8,
                 chunk_bytes: int = CHUNK_BYTES) -> dict[str, torch.Tensor]:
    """Every tensor of `files`, each on the device `place(key)` names."""
    slots: list[tuple[Path, Slot]] = []
    arena_size: dict[torch.device, int] = defaultdict(int)
    for path in files:
        base, header = read_layout(path)
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            device = torch.device(place(key))
            slot = Slot(key, base + begin, base + end, DTYPES[entry["dtype"]], tuple(entry["shape"]), device, arena_size[device])
            arena_size[device] += -(-(end - begin) // ALIGN) * ALIGN
            slots.append((path, slot))
    arenas = {device: torch.empty(size, dtype=torch.uint8, device=device) for device, size in arena_size.items()}
    uses_cuda = any(device.type == "cuda" for device in arenas)
    _copy_all(_chunks(slots, chunk_bytes), arenas, _ring(chunk_bytes, uses_cuda), uses_cuda, threads)
    result = {}
    for _, slot in slots:
        raw = arenas[slot.device][slot.offset: slot.offset + slot.end - slot.start]
        result[slot.key] = raw.view(slot.dtype).view(slot.shape)
    return result


def _chunks(slots: list[tuple[Path, Slot]], chunk_bytes: int) -> list:
    """(file, start, length, pieces) jobs; a piece is (slot, offset in chunk, length, offset in slot)."""
    by_file: dict[Path, list[Slot]] = defaultdict(list)
    for path, slot in slots:
        by_file[path].append(slot)
    jobs = []
    for path, file_slots in by_file.items():
        file_slots.sort(key=lambda s: s.start)
        first, end = 0, max(s.end for s in file_slots)
        for start in range(file_slots[0].start, end, chunk_bytes):
            stop = start + chunk_bytes
            while first < len(file_slots) and file_slots[first].end <= start:
                first += 1
            pieces = []
            for s in file_slots[first:]:
                if s.start >= stop:
                    break
                lo, hi = max(s.start, start), min(s.end, stop)
                if hi > lo:
                    pieces.append((s, lo - start, hi - lo, lo - s.start))
            jobs.append((path, start, min(stop, end) - start, pieces))
    return jobs


def _copy_all(jobs: list, arenas, ring: queue.Queue, uses_cuda: bool, threads: int) -> None:
    fds = {path: os.open(path, os.O_RDONLY) for path in {job[0] for job in jobs}}
    local = threading.local()

    def stream_for(device: torch.device):
        streams = getattr(local, "streams", None)
        if streams is None:
            streams = local.streams = {}
        if device not in streams:
            streams[device] = torch.cuda.Stream(device=device)
        return streams[device]

    def job(path: Path, start: int, length: int, pieces) -> None:
        staging = ring.get()
        try:
            for event in staging.events:
                event.synchronize()
            staging.events = []
            _pread_exactly(fds[path], staging.array[:length], start, path)
            used = set()
            for slot, src, size, dst in pieces:
                target = arenas[slot.device][slot.offset + dst: slot.offset + dst + size]
                if slot.device.type == "cuda":
                    stream = stream_for(slot.device)
                    with torch.cuda.stream(stream):
                        target.copy_(staging.tensor[src: src + size], non_blocking=True)
                    used.add(stream)
                else:
                    target.copy_(staging.tensor[src: src + size])
            for stream in used:
                event = torch.cuda.Event()
                event.record(stream)
                staging.events.append(event)
        finally:
            ring.put(staging)

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, RING_SLOTS))) as pool:
            for future in [pool.submit(job, *chunk) for chunk in jobs]:
                future.result()
        if uses_cuda:
            for device in {d for d in arenas if d.type == "cuda"}:
                torch.cuda.synchronize(device)
    finally:
        for fd in fds.values():
            os.close(fd)


def iter_file_tensors(path: Path, names) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of one safetensors file, one at a time in file order, each read into
    its own host buffer with positional reads (no memory map, so host memory holds only the
    tensors the caller keeps)."""
    base, header = read_layout(path)
    wanted = sorted(names, key=lambda name: header[name]["data_offsets"][0])
    fd = os.open(path, os.O_RDONLY)
    try:
        for name in wanted:
            entry = header[name]
            begin, end = entry["data_offsets"]
            buffer = torch.empty(end - begin, dtype=torch.uint8)
            _pread_exactly(fd, buffer.numpy(), base + begin, path)
            yield name, buffer.view(DTYPES[entry["dtype"]]).view(tuple(entry["shape"]))
    finally:
        os.close(fd)


def _pread_exactly(fd: int, buffer, offset: int, path: Path) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise LoadspecError(f"{path.name}: file ended early at byte {offset + done} (truncated)")
        done += got
