"""The plan's patch list: which fused kernel replaces which module's computation, applied to a loaded
model and removable again.

`choose(family, model_type)` decides the list (pure; the plan records it, outside the fingerprint:
patches never change an artifact's bytes). `apply(model, patches)` swaps in the kernels per module
instance — never on the transformers classes, so other models in the process are untouched — and
`unpatch(model)` restores every module exactly as it was (the same forward objects).

What each patch replaces:
  rmsnorm / rmsnorm_plus_one  the `*RMSNorm` modules' forward (Llama form / Gemma's `1 + weight`)
  swiglu / geglu              the gated `*MLP` forward: down_proj(act(gate_proj(x)) * up_proj(x)), act fused
  rope                        `apply_rotary_pos_emb` while this model's `*Attention` modules run
  cross_entropy               the `*ForCausalLM` loss (transformers' ForCausalLMLoss without its float32 logits copy);
                              training with labels also fuses the LM head into the loss (no full logits; `logits` is None)
  lora                        peft's LoRA Linear layers (plain, 4-bit, 8-bit): the adapter runs in the activations' dtype
                              from its float32 weights (cast per call, as autocast does). peft instead casts the
                              activations to float32, runs both adapter matmuls there and clones the base output: on the
                              H100 that was ~1/3 of a 1B QLoRA step's GPU time. When training a single adapter on a
                              frozen Linear or Linear4bit (or running > 512 rows without autograd, as a checkpointed
                              layer's first forward does), base matmul and adapter are one autograd node
                              (`kernels.lora.lora_linear`: the per-layer Python and dispatch work of peft and
                              bitsandbytes, not the GPU, set that step's time); otherwise the adapter's scaled output is
                              added inside the second matmul. DoRA, LoRA biases, merged or mixed-batch adapters keep
                              peft's path. Applies to the adapter layers present when the patches are applied.
On a CPU without `TRITON_INTERPRET=1` the kernels fall back to their torch references.
"""
from __future__ import annotations

import contextvars
import sys
import types

from .errors import LoadspecError

ROPE_HALF_SPLIT = ("llama", "mistral", "gemma", "gemma2", "gemma3", "qwen2", "qwen3", "granite")  # cohere interleaves; falcon: not checked
PATCHED_ATTR = "_loadspec_patches"
_MISSING = object()


def _kernel_versions() -> dict[str, str]:
    from .kernels import versions

    return versions()


def class_prefix(model_type: str) -> str:
    """'Llama' for llama (from transformers' causal-LM class name, e.g. Gemma3ForCausalLM for gemma3_text)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "")
    if not name.endswith("ForCausalLM"):
        raise LoadspecError(f"transformers has no causal-LM class for model_type {model_type!r}")
    return name[: -len("ForCausalLM")]


def choose(family, model_type: str) -> tuple[tuple[dict, ...], str]:
    """(patches, reason) for a family: one {"module": class name, "kernel": name, "version": VERSION} per kernel."""
    try:
        prefix = class_prefix(model_type)
    except LoadspecError as exc:
        return (), f"none: {exc}"
    versions = _kernel_versions()
    chosen, missing = [], []
    if family.norm in ("rmsnorm", "rmsnorm_plus_one"):
        chosen.append((f"{prefix}RMSNorm", family.norm))
    else:
        missing.append(f"{family.norm} (no kernel yet)")
    if family.activation in ("swiglu", "geglu"):
        chosen.append((f"{prefix}MLP", family.activation))
    else:
        missing.append(f"{family.activation} MLP (no kernel yet)")
    if family.name in ROPE_HALF_SPLIT:
        chosen.append((f"{prefix}Attention", "rope"))
    else:
        missing.append("RoPE (not the half-split form the kernel implements)")
    chosen.append((f"{prefix}ForCausalLM", "cross_entropy"))
    chosen.append((LORA_LAYER, "lora"))
    patches = tuple({"module": module, "kernel": kernel, "version": versions[kernel]} for module, kernel in chosen)
    why = ", ".join(f"{p['kernel']} on {p['module']}" for p in patches)
    why += (f"; not patched: {', '.join(missing)}" if missing else "")
    why += " (applied only when [train] kernels = true or loadspec.load(..., patch=True); not in the fingerprint)"
    return patches, why


# ---- applying -------------------------------------------------------------------------------------------

def _swap(module, attr: str, value) -> callable:
    """Set an instance attribute; return the undo that puts back exactly what was there (or nothing)."""
    old = module.__dict__.get(attr, _MISSING)
    setattr(module, attr, value)

    def undo():
        if old is _MISSING:
            module.__dict__.pop(attr, None)
        else:
            setattr(module, attr, old)
    return undo


def _forward_slot(module) -> str:
    """accelerate's hooks keep the module's own forward as `_old_forward`: replace that one, keep the hook."""
    return "_old_forward" if "_old_forward" in module.__dict__ else "forward"


def _patch_rmsnorm(module, plus_one: bool):
    from .kernels import rmsnorm as k

    fn = k.rmsnorm_plus_one if plus_one else k.rmsnorm
    eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))

    def forward(self, hidden_states):
        return fn(hidden_states, self.weight, eps)
    return _swap(module, _forward_slot(module), types.MethodType(forward, module))


def _mlp_activation(module) -> str:
    """Which of silu / gelu_tanh / gelu the module's act_fn computes (probed numerically, so any spelling of the
    config key or activation class is recognised)."""
    import torch

    from .kernels.swiglu import ACTIVATIONS, reference_glu

    probe = torch.linspace(-6, 6, 97, dtype=torch.float32)
    with torch.no_grad():
        got = module.act_fn(probe)
    for name in ACTIVATIONS:
        if torch.allclose(got, reference_glu(probe, torch.ones_like(probe), name), atol=1e-6, rtol=1e-5):
            return name
    raise LoadspecError(f"{type(module).__name__}.act_fn ({type(module.act_fn).__name__}) is none of {', '.join(ACTIVATIONS)}; "
                        "its MLP cannot be fused. Load without kernels.")


def _patch_mlp(module, kernel: str):
    from .kernels.swiglu import glu

    for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
        if not hasattr(module, name):
            raise LoadspecError(f"{type(module).__name__} has no {name}: not a gated MLP the {kernel} kernel can fuse.")
    activation = _mlp_activation(module)
    if (kernel == "swiglu") != (activation == "silu"):
        raise LoadspecError(f"{type(module).__name__} computes {activation}, but the plan chose {kernel}; re-plan the spec.")

    def forward(self, x):
        return self.down_proj(glu(self.gate_proj(x), self.up_proj(x), activation))
    return _swap(module, _forward_slot(module), types.MethodType(forward, module))


_ROPE_ACTIVE = contextvars.ContextVar("loadspec_rope_active", default=False)
_rope_installs: dict[str, list] = {}  # modeling module name -> [transformers' function, our dispatcher, patched attention count]


def _install_rope_dispatch(modeling) -> None:
    entry = _rope_installs.get(modeling.__name__)
    if entry is None:
        from .kernels import rope as k

        original = modeling.apply_rotary_pos_emb

        def apply_rotary_pos_emb(q, k_, cos, sin, *args, **kwargs):
            plain = len(args) + len(kwargs) <= 1 and set(kwargs) <= {"unsqueeze_dim"}
            if _ROPE_ACTIVE.get() and plain:
                return k.apply_rotary_pos_emb(q, k_, cos, sin, args[0] if args else kwargs.get("unsqueeze_dim", 1))
            return original(q, k_, cos, sin, *args, **kwargs)
        apply_rotary_pos_emb.__wrapped__ = original
        entry = _rope_installs[modeling.__name__] = [original, apply_rotary_pos_emb, 0]
        modeling.apply_rotary_pos_emb = apply_rotary_pos_emb
    entry[2] += 1


def _uninstall_rope_dispatch(modeling) -> None:
    entry = _rope_installs.get(modeling.__name__)
    if entry is None:
        return
    entry[2] -= 1
    if entry[2] <= 0:
        if getattr(modeling, "apply_rotary_pos_emb", None) is entry[1]:  # nobody replaced it after us
            modeling.apply_rotary_pos_emb = entry[0]
        del _rope_installs[modeling.__name__]


def _patch_attention(module):
    """The modeling file's `apply_rotary_pos_emb` becomes a dispatcher that uses the kernel only while a
    patched attention module runs (a context variable), so unpatched models keep transformers' own."""
    modeling = sys.modules[type(module).__module__]
    if not callable(getattr(modeling, "apply_rotary_pos_emb", None)):
        raise LoadspecError(f"{modeling.__name__} has no apply_rotary_pos_emb; the rope kernel cannot patch {type(module).__name__}.")
    _install_rope_dispatch(modeling)
    inner = module.forward  # whatever runs now (the class's forward, or an accelerate hook)

    def forward(self, *args, **kwargs):
        token = _ROPE_ACTIVE.set(True)
        try:
            return inner(*args, **kwargs)
        finally:
            _ROPE_ACTIVE.reset(token)
    undo_forward = _swap(module, "forward", types.MethodType(forward, module))

    def undo():
        undo_forward()
        _uninstall_rope_dispatch(modeling)
    return undo


def _patch_loss(module):
    """The loss without float32 logits; and in training with labels, the LM head fused into the loss."""
    from .kernels.cross_entropy import causal_lm_loss

    if not hasattr(type(module), "loss_function"):
        raise LoadspecError(f"{type(module).__name__} has no loss_function to replace.")
    undo_loss = _swap(module, "_loss_function", causal_lm_loss)  # transformers' `loss_function` property reads it first
    if not _head_fusable(module):
        return undo_loss
    undo_forward = _swap(module, _forward_slot(module), types.MethodType(_fused_head_forward(module), module))

    def undo():
        undo_forward()
        undo_loss()
    return undo


def _head_fusable(module) -> bool:
    """A plain bias-free linear LM head whose logits are not rescaled (Cohere's logit_scale, Granite's logits_scaling)."""
    import torch

    config = module.config
    scaled = getattr(config, "logit_scale", 1.0) not in (None, 1.0) or getattr(config, "logits_scaling", 1.0) not in (None, 1.0)
    head = getattr(module, "lm_head", None)
    decoder = getattr(module, "base_model_prefix", "")
    return not scaled and type(head) is torch.nn.Linear and head.bias is None and bool(decoder) and hasattr(module, decoder)


def _fused_head_forward(module):
    """Training with labels: hidden states -> fused linear cross-entropy, so the [tokens x vocab] logits never exist
    at once (the output's `logits` is None). Anything else runs the model's own forward."""
    import torch
    import torch.nn.functional as F
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from .kernels.cross_entropy import fused_linear_cross_entropy

    inner = getattr(module, _forward_slot(module))
    softcap = getattr(module.config, "final_logit_softcapping", None)

    def forward(self, *args, labels=None, **kwargs):
        if args or labels is None or not (self.training and torch.is_grad_enabled()) or kwargs.get("return_dict") is False:
            return inner(*args, labels=labels, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        out = getattr(self, self.base_model_prefix)(**kwargs)
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].to(out.last_hidden_state.device)
        loss = fused_linear_cross_entropy(out.last_hidden_state, self.lm_head.weight, shifted, softcap=softcap,
                                          reduction="mean" if num_items is None else "sum")
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None),
                                      hidden_states=getattr(out, "hidden_states", None), attentions=getattr(out, "attentions", None))
    return forward


FUSED_MIN_ROWS = 512  # without autograd, fewer rows (decoding) keep bitsandbytes' own path: its 4-bit GEMV kernels win there
LORA_LAYER = "LoraLayer"  # not a class name to match: every peft LoRA Linear layer (see _lora_layers)


def _lora_layers(model) -> list:
    """peft LoRA layers around a Linear, Linear4bit or Linear8bitLt (peft's own classes share those names)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer) and type(m).__name__ in ("Linear", "Linear4bit", "Linear8bitLt")]


def _fusable(base, x) -> bool:
    """A frozen torch Linear or bitsandbytes Linear4bit (computing in `x`'s dtype) without hooks of its own:
    what `kernels.lora.lora_linear` computes in one autograd node. (Asked at every call of every LoRA layer, so it
    reads the module's own dicts and the weight's attributes past bitsandbytes' `__torch_function__`: 22 -> 4 us.)"""
    import torch

    if base._forward_hooks or base._forward_pre_hooks or "_hf_hook" in base.__dict__:
        return False
    weight, bias = base._parameters.get("weight"), base._parameters.get("bias")
    with torch._C.DisableTorchFunctionSubclass():
        if weight is None or weight.requires_grad or (bias is not None and bias.requires_grad):
            return False
        if type(base) is torch.nn.Linear:
            return True
        return (type(base).__name__ == "Linear4bit" and getattr(weight, "quant_state", None) is not None
                and getattr(base, "compute_dtype", None) in (None, x.dtype) and weight.device == x.device)


def _patch_lora(module):
    import torch
    import torch.nn.functional as F

    from .kernels.lora import forget_dequantize_cache, lora_linear

    slot = _forward_slot(module)
    peft_forward = getattr(module, slot)  # under an accelerate hook, the module's own forward: the hook stays outside

    def forward(self, x, *args, **kwargs):
        adapters = [name for name in self.active_adapters if name in self.lora_A]
        if (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or not adapters
                or any(self.use_dora.get(name) or self.lora_B[name].bias is not None for name in adapters)):
            return peft_forward(x, *args, **kwargs)
        if (len(adapters) == 1 and not args and not kwargs and (torch.is_grad_enabled() or x.numel() > FUSED_MIN_ROWS * x.shape[-1])
                and _fusable(self.base_layer, x)):
            name = adapters[0]
            dropout = self.lora_dropout[name]
            x_lora = None if isinstance(dropout, torch.nn.Identity) else dropout(x)
            return lora_linear(x, self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], x_lora)
        result = self.base_layer(x, *args, **kwargs)
        dtype, shape = result.dtype, result.shape
        result = result.reshape(-1, shape[-1])
        for name in adapters:
            down = F.linear(self.lora_dropout[name](x).to(dtype), self.lora_A[name].weight.to(dtype))
            result = torch.addmm(result, down.reshape(-1, down.shape[-1]), self.lora_B[name].weight.to(dtype).t(),
                                 alpha=self.scaling[name])
        return result.view(shape)
    undo_forward = _swap(module, slot, types.MethodType(forward, module))

    def undo():
        undo_forward()
        forget_dequantize_cache(module.base_layer)  # the float32 absmax the fused node kept
    return undo


PATCHERS = {
    "rmsnorm": lambda m: _patch_rmsnorm(m, plus_one=False),
    "rmsnorm_plus_one": lambda m: _patch_rmsnorm(m, plus_one=True),
    "swiglu": lambda m: _patch_mlp(m, "swiglu"),
    "geglu": lambda m: _patch_mlp(m, "geglu"),
    "rope": _patch_attention,
    "cross_entropy": _patch_loss,
    "lora": _patch_lora,
}


def apply(model, patches) -> list[dict]:
    """Apply the plan's patches to `model`'s modules (per instance); returns what was patched, with counts.

    A model already patched is unpatched first. Raises LoadspecError, leaving the model unpatched, when a
    patch names an unknown kernel or matches no module (the plan and this transformers disagree).
    """
    unpatch(model)
    undos, applied = [], []
    try:
        for patch in patches:
            kernel, cls = patch["kernel"], patch["module"]
            if kernel not in PATCHERS:
                raise LoadspecError(f"the plan asks for kernel {kernel!r}, which this loadspec does not have "
                                    f"({', '.join(PATCHERS)}); rebuild the spec with this version.")
            if kernel == "lora":
                modules = _lora_layers(model)
            else:
                modules = [m for _, m in model.named_modules() if type(m).__name__ == cls]
            if not modules and kernel != "lora":
                raise LoadspecError(f"the plan patches {cls} with {kernel}, but the model has no {cls} module "
                                    "(another transformers version?). Re-plan the spec, or load without kernels.")
            for module in modules:
                undos.append(PATCHERS[kernel](module))
            applied.append({**patch, "count": len(modules)})
    except Exception:
        for undo in reversed(undos):
            undo()
        raise
    setattr(model, PATCHED_ATTR, (undos, applied))
    return applied


def patched(model) -> list[dict]:
    """The patches applied to `model` (empty if none)."""
    return list(getattr(model, PATCHED_ATTR, ((), []))[1])


def unpatch(model) -> list[dict]:
    """Undo `apply`: every module gets back exactly the forward (and loss function) it had. Returns what was removed."""
    undos, applied = model.__dict__.pop(PATCHED_ATTR, ((), []))
    for undo in reversed(undos):
        undo()
    return list(applied)
