"""Fused Triton kernels, installed as `loadspec.kernels` (never as a top-level `kernels` package,
which would shadow Hugging Face's own `kernels` package that transformers probes).

Each module holds Triton forward/backward kernels wrapped in a `torch.autograd.Function`, the
public function to call, plain-torch `reference_*` functions it is tested against, a `VERSION`
string (bumped whenever the numbers a kernel produces may change) and `AUTOTUNE_CONFIGS` (the
launch settings a GPU benchmark may choose from; recorded per target GPU in `kernels.json`).

Where the Triton path runs: on CUDA tensors when triton is installed, and on CPU tensors when
`TRITON_INTERPRET=1` was set *before* this package was imported (triton decides at decoration
time whether a kernel is interpreted). Everywhere else the public functions fall back to their
torch reference, so a patched model still runs on a CPU. `LOADSPEC_KERNELS=torch` forces the
reference everywhere (to rule a kernel out when debugging).
"""
from __future__ import annotations

import os

# Installed, this folder is only `loadspec.kernels`. Run from a checkout's root (the root on sys.path), `import kernels`
# can still find it: transformers' probe for Hugging Face's `kernels` then imports it, finds no `__version__` and
# treats the hub kernels as unavailable. So: never define `__version__` here, and import nothing heavy at the top.

import importlib.util

# found, not imported: planning reads VERSIONS without paying for triton's import; the kernel modules import it
HAVE_TRITON = importlib.util.find_spec("triton") is not None  # absent off Linux x86_64: references only

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"  # read once: triton also reads it when kernels are decorated



def use_triton(*tensors) -> bool:
    """True when the Triton kernels can run on these tensors (see the module docstring)."""
    if not HAVE_TRITON or os.environ.get("LOADSPEC_KERNELS", "").strip().lower() == "torch":
        return False
    if INTERPRET:
        return all(t.device.type == "cpu" for t in tensors)
    return all(t.is_cuda for t in tensors)


# kernel name -> version, bumped whenever a kernel's numbers may change; each module's VERSION reads its entry
VERSIONS = {"rmsnorm": "1", "rmsnorm_plus_one": "1", "rope": "1", "swiglu": "1", "geglu": "1", "cross_entropy": "1", "nf4_dequantize": "1", "lora": "2"}


def versions() -> dict[str, str]:
    """kernel name -> VERSION of the module implementing it (imports no kernel module, nor triton)."""
    return dict(VERSIONS)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def num_warps_for(block: int) -> int:
    """Default warps for a row of `block` elements (a GPU autotune run may pick another of AUTOTUNE_CONFIGS)."""
    return 16 if block >= 16384 else 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1


def program_count(rows: int, device) -> int:
    """Programs for kernels that loop over rows and keep a per-program partial sum (e.g. a norm's weight grad)."""
    import torch

    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))  # the interpreter: few programs, each looping over many rows
