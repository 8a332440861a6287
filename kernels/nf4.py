"""4-bit (NF4 / FP4) blockwise dequantization in one kernel, double quantization included.

bitsandbytes' layout: two 4-bit indices a byte (first value in the high nibble), one absmax per
`blocksize` values; with double quantization the absmax are uint8 codes into the 256-entry
dynamic map, scaled per group of `nested_blocksize` blocks and shifted by `offset`.

Numbers, as bitsandbytes' CUDA path computes them (float32 throughout, rounded once at the end):
    absmax[b] = nested_code[q[b]] * nested_absmax[b // nested_blocksize] + offset   (two roundings)
    value[i]  = code[nibble[i]] * absmax[i // blocksize]  -> weight dtype (round to nearest even)
bitsandbytes needs two launches (absmax, then values) plus Python work per call; here it is one
launch, with multiply-add fusion off so the two roundings stay two.
"""
from __future__ import annotations

import math

import torch

from . import HAVE_TRITON, VERSIONS, use_triton

VERSION = VERSIONS["nf4_dequantize"]
BLOCK = 1024
AUTOTUNE_CONFIGS = tuple({"BLOCK": b, "num_warps": w} for b in (1024, 2048, 4096) for w in (4, 8))  # key: numel

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dequantize(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, out_ptr, n,
                    blocksize, nested_blocksize, NESTED: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        nibble = (byte >> ((1 - offs % 2) * 4).to(tl.int32)) & 0xF
        value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
        block = offs // blocksize
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(nested_code_ptr + q, mask=mask, other=0.0) * \
                tl.load(nested_absmax_ptr + block // nested_blocksize, mask=mask, other=0.0)
            scale = scale + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        product = value * scale
        if out_ptr.dtype.element_ty == tl.bfloat16:
            # round to nearest even on the bits: what the GPU's conversion does, and what the interpreter's does not
            bits = product.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(out_ptr + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(out_ptr + offs, product.to(out_ptr.dtype.element_ty), mask=mask)


def _fields(quant_state):
    """(absmax, code, blocksize, nested parts or None) from a bitsandbytes QuantState."""
    nested = None
    if getattr(quant_state, "nested", False):
        inner = quant_state.state2
        nested = (inner.absmax, inner.code, float(quant_state.offset), inner.blocksize)
    return quant_state.absmax, quant_state.code, quant_state.blocksize, nested


def reference_dequantize_4bit(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """Plain-torch dequantization with the same float32 roundings (the kernel's reference)."""
    absmax, code, blocksize, nested = _fields(quant_state)
    n = math.prod(quant_state.shape)
    if nested is not None:
        nested_absmax, nested_code, offset, nested_blocksize = nested
        groups = torch.arange(absmax.numel(), device=absmax.device) // nested_blocksize
        absmax = nested_code.float()[absmax.long()] * nested_absmax.float()[groups]
        absmax = absmax + torch.tensor(offset, dtype=torch.float32, device=absmax.device)
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (code.float()[nibbles] * scale).to(quant_state.dtype).view(quant_state.shape)


def dequantize_4bit(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """The weight a bitsandbytes `Params4bit` (`packed`, its `quant_state`) holds, in `quant_state.dtype`.

    Fused on the GPU (bit-identical to bitsandbytes' CUDA dequantization for NF4); the torch reference elsewhere.
    """
    if not use_triton(packed):
        return reference_dequantize_4bit(packed, quant_state)
    absmax, code, blocksize, nested = _fields(quant_state)
    n = math.prod(quant_state.shape)
    out = torch.empty(quant_state.shape, dtype=quant_state.dtype, device=packed.device)
    if nested is None:
        nested_absmax, nested_code, offset, nested_blocksize = absmax, code, 0.0, 1  # unused when NESTED is False
    else:
        nested_absmax, nested_code, offset, nested_blocksize = nested
    if n:
        _dequantize[(triton.cdiv(n, BLOCK),)](packed, absmax, code, nested_absmax, nested_code, offset, out, n,
                                              blocksize, nested_blocksize, NESTED=nested is not None, BLOCK=BLOCK,
                                              num_warps=4, enable_fp_fusion=False)
    return out
