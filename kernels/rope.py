"""Rotary position embedding (the half-split form of Llama, Mistral, Qwen, Gemma, Granite), forward and
backward, with partial rotary (only the first `cos.shape[-1]` dims of each head rotate; the rest pass through).

    y[:r] = x[:r] * cos + rotate_half(x[:r]) * sin,   rotate_half(a) = cat(-a[r/2:], a[:r/2])
    y[r:] = x[r:]

x is [batch, heads, seq, head_dim] (`unsqueeze_dim=1`, transformers' layout; any strides) or
[batch, seq, heads, head_dim] (`unsqueeze_dim=2`); cos/sin are [batch or 1, seq, r]. Computed in float32
and rounded once (transformers rounds after each product: differences of about one unit in the last place
in bf16). The rotation is orthogonal, so the backward kernel is the same kernel rotating the other way.
cos and sin get no gradient (transformers computes them without one).
"""
from __future__ import annotations

import torch

from . import HAVE_TRITON, VERSIONS, next_power_of_2, use_triton

VERSION = VERSIONS["rope"]
AUTOTUNE_CONFIGS = tuple({"num_warps": w} for w in (1, 2, 4, 8))  # key: (heads, rotary dim); one (batch, position) per program

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_kernel(x_ptr, y_ptr, cos_ptr, sin_ptr, seq_len, n_heads, half, head_dim,
                     xb, xh, xs, yb, yh, ys, cb, cs, sb, ss,
                     BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b = pid // seq_len
        s = pid % seq_len
        heads = tl.arange(0, BLOCK_H)[:, None]
        dims = tl.arange(0, BLOCK_R)[None, :]
        mask = (heads < n_heads) & (dims < half)
        cmask = dims < half
        cos1 = tl.load(cos_ptr + b * cb + s * cs + dims, mask=cmask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + b * cb + s * cs + half + dims, mask=cmask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + b * sb + s * ss + dims, mask=cmask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + b * sb + s * ss + half + dims, mask=cmask, other=0.0).to(tl.float32)
        x_row = x_ptr + b * xb + s * xs + heads * xh
        y_row = y_ptr + b * yb + s * ys + heads * yh
        x1 = tl.load(x_row + dims, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + half + dims, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of the rotation
            y1 = x1 * cos1 + x2 * sin2
            y2 = x2 * cos2 - x1 * sin1
        else:
            y1 = x1 * cos1 - x2 * sin1
            y2 = x2 * cos2 + x1 * sin2
        tl.store(y_row + dims, y1.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_row + half + dims, y2.to(y_ptr.dtype.element_ty), mask=mask)
        if BLOCK_P > 0:  # partial rotary: copy the dims that do not rotate
            rest = 2 * half + tl.arange(0, BLOCK_P)[None, :]
            pmask = (heads < n_heads) & (rest < head_dim)
            tl.store(y_row + rest, tl.load(x_row + rest, mask=pmask, other=0.0), mask=pmask)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> torch.Tensor:
    """transformers' rotation in plain torch, plus partial rotary (cos narrower than the head)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    out = rot * cos + _rotate_half(rot) * sin
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def reference_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    return reference_rope(q, cos, sin, unsqueeze_dim), reference_rope(k, cos, sin, unsqueeze_dim)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int, backward: bool) -> torch.Tensor:
    y = torch.empty_like(x)  # same layout as x (dense tensors keep their strides)
    xv, yv = (x, y) if unsqueeze_dim == 1 else (x.transpose(1, 2), y.transpose(1, 2))  # views as [B, H, S, D]
    batch, heads, seq, head_dim = xv.shape
    r = cos.shape[-1]
    cos3, sin3 = cos.expand(batch, seq, r), sin.expand(batch, seq, r)
    block_h, block_r = next_power_of_2(heads), next_power_of_2(r // 2)
    block_p = next_power_of_2(head_dim - r) if head_dim > r else 0
    if batch * seq:
        _rope_kernel[(batch * seq,)](xv, yv, cos3, sin3, seq, heads, r // 2, head_dim,
                                     xv.stride(0), xv.stride(1), xv.stride(2), yv.stride(0), yv.stride(1), yv.stride(2),
                                     cos3.stride(0), cos3.stride(1), sin3.stride(0), sin3.stride(1),
                                     BACKWARD=backward, BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_P=block_p,
                                     num_warps=4 if block_h * block_r >= 2048 else 2)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, unsqueeze_dim):
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        return _launch(x, cos, sin, unsqueeze_dim, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        return _launch(dy, cos, sin, ctx.unsqueeze_dim, backward=True), None, None, None


def _supported(x: torch.Tensor, cos: torch.Tensor, unsqueeze_dim: int) -> bool:
    return (x.dim() == 4 and cos.dim() == 3 and unsqueeze_dim in (1, 2) and x.stride(-1) == 1
            and cos.shape[-1] % 2 == 0 and cos.shape[-1] <= x.shape[-1])


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> torch.Tensor:
    """Rotate one of q / k (see the module docstring)."""
    if not use_triton(x, cos, sin) or not _supported(x, cos, unsqueeze_dim):
        return reference_rope(x, cos, sin, unsqueeze_dim)
    cos, sin = cos.detach(), sin.detach()
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    return _Rope.apply(x, cos, sin, unsqueeze_dim)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Drop-in for transformers' `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`."""
    return rope(q, cos, sin, unsqueeze_dim), rope(k, cos, sin, unsqueeze_dim)
