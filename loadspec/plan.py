"""spec + hardware + source -> a frozen `LoadPlan`, with the reason for every decision.

Pure: no I/O. The plan serialises to canonical JSON; its `fingerprint` hashes exactly the
fields that decide the artifact's bytes, and is the cache key.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from importlib import metadata
from typing import Any

import attrs

from . import arch
from .checkpointing import describe as describe_checkpointing
from .errors import UsageError, did_you_mean
from .hardware import GIB, Hardware
from .lora import plan_lora
from .source import Source
from .spec import Spec

FORMAT_VERSION = 1
BLOCKSIZE = 64
MAX_ROPE_EXTENSION = 4.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FINGERPRINT_FIELDS = ("format_version", "source_identity", "model_type", "dtype", "quant", "quantized", "config_overrides", "tokenizer")
RESERVED_GPU_BYTES = GIB  # CUDA context and allocator slack per GPU


@attrs.frozen
class LoadPlan:
    """Every loading decision, frozen. Serialises to canonical JSON."""

    format_version: int
    name: str
    source: dict  # kind, location, revision, identity
    family: str
    model_type: str
    target: dict  # name, kind, capability, memory per device
    dtype: str  # compute dtype, and the dtype of unquantized tensors
    quant: dict  # method, double_quant, blocksize, storage, skip_modules
    quantized: tuple[str, ...]  # Linear modules stored in 4 bits
    max_seq_length: int
    config_overrides: dict  # edits written into the artifact's config.json
    device_map: dict  # block name -> device
    memory: dict  # device -> bytes of weights placed there
    tokenizer: dict  # pad_token, padding_side, chat_template
    patches: tuple = ()
    lora: dict | None = None  # new adapter settings or an existing adapter; not in the fingerprint
    train: dict = attrs.Factory(dict)  # gradient_checkpointing; not in the fingerprint
    versions: dict = attrs.Factory(dict)
    reasons: tuple[tuple[str, str], ...] = ()  # (decision, why), for people

    @property
    def source_identity(self) -> str:
        return self.source["identity"]

    @property
    def fingerprint(self) -> str:
        """sha256 (first 24 hex digits) of the fields that decide the artifact's bytes."""
        decisive = {field: getattr(self, field) for field in FINGERPRINT_FIELDS}
        return hashlib.sha256(_canonical(decisive).encode()).hexdigest()[:24]

    def to_json(self) -> str:
        return _canonical(attrs.asdict(self, recurse=False))

    @classmethod
    def from_json(cls, text: str) -> "LoadPlan":
        data = json.loads(text)
        data["quantized"] = tuple(data["quantized"])
        data["patches"] = tuple(data["patches"])
        data["reasons"] = tuple(tuple(r) for r in data["reasons"])
        return cls(**data)

    def explain(self) -> str:
        """One line per decision and why, for `loadspec plan`."""
        width = max(len(decision) for decision, _ in self.reasons)
        lines = [f"plan for {self.name!r} -> artifact {self.fingerprint}"]
        lines += [f"  {decision.ljust(width)}  {why}" for decision, why in self.reasons]
        return "\n".join(lines)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def resolve(spec: Spec, hardware: Hardware, source: Source, skeleton: arch.Skeleton | None = None) -> LoadPlan:
    """Decide how `source` is loaded on `hardware` as `spec` asks; raises UsageError if it cannot work."""
    family = arch.for_model_type(source.config.get("model_type", ""))
    skeleton = skeleton or arch.skeleton(source.config)
    reasons: list[tuple[str, str]] = [
        ("source", f"{source.kind} {source.location}" + (f" @ {source.revision[:12]}" if source.revision else "")),
        ("family", f"{family.name} (model_type {source.config.get('model_type')})" + (f"; note: {family.notes}" if family.notes else "")),
        ("target", hardware.describe()),
    ]
    dtype = _dtype(spec, hardware, family, reasons)
    quant, quantized = _quant(spec, family, skeleton, reasons)
    overrides = _rope(spec, source.config, reasons)
    tokenizer = _tokenizer(spec, source.tokenizer, reasons)
    sizes = _parameter_bytes(skeleton, source, dtype, set(quantized) if quant["method"] != "none" else set())
    device_map, memory = _device_map(spec.load.device_map, hardware, skeleton.parameters, sizes, reasons)
    reasons.append(("patches", "none: this version ships no fused kernels yet"))
    lora, lora_reasons = plan_lora(spec, family, skeleton, source, quantized if quant["method"] != "none" else ())
    reasons += lora_reasons
    reasons.append(("train", describe_checkpointing(spec.train.gradient_checkpointing, hardware.kind)))
    return LoadPlan(
        format_version=FORMAT_VERSION,
        name=spec.name,
        source={"kind": source.kind, "location": source.location, "revision": source.revision, "identity": source.identity},
        family=family.name,
        model_type=source.config["model_type"],
        target={"name": hardware.name, "kind": hardware.kind, "capability": list(hardware.capability), "memory": list(hardware.memory_bytes)},
        dtype=dtype,
        quant=quant,
        quantized=quantized,
        max_seq_length=spec.load.max_seq_length or int(source.config.get("max_position_embeddings") or 0),
        config_overrides=overrides,
        device_map=device_map,
        memory=memory,
        tokenizer=tokenizer,
        lora=lora,
        train={"gradient_checkpointing": spec.train.gradient_checkpointing},
        versions=dict(_versions(quant["method"] != "none")),
        reasons=tuple(reasons),
    )


def _dtype(spec: Spec, hardware: Hardware, family: arch.Family, reasons: list) -> str:
    asked = spec.load.dtype
    if asked == "bfloat16" and not hardware.supports_bf16:
        raise UsageError(f"dtype bfloat16 needs a GPU of capability 8.0 or newer, but the target {hardware.name} has "
                         f"{hardware.capability[0]}.{hardware.capability[1]}. Use dtype = \"float16\" or \"auto\".")
    if asked != "auto":
        why = "asked for in the spec"
        if asked == "float16" and family.fp16_overflows:
            why += f"; warning: {family.name} {family.notes}"
        reasons.append(("dtype", f"{asked} ({why})"))
        return asked
    if hardware.kind == "cpu":
        choice, why = "bfloat16", "CPU target: bfloat16 halves memory and torch runs it natively"
    elif hardware.supports_bf16:
        choice, why = "bfloat16", f"capability {hardware.capability[0]}.{hardware.capability[1]} >= 8.0 supports bfloat16"
    elif family.fp16_overflows:
        choice, why = "float32", f"capability < 8.0 has no bfloat16, and {family.name} {family.notes}"
    else:
        choice, why = "float16", f"capability {hardware.capability[0]}.{hardware.capability[1]} < 8.0 has no bfloat16"
    reasons.append(("dtype", f"{choice} ({why})"))
    return choice


def _matches(module: str, pattern: str) -> bool:
    return module == pattern or module.endswith("." + pattern) or module.startswith(pattern + ".")


def _quant(spec: Spec, family: arch.Family, skeleton: arch.Skeleton, reasons: list) -> tuple[dict, tuple[str, ...]]:
    method = spec.load.quant
    skip = tuple(dict.fromkeys((*family.keep_unquantized, *spec.load.skip_modules)))
    for pattern in spec.load.skip_modules:
        if not any(_matches(name, pattern) for name in skeleton.linears):
            short = sorted({name.rsplit(".", 1)[-1] for name in skeleton.linears})
            raise UsageError(f"load.skip_modules: {pattern!r} matches no Linear module of this model.{did_you_mean(pattern, short)} "
                             f"Linear modules are named: {', '.join(short)}")
    if method == "none":
        reasons.append(("quant", "none: weights stay 16-bit (as asked)"))
        return {"method": "none"}, ()
    quantized = tuple(name for name in skeleton.linears if not any(_matches(name, p) for p in skip))
    reasons.append(("quant", f"{method}, blocksize {BLOCKSIZE}, double quant {'on' if spec.load.double_quant else 'off'}, "
                             f"{len(quantized)} of {len(skeleton.linears)} Linear layers"))
    reasons.append(("kept 16-bit", ", ".join(skip) + " (family default" + (" + spec)" if spec.load.skip_modules else ")")))
    quant = {"method": method, "double_quant": spec.load.double_quant, "blocksize": BLOCKSIZE, "storage": "uint8", "skip_modules": list(skip)}
    return quant, quantized


def _rope(spec: Spec, config: dict, reasons: list) -> dict:
    """config.json edits for max_seq_length beyond the model's context (RoPE scaling)."""
    native = int(config.get("max_position_embeddings") or 0)
    wanted = spec.load.max_seq_length
    if not wanted or not native or wanted <= native:
        reasons.append(("rope", f"unchanged: max_seq_length {wanted or native} fits the model's context {native}"))
        return {}
    extension = wanted / native
    if extension > MAX_ROPE_EXTENSION:
        raise UsageError(f"load.max_seq_length {wanted} is {extension:.1f}x the model's context {native}; loadspec scales RoPE "
                         f"at most {MAX_ROPE_EXTENSION:.0f}x (quality drops quickly beyond). Use max_seq_length <= {int(native * MAX_ROPE_EXTENSION)}.")
    key = "rope_parameters" if "rope_parameters" in config else "rope_scaling"
    current = dict(config.get(key) or {})
    kind = current.get("rope_type") or current.get("type") or "default"
    if kind == "default":
        scaled = {**current, "rope_type": "linear", "factor": extension}
        scaled.pop("type", None)
        why = f"linear scaling, factor {extension:g} = {wanted} / {native}"
    elif kind in ("linear", "llama3", "yarn"):
        scaled = {**current, "factor": float(current.get("factor", 1.0)) * extension}
        if kind == "yarn":
            scaled.setdefault("original_max_position_embeddings", native)
        why = (f"{kind} scaling kept; factor {current.get('factor', 1.0):g} x {extension:g} = {scaled['factor']:g} "
               f"(other {kind} fields unchanged)")
    else:
        raise UsageError(f"the model uses {kind!r} RoPE scaling, which loadspec cannot extend yet; "
                         f"use max_seq_length <= {native}.")
    reasons.append(("rope", f"extension {extension:g}x: {why}; max_position_embeddings {native} -> {wanted}"))
    return {key: scaled, "max_position_embeddings": wanted}


def _tokenizer(spec: Spec, facts: dict, reasons: list) -> dict:
    asked = spec.tokenizer
    if not facts.get("present"):
        raise UsageError("the source has no tokenizer files (tokenizer.json / tokenizer.model); loadspec needs one to build an artifact.")
    if asked.pad_token != "auto":
        pad, why = asked.pad_token, "asked for in the spec"
    elif facts.get("pad_token"):
        pad, why = facts["pad_token"], "the tokenizer's own"
    elif facts.get("unk_token"):
        pad, why = facts["unk_token"], "no pad token: reusing unk, which training never predicts"
    elif facts.get("eos_token"):
        pad, why = facts["eos_token"], "no pad or unk token: reusing eos (mask padding by attention_mask, not by id)"
    else:
        raise UsageError("the tokenizer has no pad, unk or eos token; set [tokenizer] pad_token to a token in its vocabulary.")
    reasons.append(("pad token", f"{pad!r} ({why}); padding side {asked.padding_side}"))
    if asked.chat_template:
        reasons.append(("chat template", "from the spec"))
    else:
        reasons.append(("chat template", "the model's own" if facts.get("chat_template") else "none (prompts are used as plain text)"))
    return {"pad_token": pad, "padding_side": asked.padding_side, "chat_template": asked.chat_template or None}


def _parameter_bytes(skeleton: arch.Skeleton, source: Source, dtype: str, quantized: set[str]) -> dict[str, int]:
    """Bytes each parameter takes once built: 4-bit packed + scales, or `dtype`."""
    sizes = {}
    for name in skeleton.parameters:
        info = source.tensors.get(name)
        numel = math.prod(info.shape) if info else 0
        module = name.rsplit(".", 1)[0]
        if module in quantized and name.endswith(".weight"):
            blocks = -(-numel // BLOCKSIZE)
            sizes[name] = -(-numel // 2) + blocks + 4 * -(-blocks // 256) + 4 * (16 + 256) + 256
        else:
            sizes[name] = numel * DTYPE_BYTES[dtype]
    return sizes


def block_of(parameter: str) -> str:
    """The unit the device map places: a numbered layer ('model.layers.3') or the module owning the parameter."""
    parts = parameter.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or parameter


def _device_map(strategy: str, hardware: Hardware, parameters: tuple[str, ...], sizes: dict[str, int], reasons: list) -> tuple[dict, dict]:
    blocks: dict[str, int] = {}
    for name in parameters:
        blocks[block_of(name)] = blocks.get(block_of(name), 0) + sizes[name]
    total = sum(blocks.values())
    if hardware.kind == "cpu":
        reasons.append(("device map", f"all on cpu ({total / GIB:.2f} GiB of weights)"))
        return {"": "cpu"}, {"cpu": total}
    budgets = [max(0, int(m * 0.9) - RESERVED_GPU_BYTES) for m in hardware.memory_bytes]
    if total > sum(budgets):
        raise UsageError(f"the weights need {total / GIB:.1f} GiB but {hardware.count} GPU(s) of the target {hardware.name} leave "
                         f"{sum(budgets) / GIB:.1f} GiB after headroom. Use quant = \"nf4\", or a target with more/larger GPUs.")
    if strategy == "balanced":
        share = -(-total // hardware.count)
        budgets = [min(b, share + max(blocks.values())) for b in budgets]
    device_map: dict[str, str] = {}
    memory: dict[str, int] = {}
    device, used = 0, 0
    for block, size in blocks.items():
        while used + size > budgets[device] and device + 1 < hardware.count:
            device, used = device + 1, 0
        device_map[block] = f"cuda:{device}"
        memory[f"cuda:{device}"] = memory.get(f"cuda:{device}", 0) + size
        used += size
    if len(memory) == 1:
        device_map = {"": "cuda:0"}
    spread = ", ".join(f"{d} {b / GIB:.2f} GiB" for d, b in memory.items())
    reasons.append(("device map", f"{strategy}: {spread} ({len(blocks)} blocks, sizes after quantization)"))
    return device_map, memory


@functools.lru_cache(maxsize=2)
def _versions(quantized: bool) -> dict:
    names = ["loadspec", "torch", "transformers", "safetensors"] + (["bitsandbytes"] if quantized else [])
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def parse_fingerprint(text: str) -> bool:
    """True if `text` looks like an artifact fingerprint (24 lowercase hex digits)."""
    return bool(re.fullmatch(r"[0-9a-f]{24}", text))
