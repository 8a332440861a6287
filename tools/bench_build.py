"""Build benchmark: `python tools/bench_build.py ROOT --shape 8b --quant nf4`.

Writes a random Llama-shaped bf16 checkpoint (tensor by tensor, see tools/synthetic.py) once
under ROOT, warms the page cache with it, then times in this process, best of --reps:
reading the source as the build does, reading + quantizing (outputs dropped), the whole
`loadspec.build`, hashing the artifact's shards (what the manifest used to re-read), and
the previous sequential method (`sequential_build`; its files must equal the build's).
With CUDA it also times transformers quantizing the same checkpoint to NF4 on load and
prints the build's ratio to it.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import struct
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import loadspec  # noqa: E402
from loadspec import arch, builder, prequantized  # noqa: E402
from loadspec.api import plan_spec  # noqa: E402
from loadspec.bench import SHAPES  # noqa: E402
from loadspec.shards import MAX_SHARD_BYTES, SAFETENSORS_DTYPE, header_reserve  # noqa: E402
from loadspec.store import sha256_file  # noqa: E402
from tools.synthetic import write_checkpoint  # noqa: E402


def sequential_build(plan, source, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, str]:
    """The weight files of `plan` written the way builds did before the pipeline, as a reference: one tensor
    at a time read, resized, quantized and appended to its shard (header filled in last), then every file
    read back and hashed. Returns {file name: sha256}."""
    from loadspec.reader import iter_file_tensors
    from loadspec.vocab import resize_rows

    skeleton = arch.skeleton(source.config)
    copied = prequantized.copied_names(plan)
    wanted = set(skeleton.parameters) | copied
    quantized = {f"{module}.weight" for module in plan.quantized}
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, plan.dtype)
    reserve = header_reserve([n for p in skeleton.parameters for n in builder.stored_names(plan, p)])
    shards: list[tuple[Path, dict]] = []
    handle, offset = None, 0

    def finish():
        header = json.dumps({"__metadata__": {"format": "pt"}, **shards[-1][1]}, separators=(",", ":")).encode()
        handle.seek(0)
        handle.write(struct.pack("<Q", reserve) + header + b" " * (reserve - len(header)))
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()

    def append(name, tensor):
        nonlocal handle, offset
        data = tensor.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        if handle is None or (offset and offset + len(raw) > max_shard_bytes):
            if handle is not None:
                finish()
            shards.append((folder / f"sequential-{len(shards)}", {}))
            handle, offset = open(shards[-1][0], "wb"), 0
            handle.seek(8 + reserve)
        handle.write(raw)
        shards[-1][1][name] = {"dtype": SAFETENSORS_DTYPE[data.dtype], "shape": list(data.shape),
                               "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)

    if source.kind == "gguf" or any(source.tensors[n].file.endswith(".bin") for n in wanted):
        tensors = builder._stream(source, wanted)
    else:
        tensors = (item for file, names in builder._by_file(source, wanted) for item in iter_file_tensors(source.path / file, names))
    for name, tensor in tensors:
        tensor = resize_rows(plan.tokenizer, name, tensor)
        if name in copied:
            append(name, tensor)
        elif name in quantized:
            for key, value in builder.quantize(tensor.to(device, dtype), plan, name).items():
                append(key, value)
        else:
            append(name, tensor.to(dtype))
    finish()
    count = len(shards)
    names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for (path, _), name in zip(shards, names):
        path.rename(folder / name)
    if count > 1:
        weight_map = {tensor: name for (_, entries), name in zip(shards, names) for tensor in entries}
        total = sum(max(e["data_offsets"][1] for e in entries.values()) for _, entries in shards if entries)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        names.append("model.safetensors.index.json")
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(names, pool.map(sha256_file, [folder / name for name in names])))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _best(reps: int, run) -> float:
    """Fewest seconds of `reps` calls of `run`."""
    best = math.inf
    for _ in range(reps):
        gc.collect()
        started = time.perf_counter()
        run()
        _sync()
        best = min(best, time.perf_counter() - started)
    return best


def _read_stage(plan, source, quantize: bool):
    """Iterate the source as the build does; with `quantize`, also quantize or cast each tensor (results dropped)."""
    names = set(arch.skeleton(source.config).parameters) | prequantized.copied_names(plan)
    quantized = {f"{module}.weight" for module in plan.quantized}
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, plan.dtype)

    def run():
        for name, tensor in builder._tensors(plan, source, names, device):
            if quantize and name in quantized:
                builder.quantize(tensor.to(device, dtype), plan, name)
            elif quantize:
                tensor.to(dtype)
    return run


def disk_write_gbps(folder: Path, size: int = 512 * 1024**2) -> float:
    """GB/s of one fsynced sequential write here: the floor under any durable build is artifact size / this."""
    path = folder / "disk-probe"
    data = os.urandom(16 * 1024**2)
    started = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(size // len(data)):
            handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return size / seconds / 1e9


def transformers_quantize_on_load(source: Path, reps: int = 2) -> float:
    """Best seconds of transformers loading `source` quantized to NF4 on the GPU (in process, after imports)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)  # loadspec.bench's NF4

    def run():
        model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, dtype=torch.bfloat16, device_map="cuda")
        _sync()
        del model
    seconds = _best(reps, run)
    torch.cuda.empty_cache()
    return seconds


def measure(root: Path, shape: str, quant: str, reps: int = 2, old: bool = True) -> dict:
    """Every figure of one shape and quant method (seconds, and whether the files equal the reference's)."""
    source = root / f"src-{shape}"
    if not (source / "config.json").exists():
        write_checkpoint(source, shape)
    for path in source.glob("*.safetensors"):  # page cache warm, as for a model just downloaded
        with open(path, "rb") as handle:
            while handle.read(64 * 1024**2):
                pass
    target = "auto" if torch.cuda.is_available() else "cpu"
    spec = root / f"{shape}-{quant}.toml"
    spec.write_text(f'name = "bench-{shape}-{quant}"\n[model]\nsource = "{source}"\n[load]\nquant = "{quant}"\n[target]\ngpu = "{target}"\n')
    cache = root / "cache"
    planned = plan_spec(spec)
    result = {"shape": shape, "quant": quant, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "source_gib": sum(f.stat().st_size for f in source.glob("*.safetensors")) / 2**30}
    result["read_s"] = _best(reps, _read_stage(planned.plan, planned.source, quantize=False))
    result["read_quantize_s"] = _best(reps, _read_stage(planned.plan, planned.source, quantize=True))
    built = []
    result["build_s"] = _best(reps, lambda: built.append(loadspec.build(spec, cache_dir=cache, progress=False, force=True)))
    artifact = built[-1].path
    shards = sorted(artifact.glob("*.safetensors"))
    result["artifact_gib"] = sum(f.stat().st_size for f in shards) / 2**30
    with ThreadPoolExecutor(max_workers=8) as pool:
        result["rehash_s"] = _best(1, lambda: list(pool.map(sha256_file, shards)))
    result["disk_gbps"] = disk_write_gbps(root)
    if old:
        manifest = json.loads((artifact / "manifest.json").read_text())["files"]
        with tempfile.TemporaryDirectory(dir=root) as folder:
            digests = {}
            result["sequential_s"] = _best(1, lambda: digests.update(sequential_build(planned.plan, planned.source, Path(folder))))
        result["identical"] = all(manifest[name]["sha256"] == digest for name, digest in digests.items())
    if torch.cuda.is_available() and quant == "nf4":
        result["transformers_s"] = transformers_quantize_on_load(source, reps)
    return result


def report(r: dict) -> str:
    lines = [f"{r['shape']} {r['quant']} on {r['device']}: source {r['source_gib']:.2f} GiB, artifact {r['artifact_gib']:.2f} GiB",
             f"  read the source (as the build does)  {r['read_s']:7.2f} s",
             f"  read + quantize/cast (dropped)       {r['read_quantize_s']:7.2f} s",
             f"  loadspec.build (total)               {r['build_s']:7.2f} s",
             f"  re-hash of the shards (saved now)    {r['rehash_s']:7.2f} s",
             f"  fsynced writes here: {r['disk_gbps']:.2f} GB/s, so the artifact alone needs "
             f"{r['artifact_gib'] * 2**30 / 1e9 / r['disk_gbps']:.2f} s of disk"]
    if "sequential_s" in r:
        lines.append(f"  previous sequential method          {r['sequential_s']:7.2f} s  "
                     f"({r['sequential_s'] / r['build_s']:.1f}x the build; files identical: {r['identical']})")
    if "transformers_s" in r:
        lines.append(f"  transformers quantize-on-load        {r['transformers_s']:7.2f} s  "
                     f"(build = {r['build_s'] / r['transformers_s']:.2f}x; target <= 1.5x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="where the checkpoint (kept for later runs), specs and cache go")
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--quant", nargs="+", default=["nf4"], choices=["none", "nf4"])
    parser.add_argument("--reps", default=2, type=int)
    parser.add_argument("--no-old", action="store_true", help="skip the previous sequential method")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    results = []
    for quant in args.quant:
        results.append(measure(args.root, args.shape, quant, args.reps, old=not args.no_old))
        print(report(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r.get("identical", True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
