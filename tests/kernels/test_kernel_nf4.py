"""NF4 / FP4 dequantization kernel vs bitsandbytes (CPU under the interpreter, CUDA on the GPU).

Exact equality everywhere: the kernel keeps bitsandbytes' float32 roundings (two for a double-quantized
absmax, one for each value), so a weight dequantized by it is the weight bitsandbytes would give."""
import math

import pytest
import torch

from loadspec import kernels
from loadspec.kernels import nf4 as k

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")
pytestmark = pytest.mark.skipif(not kernels.HAVE_TRITON, reason="triton is not installed")

SHAPES = [(64, 128), (33, 70), (5, 7), (1, 1)]  # whole blocks, a short last block, an odd count, one value


def _quantized(shape, dtype, quant_type, double, device="cpu", seed=0):
    torch.manual_seed(seed)
    weight = (torch.randn(shape) * 0.05).to(dtype).to(device)
    weight.view(-1)[: min(64, weight.numel())] = 0  # an all-zero block
    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=double, quant_type=quant_type)
    return weight, packed, state


@pytest.mark.parametrize("double", [True, False], ids=["double", "single"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_equals_bitsandbytes_on_cpu(shape, dtype, quant_type, double):
    assert kernels.use_triton(torch.empty(1)), "the interpreter should run the kernel here"
    _, packed, state = _quantized(shape, dtype, quant_type, double)
    ours = k.dequantize_4bit(packed, state)
    theirs = F.dequantize_4bit(packed, state)
    assert ours.dtype == dtype and ours.shape == torch.Size(shape)
    assert torch.equal(ours, theirs)
    assert torch.equal(k.reference_dequantize_4bit(packed, state), theirs)


def test_dequantizes_a_loaded_params4bit():
    layer = bnb.nn.Linear4bit(96, 40, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(40, 96, dtype=torch.bfloat16) * 0.1, requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    layer = layer.to("cpu")  # quantizes
    weight = layer.weight
    expected = F.dequantize_4bit(weight.data, weight.quant_state)
    assert torch.equal(k.dequantize_4bit(weight.data, weight.quant_state), expected)
    # and it really is the weight: close to what was quantized
    assert expected.shape == (40, 96) and math.isfinite(float(expected.float().abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("double", [True, False], ids=["double", "single"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (33, 70)], ids=lambda s: "x".join(map(str, s)))
def test_kernel_bitwise_equals_bitsandbytes_cuda(shape, dtype, double):
    _, packed, state = _quantized(shape, dtype, "nf4", double, device="cuda")
    ours = k.dequantize_4bit(packed, state)
    theirs = F.dequantize_4bit(packed, state)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(ours.view(bits), theirs.view(bits))


@pytest.mark.gpu
def test_fp4_equals_bitsandbytes_cuda():
    _, packed, state = _quantized((256, 384), torch.bfloat16, "fp4", True, device="cuda")
    assert torch.equal(k.dequantize_4bit(packed, state), F.dequantize_4bit(packed, state))  # -0.0 == 0.0 allowed
