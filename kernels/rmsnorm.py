"""RMSNorm, forward and backward, in Llama's form and Gemma's `1 + weight` form.

Llama:  y = weight * (x * rstd).to(x.dtype)          (normalised in float32, cast, then scaled)
Gemma:  y = ((x * rstd) * (1 + weight)).to(x.dtype)  (everything in float32, cast once)
with rstd = 1 / sqrt(mean(x^2) + eps) per row, computed in float32.

The backward kernel loops over rows in each program and writes one float32 partial sum of the
weight gradient per program (summed in torch), so no (rows x hidden) float32 buffer is made.
"""
from __future__ import annotations

import torch

from . import HAVE_TRITON, VERSIONS, next_power_of_2, num_warps_for, program_count, use_triton

VERSION = VERSIONS["rmsnorm"]
AUTOTUNE_CONFIGS = tuple({"num_warps": w} for w in (1, 2, 4, 8, 16))  # key: hidden size (one row per program)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rmsnorm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, x_stride, y_stride, eps, offset,
                     GEMMA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x_raw = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        x = x_raw.to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        normed = x * rstd
        if GEMMA:
            y = normed * (w + offset)
        else:
            y = normed.to(x_raw.dtype).to(tl.float32) * w
        tl.store(y_ptr + row * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rmsnorm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, dy_stride, x_stride, dx_stride,
                     rows_per_program, offset, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        start = pid * rows_per_program
        zero64 = pid.to(tl.int64) * 0  # int64 row offsets (the interpreter's loop index is a plain int)
        for row in range(start, tl.minimum(start + rows_per_program, n_rows)):
            row64 = row + zero64
            x = tl.load(x_ptr + row64 * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row64 * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row64)
            normed = x * rstd
            dnormed = dy * w
            dx = rstd * (dnormed - normed * (tl.sum(dnormed * normed, axis=0) / n_cols))
            tl.store(dx_ptr + row64 * dx_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += dy * normed
        tl.store(dw_ptr + pid * n_cols + cols, dw, mask=mask)


def reference_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Llama's RMSNorm in plain torch (transformers' LlamaRMSNorm)."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def reference_rmsnorm_plus_one(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Gemma's RMSNorm in plain torch (transformers' GemmaRMSNorm): scale by 1 + weight, in float32."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (1.0 + weight.float())).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, gemma):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        rows, cols = x2.shape
        out_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((rows, cols), dtype=out_dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = next_power_of_2(cols)
        if rows:
            _rmsnorm_fwd[(rows,)](x2, weight, y, rstd, cols, x2.stride(0), y.stride(0), eps, 1.0 if gemma else 0.0,
                                  GEMMA=gemma, BLOCK=block, num_warps=num_warps_for(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.gemma, ctx.shape = gemma, shape
        return y.view(*shape[:-1], cols)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        dy2 = dy.reshape(rows, cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        programs = program_count(rows, x2.device)
        per = -(-rows // programs) if rows else 0
        dw = torch.zeros((programs, cols), dtype=torch.float32, device=x2.device)
        block = next_power_of_2(cols)
        if rows:
            _rmsnorm_bwd[(programs,)](dy2, x2, weight, rstd, dx, dw, rows, cols, dy2.stride(0), x2.stride(0), dx.stride(0),
                                      per, 1.0 if ctx.gemma else 0.0, BLOCK=block, num_warps=num_warps_for(block))
        dweight = dw.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dweight, None, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Llama-form RMSNorm over the last dimension (fused on GPU, torch reference elsewhere)."""
    if not use_triton(x, weight):
        return reference_rmsnorm(x, weight, eps)
    return _RMSNorm.apply(x, weight, float(eps), False)


def rmsnorm_plus_one(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Gemma-form RMSNorm (`1 + weight`) over the last dimension."""
    if not use_triton(x, weight):
        return reference_rmsnorm_plus_one(x, weight, eps)
    return _RMSNorm.apply(x, weight, float(eps), True)
