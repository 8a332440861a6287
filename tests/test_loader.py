"""Loader pieces a whole load does not show on its own (the whole load: test_pipeline, test_options)."""
import pytest
import torch

from loadspec import loader

bnb = pytest.importorskip("bitsandbytes")


def test_empty_copy_of_a_4bit_layer_shares_nothing_mutable_with_its_prototype():
    prototype = bnb.nn.Linear4bit(96, 80, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
    copy = loader._empty_copy(prototype)
    assert type(copy) is bnb.nn.Linear4bit
    assert (copy.in_features, copy.out_features, copy.compute_dtype) == (96, 80, torch.bfloat16)
    for name in ("weight", "bias"):
        mine, theirs = copy._parameters[name], prototype._parameters[name]
        assert mine is not theirs and mine.is_meta
        assert (mine.shape, mine.dtype, mine.requires_grad) == (theirs.shape, theirs.dtype, theirs.requires_grad)
    copy.register_forward_hook(lambda *args: None)
    copy.weight = torch.nn.Parameter(torch.zeros(80, 96), requires_grad=False)
    assert not prototype._forward_hooks and prototype.weight.is_meta  # the prototype is untouched


def test_empty_copy_refuses_modules_with_submodules():
    with pytest.raises(ValueError, match="submodules"):
        loader._empty_copy(torch.nn.Sequential(torch.nn.Linear(2, 2)))
