"""Write safetensors shards with bounded memory, each written, hashed and fsynced on its own thread.

A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes. Each
shard reserves room for its header up front (an upper bound from all tensor names) and
fills it in once its last tensor is known, padded with spaces as the format allows;
readers (safetensors, transformers) see ordinary files.

The shard's sha256 is taken in file order, header first, and the header is only known
when the shard is complete: a 4-bit weight's quant-state blob holds the mean of its absmax,
whose length in JSON (so every offset after it) depends on the weight's values. So:
* tensors on a CUDA device wait there until their shard's header is known, then go to the
  file through pinned buffers, each chunk written and hashed from the same bytes;
* host tensors go to the file at once (host memory stays bounded) and are hashed, when
  the header is known, by reading them back from the page cache they were just written to.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch

from .reader import pread_exactly, staging_ring

SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
                     torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.float64: "F64", torch.bool: "BOOL",
                     torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
HEADER_SLACK_PER_TENSOR = 200  # dtype, shape and offsets of one entry, generously
MAX_SHARD_BYTES = 1024**3  # 1 GiB shards: parallel hashing and reads
HOST_QUEUE_BYTES = 32 * 1024**2  # host tensors handed to shard threads, not yet written (one larger tensor passes alone)
DEVICE_HOLD_BYTES = 3 * 1024**3  # GPU tensors waiting for their shard's header (at least one shard's worth)
STAGING_BYTES = 16 * 1024**2  # one chunk of a GPU tensor on its way to the file, or of a read-back
STAGING_SLOTS = 4  # pinned buffers all shard threads share
FLUSH_BYTES = 128 * 1024**2  # bytes written to a shard after which the disk starts taking them, not only at its fsync


def header_reserve(names: list[str]) -> int:
    """Bytes to reserve for a header that may list any of `names`."""
    size = sum(len(json.dumps(n)) + HEADER_SLACK_PER_TENSOR for n in names) + 256
    return size + (-size % 8)


class ShardWriter:
    """Streams tensors into `model-XXXXX-of-YYYYY.safetensors` files (or one `model.safetensors`).

    `add` only decides where a tensor goes and hands it to its shard's thread; `close` waits
    until every shard is written and fsynced. After `close`, `digests` maps each file it
    wrote to its sha256.
    """

    def __init__(self, folder: Path, names: list[str], max_shard_bytes: int = MAX_SHARD_BYTES):
        self.folder = folder
        self.reserve = header_reserve(names)
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[_Shard] = []
        self.digests: dict[str, str] = {}
        self._offset = 0
        self._budgets = {"host": _Budget(HOST_QUEUE_BYTES), "cuda": _Budget(max(DEVICE_HOLD_BYTES, max_shard_bytes))}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (a CUDA tensor stays there until its shard is complete; any other is moved to the host)."""
        data = tensor.detach()
        data = (data if data.is_cuda else data.to("cpu")).contiguous()
        size = data.numel() * data.element_size()
        if not self.shards or (self._offset and self._offset + size > self.max_shard_bytes):
            self._start_shard()
        shard = self.shards[-1]
        shard.entries[name] = {"dtype": SAFETENSORS_DTYPE[data.dtype], "shape": list(data.shape),
                               "data_offsets": [self._offset, self._offset + size]}
        if size:
            budget = self._budgets["cuda" if data.is_cuda else "host"]
            budget.take(size)
            shard.put(_Piece(self._offset, size, data, budget))
        self._offset += size

    def _start_shard(self) -> None:
        if self.shards:
            self._seal(self.shards[-1])
        self.shards.append(_Shard(self.folder / f".shard-{len(self.shards):05d}.partial", self.reserve, self._budgets))
        self._offset = 0

    def _seal(self, shard: _Shard) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **shard.entries}, separators=(",", ":")).encode()
        if len(header) > self.reserve:
            raise RuntimeError(f"safetensors header of {len(header)} bytes exceeds the {self.reserve} reserved; "
                               "pass ShardWriter every tensor name it will be given")
        shard.put(struct.pack("<Q", self.reserve) + header + b" " * (self.reserve - len(header)))

    def close(self) -> list[str]:
        """Finish the last shard, wait for every shard to be fsynced, give them their final names, write the
        index; returns file names."""
        if not self.shards:
            raise RuntimeError("no tensors were written")
        try:
            self._seal(self.shards[-1])
            for shard in self.shards:
                shard.join()
        except BaseException:
            self.abort()
            raise
        count = len(self.shards)
        names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for shard, name in zip(self.shards, names):
            shard.path.rename(self.folder / name)
            self.digests[name] = shard.digest
            weight_map.update({tensor: name for tensor in shard.entries})
        if count > 1:
            total = sum(max(e["data_offsets"][1] for e in shard.entries.values()) for shard in self.shards if shard.entries)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            text = json.dumps(index, indent=2).encode()
            (self.folder / "model.safetensors.index.json").write_bytes(text)
            self.digests["model.safetensors.index.json"] = hashlib.sha256(text).hexdigest()
            names.append("model.safetensors.index.json")
        return names

    def abort(self) -> None:
        """Stop the shard threads and delete whatever was written."""
        for shard in self.shards:
            shard.abort()
        for shard in self.shards:
            shard.path.unlink(missing_ok=True)


class _Piece:
    """One tensor's bytes at `offset` in a shard's data region; `data` is dropped once it is in the file."""

    def __init__(self, offset: int, size: int, data: torch.Tensor, budget: _Budget):
        self.offset, self.size, self.data, self.budget = offset, size, data, budget
        self.ready = None
        if data.is_cuda:  # the shard thread copies it out on its own stream, after the work that made it
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(data.device))

    def release(self) -> None:
        self.data = None
        self.budget.give(self.size)


class _Shard:
    """One shard file and its thread: host pieces are written as they come; at the header (the last
    item), the header, the GPU pieces and a read-back of the host pieces are hashed in file order."""

    def __init__(self, path: Path, reserve: int, budgets: dict):
        self.path, self.base, self.budgets = path, 8 + reserve, budgets
        self.entries: dict[str, dict] = {}
        self.digest: str | None = None
        self._items: queue.Queue = queue.Queue()
        self._stopped = False
        self._error: BaseException | None = None
        self._unflushed = 0
        self._flushing = None  # the side thread's fdatasync in progress
        self._file = open(path, "wb")
        self._thread = threading.Thread(target=self._run, name=f"shard {path.name}", daemon=True)
        self._thread.start()

    def put(self, item) -> None:
        """Hand over a _Piece, or the header (bytes), which completes the shard."""
        self._items.put(item)

    def join(self) -> None:
        """Wait until the shard is written and fsynced; re-raises the thread's error."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        self._stopped = True
        self._items.put(None)
        self._thread.join()

    def _run(self) -> None:
        try:
            pieces = []
            while isinstance(item := self._items.get(), _Piece):
                if self._stopped:
                    return
                if item.ready is None:
                    self._write(self.base + item.offset, memoryview(item.data.reshape(-1).view(torch.uint8).numpy()))
                    item.release()
                pieces.append(item)
            if item is None:
                return
            self._finish(item, pieces)
        except BaseException as exc:  # handed to close(), and to an add() waiting on a budget
            self._error = exc
            for budget in self.budgets.values():
                budget.fail(exc)
        finally:
            if self._flushing is not None:
                wait([self._flushing])  # never close the descriptor under it
            self._file.close()

    def _write(self, position: int, data: memoryview) -> None:
        self._file.seek(position)
        self._file.write(data)
        self._unflushed += len(data)
        if self._unflushed >= FLUSH_BYTES and (self._flushing is None or self._flushing.done()):
            if self._flushing is not None:
                self._flushing.result()  # a write-back error: the shard fails here (the final fsync might not see it)
            self._file.flush()
            self._flushing = _flusher.submit(os.fdatasync, self._file.fileno())
            self._unflushed = 0

    def _finish(self, header: bytes, pieces: list[_Piece]) -> None:
        self._write(0, memoryview(header))
        self._file.flush()  # the host pieces are read back through another descriptor
        digest = hashlib.sha256(header)
        largest = max((p.size for p in pieces if p.ready is None), default=0)
        buffer = memoryview(bytearray(min(STAGING_BYTES, largest)))
        reader = os.open(self.path, os.O_RDONLY)
        try:
            with ThreadPoolExecutor(max_workers=1) as hasher:  # a GPU chunk is hashed while it is written
                for piece in pieces:
                    chunks = _copy_out(piece) if piece.ready is not None else _read_back(reader, self.base, piece, buffer, self.path)
                    for start, chunk in chunks:
                        if self._stopped:
                            return
                        if piece.ready is None:
                            digest.update(chunk)
                            continue
                        hashed = hasher.submit(digest.update, chunk)
                        self._write(self.base + piece.offset + start, chunk)
                        hashed.result()
                    if piece.ready is not None:
                        piece.release()
        finally:
            os.close(reader)
        if self._flushing is not None:
            self._flushing.result()
        self._file.flush()
        os.fsync(self._file.fileno())
        self.digest = digest.hexdigest()


def _read_back(fd: int, base: int, piece: _Piece, buffer: memoryview, path: Path):
    """(offset in the piece, bytes) of a host piece, read back from the file into `buffer` a chunk at a time."""
    for start in range(0, piece.size, len(buffer)):
        size = min(len(buffer), piece.size - start)
        pread_exactly(fd, buffer[:size], base + piece.offset + start, path)
        yield start, buffer[:size]


def _copy_out(piece: _Piece):
    """(offset in the piece, bytes) of a GPU piece, copied out a chunk at a time through a pinned buffer of the
    shard threads' ring (valid until the next chunk)."""
    flat = piece.data.reshape(-1).view(torch.uint8)
    stream = torch.cuda.Stream(flat.device)
    stream.wait_event(piece.ready)
    ring = staging_ring(STAGING_BYTES, True, STAGING_SLOTS)
    staging = ring.get()
    try:
        for start in range(0, piece.size, STAGING_BYTES):
            size = min(STAGING_BYTES, piece.size - start)
            with torch.cuda.stream(stream):
                staging.tensor[:size].copy_(flat[start: start + size], non_blocking=True)
            stream.synchronize()
            yield start, memoryview(staging.array)[:size]
    finally:
        ring.put(staging)


_flusher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fdatasync")  # the disk takes shards while they are written


class _Budget:
    """Bytes handed to shard threads and not yet in a file: `take` waits while they exceed `limit`
    (a tensor larger than the limit passes alone), and raises a shard thread's error instead of waiting on."""

    def __init__(self, limit: int):
        self.limit, self.used, self.error = limit, 0, None
        self._changed = threading.Condition()

    def take(self, size: int) -> None:
        with self._changed:
            while self.error is None and self.used and self.used + size > self.limit:
                self._changed.wait()
            if self.error is not None:
                raise self.error
            self.used += size

    def give(self, size: int) -> None:
        with self._changed:
            self.used -= size
            self._changed.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._changed:
            self.error = error
            self._changed.notify_all()
