"""`python -m loadspec.kernel_warmup FOLDER PLAN.json OUT.json`: compile the plan's patched kernels.

Runs each patched kernel forward and backward on a one-layer copy of the model in FOLDER/config.json,
on this GPU, in the plan's dtype, as QLoRA trains (frozen weights, gradients through the activations)
and as full fine-tuning does (every weight trainable); Triton writes what it compiles into
$TRITON_CACHE_DIR. OUT.json lists each compiled variant with its launch settings. Every layer of a
model has the same shapes, so one layer compiles what the whole model runs; token counts that are
multiples of 16 share these binaries (Triton specialises integer arguments on divisibility by 16).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

WARMUP_TOKENS = 256


def _one_layer_config(config: dict) -> dict:
    config = dict(config, num_hidden_layers=1)
    for key in ("layer_types", "sliding_window_pattern"):
        if isinstance(config.get(key), list):
            config[key] = config[key][:1]
    return config


def main(folder: str, plan_path: str, out: str) -> None:
    import torch
    import triton

    from . import arch, patches
    from .plan import LoadPlan

    plan = LoadPlan.from_json(Path(plan_path).read_text())
    variants: list[dict] = []

    def listen(*, src, metadata, metadata_group, times, cache_hit):
        constants = {str(k): v for k, v in getattr(src, "constants", {}).items() if isinstance(v, (int, float, bool, str))}
        variants.append({"kernel": metadata.get("name"), "num_warps": metadata.get("num_warps"),
                         "num_stages": metadata.get("num_stages"), "constants": constants, "key": metadata.get("hash")})
    triton.knobs.compilation.listener = listen

    config = _one_layer_config(json.loads((Path(folder) / "config.json").read_text()))
    dtype = getattr(torch, plan.dtype)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = __import__("transformers").AutoModelForCausalLM.from_config(arch.hf_config(config), dtype=dtype)
    model.train()
    patches.apply(model, plan.patches)
    ids = torch.randint(0, model.config.vocab_size, (1, WARMUP_TOKENS), device="cuda")
    for trainable in (False, True):  # QLoRA: gradients through activations only; full fine-tuning: every weight
        for parameter in model.parameters():
            parameter.requires_grad_(trainable)
        embeddings = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=embeddings, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    Path(out).write_text(json.dumps({"warmup_tokens": WARMUP_TOKENS,
                                     "variants": sorted(variants, key=lambda v: (v["kernel"] or "", v["key"] or ""))}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
