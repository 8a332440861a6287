"""Gradient checkpointing off / on / offload: the same gradients, the layers really recomputed, inputs really offloaded.

Why exact equality (torch.equal), not a tolerance: checkpointing re-runs the very same kernels on
bit-identical inputs, on the same device, with the RNG state of the original forward restored
(dropout included), and CPU kernels are deterministic for equal shapes. The backward pass
therefore sees bit-identical activations, and produces bit-identical gradients.
"""
import pytest
import torch

import loadspec
from loadspec import checkpointing

TEXT = "The train leaves the station at seven in the morning and arrives in the city just after nine."


def gradients(model, ids, seed=0):
    """LoRA gradients of one training step (dropout on, so the RNG replay is part of what is checked)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    return grads


def count_layer_runs(model):
    """How many times decoder layers run (forward and recompute)."""
    calls = []
    for layer in model.get_base_model().model.layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_checkpointing_modes_give_equal_gradients(quant, checkpoint, write_spec, tmp_path, graph_nodes):
    base = checkpoint("llama")
    cache = tmp_path / "cache"
    results, fingerprints = {}, set()
    for mode in (False, True, "offload"):
        spec = write_spec(base, name=f"gc-{mode}", load={"quant": quant, "dtype": "float32"},
                          lora={"r": 8, "dropout": 0.1, "target_modules": "all-linear"}, train={"gradient_checkpointing": mode})
        model, tokenizer = loadspec.load(spec, cache_dir=cache)
        fingerprints.add(loadspec.plan_spec(spec).plan.fingerprint)
        ids = tokenizer([TEXT, TEXT[:40]], return_tensors="pt", padding=True).input_ids
        calls = count_layer_runs(model)
        packed = []
        if mode == "offload":
            offloader = model.get_base_model()._loadspec_offloader
            pack = offloader.pack
            offloader.pack = lambda t: (packed.append(tuple(t.shape)) if t.numel() else None) or pack(t)
        results[mode] = gradients(model, ids)
        layers = len(model.get_base_model().model.layers)
        assert len(calls) == (layers if mode is False else 2 * layers)  # checkpointed layers run again in backward
        if mode == "offload":  # one tensor per layer goes to host memory: its input hidden states
            assert packed == [(2, ids.shape[1], 64)] * layers
        nodes = graph_nodes(model(input_ids=ids, labels=ids).loss)  # one recomputed node per checkpointed layer
        assert nodes.get("_RecomputedBackward", 0) == (0 if mode is False else layers)
    assert len(fingerprints) == 1  # [train] does not change the artifact
    reference = results[False]
    for mode in (True, "offload"):
        assert results[mode].keys() == reference.keys()
        for name, grad in reference.items():
            assert torch.equal(results[mode][name], grad), (mode, name, (results[mode][name] - grad).abs().max())


def test_checkpointing_only_acts_in_training_and_leaves_eval_logits_alone(checkpoint, write_spec, tmp_path):
    base = checkpoint("llama")
    plain, tokenizer = loadspec.load(write_spec(base, name="plain", load={"quant": "none", "dtype": "float32"}, lora={"r": 4}),
                                     cache_dir=tmp_path)
    offload, _ = loadspec.load(write_spec(base, name="off", load={"quant": "none", "dtype": "float32"}, lora={"r": 4},
                                          train={"gradient_checkpointing": "offload"}), cache_dir=tmp_path)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    calls = count_layer_runs(offload)
    with torch.no_grad():
        assert torch.equal(plain.eval()(input_ids=ids).logits, offload.eval()(input_ids=ids).logits)
    assert len(calls) == len(offload.get_base_model().model.layers)


def test_a_layer_whose_keyword_input_needs_grad_falls_back_to_torch_checkpoint():
    """The reentrant node would drop the gradient of a keyword input; torch's checkpoint keeps it."""
    torch.manual_seed(0)
    weight = torch.randn(4, 4, requires_grad=True)
    x, bias = torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True)

    def layer(hidden, bias):
        return torch.tanh(hidden @ weight + bias)
    plain = torch.autograd.grad(layer(x, bias).sum(), (x, bias, weight))
    import functools
    out = checkpointing.checkpointed(None, functools.partial(layer, bias=bias), x)
    assert type(out.grad_fn).__name__ != "_RecomputedBackward"
    for got, want in zip(torch.autograd.grad(out.sum(), (x, bias, weight)), plain):
        assert torch.equal(got, want)
    out = checkpointing.checkpointed(None, functools.partial(layer, bias=bias.detach()), x)  # nothing but x needs grad
    assert type(out.grad_fn).__name__ == "_RecomputedBackward"
    out.sum().backward()  # parameters get their gradients inside the node's own backward: .grad, not autograd.grad
    assert torch.equal(x.grad, plain[0]) and torch.equal(weight.grad, plain[2])


def test_offloader_keeps_host_tensors_as_they_are():
    offloader = checkpointing.ActivationOffloader()
    tensor = torch.randn(2, 3)
    assert offloader.pack(tensor) is tensor and offloader.unpack(tensor) is tensor
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        checkpointing.enable(torch.nn.Linear(1, 1), "unsloth")


@pytest.mark.gpu
def test_offload_on_cuda_moves_layer_inputs_to_pinned_host_memory_with_equal_gradients(checkpoint, write_spec, tmp_path):
    base = checkpoint("llama")
    results, after_forward = {}, {}
    for mode in (False, True, "offload"):
        spec = write_spec(base, name=f"cuda-{mode}", load={"quant": "none", "dtype": "float32"},
                          lora={"r": 8, "dropout": 0.1}, train={"gradient_checkpointing": mode})
        model, tokenizer = loadspec.load(spec, cache_dir=tmp_path, device="cuda:0")
        ids = torch.randint(3, 500, (4, 4096), device="cuda:0")
        model.train()
        stashes = []
        if mode == "offload":
            offloader = model.get_base_model()._loadspec_offloader
            pack = offloader.pack
            offloader.pack = lambda t: stashes.append(pack(t)) or stashes[-1]  # empty placeholders come back as they are
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.manual_seed(0)
        loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
        torch.cuda.synchronize()
        after_forward[mode] = torch.cuda.memory_allocated() - before
        if mode == "offload":
            moved = [s for s in stashes if isinstance(s, checkpointing._Stash)]
            assert len(moved) == 2 and all(s.host.is_pinned() and s.host.device.type == "cpu" for s in moved)
        loss.backward()
        results[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        del model, loss
        torch.cuda.empty_cache()
    layer_input = 4 * 4096 * 64 * 4  # batch x sequence x hidden x float32
    # Every layer's input left the GPU, but the first one's still has a GPU owner: it is the embeddings' output,
    # which enable_input_require_grads made a leaf that autograd keeps whatever checkpointing does.
    assert after_forward[True] - after_forward["offload"] >= 0.95 * layer_input * (2 - 1)
    assert after_forward[False] > after_forward[True]
    for mode in (True, "offload"):
        for name, grad in results[False].items():
            assert torch.equal(results[mode][name], grad), (mode, name)
