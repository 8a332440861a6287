"""RMSNorm kernels (Llama and Gemma `1 + weight` forms) vs their torch references, forward and backward.

Tolerances: float32 1e-5 (the kernel sums in another order); bfloat16 is compared with the float32
reference of the same bf16 inputs at 2e-2 (the kernel rounds once or twice to bf16: <= 1 ulp = 2^-7 relative)."""
import pytest
import torch

from loadspec import kernels
from loadspec.kernels import rmsnorm as k

pytestmark = pytest.mark.skipif(not kernels.HAVE_TRITON, reason="triton is not installed")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=4e-3, atol=4e-3)}
CASES = [(k.rmsnorm, k.reference_rmsnorm), (k.rmsnorm_plus_one, k.reference_rmsnorm_plus_one)]


def _check(fn, ref, x, w, device="cpu"):
    x = x.to(device).requires_grad_()
    w = w.to(device).requires_grad_()
    y = fn(x, w, 1e-6)
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y32 = ref(x32, w32, 1e-6)
    dx32, dw32 = torch.autograd.grad(y32, (x32, w32), dy.float())
    tol = TOL[x.dtype]
    torch.testing.assert_close(y.float(), y32, **tol)
    torch.testing.assert_close(dx.float(), dx32, **tol)
    torch.testing.assert_close(dw.float(), dw32, **{k: v * 4 for k, v in tol.items()})  # summed over rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn,ref", CASES, ids=["llama", "gemma_plus_one"])
def test_rmsnorm_matches_reference_interpreted(fn, ref, dtype):
    assert kernels.use_triton(torch.empty(1)), "TRITON_INTERPRET=1 should route CPU tensors to the Triton path"
    torch.manual_seed(0)
    x = torch.randn(2, 5, 48).to(dtype)  # 10 rows, hidden 48 (not a power of two: masked lanes)
    w = (torch.randn(48) * 0.5).to(dtype)
    _check(fn, ref, x, w)


def test_rmsnorm_float32_bitwise_close_and_strided_input():
    torch.manual_seed(1)
    x = torch.randn(6, 64)[:, :40]  # rows with a stride != hidden size
    w = torch.randn(40)
    _check(k.rmsnorm, k.reference_rmsnorm, x, w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn,ref", CASES, ids=["llama", "gemma_plus_one"])
def test_rmsnorm_matches_reference_gpu(fn, ref, dtype):
    torch.manual_seed(0)
    x = torch.randn(64, 4096).to(dtype)
    w = (torch.randn(4096) * 0.5).to(dtype)
    _check(fn, ref, x, w, device="cuda")
