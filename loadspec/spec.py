"""spec.toml -> a frozen, validated `Spec`.

Every section is an attrs class; its fields *are* the schema (type, default, allowed
values, help). Parsing binds each TOML table to its class and collects every problem
(unknown key, wrong type, out-of-range value, contradiction) with its line, then raises
one `SpecError` listing them all. Nothing here looks at hardware, disk contents or network.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import attrs

from . import vocab
from .errors import Problem, SpecError, did_you_mean

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
GPU_PROFILES = ("auto", "cpu", "h200", "h100", "a100", "a10g", "l40s", "l4", "rtx4090", "rtx3090", "t4", "v100")
# peft / unsloth spellings of [lora] keys -> loadspec's, for the "unknown key" message
KEY_ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "rank": "r", "init_lora_weights": "init",
               "seed": "random_state", "target": "target_modules", "use_gradient_checkpointing": "gradient_checkpointing"}
CHAT_TEMPLATE_NAMES = ("chatml", "llama3")  # built-in [tokenizer] chat_template names (texts in plan.CHAT_TEMPLATES)
TARGET_SETS = ("attention", "attention+mlp", "all-linear")  # [lora] target_modules keywords


def _field(default=attrs.NOTHING, *, kind: str, help: str, choices: tuple = ()):
    return attrs.field(default=default, metadata={"kind": kind, "help": help, "choices": choices})


@attrs.frozen
class ModelSection:
    source: str = _field(kind="str", help="hub id ('org/name'), a local folder, a .gguf file, or 'package:MODULE/FILE'")
    revision: str = _field("main", kind="str", help="hub branch, tag or commit; pinned to a commit in the plan")
    token_env: str = _field("HF_TOKEN", kind="str", help="name of the environment variable holding a hub token (never the token)")
    trust_remote_code: bool = _field(False, kind="bool", help="allow the source's own Python code; recorded in the plan")
    allow_pickle: bool = _field(False, kind="bool", help="accept a pickle-only checkpoint (pytorch_model*.bin): read with torch.load(weights_only=True), which refuses code")
    adapter: str = _field("", kind="str", help="an existing peft LoRA adapter folder (adapter_config.json) to attach to the source")
    adapter_trainable: bool = _field(False, kind="bool", help="load that adapter trainable (resume training) instead of frozen")


@attrs.frozen
class LoadSection:
    max_seq_length: int = _field(0, kind="int", help="longest sequence you will train on; 0 = the model's own context. Longer than the model's context -> RoPE scaling")
    dtype: str = _field("auto", kind="str", help="compute dtype", choices=("auto", "bfloat16", "float16", "float32"))
    quant: str = _field("nf4", kind="str", help="weight format: 4-bit NormalFloat, 4-bit float, 8-bit LLM.int8, fp8 (float8_e4m3fn, GPUs of capability >= 8.9), or 16-bit", choices=("nf4", "fp4", "int8", "fp8", "none"))
    fp8_scaling: str = _field("row", kind="str", help="fp8 scales: one per output row, or one per 128x128 block (DeepSeek / fine-grained FP8)", choices=("row", "block"))
    double_quant: bool = _field(True, kind="bool", help="also quantize the 4-bit block scales (saves ~0.4 bit/weight)")
    skip_modules: tuple[str, ...] = _field((), kind="strlist", help="module names kept unquantized, beyond the family's own list")
    device_map: Any = _field("sequential", kind="device_map", help="'sequential' (fill GPU 0 first), 'balanced', or a table of block -> device, e.g. {\"model.embed_tokens\" = \"cuda:0\", \"model.layers\" = \"cuda:1\"} (a key covers the blocks it prefixes)")
    max_memory: Any = _field(None, kind="max_memory", help="memory each device may hold for weights, e.g. {\"cuda:0\" = \"20GiB\", \"cuda:1\" = \"40GiB\"}; replaces the target's per-GPU budget")
    rope_scaling: Any = _field(None, kind="table", help="an explicit RoPE table written into config.json as given, e.g. {rope_type = \"yarn\", factor = 8.0, original_max_position_embeddings = 32768}; needed beyond 4x")
    full_finetuning: bool = _field(False, kind="bool", help="train the model itself, no [lora]: quant defaults to \"none\" (every weight trains); with quant = \"nf4\"/\"fp4\"/\"int8\" the 16-bit weights train and the quantized ones stay frozen")
    offload_embedding: Any = _field("auto", kind="auto_bool", help="keep the input embedding in CPU memory next to one GPU (token lookups run there); saves its GPU memory. \"auto\": when it is frozen and untied in a quantized model on one GPU")


@attrs.frozen
class TargetSection:
    gpu: Any = _field("auto", kind="gpu", help="'auto' (this machine), a profile name, or {capability='8.0', memory='80GiB', count=1}")


@attrs.frozen
class TokenizerSection:
    pad_token: str = _field("auto", kind="str", help="'auto' keeps the pad token or reuses unk, else eos; or a token string already in the vocabulary")
    padding_side: str = _field("right", kind="str", help="side padding goes on", choices=("right", "left"))
    chat_template: str = _field("", kind="str", help="a built-in template name (chatml, llama3) or a Jinja chat template replacing the model's own; empty keeps it")
    added_tokens: tuple[str, ...] = _field((), kind="tokens", help="tokens added to the tokenizer, with new ids after its last; the embedding grows when they do not fit")
    added_special_tokens: tuple[str, ...] = _field((), kind="tokens", help="as added_tokens, marked special (never split, dropped by decode(skip_special_tokens=True))")
    resize_vocab: Any = _field(None, kind="resize", help="true: grow the embeddings to fit the tokenizer; a number: exactly that many rows; false: never grow (added tokens must fit). Unset: grow only when added tokens need it")
    pad_vocab_to_multiple_of: int = _field(0, kind="multiple", help="round a growing vocabulary up to a multiple of this (e.g. 64); 0 = no rounding")


@attrs.frozen
class LoraSection:
    r: int = _field(16, kind="rank", help="LoRA rank: rows of A, columns of B")
    alpha: float = _field(16, kind="positive", help="updates are scaled by alpha / r (alpha / sqrt(r) with use_rslora)")
    use_rslora: bool = _field(False, kind="bool", help="rank-stabilised scaling alpha / sqrt(r)")
    dropout: float = _field(0.0, kind="fraction", help="dropout on the LoRA input, 0 <= dropout < 1")
    bias: str = _field("none", kind="str", help="which biases train", choices=("none", "lora_only", "all"))
    target_modules: Any = _field("attention+mlp", kind="targets", help="Linear module names, or 'attention', 'attention+mlp' (the family's own sets) or 'all-linear'")
    modules_to_save: tuple[str, ...] = _field((), kind="strlist", help="modules trained in full and saved with the adapter (e.g. lm_head)")
    init: str = _field("default", kind="str", help="initialisation of A and B (B = 0 except orthogonal)", choices=("default", "gaussian", "orthogonal"))
    random_state: int = _field(3407, kind="seed", help="seed of the adapter's initialisation: same seed, same bytes")


@attrs.frozen
class TrainSection:
    gradient_checkpointing: Any = _field(False, kind="checkpointing", help='false, true (recompute each decoder layer in backward) or "offload" (also keep its input in CPU memory)')
    kernels: bool = _field(False, kind="bool", help="apply the plan's fused kernels (RMSNorm, RoPE, SwiGLU/GeGLU, cross-entropy) to the loaded model")


SECTIONS = {"model": ModelSection, "load": LoadSection, "target": TargetSection, "tokenizer": TokenizerSection,
            "lora": LoraSection, "train": TrainSection}


@attrs.frozen
class Spec:
    """A validated spec. `path` is where it came from (for messages only)."""

    name: str
    model: ModelSection
    load: LoadSection = LoadSection()
    target: TargetSection = TargetSection()
    tokenizer: TokenizerSection = TokenizerSection()
    lora: LoraSection | None = None  # None: no [lora] section, no new adapter
    train: TrainSection = TrainSection()
    path: str = attrs.field(default="<spec>", eq=False)
    lines: dict = attrs.field(factory=dict, eq=False, repr=False)  # 'section.key' -> line, for plan-time messages


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; raises SpecError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(path), [Problem("", "no such spec file", fix="check the path, or see specs/ for examples")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), [Problem("", f"cannot read the spec file ({exc})")]) from None
    return parse_spec(text, str(path))


def parse_spec(text: str, path: str = "<spec>") -> Spec:
    """Validate TOML text as a spec; raises SpecError listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        line = int(match.group(1)) if match else None
        raise SpecError(path, [Problem("", f"not valid TOML: {exc}", line, "fix the syntax at that line (strings need quotes, tables need [brackets])")]) from None
    lines = _key_lines(text)
    problems: list[Problem] = []
    name = data.pop("name", None)
    if name is None:
        problems.append(Problem("name", "missing", 1, 'add a top-level line: name = "my-model"'))
    elif not isinstance(name, str) or not NAME_PATTERN.match(name):
        problems.append(Problem("name", f"{name!r} is not a valid name", lines.get("name"),
                                "use letters, digits, '.', '_' and '-' (at most 128, starting with a letter or digit)"))
    sections: dict[str, Any] = {}
    for key, table in data.items():
        if key in SECTIONS:
            if not isinstance(table, dict):
                problems.append(Problem(key, f"must be a table, got {_type_name(table)}", lines.get(key), f"write it as [{key}] followed by its keys"))
                continue
            sections[key] = _bind(SECTIONS[key], table, key, lines, problems)
        else:
            problems.append(Problem(key, "unknown top-level key" + did_you_mean(key, [*SECTIONS, "name"]), lines.get(key),
                                    "top-level keys are: name, " + ", ".join(f"[{s}]" for s in SECTIONS)))
    if "model" not in data:
        problems.append(Problem("model.source", "missing", None, 'add a [model] section with source = "org/name" or a local path'))
    if not problems:
        _check_combinations(data, sections, lines, problems)
    if problems:
        raise SpecError(path, problems)
    return Spec(name=name, path=path, lines=lines, **sections)


def _bind(cls, table: dict, section: str, lines: dict, problems: list[Problem]):
    fields = {f.name: f for f in attrs.fields(cls)}
    values: dict[str, Any] = {}
    before = len(problems)
    for key, value in table.items():
        where = f"{section}.{key}"
        line = lines.get(where, lines.get(section))
        field = fields.get(key)
        if field is None:
            hint = f" (loadspec calls it '{KEY_ALIASES[key]}')" if KEY_ALIASES.get(key) in fields else did_you_mean(key, fields)
            problems.append(Problem(where, "unknown key" + hint, line, f"keys of [{section}]: {', '.join(fields)}"))
            continue
        message, fix = _check_value(key, value, field.metadata)
        if message:
            problems.append(Problem(where, message, line, fix))
        else:
            values[key] = tuple(value) if isinstance(value, list) else value
    for name, field in fields.items():
        if field.default is attrs.NOTHING and name not in table:
            problems.append(Problem(f"{section}.{name}", "missing", lines.get(section), f"add {name} = ... ({field.metadata['help']})"))
    return cls(**values) if len(problems) == before else None


def _check_value(key: str, value: Any, meta: dict) -> tuple[str, str]:
    """(message, fix) for a bad value, or ('', '')."""
    kind, choices = meta["kind"], meta["choices"]
    if kind in TRAINING_KINDS:
        return TRAINING_KINDS[kind](key, value)
    if kind in vocab.SPEC_KINDS:
        return vocab.SPEC_KINDS[kind](key, value)
    if kind == "str" and not isinstance(value, str):
        return f"must be a string, got {_type_name(value)}", f'write {key} = "..."'
    if kind == "bool" and not isinstance(value, bool):
        return f"must be true or false, got {_type_name(value)}", f"write {key} = true or {key} = false (no quotes)"
    if kind == "auto_bool" and not (isinstance(value, bool) or value == "auto"):
        return f'must be true, false or "auto", got {value!r}', f'write {key} = "auto", or true / false (no quotes)'
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be a whole number, got {_type_name(value)}", f"write {key} = 4096 (no quotes)"
        if value < 0 or value > 10_000_000:
            return f"must be between 0 and 10000000, got {value}", "use a positive length in tokens, or 0 for the model's own context"
    if kind == "strlist" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return f"must be a list of strings, got {_type_name(value)}", f'write {key} = ["lm_head"]'
    if kind == "gpu":
        return _check_gpu(value)
    if kind == "device_map":
        return _check_device_map(key, value)
    if kind == "max_memory":
        return _check_max_memory(key, value)
    if kind == "table" and not (isinstance(value, dict) and value):
        return f"must be a non-empty table, got {_type_name(value)}", f'write {key} = {{rope_type = "yarn", factor = 4.0, original_max_position_embeddings = 32768}}'
    if choices and value not in choices:
        return f"{value!r} is not one of {', '.join(choices)}." + did_you_mean(value, choices), f"use one of: {', '.join(choices)}"
    return "", ""


DEVICE_PATTERN = re.compile(r"^(cpu|cuda:\d+)$")


def _check_device_map(key: str, value: Any) -> tuple[str, str]:
    strategies = ("sequential", "balanced")
    if isinstance(value, str):
        if value in strategies:
            return "", ""
        return f"{value!r} is not one of {', '.join(strategies)}." + did_you_mean(value, strategies), "use sequential, balanced, or a table"
    if not isinstance(value, dict) or not value:
        return f"must be sequential, balanced or a non-empty table, got {_type_name(value)}", f'write {key} = "sequential"'
    bad = [f"{block} = {device!r}" for block, device in value.items() if not (isinstance(device, str) and DEVICE_PATTERN.match(device))]
    if bad:
        return f"devices must be \"cpu\" or \"cuda:N\": {', '.join(bad)}", f'write {key} = {{"model.layers" = "cuda:0"}}'
    return "", ""


def _check_max_memory(key: str, value: Any) -> tuple[str, str]:
    from .hardware import parse_memory

    if not isinstance(value, dict) or not value:
        return f"must be a non-empty table, got {_type_name(value)}", f'write {key} = {{"cuda:0" = "20GiB"}}'
    for device, amount in value.items():
        if not DEVICE_PATTERN.match(device) or device == "cpu":
            return f"{device!r} is not a GPU name", 'name GPUs as "cuda:0", "cuda:1", …'
        try:
            parse_memory(amount)
        except ValueError as exc:
            return f"{device}: {exc}", 'write sizes like "20GiB"'
    return "", ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_rank(key: str, value: Any) -> tuple[str, str]:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be a whole number, got {_type_name(value)}", f"write {key} = 16 (no quotes)"
    if not 1 <= value <= 4096:
        return f"must be between 1 and 4096, got {value}", "LoRA ranks are usually 8 to 128"
    return "", ""


def _check_positive(key: str, value: Any) -> tuple[str, str]:
    if not _is_number(value):
        return f"must be a number, got {_type_name(value)}", f"write {key} = 32 (no quotes)"
    if not 0 < value <= 1_000_000:
        return f"must be above 0 (and at most 1000000), got {value}", "alpha is usually r or 2 * r"
    return "", ""


def _check_fraction(key: str, value: Any) -> tuple[str, str]:
    if not _is_number(value):
        return f"must be a number, got {_type_name(value)}", f"write {key} = 0.05 (no quotes)"
    if not 0 <= value < 1:
        return f"must be at least 0 and below 1, got {value}", f"write {key} = 0 (off) or a small value like 0.05"
    return "", ""


def _check_seed(key: str, value: Any) -> tuple[str, str]:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be a whole number, got {_type_name(value)}", f"write {key} = 3407 (no quotes)"
    if value < 0:
        return f"must be 0 or more, got {value}", f"write {key} = 3407"
    return "", ""


def _check_targets(key: str, value: Any) -> tuple[str, str]:
    fix = f'write {key} = "attention+mlp", "all-linear", or a list like ["q_proj", "v_proj"]'
    if isinstance(value, str):
        if value in TARGET_SETS:
            return "", ""
        return f"{value!r} is not one of {', '.join(TARGET_SETS)}." + did_you_mean(value, TARGET_SETS), fix
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return f"must be a string or a list of strings, got {_type_name(value)}", fix
    if not value or any(not v.strip() for v in value):
        return "must name at least one module, and no empty names", fix
    return "", ""


def _check_checkpointing(key: str, value: Any) -> tuple[str, str]:
    if isinstance(value, bool) or value == "offload":
        return "", ""
    fix = f'write {key} = false, {key} = true or {key} = "offload"'
    if isinstance(value, str):
        hint = " (unsloth's \"unsloth\" mode is loadspec's \"offload\")" if value == "unsloth" else did_you_mean(value, ["offload", "true", "false"])
        return f"{value!r} is not false, true or \"offload\"." + hint, fix
    return f"must be true, false or \"offload\", got {_type_name(value)}", fix


TRAINING_KINDS = {"rank": _check_rank, "positive": _check_positive, "fraction": _check_fraction, "seed": _check_seed,
                  "targets": _check_targets, "checkpointing": _check_checkpointing}


def _check_gpu(value: Any) -> tuple[str, str]:
    if isinstance(value, str):
        if value.lower() in GPU_PROFILES:
            return "", ""
        return f"unknown GPU profile {value!r}." + did_you_mean(value.lower(), GPU_PROFILES), f"use one of: {', '.join(GPU_PROFILES)}, or a table"
    if isinstance(value, dict):
        extra = set(value) - {"capability", "memory", "count"}
        if extra:
            return f"unknown field(s) {sorted(extra)} in the GPU table", "the table takes capability, memory and count"
        if "capability" not in value or "memory" not in value:
            return "a GPU table needs capability and memory", "write gpu = {capability = \"8.0\", memory = \"80GiB\", count = 1}"
        from .hardware import parse_capability, parse_memory  # pure parsers, no hardware access

        try:
            parse_capability(value["capability"])
            parse_memory(value["memory"])
        except ValueError as exc:
            return str(exc), 'capability like "8.0", memory like "80GiB" or "24GB"'
        count = value.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1024:
            return f"count must be a whole number from 1 to 1024, got {count!r}", "write count = 2"
        return "", ""
    return f"must be a profile name or a table, got {_type_name(value)}", 'write gpu = "h100"'


def _check_combinations(data: dict, sections: dict, lines: dict, problems: list[Problem]) -> None:
    load_table = data.get("load", {})
    load = sections.get("load") or LoadSection()
    if load.full_finetuning:
        if "quant" not in load_table:
            load = sections["load"] = attrs.evolve(load, quant="none")  # full fine-tuning is 16-bit unless asked otherwise
        elif load.quant == "fp8":  # 4/8-bit bitsandbytes weights stay frozen beside the trained 16-bit ones; fp8 has no such path
            problems.append(Problem("load.full_finetuning", "full fine-tuning next to fp8 weights is not supported: they take no "
                                    "gradient updates, and training beside them is untested", lines.get("load.quant"), 'use quant = "none" (train every weight), '
                                    'or "nf4" / "int8" (train the 16-bit weights, quantized ones stay frozen)'))
        for section in ("lora",):
            if section in sections:
                problems.append(Problem("load.full_finetuning", "full fine-tuning trains the model itself, so a new [lora] adapter "
                                        "would only freeze it again", lines.get(section), "remove [lora], or set full_finetuning = false"))
        model = sections.get("model")
        if model is not None and model.adapter.strip():
            problems.append(Problem("load.full_finetuning", "full fine-tuning and an existing [model] adapter cannot be combined",
                                    lines.get("model.adapter"), "merge the adapter into the model first, or set full_finetuning = false"))
    if load.quant in ("none", "int8", "fp8"):
        for key in ("double_quant",) + (("skip_modules",) if load.quant == "none" else ()):
            if key in load_table:
                fix = "remove it" + (", or set quant = \"nf4\"" if load.quant == "none" else "")
                problems.append(Problem(f"load.{key}", f"applies only to {'4-bit ' if key == 'double_quant' else ''}quantization, but "
                                        f"quant = \"{load.quant}\"", lines.get(f"load.{key}"), fix))
    if load.quant != "fp8" and "fp8_scaling" in load_table:
        problems.append(Problem("load.fp8_scaling", f"applies only to fp8 weights, but quant = \"{load.quant}\"",
                                lines.get("load.fp8_scaling"), "remove it, or set quant = \"fp8\""))
    tokenizer = sections.get("tokenizer")
    if tokenizer is not None and tokenizer.chat_template and "{" not in tokenizer.chat_template \
            and tokenizer.chat_template not in CHAT_TEMPLATE_NAMES:
        problems.append(Problem("tokenizer.chat_template", f"{tokenizer.chat_template!r} is neither a built-in template "
                                f"({', '.join(CHAT_TEMPLATE_NAMES)}) nor a Jinja template." + did_you_mean(tokenizer.chat_template, CHAT_TEMPLATE_NAMES),
                                lines.get("tokenizer.chat_template"), f"use one of: {', '.join(CHAT_TEMPLATE_NAMES)}, or write the Jinja text"))
    if tokenizer is not None:
        problems += vocab.check_spec(tokenizer, lines)
    model = sections.get("model")
    if model is not None and not model.source.strip():
        problems.append(Problem("model.source", "is empty", lines.get("model.source"), 'write source = "org/name" or a local path'))
    _check_lora_combinations(sections, load, lines, problems)


def _check_lora_combinations(sections: dict, load: LoadSection, lines: dict, problems: list[Problem]) -> None:
    lora, model = sections.get("lora"), sections.get("model")
    if lora is not None and model is not None and model.adapter.strip():
        problems.append(Problem("lora", "a new adapter ([lora]) and an existing one ([model] adapter) cannot be combined", lines.get("lora"),
                                "remove [lora] to use the existing adapter (adapter_trainable = true to train it further), or remove adapter"))
    if lora is not None and lora.init == "orthogonal":
        if lora.r % 2:
            problems.append(Problem("lora.init", f"orthogonal initialisation needs an even r, got r = {lora.r}", lines.get("lora.init"),
                                    f"set r = {lora.r + 1}, or init = \"default\""))
        if load.quant != "none":
            problems.append(Problem("lora.init", f"orthogonal initialisation needs a 16-bit base, but quant = \"{load.quant}\"",
                                    lines.get("lora.init"), 'use init = "default" or "gaussian", or quant = "none"'))


def _key_lines(text: str) -> dict[str, int]:
    """Map 'section.key' (and 'section', and top-level 'key') to its 1-based line."""
    lines: dict[str, int] = {}
    section = ""
    for number, raw in enumerate(text.split("\n"), start=1):  # TOML's lines (splitlines also breaks at U+2028, \x85, ...)
        line = raw.strip()
        header = re.match(r"^\[\s*([A-Za-z0-9_.\-]+)\s*\]", line)
        if header:
            section = header.group(1)
            lines.setdefault(section, number)
            continue
        key = re.match(r"^([A-Za-z0-9_\-]+)\s*=", line)
        if key:
            lines.setdefault(f"{section}.{key.group(1)}" if section else key.group(1), number)
    return lines


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "a table"}.get(type(value), type(value).__name__)
