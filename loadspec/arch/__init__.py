"""Per-family facts the planner needs: one small module per model family.

Each module defines `FAMILY`, a `Family` record. `for_model_type` finds the one for a
config's `model_type`, or says which families are supported.
"""
from __future__ import annotations

import importlib
import json

import attrs

from ..errors import UsageError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
GATED_MLP = ("gate_proj", "up_proj", "down_proj")


@attrs.frozen
class Family:
    """What a model family needs from a loader."""

    name: str
    model_types: tuple[str, ...]
    keep_unquantized: tuple[str, ...] = ("lm_head",)  # module names never quantized
    fp16_overflows: bool = False  # activations overflow float16: use float32 where bf16 is unavailable
    attention_modules: tuple[str, ...] = ATTENTION  # default LoRA targets (attention)
    mlp_modules: tuple[str, ...] = GATED_MLP  # default LoRA targets (MLP)
    norm: str = "rmsnorm"  # rmsnorm | rmsnorm_plus_one | layernorm
    activation: str = "swiglu"  # swiglu | geglu | gelu
    notes: str = ""


MODULES = ("llama", "mistral", "gemma", "gemma2", "gemma3", "qwen2", "qwen3", "cohere", "granite", "falcon")


def families() -> list[Family]:
    """Every supported family, in a fixed order."""
    return [importlib.import_module(f"{__name__}.{name}").FAMILY for name in MODULES]


def for_model_type(model_type: str) -> Family:
    """The family whose configs carry this `model_type`."""
    for family in families():
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in families() for t in f.model_types)
    raise UsageError(f"model_type {model_type!r} is not a supported family (supported: {known}). "
                     "Open an issue with the model's config.json to ask for it.")


def module_matches(module: str, pattern: str) -> bool:
    """Whether `pattern` names `module`: the whole dotted name, a trailing part of it, or a prefix block."""
    return module == pattern or module.endswith("." + pattern) or module.startswith(pattern + ".")


@attrs.frozen
class Skeleton:
    """A model's structure from its config alone (built on the meta device, no weights)."""

    parameters: tuple[str, ...]  # parameter names in model order, tied duplicates once
    linears: tuple[str, ...]  # names of nn.Linear modules
    tied: tuple[tuple[str, str], ...]  # (alias, parameter it shares storage with)


def hf_config(config: dict):
    """A transformers config object from a config.json dict."""
    from transformers import AutoConfig

    data = dict(config)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise UsageError("config.json has no model_type; loadspec cannot tell which family it is.")
    return AutoConfig.for_model(model_type, **data)


def skip_weight_init():
    """A context in which transformers and torch.nn.init skip random initialisation
    (weights are about to be replaced, or live on the meta device)."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    return no_init_weights()


def skeleton(config: dict) -> Skeleton:
    """Module and parameter names of the model this config describes (memoized per config)."""
    key = json.dumps(config, sort_keys=True)
    if key not in _skeletons:
        _skeletons[key] = _build_skeleton(config)
    return _skeletons[key]


_skeletons: dict[str, Skeleton] = {}


def skeleton_to_json(value: Skeleton) -> str:
    return json.dumps(attrs.asdict(value))


def skeleton_from_json(text: str) -> Skeleton:
    data = json.loads(text)
    return Skeleton(tuple(data["parameters"]), tuple(data["linears"]), tuple(tuple(t) for t in data["tied"]))


def _build_skeleton(config: dict) -> Skeleton:
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), skip_weight_init():
        model = AutoModelForCausalLM.from_config(hf_config(config))
    model.tie_weights()  # part of the initialisation skipped above
    seen: dict[int, str] = {}
    names, tied = [], []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.append((name, seen[id(param)]))
        else:
            seen[id(param)] = name
            names.append(name)
    linears = tuple(name for name, module in model.named_modules() if isinstance(module, nn.Linear))
    return Skeleton(tuple(names), linears, tuple(tied))
