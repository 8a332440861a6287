"""LoRA: the spec's [lora] section and existing peft adapters, planned and attached.

Two halves, used at two times:

* planning (pure, no torch): `plan_lora` turns the spec's [lora] section, or an existing
  adapter the source resolved, into the plain dict stored as `LoadPlan.lora`, after
  checking every module name against the model's real modules (`arch.Skeleton`) and an
  existing adapter's tensor shapes against the base's. Problems raise `UsageError`.
* attaching (torch + peft): `attach(model, plan.lora)` wraps the loaded base in a
  `peft.PeftModel` — a new adapter initialised from `random_state` (same seed, same bytes;
  the caller's RNG state is left untouched) or an existing one read from its folder,
  trainable or frozen. The base is always frozen.

LoRA settings never change the base artifact: `LoadPlan.lora` is not part of the fingerprint,
so every adapter on one base shares one cached artifact.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError, did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from . import arch
    from .source import Source
    from .spec import Spec

ADAPTER_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>A|B|embedding_A|embedding_B)(?:\.weight)?$")
INIT = {"default": True, "gaussian": "gaussian", "orthogonal": "orthogonal"}  # spec value -> peft init_lora_weights


def targets(name: str, key: str) -> bool:
    """peft's rule for a list entry of target_modules: the full name, or its dotted suffix."""
    return name == key or name.endswith("." + key)


def _where(spec: "Spec", key: str) -> str:
    line = spec.lines.get(key) or spec.lines.get(key.rpartition(".")[0])
    return f"{spec.path}:{line}: {key}" if line else f"{spec.path}: {key}"


def _short_names(names) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in names})


# ---------------------------------------------------------------------------- planning

def plan_lora(spec: "Spec", family: "arch.Family", skeleton: "arch.Skeleton", source: "Source",
              quantized: tuple[str, ...]) -> tuple[dict | None, list[tuple[str, str]]]:
    """(`LoadPlan.lora`, reasons) for a spec: a new adapter, an existing one, or None."""
    adapter = getattr(source, "adapter", None)
    if adapter is not None:
        if spec.lora is not None:
            raise UsageError(f"{_where(spec, 'lora')}: the source is an existing LoRA adapter ({adapter.path}), so a new one "
                             "from [lora] cannot be added. Remove [lora] (set [model] adapter_trainable = true to train the "
                             "existing adapter further), or point source at the base model.")
        return _plan_adapter(spec, adapter, skeleton, source)
    if spec.model.adapter_trainable:
        raise UsageError(f"{_where(spec, 'model.adapter_trainable')}: there is no adapter to train: neither [model] adapter "
                         "nor a source that is an adapter folder. Remove adapter_trainable, or add adapter = \"path\".")
    if spec.lora is None:
        return None, [("lora", "none (no [lora] section, no adapter)")]
    return _plan_new(spec, family, skeleton, source, quantized)


def check_adapter_path(spec: "Spec") -> None:
    """A [model] adapter that is not an adapter folder, reported with its spec line before any file is read."""
    location = spec.model.adapter.strip()
    folder = Path(location).expanduser()
    if location and not (folder / "adapter_config.json").is_file():
        what = ("does not exist (adapters are local folders: fetch a hub adapter first, e.g. huggingface-cli download "
                "ORG/NAME --local-dir DIR)") if not folder.exists() else "has no adapter_config.json: it is not a peft adapter folder"
        raise UsageError(f"{_where(spec, 'model.adapter')}: {location!r} {what}.")


def _plan_new(spec, family, skeleton, source, quantized) -> tuple[dict, list]:
    asked = spec.lora
    linears = skeleton.linears
    output = _output_layers(skeleton)
    if asked.target_modules == "all-linear":
        names = _short_names(n for n in linears if n not in output)
        how = "all-linear: every Linear layer but the output layer"
    elif isinstance(asked.target_modules, str):
        names = list(family.attention_modules if asked.target_modules == "attention" else
                     (*family.attention_modules, *family.mlp_modules))
        how = f"{asked.target_modules}: the {family.name} family's own set"
    else:
        names = list(dict.fromkeys(asked.target_modules))
        how = "as listed"
    short = _short_names(linears)
    unknown = [key for key in names if not any(targets(name, key) for name in linears)]
    if unknown:
        each = "; ".join(f"{key!r} matches no Linear module of this model.{did_you_mean(key, short)}" for key in unknown)
        raise UsageError(f"{_where(spec, 'lora.target_modules')}: {each} Linear modules are named: {', '.join(short)}")
    targeted = [name for name in linears if any(targets(name, key) for key in names)]
    modules = _module_names(skeleton)
    for key in asked.modules_to_save:
        matched = [m for m in modules if targets(m, key)]
        if not matched:
            raise UsageError(f"{_where(spec, 'lora.modules_to_save')}: {key!r} matches no module of this model."
                             f"{did_you_mean(key, _short_names(modules))} Usual choices: lm_head, embed_tokens.")
        stored_4bit = [m for m in matched if m in quantized]
        if stored_4bit:
            raise UsageError(f"{_where(spec, 'lora.modules_to_save')}: {key!r} is stored in 4 bits ({stored_4bit[0]}), so it "
                             f"cannot be trained in full. Add {key!r} to [load] skip_modules to keep it 16-bit, or drop it here.")
        both = [t for t in targeted if any(t == m or t.startswith(m + ".") for m in matched)]
        if both:
            raise UsageError(f"{_where(spec, 'lora.modules_to_save')}: {key!r} is also a LoRA target ({both[0]}); a module is "
                             "either trained in full (modules_to_save) or through LoRA (target_modules), not both.")
    scaling = asked.alpha / (math.sqrt(asked.r) if asked.use_rslora else asked.r)
    base = str(source.path.resolve()) if source.kind == "local" and source.path is not None else source.location
    lora = {"kind": "new", "r": asked.r, "alpha": asked.alpha, "use_rslora": asked.use_rslora, "scaling": scaling,
            "dropout": asked.dropout, "bias": asked.bias, "target_modules": names, "modules_to_save": list(asked.modules_to_save),
            "init": asked.init, "random_state": asked.random_state, "base_model_name_or_path": base,
            "revision": source.revision or None}
    reasons = [("lora", f"new adapter: r {asked.r}, alpha {asked.alpha:g} -> scaling {scaling:g}"
                        f"{' (rsLoRA: alpha / sqrt(r))' if asked.use_rslora else ' (alpha / r)'}, dropout {asked.dropout:g}, "
                        f"bias {asked.bias}, init {asked.init}, random_state {asked.random_state}"),
               ("lora targets", f"{', '.join(names)} ({how}; {len(targeted)} of {len(linears)} Linear layers)"
                                + (f"; trained in full: {', '.join(asked.modules_to_save)}" if asked.modules_to_save else "")),
               ("lora base", "frozen; the adapter is not part of the fingerprint (one base artifact serves every adapter)")]
    return lora, reasons


def _plan_adapter(spec, adapter, skeleton, source) -> tuple[dict, list]:
    config = adapter.config
    problems = adapter_problems(adapter, skeleton, source)
    if problems:
        shown = "\n  ".join(problems[:6]) + (f"\n  … and {len(problems) - 6} more" if len(problems) > 6 else "")
        key = "model.adapter" if spec.model.adapter.strip() else "model.source"
        raise UsageError(f"{_where(spec, key)}: the LoRA adapter {adapter.path} does not fit the base {source.location}:\n  {shown}\n"
                         "Is it an adapter for this model? Its adapter_config.json names the base "
                         f"{config.get('base_model_name_or_path')!r}.")
    modules = sorted({m.group("module") for m in map(ADAPTER_TENSOR.match, adapter.tensors) if m})
    trainable = spec.model.adapter_trainable
    lora = {"kind": "adapter", "path": str(adapter.path), "identity": adapter.identity, "trainable": trainable,
            "r": config.get("r"), "alpha": config.get("lora_alpha"), "target_modules": _short_names(modules),
            "modules": len(modules)}
    base = config.get("base_model_name_or_path") or "?"
    reasons = [("lora", f"existing adapter {adapter.path} (r {config.get('r')}, alpha {config.get('lora_alpha')}, "
                        f"{len(modules)} modules: {', '.join(lora['target_modules'])}), loaded "
                        + ("trainable (adapter_trainable = true)" if trainable else "frozen (adapter_trainable = false)")),
               ("lora base", f"{base} per its adapter_config.json; frozen; shapes checked against it. "
                             "The adapter is not part of the fingerprint (one base artifact serves every adapter)")]
    return lora, reasons


def adapter_problems(adapter, skeleton: "arch.Skeleton", source: "Source") -> list[str]:
    """What makes an existing adapter unusable on this base: missing modules, wrong shapes, inconsistent ranks."""
    config = adapter.config
    problems = []
    linears = set(skeleton.linears)
    short = _short_names(linears)
    listed = config.get("target_modules")
    if isinstance(listed, list):
        for key in listed:
            if not any(targets(name, key) for name in linears):
                problems.append(f"target module {key!r} is not in the base.{did_you_mean(key, short)}")
    ranks: dict[str, dict[str, tuple]] = {}
    for name, info in adapter.tensors.items():
        match = ADAPTER_TENSOR.match(name)
        if match:
            ranks.setdefault(match.group("module"), {})[match.group("part")] = tuple(info.shape)
    if not ranks:
        problems.append("it holds no LoRA weights (no '*.lora_A.weight' tensors in adapter_model.safetensors)")
    modules = _module_names(skeleton)
    default_r = config.get("r")
    patterns = config.get("rank_pattern") or {}
    for module, parts in sorted(ranks.items()):
        if module not in modules:
            problems.append(f"{module}: the base has no such module")
            continue
        if "A" not in parts or "B" not in parts:
            if "embedding_A" not in parts:
                problems.append(f"{module}: lora_A or lora_B is missing")
            continue
        base = source.tensors.get(module + ".weight")
        a, b = parts["A"], parts["B"]
        expected_r = next((r for p, r in patterns.items() if re.match(rf"(.*\.)?({p})$", module)), default_r)
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            problems.append(f"{module}: lora_A {list(a)} and lora_B {list(b)} do not share a rank")
        elif expected_r is not None and a[0] != expected_r:
            problems.append(f"{module}: rank {a[0]} in the weights, but adapter_config.json says r = {expected_r}")
        if base is not None and len(base.shape) == 2 and len(a) == 2 and len(b) == 2:
            out_features, in_features = base.shape
            if a[1] != in_features or b[0] != out_features:
                problems.append(f"{module}: the adapter is for a {a[1]} -> {b[0]} layer, the base's is "
                                f"{in_features} -> {out_features}")
    return problems


def _module_names(skeleton: "arch.Skeleton") -> set[str]:
    """Every module that owns a parameter, and their parents."""
    names = set()
    for parameter in (*skeleton.parameters, *(alias for alias, _ in skeleton.tied)):
        parts = parameter.split(".")[:-1]
        names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def _output_layers(skeleton: "arch.Skeleton") -> set[str]:
    """The LM head (peft's all-linear leaves it out): the last Linear outside the numbered layers."""
    outside = [name for name in skeleton.linears if not any(part.isdigit() for part in name.split("."))]
    return {outside[-1]} if outside else set()


# ---------------------------------------------------------------------------- attaching

def lora_config(lora: dict):
    """The peft `LoraConfig` for a planned new adapter."""
    from peft import LoraConfig

    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], use_rslora=lora["use_rslora"], lora_dropout=lora["dropout"],
                      bias=lora["bias"], target_modules=list(lora["target_modules"]),
                      modules_to_save=list(lora["modules_to_save"]) or None, init_lora_weights=INIT[lora["init"]],
                      task_type="CAUSAL_LM", base_model_name_or_path=lora.get("base_model_name_or_path"),
                      revision=lora.get("revision"))


def attach(model, lora: dict | None):
    """`model` with the planned adapter attached (a `peft.PeftModel`), or `model` unchanged if none."""
    if not lora:
        return model
    import torch
    from peft import PeftModel, get_peft_model

    if lora["kind"] == "new":
        config = lora_config(lora)
        if lora.get("base_model_name_or_path"):  # peft copies it into adapter_config.json: the base a saved adapter names
            model.name_or_path = model.config._name_or_path = lora["base_model_name_or_path"]
        # peft creates and initialises A and B on the CPU, then moves them next to their base layer:
        # seeding the CPU generator alone fixes every byte, on any device. fork_rng restores the
        # caller's RNG state afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(lora["random_state"])
            peft_model = get_peft_model(model, config)
    else:
        path = Path(lora["path"])
        if not (path / "adapter_config.json").is_file():
            raise UsageError(f"the LoRA adapter {path} is gone (planned from it earlier). Restore it, or plan the spec again.")
        with torch.random.fork_rng(devices=[]):
            peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=bool(lora["trainable"]))
    return peft_model  # peft froze the base: only the adapter (and modules_to_save, biases per `bias`) trains
