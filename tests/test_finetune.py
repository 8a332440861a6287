"""[load] full_finetuning on a 16-bit, 4-bit or 8-bit model: what trains, what stays frozen, one real step."""
import bitsandbytes as bnb
import pytest
import torch

import loadspec
from loadspec.errors import SpecError
from loadspec.spec import parse_spec


@pytest.mark.parametrize("family, quant", [("qwen2", "nf4"), ("llama", "int8"), ("gemma", None)])
def test_full_finetuning_on_4bit_trains_16bit_weights_and_freezes_quantized(family, quant, checkpoint, write_spec, tmp_path):
    load = {"full_finetuning": True, **({"quant": quant} if quant else {})}
    built = loadspec.build(write_spec(checkpoint(family), name="fft", load=load), cache_dir=tmp_path, progress=False)
    assert built.plan.quant["method"] == (quant or "none")  # exactly what the spec says: no silent 16-bit, no silent 4-bit
    why = dict(built.plan.reasons)["full finetuning"]
    model, tokenizer = loadspec.load("fft", cache_dir=tmp_path)
    frozen = {f"{m}.weight" for m in built.plan.quantized}
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if not p.requires_grad} == frozen
    assert all(isinstance(params[n], (bnb.nn.Params4bit, bnb.nn.Int8Params)) for n in frozen)
    if quant:
        assert frozen and f'quant = "{quant}" asked with full_finetuning' in why and "carry no gradients" in why
        assert "embed_tokens.weight" in why and "norm.weight" in why and ("q_proj.bias" in why) == (family == "qwen2")
    else:
        assert not frozen and why.startswith("every parameter trains")

    assert one_step_moves_only_trainable(model, tokenizer) == frozen


def one_step_moves_only_trainable(model, tokenizer) -> set[str]:
    """Take one SGD step; check every trainable weight moved; return the names of those whose bytes did not change."""
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD([p for p in params.values() if p.requires_grad], lr=1.0)
    model.train()
    ids = tokenizer("What is the capital of France? Paris", return_tensors="pt").input_ids.to(model.device)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    unchanged = {n for n, p in params.items() if torch.equal(p, before[n])}
    assert not any(params[n].requires_grad for n in unchanged), unchanged
    return unchanged


@pytest.mark.gpu
def test_full_finetuning_on_4bit_trains_on_gpu(checkpoint, write_spec, tmp_path):
    built = loadspec.build(write_spec(checkpoint("llama"), name="fftgpu", load={"full_finetuning": True, "quant": "nf4"},
                                      target="auto"), cache_dir=tmp_path, progress=False)
    model, tokenizer = loadspec.load("fftgpu", cache_dir=tmp_path)
    assert model.device.type == "cuda"
    assert one_step_moves_only_trainable(model, tokenizer) == {f"{m}.weight" for m in built.plan.quantized}


def test_full_finetuning_refuses_what_cannot_work():
    def spec(extra):
        return parse_spec(f'name = "t"\n[model]\nsource = "/x"\n[load]\nfull_finetuning = true\n{extra}')

    with pytest.raises(SpecError, match=r'(?s)fp8 weights is not supported.*fix: use quant = "none".*or "nf4" / "int8"'):
        spec('quant = "fp8"\n')
    with pytest.raises(SpecError, match=r"\[lora\] adapter would only freeze it again"):
        spec('quant = "nf4"\n[lora]\nr = 8\n')
    assert spec('quant = "nf4"\n').load.quant == "nf4" and spec("").load.quant == "none"
