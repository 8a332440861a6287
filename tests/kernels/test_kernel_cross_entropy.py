"""Cross-entropy kernels (logits form, and fused LM head + loss in row chunks) vs torch, forward and backward,
with ignore_index and softcapping.

Tolerances: loss 1e-5 relative (float32 logsumexp in another order); logits gradients 1e-6 absolute
(softmax values of ~1/vocab); bf16 logits: the same, since the kernel reads bf16 and works in float32 exactly like
the reference's upcast, the gradient then rounded to bf16 (2e-3 abs). Fused: hidden/weight gradients go through bf16
matmuls of the bf16-rounded logits gradient: 2e-2 relative in bf16, 1e-5 in float32."""
import pytest
import torch

from loadspec import kernels
from loadspec.kernels import cross_entropy as k

pytestmark = pytest.mark.skipif(not kernels.HAVE_TRITON, reason="triton is not installed")


def _labels(rows, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[1] = -100
    labels[rows - 1] = -100
    return labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_matches_reference_interpreted(dtype, softcap, reduction):
    torch.manual_seed(0)
    logits = (torch.randn(6, 2500) * 4).to(dtype).requires_grad_()  # 3 vocabulary tiles, the last masked
    labels = _labels(6, 2500, 0)
    loss = k.cross_entropy(logits, labels, softcap=softcap, reduction=reduction)
    (grad,) = torch.autograd.grad(loss * 3.0, logits)  # a non-unit upstream gradient
    ref = k.reference_cross_entropy(logits, labels, softcap=softcap, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref * 3.0, logits)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    atol = 1e-6 if reduction == "mean" else 1e-5
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=2e-3 if dtype == torch.bfloat16 else atol)
    assert torch.all(grad[1] == 0) and torch.all(grad[5] == 0)  # ignored rows get no gradient


def test_all_ignored_gives_zero_not_nan():
    logits = torch.randn(3, 40, requires_grad=True)
    loss = k.cross_entropy(logits, torch.full((3,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["plain", "softcap"])
def test_fused_linear_cross_entropy_chunks_match_reference(dtype, softcap):
    torch.manual_seed(0)
    hidden = torch.randn(11, 32).to(dtype).requires_grad_()
    weight = (torch.randn(300, 32) * 0.2).to(dtype).requires_grad_()
    bias = (torch.randn(300) * 0.1).to(dtype).requires_grad_()
    labels = _labels(11, 300, 1)
    loss = k.fused_linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=softcap, chunk_rows=4)  # 3 chunks
    grads = torch.autograd.grad(loss * 0.5, (hidden, weight, bias))
    ref = k.reference_fused_linear_cross_entropy(hidden, weight, labels, bias=bias, softcap=softcap)
    ref_grads = torch.autograd.grad(ref * 0.5, (hidden, weight, bias))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss, ref, rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-5)
    for ours, theirs in zip(grads, ref_grads):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.float(), theirs.float(), **tol)


def test_fused_linear_frozen_head_and_default_chunks():
    torch.manual_seed(3)
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    weight = torch.randn(100, 16)  # frozen LM head (LoRA): no weight gradient is accumulated
    labels = torch.randint(0, 100, (2, 5))
    loss = k.fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    k.reference_fused_linear_cross_entropy(ref_hidden.reshape(-1, 16), weight, labels.reshape(-1)).backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-6)


def test_causal_lm_loss_matches_transformers():
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(4)
    logits = torch.randn(2, 6, 50, requires_grad=True)
    labels = torch.randint(0, 50, (2, 6))
    labels[0, :2] = -100
    for items in (None, torch.tensor(7)):
        ours = k.causal_lm_loss(logits, labels, 50, num_items_in_batch=items)
        theirs = ForCausalLMLoss(logits, labels, 50, num_items_in_batch=items)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        g1, = torch.autograd.grad(ours, logits)
        g2, = torch.autograd.grad(theirs, logits)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_cross_entropy_gpu(softcap):
    torch.manual_seed(0)
    logits = (torch.randn(512, 32000, device="cuda") * 4).bfloat16().requires_grad_()
    labels = torch.randint(0, 32000, (512,), device="cuda")
    labels[::7] = -100
    loss = k.cross_entropy(logits, labels, softcap=softcap)
    (grad,) = torch.autograd.grad(loss, logits)
    ref = k.reference_cross_entropy(logits, labels, softcap=softcap)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-6)
