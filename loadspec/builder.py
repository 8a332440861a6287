"""Execute a plan once: stream the source's tensors, quantize, write the artifact files.

Writes into a folder the store hands out (a private staging folder); the store makes it
visible by renaming it only after everything here has succeeded.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import arch
from .errors import UsageError
from .plan import LoadPlan
from .shards import ShardWriter
from .source import Source

QUANT_SUFFIXES = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
HASH_CHUNK = 8 * 1024 * 1024


def write_artifact(plan: LoadPlan, source: Source, folder: Path, *, progress: bool = True) -> dict:
    """Write every artifact file of `plan` into `folder`; returns the manifest."""
    skeleton = arch.skeleton(source.config)
    write_tokenizer(plan, source, folder)
    _write_config(plan, source, folder)
    _write_weights(plan, source, skeleton, folder, progress)
    (folder / "plan.json").write_text(plan.to_json())
    manifest = _manifest(plan, folder, progress)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def write_tokenizer(plan: LoadPlan, source: Source, folder: Path) -> None:
    """Save the source's tokenizer with the plan's fixes (pad token, padding side, chat template)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="loadspec-tok-") as tmp:
        tok_dir = source.path
        if source.kind == "gguf":
            from . import gguf

            gguf.save_tokenizer(source.path, Path(tmp))
            tok_dir = Path(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    fixes = plan.tokenizer
    if fixes["pad_token"] not in tokenizer.get_vocab():
        raise UsageError(f"[tokenizer] pad_token {fixes['pad_token']!r} is not in the tokenizer's vocabulary; "
                         "use 'auto' or one of its special tokens " + str(tokenizer.all_special_tokens[:8]))
    tokenizer.pad_token = fixes["pad_token"]
    tokenizer.padding_side = fixes["padding_side"]
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
    """The bitsandbytes `quantization_config` transformers expects in config.json."""
    q = plan.quant
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": q["method"], "bnb_4bit_use_double_quant": q["double_quant"],
            "bnb_4bit_compute_dtype": plan.dtype, "bnb_4bit_quant_storage": q["storage"],
            "llm_int8_skip_modules": q["skip_modules"], "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def stored_names(plan: LoadPlan, parameter: str) -> list[str]:
    """The safetensors keys one parameter is stored under."""
    if parameter.endswith(".weight") and parameter[: -len(".weight")] in plan.quantized:
        return [parameter + s for s in QUANT_SUFFIXES] + [f"{parameter}.quant_state.bitsandbytes__{plan.quant['method']}"]
    return [parameter]


def _write_weights(plan: LoadPlan, source: Source, skeleton: arch.Skeleton, folder: Path, progress: bool) -> None:
    wanted = set(skeleton.parameters)
    missing = wanted - set(source.tensors)
    if missing:
        raise UsageError(f"the source lacks {len(missing)} tensor(s) the model needs, e.g. {sorted(missing)[:3]}; "
                         "is the checkpoint complete and of the family its config.json says?")
    quantized = set(plan.quantized)
    if quantized:
        from . import quant
    dtype = getattr(torch, plan.dtype)
    writer = ShardWriter(folder, [n for p in skeleton.parameters for n in stored_names(plan, p)])
    total = sum(_numel(source.tensors[n].shape) for n in wanted)
    bar = tqdm(total=total, unit=" params", unit_scale=True, desc="build", disable=not progress)
    try:
        for name, tensor in _stream(source, wanted):
            tensor = tensor.to(dtype)
            if name.endswith(".weight") and name[: -len(".weight")] in quantized:
                packed = quant.quantize_4bit(tensor, quant_type=plan.quant["method"], blocksize=plan.quant["blocksize"],
                                             double_quant=plan.quant["double_quant"], name=name)
                for key, value in packed.state_dict(name).items():
                    writer.add(key, value)
            else:
                writer.add(name, tensor)
            bar.update(tensor.numel())
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()


def _stream(source: Source, wanted: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The source's tensors one at a time (only those in `wanted`)."""
    if source.kind == "gguf":
        from . import gguf

        for name, tensor in gguf.iter_tensors(source.path, torch.float32):
            if name in wanted:
                yield name, tensor
        return
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name in sorted(wanted):
        by_file.setdefault(source.tensors[name].file, []).append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(source.path / file, framework="pt") as handle:
            for name in names:
                yield name, handle.get_tensor(name)


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _manifest(plan: LoadPlan, folder: Path, progress: bool) -> dict:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "manifest.json")
    entries = {}
    for path in tqdm(files, desc="hash", disable=not progress, leave=False):
        entries[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return {"format_version": plan.format_version, "fingerprint": plan.fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": plan.versions,
            "target": plan.target["name"], "files": entries}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
