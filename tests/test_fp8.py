"""fp8 weights: the quantizer's error bound and edge cases, plans, and artifacts built and loaded end to end."""
import pytest
import torch
from safetensors import safe_open

import loadspec
from loadspec import fp8
from loadspec.errors import SpecError, UsageError
from loadspec.hardware import GIB
from tests.test_options import logits, plan_for
from tests.test_plan import LLAMA_8B

E4M3_HALF_ULP = 2.0**-4  # 3 mantissa bits: rounding moves a normal value by at most 1/16 of it
E4M3_HALF_SUBNORMAL = 2.0**-10  # below 2^-6 the step is 2^-9 (times the scale)
BF16_HALF_ULP = 2.0**-8


@pytest.mark.parametrize("scaling", fp8.SCALINGS)
def test_dequantized_weight_within_e4m3_rounding_of_bf16(scaling):
    torch.manual_seed(0)
    weight = (torch.randn(300, 200) * torch.logspace(-3, 1, 300)[:, None]).to(torch.bfloat16)  # rows of very different size
    codes, scale = fp8.quantize(weight, scaling)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == weight.shape and scale.dtype == torch.float32
    assert scale.shape == ((300, 1) if scaling == "row" else (3, 2))  # 300 x 200 -> short last blocks
    back = fp8.dequantize(codes, scale, scaling, torch.bfloat16)
    w, step = weight.float(), fp8._expand(scale, weight.shape, scaling)
    bound = w.abs() * (E4M3_HALF_ULP + BF16_HALF_ULP) * 1.001 + step * E4M3_HALF_SUBNORMAL
    assert ((back.float() - w).abs() <= bound).all()
    assert (back.float() - w).norm() / w.norm() < 0.03
    assert codes.float().abs().amax() == 448  # the largest value of a row/block maps to e4m3's maximum


@pytest.mark.parametrize("scaling", fp8.SCALINGS)
def test_zero_rows_and_blocks_get_a_usable_scale(scaling):
    weight = torch.randn(130, 257)
    weight[5] = 0  # a zero row
    weight[:128, 128:256] = 0  # a zero block (and, for rows, nothing else changes)
    weight[129] = 0
    weight[129, 0] = 1e-44  # a subnormal row: its absmax / 448 underflows to 0
    codes, scale = fp8.quantize(weight, scaling)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    back = fp8.dequantize(codes, scale, scaling, torch.float32)
    assert torch.isfinite(back).all()
    assert (back[5] == 0).all() and (back[:128, 128:256] == 0).all()
    if scaling == "block":
        assert scale.shape == (2, 3) and scale[0, 1] == 1.0  # 130 x 257: short last block row and column
    else:
        assert scale[5, 0] == 1.0 and scale[129, 0] == 1.0


def test_inf_or_nan_refused_naming_the_tensor():
    for bad in (float("inf"), float("nan")):
        weight = torch.ones(4, 4)
        weight[1, 2] = bad
        with pytest.raises(UsageError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight contains inf or NaN"):
            fp8.quantize(weight, "row", name="model.layers.0.mlp.up_proj.weight")


def test_fp8_refused_below_capability_8_9():
    for target in ("cpu", "t4", "a100"):
        with pytest.raises(UsageError, match=rf'quant = "fp8" needs a GPU of capability 8\.9 or newer.*target {target} .*quant = "nf4"'):
            plan_for('quant = "fp8"', target=target)


def test_fp8_plan_memory_reasons_and_fingerprint():
    row = plan_for('quant = "fp8"', config=LLAMA_8B, target="h100")
    block = plan_for('quant = "fp8"\nfp8_scaling = "block"', config=LLAMA_8B, target="h100")
    int8 = plan_for('quant = "int8"', config=LLAMA_8B, target="h100")
    assert row.quant == {"method": "fp8", "scaling": "row", "storage": "float8_e4m3fn", "skip_modules": ["lm_head"]}
    assert row.memory == int8.memory  # 1 byte a weight + one float32 scale per output row, like int8
    assert 7.0 * GIB < block.memory["cuda:0"] < row.memory["cuda:0"]
    assert "float8_e4m3fn weights (1 byte/param) with float32 scales per output row" in dict(row.reasons)["quant"]
    assert "128x128 block" in dict(block.reasons)["quant"]
    assert len({row.fingerprint, block.fingerprint, int8.fingerprint}) == 3
    assert plan_for('quant = "fp8"', target="l4").quant["method"] == "fp8"  # capability 8.9
    with pytest.raises(SpecError, match=r'fp8_scaling.*applies only to fp8 weights, but quant = "nf4"'):
        plan_for('fp8_scaling = "block"')


@pytest.mark.parametrize(("family", "scaling"), [("llama", "row"), ("qwen3", "block")])
def test_fp8_build_load_close_to_16bit(family, scaling, checkpoint, write_spec, tmp_path):
    """Logits of the fp8 model (CPU: dequantize, then matmul in bf16) against the same model in bf16: within 6% of the
    largest logit, cosine similarity above 0.998 (e4m3 keeps 3 mantissa bits: each weight moves by up to 1/16)."""
    folder = checkpoint(family)
    built = loadspec.build(write_spec(folder, name="f8", load={"quant": "fp8", "fp8_scaling": scaling}, target="h100"),
                           cache_dir=tmp_path, progress=False)
    loadspec.build(write_spec(folder, name="b16", load={"quant": "none"}, target="h100"), cache_dir=tmp_path, progress=False)
    module = built.plan.quantized[0]
    with safe_open(next(built.path.glob("*.safetensors")), framework="pt") as handle:
        assert handle.get_tensor(f"{module}.weight").dtype == torch.float8_e4m3fn
        assert handle.get_tensor(f"{module}.{fp8.scale_name(scaling)}").dtype == torch.float32
    model, tokenizer = loadspec.load("f8", cache_dir=tmp_path, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, fp8.Fp8Linear)]
    assert len(layers) == len(built.plan.quantized) and not any(p.requires_grad for m in layers for p in m.parameters())
    ours = logits(model, tokenizer).float()
    reference = logits(loadspec.load("b16", cache_dir=tmp_path, device="cpu")[0], tokenizer).float()
    assert (ours - reference).abs().max() < 0.06 * reference.abs().max()
    assert torch.nn.functional.cosine_similarity(ours.flatten(), reference.flatten(), dim=0) > 0.998


def test_lora_trains_on_fp8_base(checkpoint, write_spec, tmp_path):
    loadspec.build(write_spec(checkpoint("llama"), name="f8lora", load={"quant": "fp8"}, target="h100", lora={"r": 8}),
                   cache_dir=tmp_path, progress=False)
    model, tokenizer = loadspec.load("f8lora", cache_dir=tmp_path, device="cpu")
    ids = tokenizer("a b c", return_tensors="pt").input_ids
    model.train()
    model(ids, labels=ids).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert all(p.dtype != torch.float8_e4m3fn for p in trainable)


@pytest.mark.gpu
def test_scaled_mm_path_matches_dequantized_path():
    if torch.cuda.get_device_capability() < fp8.MIN_CAPABILITY:
        pytest.skip("needs capability 8.9 or newer")
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 512, bias=True, dtype=torch.bfloat16)
    layer = fp8.Fp8Linear(256, 512, True, scaling="row", dtype=torch.bfloat16, device="cuda")
    codes, scale = fp8.quantize(dense.weight.data, "row")
    layer.weight.data, layer.weight_scale.data, layer.bias.data = codes.cuda(), scale.cuda(), dense.bias.data.cuda()
    x = torch.randn(3, 7, 256, dtype=torch.bfloat16, device="cuda")
    assert fp8.scaled_mm_works(x.device) and layer._scaled_mm_applies(x)
    with torch.no_grad():
        fast = layer(x)
        slow = torch.nn.functional.linear(x, fp8.dequantize(layer.weight, layer.weight_scale, "row"), layer.bias)
    assert fast.shape == slow.shape == (3, 7, 512) and fast.dtype == torch.bfloat16
    assert ((fast.float() - slow.float()).norm() / slow.float().norm()) < 0.05  # activations are rounded to e4m3 too
    x.requires_grad_(True)
    assert not layer._scaled_mm_applies(x)  # training: gradients flow through the dequantized matmul
    layer(x).sum().backward()
    assert x.grad is not None


@pytest.mark.gpu
def test_fp8_fixture_model_runs_scaled_mm_on_cuda(checkpoint, write_spec, tmp_path, monkeypatch):
    if torch.cuda.get_device_capability() < fp8.MIN_CAPABILITY:
        pytest.skip("needs capability 8.9 or newer")
    folder = checkpoint("llama")
    loadspec.build(write_spec(folder, name="f8gpu", load={"quant": "fp8"}, target="auto"), cache_dir=tmp_path, progress=False)
    loadspec.build(write_spec(folder, name="b16gpu", load={"quant": "none"}, target="auto"), cache_dir=tmp_path, progress=False)
    model, tokenizer = loadspec.load("f8gpu", cache_dir=tmp_path)
    reference, _ = loadspec.load("b16gpu", cache_dir=tmp_path)
    assert fp8.scaled_mm_works(torch.device("cuda:0"))  # probed (and cached) before counting calls
    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or scaled_mm(*a, **k))
    ids = tokenizer("What is the capital of France? Paris is", return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        ours, theirs = model(ids).logits.float(), reference(ids).logits.float()
    assert len(calls) == sum(isinstance(m, fp8.Fp8Linear) for m in model.modules()) > 0
    assert (ours - theirs).abs().max() < 0.1 * theirs.abs().max()
