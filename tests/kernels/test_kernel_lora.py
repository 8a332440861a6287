"""The fused LoRA linear node vs the same computation as separate torch ops (CPU; CUDA on the GPU).

Forward values and the gradients of x, A and B agree within float32 (CPU) or bf16 (GPU) rounding; the
4-bit weight it dequantizes on the GPU is bit for bit bitsandbytes' own."""
import pytest
import torch

from loadspec.kernels import lora as k

F = pytest.importorskip("bitsandbytes.functional")
bnb = pytest.importorskip("bitsandbytes")


def _layer(kind, bias, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(96, 80, bias=bias).to(dtype)
    if kind == "linear":
        layer = dense
    else:
        layer = bnb.nn.Linear4bit(96, 80, bias=bias, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
        if bias:
            layer.bias = torch.nn.Parameter(dense.bias.data.clone())
    layer = layer.to(device)
    layer.requires_grad_(False)
    return layer


def _inputs(dtype, device, dropout, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(2, 7, 96, dtype=dtype, device=device, requires_grad=True)
    a = (torch.randn(8, 96, device=device) * 0.1).requires_grad_()  # float32 masters, as peft keeps them
    b = (torch.randn(80, 8, device=device) * 0.1).requires_grad_()
    x_lora = torch.nn.functional.dropout(x, 0.25) if dropout else None
    return x, a, b, x_lora


def _run(fn, layer, dtype, device, dropout, scaling):
    x, a, b, x_lora = _inputs(dtype, device, dropout)
    out = fn(x, layer, a, b, scaling, x_lora)
    (out.float() * torch.linspace(-1, 1, out.shape[-1], device=device)).sum().backward()
    return out.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("kind", ["linear", "linear4bit"])
def test_fused_node_matches_separate_ops_on_cpu(kind, bias, dropout):
    layer = _layer(kind, bias)
    fused = _run(k.lora_linear, layer, torch.float32, "cpu", dropout, scaling=2.0)
    plain = _run(k.reference_lora_linear, layer, torch.float32, "cpu", dropout, scaling=2.0)
    for name, got, want in zip(("out", "dx", "dA", "dB"), fused, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert fused[2].dtype == fused[3].dtype == torch.float32  # gradients land in the float32 masters


def test_fused_node_is_one_autograd_node_and_keeps_the_weight_frozen():
    layer = _layer("linear4bit", bias=True)
    x, a, b, _ = _inputs(torch.float32, "cpu", dropout=False)
    out = k.lora_linear(x, layer, a, b, 1.0)
    assert type(out.grad_fn).__name__ == "_LoraLinearBackward"
    assert {type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None} == {"AccumulateGrad"}  # x, A, B leaves
    out.sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("double", [True, False], ids=["double", "single"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_dequantize_equals_bitsandbytes_on_gpu(dtype, quant_type, double):
    torch.manual_seed(0)
    weight = (torch.randn(300, 257, device="cuda") * 0.05).to(dtype)
    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=double, quant_type=quant_type)
    assert k._native_dequantizers() is not None, "bitsandbytes' CUDA library should be loaded here"
    want = F.dequantize_4bit(packed, state)
    assert torch.equal(k.dequantize_4bit(packed, state), want)
    assert torch.equal(k.dequantize_4bit(packed, state), want)  # again, from what the first call kept


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kept_absmax_are_bitsandbytes_own_follow_a_move_and_are_freed_on_request():
    layer = _layer("linear4bit", bias=False, dtype=torch.bfloat16, device="cuda")
    state = layer.weight.quant_state
    want = F.dequantize_4bit(layer.weight, state)
    assert torch.equal(k.base_weight(layer, torch.bfloat16), want)
    _, kept, _ = getattr(state, k._LAUNCH_ATTR)[1]
    blocks = -(-80 * 96 // state.blocksize)
    assert kept.dtype == torch.float32 and kept.numel() == blocks  # one float32 per block, not the 8-bit codes
    assert torch.equal(kept, F.dequantize_blockwise(state.absmax, state.state2) + state.offset)
    state.absmax = state.absmax.clone()  # the codes moved (as after .to()): what was kept for the old ones is stale
    assert torch.equal(k.base_weight(layer, torch.bfloat16), want)
    assert getattr(state, k._LAUNCH_ATTR)[1][1] is not kept
    k.forget_dequantize_cache(layer)
    assert not hasattr(state, k._LAUNCH_ATTR)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "dropout"])
def test_fused_node_matches_separate_ops_in_bf16_on_gpu(dropout):
    layer = _layer("linear4bit", bias=True, dtype=torch.bfloat16, device="cuda")
    fused = _run(k.lora_linear, layer, torch.bfloat16, "cuda", dropout, scaling=2.0)
    plain = _run(k.reference_lora_linear, layer, torch.bfloat16, "cuda", dropout, scaling=2.0)
    for name, got, want in zip(("out", "dx", "dA", "dB"), fused, plain):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2, msg=lambda m: f"{name}: {m}")
