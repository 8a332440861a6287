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

    before = {n: p.detach().clone() for n, p in params.items()}
    trainable = [p for p in params.values() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    model.train()
    ids = tokenizer("What is the capital of France? Paris", return_tensors="pt").input_ids
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    for name, param in params.items():
        assert torch.equal(param, before[name]) == (name in frozen), name  # trained weights moved, quantized bytes did not


def test_full_finetuning_refuses_what_cannot_work():
    def spec(extra):
        return parse_spec(f'name = "t"\n[model]\nsource = "/x"\n[load]\nfull_finetuning = true\n{extra}')

    with pytest.raises(SpecError, match=r'(?s)fp8 weights is not supported.*fix: use quant = "none".*or "nf4" / "int8"'):
        spec('quant = "fp8"\n')
    with pytest.raises(SpecError, match=r"\[lora\] adapter would only freeze it again"):
        spec('quant = "nf4"\n[lora]\nr = 8\n')
    assert spec('quant = "nf4"\n').load.quant == "nf4" and spec("").load.quant == "none"
