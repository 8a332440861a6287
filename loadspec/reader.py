"""Read safetensors files straight into device memory.

Tensors bound for a GPU land in one arena per device (a single allocation), laid out as in
their file. The files are read in chunks by several threads with positional reads into a
small ring of pinned host buffers, allocated once per process and reused; each chunk goes to
its device in one asynchronous copy on the reading thread's own CUDA stream while other
threads read the next chunks. Tensors bound for the host are the file's pages, mapped
copy-on-write: nothing is read until they are used.

Loads read a whole artifact at once (`read_tensors`); builds stream a source tensor by tensor
with a bounded read-ahead (`read_ahead`), and single tensors on the host (`iter_file_tensors`).
"""
from __future__ import annotations

import collections
import json
import os
import queue
import struct
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import attrs
import torch

from .errors import LoadspecError

ALIGN = 256  # where each GPU run starts in its arena: enough for any dtype and for the kernels' vector loads
CHUNK_BYTES = 8 * 1024 * 1024  # 8 and 16 MiB read alike on the H100 machine; 8 halves the pinning
RING_SLOTS = 12
RIDE_ALONG_BYTES = 64 * 1024  # host-bound bytes a GPU run may carry along rather than be split by them
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@attrs.define(eq=False)
class Run:
    """A stretch of one file whose tensors go to one GPU, read into its arena in file layout."""

    path: Path
    start: int  # absolute byte range in the file
    end: int
    device: torch.device
    offset: int  # byte offset of `start` in the device's arena, a multiple of ALIGN


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
    """One reusable host buffer of the ring, with the events its last copies must finish before reuse (`read_ahead`
    records them; `read_tensors`' threads wait for their copies themselves). The ring's `get` waits for them, so
    a buffer `read_ahead` put back is never overwritten by another reader while its copies run."""

    def __init__(self, size: int, pinned: bool):
        self.tensor = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
        self.array = self.tensor.numpy()
        self.events: list = []

    def wait_until_free(self) -> None:
        """Block until the copies that last read this buffer are done, so it can be filled again."""
        for event in self.events:
            event.synchronize()
        self.events = []


class StagingRing:
    """Up to `slots` (default RING_SLOTS) reusable host buffers of one size, made when first needed (`prepare`, or a
    thread finding none free) and reused by every later user in the process: pinning is slow (12 x 16 MiB took
    0.1 s on the H100 machine)."""

    def __init__(self, size: int, pinned: bool, slots: int | None = None):
        self.size, self.pinned = size, pinned
        self.slots = RING_SLOTS if slots is None else slots
        self._free: queue.Queue = queue.Queue()
        self._made = 0
        self._lock = threading.Lock()

    def get(self) -> _Staging:
        """A free buffer: a released one, a new one while fewer than `slots` exist, else the next released; in every
        case one whose last asynchronous copies (recorded in its `events`) are done, whoever made them."""
        try:
            staging = self._free.get_nowait()
        except queue.Empty:
            with self._lock:
                make = self._made < self.slots
                self._made += make
            staging = _Staging(self.size, self.pinned) if make else self._free.get()
        staging.wait_until_free()
        return staging

    def put(self, staging: _Staging) -> None:
        self._free.put(staging)

    def prepare(self, count: int) -> None:
        """Make sure `count` buffers exist (pinning them now rather than when the first reads need them)."""
        for staging in [self.get() for _ in range(min(count, self.slots))]:
            self.put(staging)


_rings: dict[tuple[int, bool, int | None], StagingRing] = {}
_rings_lock = threading.Lock()


def staging_ring(size: int, pinned: bool, slots: int | None = None) -> StagingRing:
    """The process-wide ring of up to `slots` staging buffers of `size` bytes (pinning is expensive: done once
    per buffer); reads and the shard writer each keep their own."""
    with _rings_lock:
        if (size, pinned, slots) not in _rings:
            _rings[size, pinned, slots] = StagingRing(size, pinned, slots)
        return _rings[size, pinned, slots]


def read_tensors(files: list[Path], place: Callable[[str], torch.device], *, threads: int = 12,
                 chunk_bytes: int = CHUNK_BYTES, go: Future | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of `files`, each on the device `place(key)` names. With `go`, everything that needs little
    of Python's lock (headers, the arenas, pinning the staging buffers, CUDA's start in a fresh process) is done
    first, then the reading waits for `go`'s result, so a caller busy in Python meanwhile is not slowed down:
    True reads, False (the caller gave up) returns an empty dict without reading.

    Consecutive tensors bound for one GPU form a run, laid out in its arena as in the file, so each chunk
    reaches the GPU in one copy. A run starts at an ALIGN boundary and ends before a tensor
    that would not land on one; small host-bound tensors between its tensors (a 4-bit weight's quant-state
    JSON) ride along rather than end it.
    Host-bound tensors are views of the file mapped copy-on-write (torch's own mapping, freed with them):
    nothing is read until used, and the pages are the page cache's, shared by every process mapping the file.
    A host tensor whose file offset does not suit its dtype is copied once to an aligned buffer."""
    runs, tensors, arena_size = _plan_runs(files, place)
    arenas = {device: torch.empty(size, dtype=torch.uint8, device=device) for device, size in arena_size.items()}
    ring = staging_ring(chunk_bytes, True) if runs else None
    if ring is not None:
        ring.prepare(threads)
    if go is not None and not go.result():
        return {}
    if runs:
        _copy_all(_chunk_jobs(runs, chunk_bytes), arenas, ring, threads)
    mapped = {path: torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)
              for path in {item.path for item, run in tensors if run is None}}
    result = {}
    typed: dict = {}  # (arena or mapping, dtype) -> all of it seen as that dtype: one view op per tensor below
    for item, run in tensors:
        whole = mapped[item.path] if run is None else arenas[run.device]
        at = item.start if run is None else run.offset + item.start - run.start
        size = item.dtype.itemsize
        if at % size:  # a fresh allocation is aligned for any dtype
            result[item.name] = whole[at: at + item.end - item.start].clone().view(item.dtype).view(item.shape)
            continue
        if (id(whole), item.dtype) not in typed:
            typed[id(whole), item.dtype] = whole[: whole.numel() - whole.numel() % size].view(item.dtype)
        result[item.name] = typed[id(whole), item.dtype].as_strided(item.shape, _contiguous_strides(item.shape), at // size)
    return result


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides (in elements) of a contiguous tensor of `shape`, as torch gives them."""
    strides, step = [], 1
    for extent in reversed(shape):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))


def _plan_runs(files: list[Path], place: Callable[[str], torch.device]):
    """(the GPU runs, each tensor with its run (None: bound for the host), each GPU arena's size) for
    `read_tensors`."""
    runs: list[Run] = []
    tensors: list[tuple[Stored, Run | None]] = []
    arena_size: dict[torch.device, int] = defaultdict(int)
    for path in files:
        for item in stored_tensors(path, None, place):
            run = None
            if item.device.type != "cpu":
                last = runs[-1] if runs else None
                if (last is None or last.path is not path or last.device != item.device or not 0 <= item.start - last.end <= RIDE_ALONG_BYTES
                        or (last.offset + item.start - last.start) % ALIGN):  # GPU kernels may load 16 bytes at once
                    runs.append(Run(path, item.start, item.start, item.device, -(-arena_size[item.device] // ALIGN) * ALIGN))
                run = runs[-1]
                run.end = item.end
                arena_size[item.device] = run.offset + run.end - run.start
            tensors.append((item, run))
    return runs, tensors, arena_size


def _chunk_jobs(runs: list[Run], chunk_bytes: int) -> list[tuple[Path, int, int, list[tuple[Run, int, int]]]]:
    """The reads that bring `runs` in: (file, offset, length, [(run, file offset, length), ...] of the runs' bytes
    in that read). Runs of one file with at most RIDE_ALONG_BYTES between them (a quant-state blob, a tensor
    that starts a new run only to land on an ALIGN boundary) are read as one stretch, `chunk_bytes` at a time,
    so a chunk may feed several runs: an 8B artifact has ~450 runs of ~10 MB, and cutting chunks at run ends
    would make one read in two a short one."""
    jobs = []
    first = 0
    while first < len(runs):
        last = first + 1
        while (last < len(runs) and runs[last].path == runs[first].path
               and 0 <= runs[last].start - runs[last - 1].end <= RIDE_ALONG_BYTES):
            last += 1
        stretch, current = runs[first:last], 0
        for at in range(stretch[0].start, stretch[-1].end, chunk_bytes):
            stop = min(at + chunk_bytes, stretch[-1].end)
            while stretch[current].end <= at:
                current += 1
            pieces, index = [], current
            while index < len(stretch) and stretch[index].start < stop:
                begin, end = max(at, stretch[index].start), min(stop, stretch[index].end)
                if end > begin:
                    pieces.append((stretch[index], begin, end - begin))
                index += 1
            jobs.append((stretch[0].path, at, stop - at, pieces))
        first = last
    return jobs


def _copy_all(jobs: list[tuple[Path, int, int, list]], arenas: dict, ring: StagingRing, threads: int) -> None:
    """Run each `_chunk_jobs` job: one positional read into a pinned staging buffer, then one asynchronous copy per
    run it feeds, on the reading thread's own stream, to the run's place in its device's arena.
    Each thread keeps one staging buffer and one stream per device and takes jobs from a shared iterator until
    none are left: per chunk it needs Python's lock only between its read, its copies and its wait for them (each
    of which lets go of it), and the destinations are sliced here, before the threads start."""
    fds = {path: os.open(path, os.O_RDONLY) for path in {path for path, _, _, _ in jobs}}
    copies = [[(arenas[run.device][run.offset + begin - run.start: run.offset + begin - run.start + length], begin - at, run.device)
               for run, begin, length in pieces] for _, at, _, pieces in jobs]
    pending = iter(range(len(jobs)))  # next() on it is atomic under Python's lock: each job goes to one thread

    def work() -> None:
        staging = ring.get()
        streams: dict = {}
        try:
            for index in pending:
                path, at, length, _ = jobs[index]
                pread_exactly(fds[path], staging.array[:length], at, path)
                for target, source, device in copies[index]:
                    if device not in streams:
                        streams[device] = torch.cuda.Stream(device=device)
                        torch.cuda.set_stream(streams[device])
                    target.copy_(staging.tensor[source: source + target.numel()], non_blocking=True)
                for stream in streams.values():
                    stream.synchronize()  # the buffer is free again, and the bytes are in place
        finally:
            ring.put(staging)

    workers = max(1, min(threads, ring.slots, len(jobs)))
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(work) for _ in range(workers)]:
                future.result()
    finally:
        for fd in fds.values():
            os.close(fd)


@attrs.frozen
class Stored:
    """Where one stored tensor's bytes are, and the device they go to."""

    name: str
    path: Path
    start: int  # byte range in the file
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: torch.device


def stored_tensors(path: Path, names, place: Callable[[str], torch.device]) -> list[Stored]:
    """The named tensors of one safetensors file (`names` None: all of them), in file order (an empty tensor before
    one starting at its offset), each bound for the device `place(name)` says."""
    base, header = read_layout(path)
    stored = []
    for name in sorted(header if names is None else names, key=lambda n: header[n]["data_offsets"]):
        begin, end = header[name]["data_offsets"]
        stored.append(Stored(name, path, base + begin, base + end, DTYPES[header[name]["dtype"]], tuple(header[name]["shape"]),
                             torch.device(place(name))))
    return stored


def read_ahead(order: list[Stored], ahead_bytes: dict[str, int], *, threads: int = 8) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each of `order`, in that order, each on its device. Threads read CHUNK_BYTES chunks with
    positional reads, while the caller works, at most `ahead_bytes[device type]` (one larger tensor passes alone)
    ahead of the tensor it holds: a host tensor's chunks straight into its buffer, a GPU tensor's through the ring
    of pinned buffers and an asynchronous copy on the reading thread's stream, which the caller's stream waits
    for before it gets the tensor."""
    fds = {path: os.open(path, os.O_RDONLY) for path in {item.path for item in order}}
    streams = threading.local()
    ring = staging_ring(CHUNK_BYTES, True) if any(item.device.type == "cuda" for item in order) else None

    def to_host(item: Stored, buffer, start: int) -> None:
        pread_exactly(fds[item.path], buffer, item.start + start, item.path)

    def to_device(item: Stored, target: torch.Tensor, allocated, start: int):
        staging = ring.get()
        try:
            size = target.numel()
            pread_exactly(fds[item.path], staging.array[:size], item.start + start, item.path)
            if not hasattr(streams, "stream"):
                streams.stream = torch.cuda.Stream(item.device)
            streams.stream.wait_event(allocated)
            with torch.cuda.stream(streams.stream):
                target.copy_(staging.tensor[:size], non_blocking=True)
            staging.events = [torch.cuda.Event()]
            staging.events[0].record(streams.stream)
            return staging.events[0]
        finally:
            ring.put(staging)

    def submit(item: Stored):
        raw = torch.empty(item.end - item.start, dtype=torch.uint8, device=item.device)
        if item.device.type == "cuda":
            allocated = torch.cuda.Event()
            allocated.record(torch.cuda.current_stream(item.device))
            jobs = [pool.submit(to_device, item, raw[a: a + CHUNK_BYTES], allocated, a) for a in range(0, raw.numel(), CHUNK_BYTES)]
        else:
            array = raw.numpy()
            jobs = [pool.submit(to_host, item, array[a: a + CHUNK_BYTES], a) for a in range(0, raw.numel(), CHUNK_BYTES)]
        return item, raw, jobs

    pending: collections.deque = collections.deque()
    ahead = collections.Counter()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="read")
    try:
        following = iter(order)
        waiting = next(following, None)
        while pending or waiting is not None:
            while waiting is not None and (not pending or not ahead[waiting.device.type]
                                           or ahead[waiting.device.type] + waiting.end - waiting.start <= ahead_bytes[waiting.device.type]):
                pending.append(submit(waiting))
                ahead[waiting.device.type] += waiting.end - waiting.start
                waiting = next(following, None)
            item, raw, jobs = pending.popleft()
            ahead[item.device.type] -= item.end - item.start
            for job in jobs:
                event = job.result()
                if event is not None:
                    torch.cuda.current_stream(item.device).wait_event(event)
            yield item.name, raw.view(item.dtype).view(item.shape)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
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
            pread_exactly(fd, buffer.numpy(), base + begin, path)
            yield name, buffer.view(DTYPES[entry["dtype"]]).view(tuple(entry["shape"]))
    finally:
        os.close(fd)


def pread_exactly(fd: int, buffer, offset: int, path: Path) -> None:
    """Fill `buffer` from `fd` at `offset` (positional reads, no shared file position); a short file is an error."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise LoadspecError(f"{path.name}: file ended early at byte {offset + done} (truncated)")
        done += got
