"""SwiGLU / GeGLU (tanh and erf) kernels vs torch, forward and backward.

Tolerances: float32 1e-5 (tanh via exp, sigmoid and erf differ from torch's by a few ulp); bfloat16 vs the
float32 reference of the same inputs at 2e-2 (one bf16 rounding; transformers rounds twice)."""
import pytest
import torch

from loadspec import kernels
from loadspec.kernels import swiglu as k

pytestmark = pytest.mark.skipif(not kernels.HAVE_TRITON, reason="triton is not installed")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _check(activation, gate, up):
    gate, up = gate.requires_grad_(), up.requires_grad_()
    y = k.glu(gate, up, activation)
    dy = torch.randn_like(y)
    dg, du = torch.autograd.grad(y, (gate, up), dy)
    g32, u32 = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
    y32 = k.reference_glu(g32, u32, activation)
    dg32, du32 = torch.autograd.grad(y32, (g32, u32), dy.float())
    tol = TOL[gate.dtype]
    torch.testing.assert_close(y.float(), y32, **tol)
    torch.testing.assert_close(dg.float(), dg32, **tol)
    torch.testing.assert_close(du.float(), du32, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", k.ACTIVATIONS)
def test_glu_matches_reference_interpreted(activation, dtype):
    torch.manual_seed(0)
    gate = (torch.randn(3, 7, 50) * 3).to(dtype)  # 1050 elements: two blocks, the second masked
    up = torch.randn(3, 7, 50).to(dtype)
    _check(activation, gate, up)


def test_glu_extreme_gates_stay_finite():
    gate = torch.tensor([-200.0, -30.0, 0.0, 30.0, 200.0])
    for activation in k.ACTIVATIONS:
        y = k.glu(gate, torch.ones(5), activation)
        assert torch.isfinite(y).all(), activation
        torch.testing.assert_close(y, k.reference_glu(gate, torch.ones(5), activation), rtol=1e-5, atol=1e-5)


def test_public_names():
    gate, up = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(k.swiglu(gate, up), k.reference_swiglu(gate, up), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.geglu(gate, up), k.reference_geglu(gate, up), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.geglu(gate, up, "none"), k.reference_geglu(gate, up, "none"), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", k.ACTIVATIONS)
def test_glu_matches_reference_gpu(activation):
    torch.manual_seed(0)
    _check(activation, torch.randn(256, 11008, device="cuda").bfloat16(), torch.randn(256, 11008, device="cuda").bfloat16())
