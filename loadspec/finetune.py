"""Full fine-tuning (`[load] full_finetuning`): which weights train, which stay frozen, and why.

Planning only. The loader makes every floating-point parameter trainable; quantized weights
(bitsandbytes `Params4bit` / `Int8Params`) carry no gradients, so on a 4/8-bit model the 16-bit
ones train — embeddings, norms, the LM head, biases — and the quantized ones stay frozen.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from . import arch
    from .source import Source
    from .spec import Spec


def full_finetuning_reasons(spec: "Spec", skeleton: "arch.Skeleton", source: "Source",
                            quantized: tuple[str, ...]) -> list[tuple[str, str]]:
    """The plan's reason line for full fine-tuning (none when it is off)."""
    if not spec.load.full_finetuning:
        return []
    quantized_modules = set(quantized)
    frozen = [name for name in skeleton.parameters if name.endswith(".weight") and name[: -len(".weight")] in quantized_modules]
    frozen_set = set(frozen)
    trainable = [name for name in skeleton.parameters if name not in frozen_set]

    def count(names) -> int:
        return sum(math.prod(source.tensors[n].shape) for n in names if n in source.tensors)

    total = count(skeleton.parameters)
    share = f"{count(trainable):,} of {total:,} weights" + (f" ({100 * count(trainable) / total:.1f}%)" if total else "")
    if not frozen:
        return [("full finetuning", f"every parameter trains ({share}); no adapter")]
    return [("full finetuning", f"quant = \"{spec.load.quant}\" asked with full_finetuning: {len(trainable)} 16-bit parameters "
                                f"train ({_kinds(trainable)}; {share}); the {len(frozen)} quantized Linear weights "
                                f"({_kinds(frozen)}) stay frozen: bitsandbytes-quantized weights carry no gradients. "
                                "For every weight to train, set quant = \"none\"")]


def _kinds(names: list[str]) -> str:
    """Distinct parameter names with the layer number dropped ('input_layernorm.weight', 'lm_head.weight', ...)."""
    short = dict.fromkeys(".".join(name.split(".")[-2:]) for name in names)
    return ", ".join(short)
