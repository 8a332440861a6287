"""Gated MLP activations, forward and backward: SwiGLU `silu(gate) * up` (Llama, Mistral, Qwen, Granite)
and GeGLU `gelu(gate) * up` (Gemma: the tanh approximation, `gelu_pytorch_tanh`; or the exact erf form).

Element-wise over the flattened tensors, computed in float32 and rounded once (transformers rounds
the activation and the product separately: about one unit in the last place apart in bf16).
The backward kernel recomputes the activation instead of saving it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import HAVE_TRITON, VERSIONS, use_triton

VERSION = VERSIONS["swiglu"]
BLOCK = 1024
AUTOTUNE_CONFIGS = tuple({"BLOCK": b, "num_warps": w} for b in (1024, 2048, 4096) for w in (4, 8))  # key: numel
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_math import tanh as _tanh

    @triton.jit
    def _act_and_grad(g, ACT: tl.constexpr):
        """(act(g), act'(g)) in float32; ACT 0 silu, 1 gelu tanh approximation, 2 gelu erf."""
        if ACT == 0:
            s = tl.sigmoid(g)
            return g * s, s * (1.0 + g * (1.0 - s))
        elif ACT == 1:
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            t = _tanh(inner)
            dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
            return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * dinner
        else:
            cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
            return g * cdf, cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327

    @triton.jit
    def _glu_fwd(g_ptr, u_ptr, y_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a, _ = _act_and_grad(g, ACT)
        tl.store(y_ptr + offs, (a * u).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_bwd(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a, da = _act_and_grad(g, ACT)
        tl.store(dg_ptr + offs, (dy * u * da).to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + offs, (dy * a).to(du_ptr.dtype.element_ty), mask=mask)


def _activation(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu_tanh":
        return lambda g: F.gelu(g, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"activation {name!r} is not one of {', '.join(ACTIVATIONS)}")


def reference_glu(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """`act(gate) * up` in plain torch, exactly as transformers' MLPs compute it."""
    return _activation(activation)(gate) * up


def reference_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return reference_glu(gate, up, "silu")


def reference_geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return reference_glu(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act):
        gate_c, up_c = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate_c, dtype=torch.promote_types(gate.dtype, up.dtype))
        n = gate_c.numel()
        if n:
            _glu_fwd[(triton.cdiv(n, BLOCK),)](gate_c, up_c, y, n, ACT=act, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gate_c, up_c)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx, dy):
        gate_c, up_c = ctx.saved_tensors
        dy = dy.contiguous()
        dgate, dup = torch.empty_like(gate_c), torch.empty_like(up_c)
        n = gate_c.numel()
        if n:
            _glu_bwd[(triton.cdiv(n, BLOCK),)](dy, gate_c, up_c, dgate, dup, n, ACT=ctx.act, BLOCK=BLOCK, num_warps=4)
        return dgate, dup, None


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """`act(gate) * up` for activation silu / gelu_tanh / gelu (fused on GPU, torch reference elsewhere)."""
    act = ACTIVATIONS.index(activation) if activation in ACTIVATIONS else None
    if act is None:
        raise ValueError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if not use_triton(gate, up) or gate.shape != up.shape:
        return reference_glu(gate, up, activation)
    return _GLU.apply(gate, up, act)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`."""
    return glu(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """`gelu(gate) * up`; approximate "tanh" (Gemma's gelu_pytorch_tanh) or "none" (erf)."""
    return glu(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")
