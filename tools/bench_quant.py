"""Time bitsandbytes' CPU quantize_4bit against loadspec.quant.quantize_4bit on the same tensors.

    python tools/bench_quant.py [--shape 4096x4096 ...] [--dtype bf16] [--quant-type nf4]
                                [--no-double-quant] [--reps 5] [--json OUT]

For each shape: one warm-up call of each, then `--reps` timed calls of each, interleaved so that
machine noise hits both alike; the median is reported.  Each loadspec result is checked to be
byte-identical to bitsandbytes' serialized state (`QuantState.as_dict(packed=True)`).
Throughput is GB/s of *input* (numel * element size / seconds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadspec import quant  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bnb_quantize(weight: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int) -> dict[str, torch.Tensor]:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                       quant_type=quant_type)
    tensors = {"w": packed}
    tensors.update({f"w.{key}": value for key, value in state.as_dict(packed=True).items()})
    return tensors


def ours_quantize(weight: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int) -> dict[str, torch.Tensor]:
    result = quant.quantize_4bit(weight, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, name="w")
    return result.state_dict("w")


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    if list(a) != list(b):
        return False
    return all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def bench_one(shape: tuple[int, ...], dtype: torch.dtype, quant_type: str, double_quant: bool,
              blocksize: int, reps: int) -> dict:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    args = (weight, quant_type, double_quant, blocksize)
    same = identical(bnb_quantize(*args), ours_quantize(*args))  # also the warm-up
    bnb_times, ours_times = [], []
    for _ in range(reps):
        bnb_times.append(timed(bnb_quantize, *args))
        ours_times.append(timed(ours_quantize, *args))
    gigabytes = weight.numel() * weight.element_size() / 1e9
    bnb_s, ours_s = statistics.median(bnb_times), statistics.median(ours_times)
    return {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "quant_type": quant_type,
            "double_quant": double_quant, "blocksize": blocksize, "reps": reps,
            "bnb_s": bnb_s, "loadspec_s": ours_s, "bnb_gbps": gigabytes / bnb_s, "loadspec_gbps": gigabytes / ours_s,
            "speedup": bnb_s / ours_s, "identical": same}


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.lower().split("x"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", type=parse_shape,
                        help="e.g. 4096x4096 (repeatable; default 4096x4096 and 4096x14336)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--quant-type", choices=quant.QUANT_TYPES, default="nf4")
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    shapes = args.shape or [(4096, 4096), (4096, 14336)]

    rows = [bench_one(shape, DTYPES[args.dtype], args.quant_type, not args.no_double_quant, args.blocksize, args.reps)
            for shape in shapes]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.quant_type}, double_quant={not args.no_double_quant}, blocksize={args.blocksize}, "
          f"median of {args.reps}")
    header = f"{'shape':>12} {'dtype':>9} {'bnb ms':>9} {'bnb GB/s':>9} {'ours ms':>9} {'ours GB/s':>10} {'speedup':>8}  identical"
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{shape:>12} {r['dtype']:>9} {r['bnb_s'] * 1e3:9.1f} {r['bnb_gbps']:9.3f} {r['loadspec_s'] * 1e3:9.1f} "
              f"{r['loadspec_gbps']:10.3f} {r['speedup']:7.1f}x  {'yes' if r['identical'] else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "results": rows}, indent=2) + "\n")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
