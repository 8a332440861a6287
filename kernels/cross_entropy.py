"""Cross-entropy that never materialises full float32 logits, with `ignore_index` and Gemma 2's logit
softcapping (`cap * tanh(logits / cap)`), forward and backward.

Two entry points:

* `cross_entropy(logits, labels)`: logits as the model produced them (bf16/fp16/fp32, [rows, vocab]).
  One program per row walks the vocabulary in tiles (online max / sum-exp), so no float32 copy of the
  logits is made; the backward kernel recomputes softmax from the saved per-row logsumexp.
* `fused_linear_cross_entropy(hidden, weight, labels)`: the LM head and the loss together. Rows are
  processed `chunk_rows` at a time: a chunk's logits (`chunk_rows x vocab`, in the model dtype) are
  computed, turned into their gradient in place by the kernel, and folded into the gradients w.r.t. the
  hidden states and the head weight (float32 accumulator) before the next chunk. At most one chunk of
  logits exists at once; backward only scales the stored gradients.

Reduction "mean" divides by the number of non-ignored labels, but never by zero: an all-padding batch
gives loss 0 and zero gradients (torch gives nan). "sum" with a caller-side divisor serves transformers'
`num_items_in_batch` (gradient accumulation).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import HAVE_TRITON, VERSIONS, next_power_of_2, use_triton

VERSION = VERSIONS["cross_entropy"]
BLOCK_V = 1024  # vocabulary tile
AUTOTUNE_CONFIGS = tuple({"BLOCK_V": b, "num_warps": w} for b in (1024, 2048, 4096) for w in (4, 8, 16))  # key: vocab

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_math import tanh as _tanh

    @triton.jit
    def _ce_kernel(logits_ptr, grad_ptr, labels_ptr, loss_ptr, lse_ptr, scale_ptr, n_cols, logits_stride, grad_stride,
                   ignore_index, softcap, SOFTCAP: tl.constexpr, HAVE_LSE: tl.constexpr, GRAD: tl.constexpr,
                   BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        base = logits_ptr + row * logits_stride
        if HAVE_LSE:
            lse = tl.load(lse_ptr + row)
        else:  # pass 1: logsumexp (online, per lane) and the label's logit
            m = tl.full([BLOCK], float("-inf"), tl.float32)
            d = tl.zeros([BLOCK], dtype=tl.float32)
            picked = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
                if SOFTCAP:
                    z = softcap * _tanh(z / softcap)
                z = tl.where(mask, z, float("-inf"))
                m_new = tl.maximum(m, z)
                m_safe = tl.where(m_new != float("-inf"), m_new, 0.0)  # lanes masked so far: no inf - inf
                d = d * tl.exp(m - m_safe) + tl.exp(z - m_safe)
                m = m_new
                picked += tl.where(cols == label, z, 0.0)
            top = tl.max(m, axis=0)
            lse = top + tl.log(tl.sum(d * tl.exp(m - top), axis=0))
            loss = tl.where(valid, lse - tl.sum(picked, axis=0), 0.0)
            tl.store(loss_ptr + row, loss)
            tl.store(lse_ptr + row, lse)
        if GRAD:  # pass 2: d loss / d logits = scale * (softmax - onehot) [* softcap derivative]
            scale = tl.where(valid, tl.load(scale_ptr).to(tl.float32), 0.0)
            gbase = grad_ptr + row * grad_stride
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
                if SOFTCAP:
                    t = _tanh(x / softcap)
                    z = softcap * t
                else:
                    z = x
                g = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
                if SOFTCAP:
                    g = g * (1.0 - t * t)
                tl.store(gbase + cols, (g * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def _softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def reference_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                            softcap: float | None = None, reduction: str = "mean") -> torch.Tensor:
    """Plain torch: float32 logits, optional softcap, torch's cross-entropy. "mean" of no valid label is 0."""
    z = _softcapped(logits.float(), softcap)
    loss = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        loss = loss / (labels != ignore_index).sum().clamp(min=1)
    return loss


def reference_fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                                         softcap: float | None = None, reduction: str = "mean") -> torch.Tensor:
    """Plain torch: the full logits `hidden @ weight.T (+ bias)`, then `reference_cross_entropy`."""
    return reference_cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index, softcap, reduction)


def _mean_scale(labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """1 / (valid labels) for "mean", 1 for "sum", as a float32 device tensor (no host sync)."""
    if reduction == "sum":
        return torch.ones(1, dtype=torch.float32, device=labels.device)
    return 1.0 / (labels != ignore_index).sum().clamp(min=1).to(torch.float32).reshape(1)


def _run(logits, grad, labels, loss_rows, lse, scale, ignore_index, softcap, have_lse, want_grad):
    rows, cols = logits.shape
    if not rows:
        return
    block = min(BLOCK_V, next_power_of_2(cols))
    _ce_kernel[(rows,)](logits, grad if grad is not None else logits, labels, loss_rows, lse, scale, cols, logits.stride(0),
                        grad.stride(0) if grad is not None else 0, ignore_index, float(softcap or 1.0),
                        SOFTCAP=bool(softcap), HAVE_LSE=have_lse, GRAD=want_grad, BLOCK=block,
                        num_warps=8 if block >= 2048 else 4)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, softcap, reduction):
        rows = logits.shape[0]
        loss_rows = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        scale = _mean_scale(labels, ignore_index, reduction)
        _run(logits, None, labels, loss_rows, lse, scale, ignore_index, softcap, False, False)
        ctx.save_for_backward(logits, labels, lse, scale)
        ctx.ignore_index, ctx.softcap = ignore_index, softcap
        return loss_rows.sum() * scale[0]

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse, scale = ctx.saved_tensors
        grad = torch.empty_like(logits)
        _run(logits, grad, labels, lse, lse, (scale * grad_out.float()).reshape(1), ctx.ignore_index, ctx.softcap, True, True)
        return grad, None, None, None, None


def _check(labels: torch.Tensor, rows: int, reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if labels.numel() != rows:
        raise ValueError(f"{labels.numel()} labels for {rows} rows of logits")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, softcap: float | None = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of `logits` [..., vocab] against `labels` [...] without a float32 copy of the logits."""
    logits2 = logits.reshape(-1, logits.shape[-1])
    _check(labels, logits2.shape[0], reduction)
    if not use_triton(logits2, labels):
        return reference_cross_entropy(logits2, labels.reshape(-1), ignore_index, softcap, reduction)
    if logits2.stride(-1) != 1:
        logits2 = logits2.contiguous()
    return _CrossEntropy.apply(logits2, labels.reshape(-1).contiguous(), int(ignore_index), softcap, reduction)


def default_chunk_rows(rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk so that a chunk of logits is about as large as the hidden states (a power of two)."""
    return max(1, min(next_power_of_2(rows), next_power_of_2(math.ceil(rows / max(1, math.ceil(vocab / max(1, hidden)))))))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, softcap, reduction, chunk_rows):
        rows = hidden.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        loss_rows = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        scale = _mean_scale(labels, ignore_index, reduction)
        want_grad = need_h or need_w or need_b
        for start in range(0, rows, chunk_rows):
            end = min(rows, start + chunk_rows)
            h = hidden[start:end]
            logits = F.linear(h, weight, bias)  # the only chunk of logits alive; becomes its own gradient
            _run(logits, logits if want_grad else None, labels[start:end], loss_rows[start:end], lse[start:end], scale,
                 ignore_index, softcap, False, want_grad)
            if need_h:
                grad_h[start:end] = logits @ weight
            if need_w:
                grad_w += (logits.t() @ h).float()
            if need_b:
                grad_b += logits.float().sum(0)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.have = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss_rows.sum() * scale[0]

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if have else None for have in ctx.have]
        grad_h, grad_w, grad_b = grads
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out.float()).to(ctx.dtypes[0])
        if grad_b is not None:
            grad_b = (grad_b * grad_out.float()).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100, softcap: float | None = None,
                               reduction: str = "mean", chunk_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, `chunk_rows` rows of logits at a time.

    The gradients are computed during the forward pass (the logits are not kept), so call backward on the
    result once; `hidden` [..., hidden_size], `weight` [vocab, hidden_size], `labels` [...].
    """
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    _check(labels, hidden2.shape[0], reduction)
    if not use_triton(hidden2, weight, labels):
        return reference_fused_linear_cross_entropy(hidden2, weight, labels.reshape(-1), bias, ignore_index, softcap, reduction)
    chunk = chunk_rows or default_chunk_rows(hidden2.shape[0], hidden2.shape[1], weight.shape[0])
    return _FusedLinearCrossEntropy.apply(hidden2.contiguous(), weight, bias, labels.reshape(-1).contiguous(), int(ignore_index),
                                          softcap, reduction, int(chunk))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Drop-in for transformers' `ForCausalLMLoss`, without its float32 copy of the logits."""
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    logits2 = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits2.device)
    if num_items_in_batch is None:
        return cross_entropy(logits2, shift_labels, ignore_index=ignore_index, reduction="mean")
    loss = cross_entropy(logits2, shift_labels, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
