"""Write safetensors shards one tensor at a time, with bounded memory.

A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes.
The header is only known once every tensor is written, so each shard reserves room for
it up front (an upper bound from the tensor names) and fills it in at the end, padded
with spaces as the format allows. Readers (safetensors, transformers) see ordinary files.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
                     torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.float64: "F64", torch.bool: "BOOL",
                     torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
HEADER_SLACK_PER_TENSOR = 200  # dtype, shape and offsets of one entry, generously
MAX_SHARD_BYTES = 1024**3  # 1 GiB shards: parallel hashing and reads


def header_reserve(names: list[str]) -> int:
    """Bytes to reserve for a header that may list any of `names`."""
    size = sum(len(json.dumps(n)) + HEADER_SLACK_PER_TENSOR for n in names) + 256
    return size + (-size % 8)


class ShardWriter:
    """Streams tensors into `model-XXXXX-of-YYYYY.safetensors` files (or one `model.safetensors`)."""

    def __init__(self, folder: Path, names: list[str], max_shard_bytes: int = MAX_SHARD_BYTES):
        self.folder = folder
        self.reserve = header_reserve(names)
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[tuple[Path, dict]] = []  # (temporary path, header entries)
        self._file = None
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (any device; copied to host here)."""
        data = tensor.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
        if self._file is None or (self._offset and self._offset + len(raw) > self.max_shard_bytes):
            self._start_shard()
        self._file.write(raw)
        self.shards[-1][1][name] = {"dtype": SAFETENSORS_DTYPE[data.dtype], "shape": list(data.shape),
                                    "data_offsets": [self._offset, self._offset + len(raw)]}
        self._offset += len(raw)

    def _start_shard(self) -> None:
        self._finish_shard()
        path = self.folder / f".shard-{len(self.shards):05d}.partial"
        self._file = open(path, "wb")
        self._file.seek(8 + self.reserve)
        self.shards.append((path, {}))
        self._offset = 0

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        entries = self.shards[-1][1]
        header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
        if len(header) > self.reserve:
            raise RuntimeError(f"safetensors header of {len(header)} bytes exceeds the {self.reserve} reserved")
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self.reserve) + header + b" " * (self.reserve - len(header)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def close(self) -> list[str]:
        """Finish the last shard, give the shards their final names, write the index; returns file names."""
        self._finish_shard()
        if not self.shards:
            raise RuntimeError("no tensors were written")
        count = len(self.shards)
        names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for (path, entries), name in zip(self.shards, names):
            path.rename(self.folder / name)
            weight_map.update({tensor: name for tensor in entries})
        if count > 1:
            total = sum(max(e["data_offsets"][1] for e in entries.values()) for _, entries in self.shards if entries)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            names.append("model.safetensors.index.json")
        return names

    def abort(self) -> None:
        """Close and delete whatever was written."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for path, _ in self.shards:
            path.unlink(missing_ok=True)
