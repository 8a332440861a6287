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

from . import arch, fp8, prequantized
from .checkpointing import describe as describe_checkpointing
from .errors import UsageError, did_you_mean
from .finetune import full_finetuning_reasons
from .hardware import GIB, Hardware, parse_memory
from .lora import plan_lora, targets
from .patches import choose as choose_patches
from .source import Source
from .spec import Spec
from .vocab import plan_vocab

FORMAT_VERSION = 1
BLOCKSIZE = 64
MAX_ROPE_EXTENSION = 4.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FINGERPRINT_FIELDS = ("format_version", "source_identity", "model_type", "dtype", "quant", "quantized", "config_overrides", "tokenizer")
RESERVED_GPU_BYTES = GIB  # CUDA context and allocator slack per GPU
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold (bitsandbytes' and transformers' default)


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
    patches: tuple = ()  # ({module, kernel, version}, ...) chosen per family; applied on request; not in the fingerprint
    lora: dict | None = None  # new adapter settings or an existing adapter; not in the fingerprint
    train: dict = attrs.Factory(dict)  # gradient_checkpointing; not in the fingerprint
    versions: dict = attrs.Factory(dict)
    reasons: tuple[tuple[str, str], ...] = ()  # (decision, why), for people

    @property
    def source_identity(self) -> str:
        """The weights' identity; trusting the source's own code can change the artifact (custom tokenizer/config
        code is saved with it), so a trusted build is a different artifact."""
        trusted = self.source.get("trust_remote_code", False)
        return self.source["identity"] + ("+trust_remote_code" if trusted else "")

    @property
    def fingerprint(self) -> str:
        """sha256 (first 24 hex digits) of the fields that decide the artifact's bytes."""
        decisive = {field: getattr(self, field) for field in FINGERPRINT_FIELDS}
        return hashlib.sha256(_canonical(decisive).encode()).hexdigest()[:24]

    def to_json(self) -> str:
        return _canonical(attrs.asdict(self, recurse=False))

    @classmethod
    def from_json(cls, text: str) -> "LoadPlan":
        data = None
        try:
            data = json.loads(text)
            data["quantized"] = tuple(data["quantized"])
            data["patches"] = tuple(data["patches"])
            data["reasons"] = tuple(tuple(r) for r in data["reasons"])
            return cls(**data)
        except (ValueError, KeyError, TypeError) as exc:  # another format version, or a damaged file
            from .errors import LoadspecError

            version = data.get("format_version") if isinstance(data, dict) else None
            raise LoadspecError(f"plan.json (artifact format {version!r}; this loadspec writes {FORMAT_VERSION}) cannot be read "
                                f"by this loadspec ({type(exc).__name__}: {exc}). Rebuild with 'loadspec build SPEC --force', "
                                "or use the loadspec version that wrote it.") from None

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
    if "quantization_config" in source.config:  # stored quantized already: reused as it is
        quant, quantized = prequantized.plan_quant(spec, skeleton, source, reasons)
    else:
        quant, quantized = _quant(spec, hardware, family, skeleton, reasons)
    overrides = _rope(spec, source.config, reasons)
    tokenizer = _tokenizer(spec, source.tokenizer, reasons)
    added, resized = plan_vocab(spec, source, skeleton, reasons)  # added tokens and embedding rows change the artifact
    tokenizer, overrides = {**tokenizer, **added}, {**overrides, **resized}
    sizes = _parameter_bytes(skeleton, source, dtype, quant, set(quantized))
    lora, lora_reasons = plan_lora(spec, family, skeleton, source, quantized)  # () when nothing is quantized
    offload = _offloaded_embedding(spec, hardware, skeleton, quantized, lora, source, resized, reasons)
    device_map, memory = _device_map(spec.load.device_map, hardware, skeleton.parameters, sizes, reasons, offload,
                                     spec.load.max_memory)
    patches, patches_why = choose_patches(family, source.config["model_type"])
    reasons.append(("patches", patches_why))
    reasons += lora_reasons
    reasons += full_finetuning_reasons(spec, skeleton, source, quantized)
    reasons.append(("train", describe_checkpointing(spec.train.gradient_checkpointing, hardware.kind)))
    return LoadPlan(
        format_version=FORMAT_VERSION,
        name=spec.name,
        source={"kind": source.kind, "location": source.location, "revision": source.revision, "identity": source.identity,
                "trust_remote_code": spec.model.trust_remote_code},  # fingerprinted through source_identity
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
        patches=patches,
        lora=lora,
        train={"gradient_checkpointing": spec.train.gradient_checkpointing,
               **({"kernels": True} if spec.train.kernels else {})},  # key only when on: older plans compare equal
        versions=dict(_versions(quant["method"] not in ("none", "fp8"))),
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


def _quant(spec: Spec, hardware: Hardware, family: arch.Family, skeleton: arch.Skeleton, reasons: list) -> tuple[dict, tuple[str, ...]]:
    method = spec.load.quant
    if method == "fp8":
        if hardware.kind == "cpu" or hardware.capability < (8, 9):
            has = "a CPU" if hardware.kind == "cpu" else f"capability {hardware.capability[0]}.{hardware.capability[1]}"
            raise UsageError(f"quant = \"fp8\" needs a GPU of capability 8.9 or newer (L4, L40S, RTX 4090, H100, H200), but the "
                             f"target {hardware.name} has {has}. Use quant = \"nf4\" or \"int8\", or target such a GPU.")
    skip = tuple(dict.fromkeys((*family.keep_unquantized, *spec.load.skip_modules)))
    for pattern in spec.load.skip_modules:
        if not any(arch.module_matches(name, pattern) for name in skeleton.linears):
            short = sorted({name.rsplit(".", 1)[-1] for name in skeleton.linears})
            raise UsageError(f"load.skip_modules: {pattern!r} matches no Linear module of this model.{did_you_mean(pattern, short)} "
                             f"Linear modules are named: {', '.join(short)}")
    if method == "none":
        why = "full fine-tuning trains every weight, so they stay 16-bit" if spec.load.full_finetuning else "as asked"
        reasons.append(("quant", f"none: weights stay 16-bit ({why})"))
        return {"method": "none"}, ()
    quantized = tuple(name for name in skeleton.linears if not any(arch.module_matches(name, p) for p in skip))
    kept = ("kept 16-bit", ", ".join(skip) + " (family default" + (" + spec)" if spec.load.skip_modules else ")"))
    if method == "int8":
        reasons.append(("quant", f"int8 (LLM.int8: row-wise absmax int8 weights + SCB scales, outlier threshold {INT8_THRESHOLD:g}), "
                                 f"{len(quantized)} of {len(skeleton.linears)} Linear layers"))
        reasons.append(kept)
        return {"method": "int8", "threshold": INT8_THRESHOLD, "storage": "int8", "skip_modules": list(skip)}, quantized
    if method == "fp8":
        scaling = spec.load.fp8_scaling
        per = "output row; inference matmuls run in fp8 through torch._scaled_mm" if scaling == "row" else \
            f"{fp8.BLOCK}x{fp8.BLOCK} block; matmuls dequantize the weight first"
        reasons.append(("quant", f"fp8: float8_e4m3fn weights (1 byte/param) with float32 scales per {per}; "
                                 f"{len(quantized)} of {len(skeleton.linears)} Linear layers"))
        reasons.append(kept)
        return {"method": "fp8", "scaling": scaling, "storage": "float8_e4m3fn", "skip_modules": list(skip)}, quantized
    reasons.append(("quant", f"{method}, blocksize {BLOCKSIZE}, double quant {'on' if spec.load.double_quant else 'off'}, "
                             f"{len(quantized)} of {len(skeleton.linears)} Linear layers"))
    reasons.append(kept)
    quant = {"method": method, "double_quant": spec.load.double_quant, "blocksize": BLOCKSIZE, "storage": "uint8", "skip_modules": list(skip)}
    return quant, quantized


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
ROPE_REQUIRED = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
                 "yarn": ("factor", "original_max_position_embeddings"),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                 "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}


def _rope(spec: Spec, config: dict, reasons: list) -> dict:
    """config.json edits for max_seq_length beyond the model's context (RoPE scaling).

    The model's own RoPE type is kept and adjusted (linear/llama3: factor x extension; yarn: factor =
    new length / its original context; dynamic: nothing, it rescales at run time). Per-layer-type RoPE
    (Gemma 3's {full_attention, sliding_attention}) scales the full-attention layers only. Beyond
    MAX_ROPE_EXTENSION, or for longrope, only an explicit `[load] rope_scaling` table is accepted.
    """
    native = int(config.get("max_position_embeddings") or 0)
    wanted = spec.load.max_seq_length
    key = "rope_parameters" if "rope_parameters" in config else "rope_scaling"
    current = dict(config.get(key) or {})
    per_layer = _per_layer_rope(current)
    if spec.load.rope_scaling:
        return _rope_override(spec, config, key, current, per_layer, native, wanted, reasons)
    blocks = {name: block for name, block in current.items() if block is not None and "sliding" not in name} if per_layer else {"": current}
    context = min((_rope_context(block, native, config) for block in blocks.values()), default=native)
    if not wanted or not native or wanted <= context:
        covered = f" ({_rope_kind(next(iter(blocks.values())))} scaling already covers {context})" if context > native else ""
        reasons.append(("rope", f"unchanged: max_seq_length {wanted or native} fits the model's context {native}{covered}"))
        return {}
    extension = wanted / context
    if extension > MAX_ROPE_EXTENSION:
        raise UsageError(f"load.max_seq_length {wanted} is {extension:.1f}x the model's context {context}; loadspec scales RoPE "
                         f"at most {MAX_ROPE_EXTENSION:.0f}x on its own (quality drops quickly beyond). Use max_seq_length <= "
                         f"{int(context * MAX_ROPE_EXTENSION)}, or write the scaling yourself in [load], e.g. rope_scaling = "
                         f"{{rope_type = \"yarn\", factor = {wanted / native:g}, original_max_position_embeddings = {native}}}.")
    scaled, whys = dict(current), []
    for name, block in blocks.items():
        new, why = _extend_rope(block, extension, wanted, native, config)
        if name:
            scaled[name] = new
            whys.append(f"{name}: {why}")
        else:
            scaled = new
            whys.append(why)
    if per_layer:
        kept = [name for name in current if name not in blocks]
        whys.append(f"{', '.join(kept)} unchanged (a sliding window never sees distances beyond its width)" if kept else "")
    dynamic_only = all(_rope_kind(block) == "dynamic" for block in blocks.values())
    overrides = {} if dynamic_only else {key: scaled, "max_position_embeddings": wanted}
    context_change = f"max_position_embeddings {native} kept (dynamic NTK reads it as the trained context)" if dynamic_only else \
        f"max_position_embeddings {native} -> {wanted}"
    reasons.append(("rope", f"extension {extension:g}x: {'; '.join(w for w in whys if w)}; {context_change}"))
    return overrides


def _per_layer_rope(block: dict) -> bool:
    """True for transformers 5's per-layer-type form: {"full_attention": {...}, "sliding_attention": {...}}."""
    return bool(block) and all(isinstance(value, dict) or value is None for value in block.values())


def _rope_kind(block: dict) -> str:
    return block.get("rope_type") or block.get("type") or "default"


def _rope_original(block: dict, native: int, config: dict) -> int:
    """The pretraining context a yarn/llama3/longrope block refers to (transformers' own order of precedence)."""
    return int(config.get("original_max_position_embeddings") or block.get("original_max_position_embeddings") or native)


def _rope_context(block: dict, native: int, config: dict) -> int:
    """How many positions the block already serves: yarn covers original x factor, the others max_position_embeddings."""
    if _rope_kind(block) == "yarn" and block.get("factor"):
        return max(native, int(_rope_original(block, native, config) * float(block["factor"])))
    return native


def _extend_rope(block: dict, extension: float, wanted: int, native: int, config: dict) -> tuple[dict, str]:
    kind = _rope_kind(block)
    factor = float(block.get("factor") or 1.0)
    if kind == "default":
        scaled = {**block, "rope_type": "linear", "factor": extension}
        scaled.pop("type", None)
        return scaled, f"linear scaling, factor {extension:g} = {wanted} / {native}"
    if kind in ("linear", "llama3"):
        other = " (low/high frequency factors and original context unchanged)" if kind == "llama3" else ""
        return {**block, "factor": factor * extension}, f"{kind} scaling kept; factor {factor:g} x {extension:g} = {factor * extension:g}{other}"
    if kind == "yarn":
        original = _rope_original(block, native, config)
        new = wanted / original
        return ({**block, "factor": new, "original_max_position_embeddings": original},
                f"yarn scaling kept; factor {factor:g} -> {new:g} = {wanted} / original context {original} (other yarn fields unchanged)")
    if kind == "dynamic":
        return dict(block), f"dynamic NTK scaling kept unchanged (factor {factor:g}): it rescales RoPE at run time for sequences beyond {native}"
    if kind == "longrope":
        raise UsageError(f"the model uses longrope RoPE, whose per-dimension short/long factors were fitted for its context {native}; "
                         f"loadspec cannot extend them correctly. Use max_seq_length <= {native}, or give the scaling yourself "
                         "with [load] rope_scaling = {...} (honoured exactly).")
    raise UsageError(f"the model uses {kind!r} RoPE scaling, which loadspec cannot extend; use max_seq_length <= {native}, "
                     "or give the scaling yourself with [load] rope_scaling = {...} (honoured exactly).")


def _check_rope_block(block: dict, where: str) -> None:
    kind = _rope_kind(block)
    if kind not in ROPE_TYPES:
        raise UsageError(f"{where}: rope_type {kind!r} is not one of {', '.join(ROPE_TYPES)}.{did_you_mean(kind, ROPE_TYPES)}")
    missing = [k for k in ROPE_REQUIRED[kind] if k not in block]
    if missing:
        raise UsageError(f"{where}: {kind} RoPE needs {', '.join(missing)}; add {' and '.join(f'{k} = ...' for k in missing)} to the table.")
    factor = block.get("factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1):
        raise UsageError(f"{where}: factor must be a number >= 1, got {factor!r}.")
    original = block.get("original_max_position_embeddings")
    if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 1):
        raise UsageError(f"{where}: original_max_position_embeddings must be a whole number of positions >= 1 "
                         f"(the model's context before scaling), got {original!r}.")


def _rope_override(spec: Spec, config: dict, key: str, current: dict, per_layer: bool, native: int, wanted: int, reasons: list) -> dict:
    """An explicit `[load] rope_scaling` table, checked and written as given."""
    asked = json.loads(json.dumps(spec.load.rope_scaling))  # plain dicts, a private copy
    line = spec.lines.get("load.rope_scaling")
    where = "[load] rope_scaling" + (f" ({spec.path}:{line})" if line else "")
    asked_per_layer = _per_layer_rope(asked)
    for name, block in (asked.items() if asked_per_layer else [("", asked)]):
        if block is not None:
            _check_rope_block(block, where + (f" {name}" if name else ""))
    note = ""
    if per_layer and not asked_per_layer:
        full = [name for name in current if "sliding" not in name and current[name] is not None]
        asked = {**current, **{name: asked for name in full}}
        note = f"; applied to {', '.join(full)}, sliding-window layers keep theirs"
    if key == "rope_parameters":  # transformers 5 keeps rope_theta in this block: carry the model's own over
        pairs = [(asked[n], current.get(n) or {}) for n in asked if asked[n] is not None] if per_layer or asked_per_layer else [(asked, current)]
        for block, own in pairs:
            for carried in ("rope_theta", "partial_rotary_factor"):
                if carried in own and carried not in block:
                    block[carried] = own[carried]
    flat = [asked] if not _per_layer_rope(asked) else [b for b in asked.values() if b is not None]
    for block in flat:
        if _rope_kind(block) == "yarn" and wanted and float(block["original_max_position_embeddings"]) * float(block["factor"]) < wanted:
            covered = int(float(block["original_max_position_embeddings"]) * float(block["factor"]))
            raise UsageError(f"{where}: yarn with factor {block['factor']:g} over {block['original_max_position_embeddings']} covers "
                             f"{covered} positions, less than max_seq_length {wanted}. Raise factor to {wanted / float(block['original_max_position_embeddings']):g}.")
    overrides: dict = {key: asked}
    dynamic = all(_rope_kind(b) == "dynamic" for b in flat)
    if wanted and wanted > native and not dynamic:
        overrides["max_position_embeddings"] = wanted
    reasons.append(("rope", f"explicit [load] rope_scaling honoured as written{note}; max_position_embeddings "
                            + (f"{native} -> {wanted}" if "max_position_embeddings" in overrides else f"{native} kept")))
    return overrides


# [tokenizer] chat_template names -> Jinja (the plan records the text: it is in the fingerprint)
CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
               "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
}


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
    template = CHAT_TEMPLATES.get(asked.chat_template, asked.chat_template)
    if asked.chat_template in CHAT_TEMPLATES:
        reasons.append(("chat template", f"built-in {asked.chat_template!r} (from the spec), replacing the model's own"))
    elif asked.chat_template:
        reasons.append(("chat template", "from the spec"))
    else:
        reasons.append(("chat template", "the model's own" if facts.get("chat_template") else "none (prompts are used as plain text)"))
    return {"pad_token": pad, "padding_side": asked.padding_side, "chat_template": template or None}


def _parameter_bytes(skeleton: arch.Skeleton, source: Source, dtype: str, quant: dict, quantized: set[str]) -> dict[str, int]:
    """Bytes each parameter takes once built: a pre-quantized source's stored tensors, int8 + row scales,
    fp8 + scales, 4-bit packed + scales, or `dtype`."""
    sizes = {}
    for name in skeleton.parameters:
        info = source.tensors.get(name)
        numel = math.prod(info.shape) if info else 0
        module = name.rsplit(".", 1)[0]
        if module in quantized and name.endswith(".weight") and quant.get("prequantized"):
            sizes[name] = prequantized.stored_bytes(source, name, quant)
        elif module in quantized and name.endswith(".weight") and quant["method"] == "int8":
            sizes[name] = numel + 4 * (info.shape[0] if info else 0)  # int8 weight + float32 row scales (SCB)
        elif module in quantized and name.endswith(".weight") and quant["method"] == "fp8":
            sizes[name] = fp8.stored_bytes(info.shape, quant["scaling"]) if info else 0
        elif module in quantized and name.endswith(".weight"):
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


def _offloaded_embedding(spec: Spec, hardware: Hardware, skeleton: arch.Skeleton, quantized, lora: dict | None, source: Source,
                         resized: dict, reasons: list) -> tuple[str, ...]:
    """Blocks kept in CPU memory: the input embedding when `offload_embedding` is true, or "auto" finds it only
    looked up (frozen, untied, in a quantized model on one GPU), never when it is tied to the LM head."""
    asked = spec.load.offload_embedding
    if asked is False:
        return ()
    if hardware.kind == "cpu":
        if asked is True:
            reasons.append(("offload embedding", "nothing to do: the target is the CPU, where every weight already lives"))
        return ()
    embedding = next((n for n in skeleton.parameters if n.endswith(("embed_tokens.weight", "word_embeddings.weight", "wte.weight"))), None)
    tied = embedding is not None and any(embedding in pair for pair in skeleton.tied)
    if asked == "auto":
        kept = _embedding_stays_on_gpu(spec, hardware, embedding, tied, quantized, lora, source, resized)
        if kept:
            reasons.append(("offload embedding", f"no, it stays on the GPU: {kept} (offload_embedding = \"auto\")"))
            return ()
    elif embedding is None:
        raise UsageError("load.offload_embedding: this model has no input embedding loadspec recognises (embed_tokens / word_embeddings).")
    elif tied:
        raise UsageError(f"load.offload_embedding: this model ties its input embedding ({embedding}) to the LM head, so offloading it "
                         "would run the LM head on the CPU for every token. Set offload_embedding = false.")
    block = block_of(embedding)
    why = " (offload_embedding = \"auto\": it is frozen and only looked up; set false to keep it on the GPU)" if asked == "auto" else ""
    reasons.append(("offload embedding", f"{block} stays in CPU memory, mapped from the artifact (token lookups run there; "
                                         f"only the looked-up rows go to the GPU){why}"))
    return (block,)


def _embedding_stays_on_gpu(spec: Spec, hardware: Hardware, embedding: str | None, tied: bool, quantized, lora: dict | None,
                            source: Source, resized: dict) -> str:
    """Why offload_embedding = "auto" keeps the input embedding on the GPU, or "" to offload it."""
    if embedding is None:
        return "no input embedding loadspec recognises"
    if tied:
        return "it is tied to the LM head"
    if not quantized:
        return "the model is not quantized (auto offloads only beside quantized weights, as in QLoRA)"
    if spec.load.full_finetuning:
        return "full fine-tuning trains it"
    if hardware.count > 1 or isinstance(spec.load.device_map, dict):
        return "the device map spreads the model or is a table"
    module = block_of(embedding)
    saved = list((lora or {}).get("modules_to_save") or [])
    adapter = getattr(source, "adapter", None)
    if adapter is not None:
        saved += list(adapter.config.get("modules_to_save") or [])
    if any(targets(module, key) for key in saved):
        return "the adapter trains it (modules_to_save)"
    if "vocab_size" in resized:
        return "the vocabulary grows, and new rows are usually trained"
    return ""


def _device_map(strategy, hardware: Hardware, parameters: tuple[str, ...], sizes: dict[str, int], reasons: list,
                offload: tuple[str, ...] = (), max_memory: dict | None = None) -> tuple[dict, dict]:
    blocks: dict[str, int] = {}
    for name in parameters:
        blocks[block_of(name)] = blocks.get(block_of(name), 0) + sizes[name]
    on_cpu = {block: blocks.pop(block) for block in offload}
    total = sum(blocks.values())
    if hardware.kind == "cpu":
        if isinstance(strategy, dict) or max_memory:
            raise UsageError("load.device_map tables and load.max_memory place layers on GPUs, but the target is the CPU; "
                             "set [target] gpu to the GPUs you plan for.")
        reasons.append(("device map", f"all on cpu ({total / GIB:.2f} GiB of weights)"))
        return {"": "cpu"}, {"cpu": total}
    budgets = _budgets(hardware, max_memory)
    if isinstance(strategy, dict):
        return _explicit_device_map(strategy, hardware, {**on_cpu, **blocks}, budgets, reasons)
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
    if len(memory) == 1 and not on_cpu:
        device_map = {"": "cuda:0"}
    if on_cpu and len(memory) > 1:
        raise UsageError("load.offload_embedding with the layers spread over several GPUs is not supported yet; "
                         "use a target with one GPU that fits them, or set offload_embedding = false.")
    for block, size in on_cpu.items():
        device_map = {block: "cpu", **device_map}
        memory["cpu"] = memory.get("cpu", 0) + size
    spread = ", ".join(f"{d} {b / GIB:.2f} GiB" for d, b in memory.items())
    reasons.append(("device map", f"{strategy}: {spread} ({len(blocks)} blocks, sizes after quantization)"))
    return device_map, memory


def _budgets(hardware: Hardware, max_memory: dict | None) -> list[int]:
    """Bytes of weights each GPU may take: 90% of its memory less a reserve, or what max_memory says."""
    budgets = [max(0, int(m * 0.9) - RESERVED_GPU_BYTES) for m in hardware.memory_bytes]
    for device, amount in (max_memory or {}).items():
        index = int(device.partition(":")[2])
        if index >= hardware.count:
            raise UsageError(f"load.max_memory names {device}, but the target {hardware.name} has {hardware.count} GPU(s).")
        budgets[index] = parse_memory(amount)
    return budgets


def _explicit_device_map(table: dict, hardware: Hardware, blocks: dict[str, int], budgets: list[int], reasons: list) -> tuple[dict, dict]:
    """Place each block where the most specific matching key of `table` says; check every block is placed and fits."""
    unknown = [key for key in table if not any(block == key or block.startswith(key + ".") for block in blocks)]
    if unknown:
        raise UsageError(f"load.device_map: {unknown[0]!r} matches no block of this model.{did_you_mean(unknown[0], list(blocks))} "
                         f"Blocks are: {', '.join(list(blocks)[:4])}, … (a key covers the blocks it prefixes, e.g. 'model.layers').")
    device_map, memory = {}, {}
    for block, size in blocks.items():
        keys = [key for key in table if block == key or block.startswith(key + ".")]
        if not keys:
            raise UsageError(f"load.device_map places no device for block {block!r}; add it, or a key that prefixes it "
                             f"(e.g. {block.rsplit('.', 1)[0]!r}).")
        device = table[max(keys, key=len)]
        if device.startswith("cuda:") and int(device[5:]) >= hardware.count:
            raise UsageError(f"load.device_map puts {block} on {device}, but the target {hardware.name} has {hardware.count} GPU(s).")
        device_map[block] = device
        memory[device] = memory.get(device, 0) + size
    for device, used in memory.items():
        if device.startswith("cuda:") and used > budgets[int(device[5:])]:
            raise UsageError(f"load.device_map puts {used / GIB:.1f} GiB of weights on {device}, over its "
                             f"{budgets[int(device[5:])] / GIB:.1f} GiB budget; move blocks elsewhere or raise load.max_memory.")
    spread = ", ".join(f"{d} {b / GIB:.2f} GiB" for d, b in memory.items())
    reasons.append(("device map", f"from the spec's table: {spread} ({len(blocks)} blocks)"))
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
