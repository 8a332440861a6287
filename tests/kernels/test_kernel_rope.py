"""RoPE kernel vs transformers' rotation (and its partial-rotary extension), forward and backward.

Tolerances: float32 1e-6 (same products, one rounding); bfloat16 vs the float32 reference of the same inputs
at 2e-2 (one bf16 rounding of values up to ~4)."""
import pytest
import torch

from loadspec import kernels
from loadspec.kernels import rope as k

pytestmark = pytest.mark.skipif(not kernels.HAVE_TRITON, reason="triton is not installed")
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _cos_sin(batch, seq, dim, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.arange(seq).float()[:, None] * inv[None]
    emb = torch.cat((freqs, freqs), -1)[None].expand(batch, seq, dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _check(q, cos, sin, unsqueeze_dim):
    q = q.requires_grad_()
    y = k.rope(q, cos, sin, unsqueeze_dim)
    dy = torch.randn_like(y)
    (dq,) = torch.autograd.grad(y, q, dy)
    q32 = q.detach().float().requires_grad_()
    y32 = k.reference_rope(q32, cos.float(), sin.float(), unsqueeze_dim)
    (dq32,) = torch.autograd.grad(y32, q32, dy.float())
    assert y.shape == q.shape and y.dtype == q.dtype
    torch.testing.assert_close(y.float(), y32, **TOL[q.dtype])
    torch.testing.assert_close(dq.float(), dq32, **TOL[q.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_transformers_layout_interpreted(dtype):
    torch.manual_seed(0)
    # [B, S, H, D] projected then transposed to [B, H, S, D]: transformers' non-contiguous layout; 3 heads, GQA-like
    q = torch.randn(2, 5, 3, 16).to(dtype).transpose(1, 2)
    cos, sin = _cos_sin(2, 5, 16, dtype)
    _check(q, cos, sin, 1)


def test_rope_equals_transformers_function_float32():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(1)
    q, kk = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    cos, sin = _cos_sin(1, 6, 8, torch.float32)
    ours = k.apply_rotary_pos_emb(q, kk, cos[:1], sin[:1])
    theirs = apply_rotary_pos_emb(q, kk, cos[:1], sin[:1])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_rope_partial_rotary_and_seq_major_layout():
    torch.manual_seed(2)
    q = torch.randn(2, 4, 3, 16)  # [B, S, H, D], unsqueeze_dim=2
    cos, sin = _cos_sin(1, 4, 8, torch.float32)  # only the first 8 of 16 dims rotate
    _check(q, cos, sin, 2)
    y = k.rope(q, cos, sin, 2)
    assert torch.equal(y[..., 8:], q[..., 8:])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_reference_gpu(dtype):
    torch.manual_seed(0)
    q = torch.randn(2, 256, 32, 128, device="cuda").to(dtype).transpose(1, 2)
    cos, sin = _cos_sin(2, 256, 128, dtype)
    _check(q, cos.cuda(), sin.cuda(), 1)
