"""Execute a plan once: stream the source's tensors, quantize, write the artifact files.

Writes into a folder the store hands out (a private staging folder); the store makes it
visible by renaming it only after everything here has succeeded.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import arch, fp8, kernel_cache, prequantized
from .errors import UsageError
from .plan import LoadPlan
from .reader import read_ahead, stored_tensors
from .shards import ShardWriter
from .source import Source
from .store import sha256_file
from .vocab import add_tokens, open_tokenizer, resize_rows

READ_THREADS = min(8, os.cpu_count() or 1)
READ_AHEAD_BYTES = {"cpu": 32 * 1024**2, "cuda": 2 * 1024**3}  # source bytes read ahead of the tensor in use


def write_artifact(plan: LoadPlan, source: Source, skeleton: arch.Skeleton, folder: Path, *, progress: bool = True) -> dict:
    """Write every artifact file of `plan` into `folder` (`skeleton`: the model's names, as planned: building it
    again here took a fresh 8B build process 0.3 s); returns the manifest."""
    write_tokenizer(plan, source, folder)
    _write_config(plan, source, folder)
    warmup = kernel_cache.Warmup(plan, folder)  # compiles the patched kernels on the GPU while the weights are written
    try:
        digests = _write_weights(plan, source, skeleton, folder, progress)
        warmup.finish()
    except BaseException:
        warmup.abort()
        raise
    (folder / "plan.json").write_text(plan.to_json())
    manifest = _manifest(plan, folder, digests, progress)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def write_tokenizer(plan: LoadPlan, source: Source, folder: Path) -> None:
    """Save the source's tokenizer with the plan's fixes (added tokens, pad token, padding side, chat template)."""
    fixes = plan.tokenizer
    # padding side passed at load so that save_pretrained records it (a later attribute change is not saved)
    # the source's own Python code (auto_map) runs only when the spec says trust_remote_code = true
    tokenizer = open_tokenizer(source, padding_side=fixes["padding_side"],
                               trust_remote_code=bool(plan.source.get("trust_remote_code", False)))
    add_tokens(tokenizer, fixes)  # before the pad check: the pad token may be an added one
    if fixes["pad_token"] not in tokenizer.get_vocab():
        raise UsageError(f"[tokenizer] pad_token {fixes['pad_token']!r} is not in the tokenizer's vocabulary; "
                         "use 'auto' or one of its special tokens " + str(tokenizer.all_special_tokens[:8]))
    tokenizer.pad_token = fixes["pad_token"]
    if fixes["chat_template"]:
        tokenizer.chat_template = fixes["chat_template"]
    tokenizer.save_pretrained(folder)


def _write_config(plan: LoadPlan, source: Source, folder: Path) -> None:
    config = {k: v for k, v in source.config.items() if k != "quantization_config"}
    config.update(plan.config_overrides)
    config["torch_dtype"] = config["dtype"] = plan.dtype
    if plan.quant["method"] != "none":
        config["quantization_config"] = quantization_config(plan)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    generation = source.path / "generation_config.json" if source.path.is_dir() else None
    if generation and generation.exists():
        (folder / "generation_config.json").write_bytes(generation.read_bytes())


def quantization_config(plan: LoadPlan) -> dict:
    """The `quantization_config` transformers expects in config.json (bitsandbytes, or fp8's own)."""
    q = plan.quant
    if q["method"] == "fp8":
        return fp8.quantization_config(q)
    if q["method"] == "int8":
        return {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True,
                "llm_int8_skip_modules": q["skip_modules"], "llm_int8_threshold": q["threshold"],
                "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": q["method"], "bnb_4bit_use_double_quant": q["double_quant"],
            "bnb_4bit_compute_dtype": q.get("compute_dtype", plan.dtype), "bnb_4bit_quant_storage": q["storage"],
            "llm_int8_skip_modules": q["skip_modules"], "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def stored_names(plan: LoadPlan, parameter: str) -> list[str]:
    """The safetensors keys one parameter is stored under."""
    if parameter.endswith(".weight") and parameter[: -len(".weight")] in plan.quantized:
        return prequantized.quantized_names(parameter, plan.quant)
    return [parameter]


def _write_weights(plan: LoadPlan, source: Source, skeleton: arch.Skeleton, folder: Path, progress: bool) -> dict[str, str]:
    """Write the weight shards; returns their sha256 digests (hashed as they were written)."""
    wanted = set(skeleton.parameters)
    missing = wanted - set(source.tensors)
    if missing:
        raise UsageError(f"the source lacks {len(missing)} tensor(s) the model needs, e.g. {sorted(missing)[:3]}; "
                         "is the checkpoint complete and of the family its config.json says?")
    quantized = set(plan.quantized)
    dtype = getattr(torch, plan.dtype)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")  # where 4-bit quantization runs
    copied = prequantized.copied_names(plan)  # a pre-quantized source's stored tensors, copied unchanged
    read = wanted | copied
    writer = ShardWriter(folder, [n for p in skeleton.parameters for n in stored_names(plan, p)])
    total = sum(math.prod(source.tensors[n].shape) for n in read)
    bar = tqdm(total=total, unit=" params", unit_scale=True, desc="build", disable=not progress)
    try:
        with contextlib.closing(_tensors(plan, source, read, device)) as tensors:  # stops the readers on an error
            for name, tensor in tensors:
                tensor = resize_rows(plan.tokenizer, name, tensor)  # added tokens: new embedding / LM head rows
                if name in copied:
                    writer.add(name, tensor)
                elif name.endswith(".weight") and name[: -len(".weight")] in quantized:
                    for key, value in quantize(tensor.to(device, dtype), plan, name).items():
                        writer.add(key, value)
                else:
                    writer.add(name, tensor.to(dtype))
                bar.update(tensor.numel())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return writer.digests


def _tensors(plan: LoadPlan, source: Source, names: set[str], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """The source's tensors in `names`, in the order they are written. Safetensors files are read by several
    threads; on a GPU, those used there as they are stored (weights to quantize, tensors copied without a cast)
    are read straight into GPU memory. The rest stay on the host, where resizing and casts run as they always did."""
    if source.kind == "gguf" or any(source.tensors[n].file.endswith(".bin") for n in names):
        return _prefetch(_stream(source, names))
    resized = set((plan.tokenizer.get("vocab") or {}).get("tensors", ()))
    quantized = {f"{module}.weight" for module in plan.quantized}

    def place(name: str) -> torch.device:
        as_stored = name in quantized or source.tensors[name].dtype == plan.dtype
        return device if device.type == "cuda" and name not in resized and as_stored else torch.device("cpu")

    order = []
    for file, file_names in _by_file(source, names):  # file by file, each in file order
        order += stored_tensors(source.path / file, file_names, place)
    return read_ahead(order, READ_AHEAD_BYTES, threads=READ_THREADS)


def _by_file(source: Source, names) -> list[tuple[str, list[str]]]:
    """(file, its names) for the source files holding `names`, both sorted."""
    by_file: dict[str, list[str]] = {}
    for name in sorted(names):
        by_file.setdefault(source.tensors[name].file, []).append(name)
    return sorted(by_file.items())


def quantize(weight: torch.Tensor, plan: LoadPlan, name: str) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized weight: bitsandbytes' CUDA kernel on a GPU, loadspec.quant on the CPU
    (int8: bitsandbytes' row-wise quantizer on either, from float16 as bitsandbytes' Int8Params does; fp8: loadspec.fp8)."""
    q = plan.quant
    if q["method"] == "int8":
        return quantize_int8(weight, name)
    if q["method"] == "fp8":
        return fp8.state_dict(weight, q["scaling"], name)
    if weight.is_cuda:
        from bitsandbytes.functional import quantize_4bit

        if not torch.isfinite(weight).all():
            raise UsageError(f"tensor {name} contains inf or NaN; the source checkpoint is damaged.")
        packed, state = quantize_4bit(weight, blocksize=q["blocksize"], compress_statistics=q["double_quant"],
                                      quant_type=q["method"], quant_storage=torch.uint8)
        return {name: packed, **{f"{name}.{key}": value for key, value in state.as_dict(packed=True).items()}}
    from . import quant

    return quant.quantize_4bit(weight, quant_type=q["method"], blocksize=q["blocksize"], double_quant=q["double_quant"],
                               name=name).state_dict(name)


def quantize_int8(weight: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """LLM.int8 storage of one weight, in the layout transformers saves: int8 rows, float32 row absmax (SCB), format 0 (row)."""
    from bitsandbytes.functional import int8_vectorwise_quant

    if not torch.isfinite(weight).all():
        raise UsageError(f"tensor {name} contains inf or NaN; the source checkpoint is damaged.")
    module = name[: -len(".weight")]
    rows, scales, _ = int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    return {name: rows, f"{module}.SCB": scales.float(), f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8)}


def _prefetch(items: Iterator, depth: int = 1) -> Iterator:
    """Iterate `items` on a reader thread, at most `depth` ahead (bounds host memory)."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for item in items:
                buffer.put(item)
            buffer.put(done)
        except BaseException as exc:
            buffer.put(exc)

    threading.Thread(target=produce, daemon=True).start()
    while (item := buffer.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def _stream(source: Source, wanted: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """A GGUF or pickle source's tensors one at a time (only those in `wanted`)."""
    if source.kind == "gguf":
        from . import gguf

        for name, tensor in gguf.iter_tensors(source.path, torch.float32):
            if name in wanted:
                yield name, tensor
        return
    for file, names in _by_file(source, wanted):  # a pickle checkpoint the spec allowed ([model] allow_pickle); never unpickles code
        from .source import load_pickle_weights

        state = load_pickle_weights(source.path / file)
        for name in names:
            yield name, state.pop(name)
        del state


def _manifest(plan: LoadPlan, folder: Path, digests: dict[str, str], progress: bool) -> dict:
    """The manifest: every file's size and sha256 (`digests`: those hashed as they were written; the rest are read)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "manifest.json")
    unhashed = [path for path in files if path.name not in digests]
    with ThreadPoolExecutor(max_workers=8) as pool:  # hashlib releases the GIL: files hash in parallel
        hashed = tqdm(pool.map(sha256_file, unhashed), total=len(unhashed), desc="hash", disable=not progress, leave=False)
        digests = {**digests, **{path.name: digest for path, digest in zip(unhashed, hashed)}}
    entries = {path.name: {"size": path.stat().st_size, "sha256": digests[path.name]} for path in files}
    return {"format_version": plan.format_version, "fingerprint": plan.fingerprint, "quantizer": _quantizer_name(plan),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": plan.versions,
            "target": plan.target["name"], "files": entries}


def _quantizer_name(plan: LoadPlan) -> str:
    """Which quantizer wrote the 4-bit bytes: bitsandbytes' CPU and CUDA kernels round differently,
    so two valid builds of one plan can differ byte for byte (each matches its own reference)."""
    if not plan.quantized:
        return "none"
    if plan.quant.get("prequantized"):
        return "copied from the pre-quantized source"
    if plan.quant["method"] == "fp8":
        return "loadspec.fp8"
    return "bitsandbytes-cuda" if torch.cuda.is_available() else "loadspec.quant (bit-exact with bitsandbytes-cpu)"


