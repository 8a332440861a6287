"""Sources saved pre-quantized by transformers + bitsandbytes: reused as stored, never re-quantized."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import loadspec
from loadspec.errors import UsageError
from tests.test_options import logits

KINDS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),  # transformers' default compute dtype: float32
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def prequantized(checkpoint, tmp_path_factory):
    """prequantized(kind) -> a folder saved by transformers' save_pretrained of the llama fixture loaded quantized."""
    root, made = tmp_path_factory.mktemp("prequantized"), {}

    def get(kind: str):
        if kind not in made:
            source, folder = checkpoint("llama"), root / kind
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, device_map="cpu",
                                                         quantization_config=BitsAndBytesConfig(**KINDS[kind]))
            model.save_pretrained(folder)
            AutoTokenizer.from_pretrained(source).save_pretrained(folder)
            made[kind] = folder
        return made[kind]

    return get


def tensors(path):
    with safe_open(next(path.glob("*.safetensors")), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@pytest.mark.parametrize("kind", KINDS)
def test_prequantized_build_load_equals_transformers(kind, prequantized, write_spec, tmp_path):
    folder = prequantized(kind)
    built = loadspec.build(write_spec(folder, name="pq"), cache_dir=tmp_path, progress=False)
    source, artifact = tensors(folder), tensors(built.path)
    assert source.keys() == artifact.keys()
    assert all(torch.equal(source[k], artifact[k]) and source[k].dtype == artifact[k].dtype for k in source)  # copied as stored
    model, tokenizer = loadspec.load("pq", cache_dir=tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    assert torch.equal(logits(model, tokenizer), logits(reference, tokenizer))


def test_plan_says_the_source_settings_win(prequantized, write_spec):
    reasons = dict(loadspec.plan_spec(write_spec(prequantized("nf4-dq"), name="pq")).plan.reasons)
    assert reasons["quant"].startswith("nf4 from the pre-quantized source (its quantization_config wins over the spec's defaults; "
                                       "stored tensors copied, not re-quantized): blocksize 64, double quant on, compute dtype bfloat16; "
                                       "14 of 15 Linear layers")
    assert reasons["kept 16-bit"] == "lm_head (as stored in the source)"
    plan = loadspec.plan_spec(write_spec(prequantized("nf4"), name="pq", load={"quant": "nf4"})).plan  # the same, asked: fine
    assert plan.quant["compute_dtype"] == "float32" and plan.quant["double_quant"] is False
    assert "LLM.int8, outlier threshold 6" in dict(loadspec.plan_spec(write_spec(prequantized("int8"), name="pq")).plan.reasons)["quant"]


@pytest.mark.parametrize(("kind", "load", "message"), [
    ("nf4-dq", {"quant": "int8"}, r'stored pre-quantized in nf4 \(double quant on\), but the spec asks for quant = "int8"; '
                                  r'.*never dequantizes.*unquantized model.*remove quant from \[load\]'),
    ("int8", {"quant": "none"}, r'stored pre-quantized in int8, but the spec asks for quant = "none"'),
    ("nf4-dq", {"double_quant": False}, r"asks for double_quant = false"),
    ("nf4", {"skip_modules": ["q_proj"]}, r"skip_modules 'q_proj' names model\.layers\.0\.self_attn\.q_proj, which the source stores quantized"),
    ("nf4", {"full_finetuning": True}, r'full_finetuning without quant = "nf4" trains every weight in 16 bits'),
])
def test_conflicting_spec_refused_with_fix(kind, load, message, prequantized, write_spec):
    with pytest.raises(UsageError, match=message):
        loadspec.plan_spec(write_spec(prequantized(kind), name="pq", load=load))


def test_other_quantizations_refused_with_fix(checkpoint, write_spec, tmp_path):
    folder = tmp_path / "gptq"
    shutil.copytree(checkpoint("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    with pytest.raises(UsageError, match=r"already quantized \(gptq\); loadspec reuses bitsandbytes.*unquantized model"):
        loadspec.plan_spec(write_spec(folder, name="g"))
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                                                                       "bnb_4bit_quant_type": "nf4"}}))
    with pytest.raises(UsageError, match="says bitsandbytes nf4, but no Linear weight is stored that way"):
        loadspec.plan_spec(write_spec(folder, name="g"))
