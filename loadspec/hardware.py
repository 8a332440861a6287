"""The machine a plan targets: detected GPUs, or a named offline profile.

A CPU box can plan and build for a GPU cluster by naming the cluster's profile.
"""
from __future__ import annotations

import re
from typing import Any

import attrs

GIB = 1024**3


@attrs.frozen
class Hardware:
    """What the plan may use: one entry per device, all of one kind."""

    name: str
    kind: str  # "cuda" or "cpu"
    capability: tuple[int, int] = (0, 0)
    memory_bytes: tuple[int, ...] = ()  # per device

    @property
    def count(self) -> int:
        return len(self.memory_bytes)

    @property
    def supports_bf16(self) -> bool:
        return self.kind == "cpu" or self.capability >= (8, 0)

    def describe(self) -> str:
        if self.kind == "cpu":
            return f"{self.name} (CPU)"
        memory = self.memory_bytes[0] / GIB if self.memory_bytes else 0
        return f"{self.name}: {self.count}× GPU, capability {self.capability[0]}.{self.capability[1]}, {memory:.0f} GiB each"


# name -> (capability, memory per GPU)
PROFILES: dict[str, tuple[tuple[int, int], int]] = {
    "h200": ((9, 0), 141 * GIB),
    "h100": ((9, 0), 80 * GIB),
    "a100": ((8, 0), 80 * GIB),
    "a10g": ((8, 6), 24 * GIB),
    "l40s": ((8, 9), 48 * GIB),
    "l4": ((8, 9), 24 * GIB),
    "rtx4090": ((8, 9), 24 * GIB),
    "rtx3090": ((8, 6), 24 * GIB),
    "t4": ((7, 5), 16 * GIB),
    "v100": ((7, 0), 32 * GIB),
}


def parse_capability(value: Any) -> tuple[int, int]:
    """'8.0' or 8.0 -> (8, 0)."""
    match = re.fullmatch(r"\s*(\d+)\.(\d)\s*", str(value))
    if not match:
        raise ValueError(f"capability must look like '8.0', got {value!r}")
    return int(match.group(1)), int(match.group(2))


def parse_memory(value: Any) -> int:
    """'80GiB', '24GB', '512MiB' or a byte count -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GiB|GB|MiB|MB|TiB|TB)\s*", str(value))
    if not match:
        raise ValueError(f"memory must look like '80GiB' or '24GB', got {value!r}")
    units = {"GiB": GIB, "GB": 10**9, "MiB": 1024**2, "MB": 10**6, "TiB": 1024 * GIB, "TB": 10**12}
    return int(float(match.group(1)) * units[match.group(2)])


def profile(gpu: Any, count: int | None = None) -> Hardware:
    """A target from the spec's `[target] gpu` value (or the --target option)."""
    if isinstance(gpu, dict):
        capability = parse_capability(gpu["capability"])
        memory = parse_memory(gpu["memory"])
        n = count or gpu.get("count", 1)
        return Hardware(f"custom-{capability[0]}.{capability[1]}", "cuda", capability, (memory,) * n)
    name = str(gpu).lower()
    if name == "auto":
        return detect()
    if name == "cpu":
        return Hardware("cpu", "cpu")
    if name not in PROFILES:
        raise ValueError(f"unknown GPU profile {gpu!r}; known: auto, cpu, {', '.join(PROFILES)}")
    capability, memory = PROFILES[name]
    return Hardware(name, "cuda", capability, (memory,) * (count or 1))


def detect() -> Hardware:
    """This machine's GPUs as torch sees them, or the CPU."""
    import torch

    if not torch.cuda.is_available():
        return Hardware("cpu", "cpu")
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    first = props[0]
    name = first.name.replace("NVIDIA ", "").split()[0].lower()
    return Hardware(name, "cuda", (first.major, first.minor), tuple(p.total_memory for p in props))
