"""Sources stored already quantized by bitsandbytes (transformers' `save_pretrained` of a 4-bit or 8-bit model).

Their weights are reused as stored: the plan takes the quantization settings from the source's config.json
`quantization_config` and tensor headers (the source's settings win over the spec's defaults; a spec that
explicitly asks for something else is refused), and the build copies the stored tensors, whose layout is
loadspec's own, into the artifact without dequantizing or re-quantizing them.
"""
from __future__ import annotations

import math

import torch

from . import arch, fp8
from .errors import UsageError
from .quant import BLOCKSIZES
from .source import Source
from .spec import Spec

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
QUANT_SUFFIXES = ("", ".absmax", ".quant_map")
NESTED_SUFFIXES = (".nested_absmax", ".nested_quant_map")


def quantized_names(weight: str, quant: dict) -> list[str]:
    """The keys of one quantized weight ('x.weight'), in the layout transformers saves for its method."""
    module = weight[: -len(".weight")]
    if quant["method"] == "int8":
        return [weight, f"{module}.SCB", f"{module}.weight_format"]  # bitsandbytes' Linear8bitLt state dict
    if quant["method"] == "fp8":
        return [weight, f"{module}.{fp8.scale_name(quant['scaling'])}"]
    suffixes = QUANT_SUFFIXES + (NESTED_SUFFIXES if quant["double_quant"] else ())
    return [weight + s for s in suffixes] + [f"{weight}.quant_state.bitsandbytes__{quant['method']}"]


def plan_quant(spec: Spec, skeleton: arch.Skeleton, source: Source, reasons: list) -> tuple[dict, tuple[str, ...]]:
    """The source's own quantization and quantized Linear layers; raises UsageError on a conflicting spec."""
    quant = _settings(source)
    method = quant["method"]
    marker = "{}.SCB" if method == "int8" else "{}.weight.quant_state.bitsandbytes__" + method
    quantized = tuple(name for name in skeleton.linears if marker.format(name) in source.tensors)
    if not quantized:
        raise UsageError(f"{source.location}: its config.json says bitsandbytes {method}, but no Linear weight is stored that way "
                         "(the checkpoint does not match its config). Re-save it, or point source at the unquantized model.")
    missing = [n for name in quantized for n in quantized_names(f"{name}.weight", quant) if n not in source.tensors]
    if missing:
        raise UsageError(f"{source.location}: the pre-quantized checkpoint lacks {missing[0]} ({len(missing)} tensor(s) missing); "
                         "it is incomplete. Re-save it, or point source at the unquantized model.")
    kept = [name for name in skeleton.linears if name not in quantized]
    quant["skip_modules"] = kept
    if method != "int8":
        quant["blocksize"] = _blocksize(source, f"{quantized[0]}.weight")
    _check_spec(spec, quant, quantized, source.location)
    if method == "int8":
        what = f"LLM.int8, outlier threshold {quant['threshold']:g}"
    else:
        what = (f"blocksize {quant['blocksize']}, double quant {'on' if quant['double_quant'] else 'off'}, "
                f"compute dtype {quant['compute_dtype']}")
    reasons.append(("quant", f"{method} from the pre-quantized source (its quantization_config wins over the spec's defaults; "
                             f"stored tensors copied, not re-quantized): {what}; {len(quantized)} of {len(skeleton.linears)} Linear layers"))
    reasons.append(("kept 16-bit", (", ".join(kept) or "none") + " (as stored in the source)"))
    return quant, quantized


def _settings(source: Source) -> dict:
    """The plan's quant dict (without the module lists) from the source's quantization_config."""
    config = source.config["quantization_config"] or {}
    method = config.get("quant_method")
    if method != "bitsandbytes":
        raise UsageError(f"{source.location} is already quantized ({method}); loadspec reuses bitsandbytes 4-bit and 8-bit "
                         "checkpoints only. Point source at the unquantized model.")
    if config.get("load_in_8bit"):
        return {"method": "int8", "threshold": float(config.get("llm_int8_threshold", 6.0)), "storage": "int8", "prequantized": True}
    if not config.get("load_in_4bit"):
        raise UsageError(f"{source.location}: its bitsandbytes quantization_config sets neither load_in_4bit nor load_in_8bit; "
                         "fix its config.json, or point source at the unquantized model.")
    storage = config.get("bnb_4bit_quant_storage") or "uint8"
    compute = config.get("bnb_4bit_compute_dtype") or "float32"  # transformers' default
    if storage != "uint8" or compute not in COMPUTE_DTYPES:
        raise UsageError(f"{source.location}: 4-bit storage {storage!r} with compute dtype {compute!r} is not supported yet "
                         f"(loadspec reuses uint8 storage computing in {', '.join(COMPUTE_DTYPES)}). "
                         "Point source at the unquantized model.")
    return {"method": config.get("bnb_4bit_quant_type") or "fp4", "double_quant": bool(config.get("bnb_4bit_use_double_quant")),
            "compute_dtype": compute, "storage": "uint8", "prequantized": True}


def _blocksize(source: Source, weight: str) -> int:
    """Values per absmax, from the header shapes: the packed weight holds 2 values a byte."""
    values = 2 * math.prod(source.tensors[weight].shape)
    blocks = math.prod(source.tensors[f"{weight}.absmax"].shape)
    for size in BLOCKSIZES:
        if -(-values // size) == blocks:
            return size
    raise UsageError(f"{source.location}: {weight} has {blocks} absmax values for {values} 4-bit values, which fits no "
                     "bitsandbytes blocksize; the checkpoint is damaged.")


def _check_spec(spec: Spec, quant: dict, quantized: tuple[str, ...], location: str) -> None:
    """Refuse what the spec explicitly asks for that the stored weights are not."""
    method = quant["method"]
    stored = f"stored pre-quantized in {method}" + (f" (double quant {'on' if quant['double_quant'] else 'off'})" if method != "int8" else "")
    reuse = ("loadspec reuses quantized weights as stored and never dequantizes them to quantize again. Point source at "
             "the unquantized model to get that")
    explicit = {key.removeprefix("load.") for key in spec.lines if key.startswith("load.")}
    if spec.load.full_finetuning and spec.load.quant != method:
        raise UsageError(f"{location} is {stored}, but full_finetuning without quant = \"{method}\" trains every weight in 16 bits; "
                         f"{reuse}, or write quant = \"{method}\" to train the 16-bit weights with the quantized ones frozen.")
    if "quant" in explicit and spec.load.quant != method:
        raise UsageError(f"{location} is {stored}, but the spec asks for quant = \"{spec.load.quant}\"; {reuse}, or "
                         f"remove quant from [load] (or write quant = \"{method}\") to use the source's {method} weights.")
    if "double_quant" in explicit and (method == "int8" or spec.load.double_quant != quant["double_quant"]):
        raise UsageError(f"{location} is {stored}, but the spec asks for double_quant = {str(spec.load.double_quant).lower()}; "
                         f"{reuse}, or remove double_quant from [load].")
    for pattern in spec.load.skip_modules:
        hit = next((name for name in quantized if arch.module_matches(name, pattern)), None)
        if hit:
            raise UsageError(f"{location} is {stored}, and load.skip_modules {pattern!r} names {hit}, which the source stores "
                             f"quantized; {reuse} module in 16 bits, or remove {pattern!r} from skip_modules.")


def copied_names(plan) -> set[str]:
    """The stored keys a build copies unchanged from a pre-quantized source (none for other sources)."""
    if not plan.quant.get("prequantized"):
        return set()
    return {n for name in plan.quantized for n in quantized_names(f"{name}.weight", plan.quant)}


def stored_bytes(source: Source, weight: str, quant: dict) -> int:
    """Bytes the source stores for one quantized weight (packed values and their statistics)."""
    return sum(math.prod(info.shape) * getattr(torch, info.dtype).itemsize
               for info in (source.tensors[n] for n in quantized_names(weight, quant)))
