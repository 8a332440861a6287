"""The plan's patch list, applied by `load` and removable: a patched tiny model gives the unpatched model's
logits, loss and gradients, and `unpatch` restores it exactly.

The Triton kernels run through triton's interpreter here (TRITON_INTERPRET=1, set before loadspec.kernels is
imported; tests/kernels/conftest.py sets it too). Tolerances, float32 models: logits and loss 1e-4, parameter
gradients 1e-4 relative / 1e-5 absolute (two decoder layers of kernels that sum in another order than torch);
bfloat16 models: 5e-2 on logits (bf16 roundings at different places, compounded over the layers)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import loadspec  # noqa: E402
from loadspec import arch, patches  # noqa: E402
from loadspec import kernels  # noqa: E402

EXPECTED = {
    "llama": ["rmsnorm", "swiglu", "rope", "cross_entropy", "lora"],
    "gemma": ["rmsnorm_plus_one", "geglu", "rope", "cross_entropy", "lora"],
    "gemma2": ["rmsnorm_plus_one", "geglu", "rope", "cross_entropy", "lora"],
    "cohere": ["swiglu", "cross_entropy", "lora"],  # LayerNorm, interleaved RoPE: no kernel yet
    "falcon": ["cross_entropy", "lora"],
}


@pytest.mark.parametrize("family", arch.families(), ids=lambda f: f.name)
def test_plan_chooses_patches_per_family_naming_real_classes(family):
    import importlib

    import transformers

    chosen, why = patches.choose(family, family.model_types[0])
    if family.name in EXPECTED:
        assert [p["kernel"] for p in chosen] == EXPECTED[family.name]
    for patch in chosen:
        assert patch["version"] == kernels.versions()[patch["kernel"]]
        assert f"{patch['kernel']} on {patch['module']}" in why
        if patch["kernel"] == "lora":
            continue  # peft's LoRA layers, whatever the family
        assert hasattr(transformers, patch["module"]) or importlib.import_module(  # the class exists in transformers
            f"transformers.models.{family.name}.modeling_{family.name}").__dict__.get(patch["module"]), patch


def test_patches_recorded_in_plan_not_in_fingerprint(checkpoint, write_spec, tmp_path):
    source = checkpoint("llama")
    off = loadspec.plan_spec(write_spec(source, name="off", load={"quant": "none"})).plan
    on = loadspec.plan_spec(write_spec(source, name="on", load={"quant": "none"}, train={"kernels": True})).plan
    assert off.fingerprint == on.fingerprint
    assert on.train["kernels"] is True and "kernels" not in off.train
    assert [p["module"] for p in on.patches] == ["LlamaRMSNorm", "LlamaMLP", "LlamaAttention", "LlamaForCausalLM", "LoraLayer"]
    assert on.patches == off.patches  # chosen per family; [train] kernels only decides whether load applies them
    assert dict(on.reasons)["patches"].startswith("rmsnorm on LlamaRMSNorm")
    assert type(on).from_json(on.to_json()).patches == on.patches


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def _run(model, ids, labels):
    """(eval-mode logits, training loss, training gradients); a patched model trains without making logits."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.train()
    return logits, out.loss.detach().clone(), grads, out.logits


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_patched_model_matches_unpatched_and_unpatch_restores(family, checkpoint, write_spec, tmp_path, monkeypatch):
    assert kernels.INTERPRET and kernels.HAVE_TRITON, "the Triton path should run (interpreted) in this test"
    spec = write_spec(checkpoint(family), name=family, load={"quant": "none", "dtype": "float32"})
    model, _ = loadspec.load(spec, cache_dir=tmp_path / "cache")
    assert patches.patched(model) == []
    model.train()
    ids, labels = _batch(model.config.vocab_size)
    before = _run(model, ids, labels)
    originals = {name: module.__dict__.get("forward") for name, module in model.named_modules()}
    modeling = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
    rope_fn = modeling.apply_rotary_pos_emb

    applied = patches.apply(model, loadspec.plan_spec(spec).plan.patches)
    assert {p["kernel"]: p["count"] for p in applied} == {
        EXPECTED[family][0]: 2 * model.config.num_hidden_layers + 1,  # input + post-attention per layer, final norm
        EXPECTED[family][1]: model.config.num_hidden_layers, "rope": model.config.num_hidden_layers, "cross_entropy": 1,
        "lora": 0}  # no adapter attached: nothing for the lora patch
    assert modeling.apply_rotary_pos_emb is not rope_fn
    import importlib

    triton_calls = {}
    for name in ("rmsnorm", "rope", "swiglu", "cross_entropy"):  # spy: each kernel module really took the Triton path
        module = importlib.import_module(f"loadspec.kernels.{name}")

        def spy(*tensors, _name=name, _real=module.use_triton):
            triton_calls[_name] = triton_calls.get(_name, 0) + bool(_real(*tensors))
            return _real(*tensors)
        monkeypatch.setattr(module, "use_triton", spy)
    after = _run(model, ids, labels)
    assert all(triton_calls.get(name) for name in ("rmsnorm", "rope", "swiglu", "cross_entropy")), triton_calls
    assert before[3] is not None and after[3] is None  # training with labels: the LM head is fused into the loss
    torch.testing.assert_close(after[0], before[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after[1], before[1], rtol=1e-4, atol=1e-4)
    assert after[2].keys() == before[2].keys()
    for name in before[2]:
        torch.testing.assert_close(after[2][name], before[2][name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")

    removed = patches.unpatch(model)
    assert [p["kernel"] for p in removed] == EXPECTED[family]
    assert {name: module.__dict__.get("forward") for name, module in model.named_modules()} == originals
    assert "_loss_function" not in model.__dict__ and modeling.apply_rotary_pos_emb is rope_fn
    restored = _run(model, ids, labels)
    assert torch.equal(restored[0], before[0]) and torch.equal(restored[1], before[1])  # bit-identical again
    assert all(torch.equal(restored[2][n], before[2][n]) for n in before[2])


def test_load_applies_patches_when_asked(checkpoint, write_spec, tmp_path):
    source = checkpoint("llama")
    asked = write_spec(source, name="asked", load={"quant": "none"}, train={"kernels": True})
    model, _ = loadspec.load(asked, cache_dir=tmp_path / "cache")
    assert [p["kernel"] for p in patches.patched(model)] == EXPECTED["llama"]
    model_off, _ = loadspec.load(asked, cache_dir=tmp_path / "cache", patch=False)
    assert patches.patched(model_off) == []
    plain = write_spec(source, name="plain", load={"quant": "none"})
    model_on, _ = loadspec.load(plain, cache_dir=tmp_path / "cache", patch=True)
    assert len(patches.patched(model_on)) == 5
    # bfloat16 (the CPU default): patched and unpatched agree within bf16 tolerance
    ids, labels = _batch(model.config.vocab_size)
    with torch.no_grad():
        ours = model_on(input_ids=ids, labels=labels)
        theirs = model_off(input_ids=ids, labels=labels)
    torch.testing.assert_close(ours.logits.float(), theirs.logits.float(), rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-2, atol=1e-2)
    patches.unpatch(model)
    patches.unpatch(model_on)


def test_unknown_kernel_or_module_leaves_model_unpatched(checkpoint, write_spec, tmp_path):
    from loadspec.errors import LoadspecError

    model, _ = loadspec.load(write_spec(checkpoint("llama"), load={"quant": "none"}), cache_dir=tmp_path / "cache")
    good = {"module": "LlamaRMSNorm", "kernel": "rmsnorm", "version": "1"}
    with pytest.raises(LoadspecError, match="no GemmaMLP module"):
        patches.apply(model, [good, {"module": "GemmaMLP", "kernel": "geglu", "version": "1"}])
    with pytest.raises(LoadspecError, match="does not have"):
        patches.apply(model, [good, {"module": "LlamaMLP", "kernel": "fancy", "version": "1"}])
    assert patches.patched(model) == []
    assert all("forward" not in m.__dict__ for m in model.modules())


class _Float32Matmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the matmuls computed in float32 (where the adapter's compute dtype shows)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm) and out.dtype == torch.float32:
            self.count += 1
        return out


def _float32_matmuls(model, ids) -> int:
    with _Float32Matmuls() as counter, torch.no_grad():
        model(input_ids=ids)
    return counter.count


def _lora_step(model, ids, labels, fused_nodes=None, graph_nodes=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks on both sides
    out = model(input_ids=ids, labels=labels)
    if fused_nodes is not None:
        assert graph_nodes(out.loss).get("_LoraLinearBackward", 0) == fused_nodes
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("quant,dropout", [("none", 0.0), ("nf4", 0.0), ("nf4", 0.1)])
def test_lora_patch_matches_peft_and_unpatches(quant, dropout, checkpoint, write_spec, tmp_path, graph_nodes):
    spec = write_spec(checkpoint("llama"), name=f"lora_{quant}", load={"quant": quant, "dtype": "float32"},
                      lora={"r": 8, "alpha": 16, "dropout": dropout, "target_modules": "all-linear"})
    model, _ = loadspec.load(spec, cache_dir=tmp_path / "cache", patch=False)
    model.train()
    ids, labels = _batch(model.config.vocab_size)
    before = _lora_step(model, ids, labels, fused_nodes=0, graph_nodes=graph_nodes)
    applied = patches.apply(model, [{"module": "LoraLayer", "kernel": "lora", "version": kernels.versions()["lora"]}])
    assert applied[0]["count"] == 7 * model.config.num_hidden_layers  # q k v o gate up down in every layer
    after = _lora_step(model, ids, labels, fused_nodes=applied[0]["count"], graph_nodes=graph_nodes)  # training: one node per LoRA layer
    torch.testing.assert_close(after[0], before[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[1], before[1], rtol=1e-5, atol=1e-5)
    assert after[2].keys() == before[2].keys() and all("lora_" in n for n in after[2])
    for name in before[2]:
        torch.testing.assert_close(after[2][name], before[2][name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    with model.disable_adapter(), torch.no_grad():  # adapters off: peft's own path, the base model's logits
        base_logits = model(input_ids=ids).logits
    patches.unpatch(model)
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base_logits)
    restored = _lora_step(model, ids, labels)
    assert torch.equal(restored[0], before[0]) and all(torch.equal(restored[2][n], before[2][n]) for n in before[2])


def test_lora_patch_computes_the_adapter_in_bf16_from_float32_weights(checkpoint, write_spec, tmp_path):
    spec = write_spec(checkpoint("llama"), name="lora_bf16", load={"quant": "none", "dtype": "bfloat16"},
                      lora={"r": 8, "alpha": 16, "target_modules": "all-linear"})
    model, _ = loadspec.load(spec, cache_dir=tmp_path / "cache", patch=False)
    model.train()
    ids, labels = _batch(model.config.vocab_size)
    adapter = [p for n, p in model.named_parameters() if p.requires_grad]
    assert {p.dtype for p in adapter} == {torch.float32}  # peft keeps the adapter's master weights in float32
    with model.disable_adapter():
        base = _float32_matmuls(model, ids)  # the model's own (RoPE frequencies are computed in float32)
    assert _float32_matmuls(model, ids) == base + 2 * 7 * model.config.num_hidden_layers  # peft: A and B in float32
    before = _lora_step(model, ids, labels)
    patches.apply(model, [{"module": "LoraLayer", "kernel": "lora", "version": kernels.versions()["lora"]}])
    assert _float32_matmuls(model, ids) == base  # the adapter now runs in bf16
    after = _lora_step(model, ids, labels)
    assert {after[2][n].dtype for n in after[2]} == {torch.float32}  # gradients land on the float32 masters
    torch.testing.assert_close(after[0].float(), before[0].float(), rtol=2e-2, atol=2e-2)
    for name in before[2]:  # bf16 adapter matmuls: gradients agree to bf16 precision
        torch.testing.assert_close(after[2][name], before[2][name], rtol=5e-2, atol=5e-3, msg=lambda m: f"{name}: {m}")


class _OneLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.q_proj(x)


def _one_lora_layer():
    """A peft LoRA model around one Linear (random B, so the adapter changes the output), seeded."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(_OneLinear(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))


def test_lora_patch_under_an_accelerate_hook_falls_back_without_recursing():
    """A dispatched model's layers carry accelerate hooks: the patch replaces the module's own forward
    (`_old_forward`), and its fallback to peft (adapters disabled) calls that one, not the hook again."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = _one_lora_layer()
    add_hook_to_module(model.base_model.model.q_proj, ModelHook())
    x = torch.randn(3, 8)
    adapted = model(x)
    with model.disable_adapter():
        base = model(x)
    assert patches.apply(model, [{"module": "LoraLayer", "kernel": "lora", "version": kernels.versions()["lora"]}])[0]["count"] == 1
    torch.testing.assert_close(model(x), adapted, rtol=1e-6, atol=1e-6)
    with model.disable_adapter():
        assert torch.equal(model(x), base)


def test_lora_patch_keeps_peft_path_for_layers_it_cannot_fuse(graph_nodes):
    """The fused node only stands in for a frozen, hook-free base layer: a forward hook on it, a trainable base
    weight or bias, or an accelerate hook on it send the call back to peft, whose gradients reach the base."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    def fused_nodes(model):
        return graph_nodes(model(torch.randn(3, 8)).sum()).get("_LoraLinearBackward", 0)

    def patched():
        model = _one_lora_layer()
        patches.apply(model, [{"module": "LoraLayer", "kernel": "lora", "version": kernels.versions()["lora"]}])
        return model, model.base_model.model.q_proj.base_layer

    model, base = patched()
    assert fused_nodes(model) == 1
    handle = base.register_forward_hook(lambda module, args, out: out)
    assert fused_nodes(model) == 0
    handle.remove()
    assert fused_nodes(model) == 1
    base.weight.requires_grad_(True)
    assert fused_nodes(model) == 0
    model(torch.randn(3, 8)).sum().backward()
    assert base.weight.grad is not None  # peft's path trains the unfrozen base weight
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(True)
    assert fused_nodes(model) == 0
    model, base = patched()
    add_hook_to_module(base, ModelHook())
    assert fused_nodes(model) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lora_patch_on_a_4bit_gpu_model_matches_peft_and_unpatch_frees_the_kept_absmax(checkpoint, write_spec, tmp_path, graph_nodes):
    from loadspec.kernels import lora as lora_kernel

    spec = write_spec(checkpoint("llama"), name="lora_gpu_nf4", load={"quant": "nf4", "dtype": "bfloat16"},
                      lora={"r": 8, "alpha": 16, "target_modules": "all-linear"})
    model, _ = loadspec.load(spec, cache_dir=tmp_path / "cache", device="cuda:0", patch=False)
    model.train()
    ids, labels = (t.cuda() for t in _batch(model.config.vocab_size))
    before = _lora_step(model, ids, labels, fused_nodes=0, graph_nodes=graph_nodes)
    applied = patches.apply(model, [{"module": "LoraLayer", "kernel": "lora", "version": kernels.versions()["lora"]}])
    after = _lora_step(model, ids, labels, fused_nodes=applied[0]["count"], graph_nodes=graph_nodes)
    torch.testing.assert_close(after[0], before[0], rtol=2e-2, atol=2e-2)  # bf16 adapters vs autocast's, 2 layers
    for name in before[2]:
        torch.testing.assert_close(after[2][name], before[2][name], rtol=5e-2, atol=5e-3, msg=lambda m: f"{name}: {m}")
    states = [m.base_layer.weight.quant_state for m in patches._lora_layers(model)]
    assert states and all(hasattr(s, lora_kernel._LAUNCH_ATTR) for s in states)  # float32 absmax kept per layer
    again = _lora_step(model, ids, labels)
    assert torch.equal(again[0], after[0])  # from the kept absmax: the same numbers as the step that made them
    patches.unpatch(model)
    assert not any(hasattr(s, lora_kernel._LAUNCH_ATTR) for s in states)
