"""Load options users know from FastLanguageModel.from_pretrained / transformers + bitsandbytes.

README_ROWS maps each FastLanguageModel parameter that has a loadspec spec key to the test(s)
covering it here or elsewhere (the README's "From FastLanguageModel" table names the same tests).
"""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import loadspec
from loadspec.errors import SpecError, UsageError
from loadspec.hardware import GIB, profile
from loadspec.plan import resolve
from loadspec.spec import parse_spec
from tests.test_plan import LLAMA_8B, TINY_MISTRAL, TOKENIZER, source_for

README_ROWS = {
    "model_name": "tests/test_pipeline.py::test_build_load_matches_transformers",
    "max_seq_length": "tests/test_rope.py",
    "dtype": "tests/test_plan.py::test_dtype_follows_capability",
    "load_in_4bit": "tests/test_pipeline.py::test_build_load_matches_transformers",
    "load_in_8bit": "tests/test_options.py::test_int8_build_load_matches_transformers",
    "load_in_16bit": "tests/test_pipeline.py::test_build_load_matches_transformers",
    "full_finetuning": ("tests/test_options.py::test_full_finetuning_loads_16bit_and_trains_every_weight",
                        "tests/test_finetune.py::test_full_finetuning_on_4bit_trains_16bit_weights_and_freezes_quantized"),
    "resize_model_vocab": "tests/test_vocab.py::test_resize_vocab_decisions_and_fingerprints",
    "add_new_tokens": "tests/test_vocab.py::test_added_tokens_grow_the_embedding_and_keep_old_logits",
    "token": "tests/test_hub_source.py::test_token_read_from_env_and_never_written",
    "device_map": "tests/test_plan.py::test_device_map_spills_to_second_gpu_and_refuses_when_too_big",
    "rope_scaling": "tests/test_rope.py::test_override_honoured_exactly_beyond_4x",
    "trust_remote_code": "tests/test_options.py::test_trust_remote_code_recorded_and_fingerprinted",
    "use_gradient_checkpointing": "tests/test_checkpointing.py",
    "revision": "tests/test_hub_source.py::test_offline_revision_pinned_to_commit",
    "offload_embedding": "tests/test_options.py::test_offload_embedding_plans_embedding_on_cpu",
    "load_in_fp8": "tests/test_fp8.py::test_fp8_build_load_close_to_16bit",
    "random_state": "tests/test_lora.py",
    "fix_tokenizer": "tests/test_pipeline.py::test_tokenizer_fixes_applied",
    "float32_mixed_precision": "tests/test_plan.py::test_dtype_follows_capability",
    "quantization_config": "tests/test_prequantized.py::test_prequantized_build_load_equals_transformers",
}


def plan_for(load="", config=TINY_MISTRAL, target="cpu", extra=""):
    spec = parse_spec(f'name = "t"\n[model]\nsource = "/models/x"\n{extra}[load]\n{load}')
    return resolve(spec, profile(target), source_for(config))


def logits(model, tokenizer):
    ids = tokenizer("What is the capital of France? Paris is", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_readme_rows_name_real_tests():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    for parameter, tests in README_ROWS.items():
        for test in [tests] if isinstance(tests, str) else tests:
            path, _, name = test.partition("::")
            assert (root / path).is_file(), test
            assert not name or f"def {name}(" in (root / path).read_text(), test
        assert f"| `{parameter}`" in readme, f"README lacks a row for {parameter}"


def test_int8_build_load_matches_transformers(checkpoint, write_spec, tmp_path):
    import bitsandbytes as bnb

    folder = checkpoint("llama")
    built = loadspec.build(write_spec(folder, name="i8", load={"quant": "int8"}), cache_dir=tmp_path, progress=False)
    assert "int8 (LLM.int8" in dict(built.plan.reasons)["quant"]
    config = json.loads((built.path / "config.json").read_text())["quantization_config"]
    assert config["load_in_8bit"] and not config["load_in_4bit"] and config["llm_int8_threshold"] == 6.0
    with safe_open(next(built.path.glob("*.safetensors")), framework="pt") as handle:  # transformers' 8-bit layout
        q = "model.layers.0.self_attn.q_proj"
        assert handle.get_tensor(f"{q}.weight").dtype == torch.int8
        scb = handle.get_tensor(f"{q}.SCB")
        assert scb.dtype == torch.float32 and scb.shape == handle.get_tensor(f"{q}.weight").shape[:1]
        assert handle.get_tensor(f"{q}.weight_format").item() == 0
        assert handle.get_tensor("lm_head.weight").dtype == torch.bfloat16
    model, tokenizer = loadspec.load("i8", cache_dir=tmp_path)
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) == len(built.plan.quantized) > 0
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu",
                                                     quantization_config=BitsAndBytesConfig(load_in_8bit=True)).eval()
    ours = logits(model, tokenizer)
    assert torch.equal(ours, logits(reference, tokenizer))  # bitsandbytes' CPU int8 matmul, same bytes
    direct = AutoModelForCausalLM.from_pretrained(built.path, device_map="cpu").eval()  # transformers reads our artifact
    assert torch.equal(ours, logits(direct, tokenizer))


def test_int8_plan_sizes_and_flags():
    int8 = plan_for('quant = "int8"', config=LLAMA_8B, target="h100")
    nf4 = plan_for("", config=LLAMA_8B, target="h100")
    assert 7.0 * GIB < int8.memory["cuda:0"] < 8.5 * GIB and nf4.memory["cuda:0"] < 0.7 * int8.memory["cuda:0"]
    assert int8.quant["method"] == "int8" and "lm_head" not in int8.quantized
    assert int8.fingerprint != nf4.fingerprint
    with pytest.raises(SpecError, match=r'double_quant.*applies only to 4-bit quantization, but quant = "int8"'):
        plan_for('quant = "int8"\ndouble_quant = false')


def test_full_finetuning_loads_16bit_and_trains_every_weight(checkpoint, write_spec, tmp_path):
    built = loadspec.build(write_spec(checkpoint("qwen3"), name="fft", load={"full_finetuning": True}), cache_dir=tmp_path, progress=False)
    assert built.plan.quant == {"method": "none"} and built.plan.quantized == ()
    assert "full fine-tuning" in dict(built.plan.reasons)["quant"]
    model, tokenizer = loadspec.load("fft", cache_dir=tmp_path)
    params = list(model.parameters())
    assert all(p.requires_grad and p.dtype == torch.bfloat16 for p in params)
    ids = tokenizer("a b c", return_tensors="pt").input_ids
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in params)


def test_offload_embedding_plans_embedding_on_cpu():
    plan = plan_for("offload_embedding = true", target="h100")
    assert plan.device_map["model.embed_tokens"] == "cpu"
    assert set(plan.device_map.values()) == {"cpu", "cuda:0"}
    assert plan.memory["cpu"] == 512 * 64 * 2  # vocab x hidden in bf16 stays in host memory
    assert "stays in CPU memory" in dict(plan.reasons)["offload embedding"]
    assert plan.fingerprint == plan_for("", target="h100").fingerprint  # placement only: same artifact
    assert "nothing to do" in dict(plan_for("offload_embedding = true").reasons)["offload embedding"]
    tied = {**TINY_MISTRAL, "tie_word_embeddings": True}
    with pytest.raises(UsageError, match="ties its input embedding.*LM head"):
        plan_for("offload_embedding = true", config=tied, target="h100")


def test_offload_embedding_auto_offloads_only_a_frozen_untied_embedding_of_a_quantized_model():
    auto = plan_for("", target="h100")  # the default: nf4 on one GPU, [lora] or not, the embedding is only looked up
    assert auto.device_map["model.embed_tokens"] == "cpu"
    assert 'offload_embedding = "auto"' in dict(auto.reasons)["offload embedding"]
    assert plan_for("offload_embedding = false", target="h100").device_map == {"": "cuda:0"}
    kept = {
        "tied to the LM head": plan_for("", config={**TINY_MISTRAL, "tie_word_embeddings": True}, target="h100"),
        "not quantized": plan_for('quant = "none"', target="h100"),
        "full fine-tuning trains it": plan_for('full_finetuning = true\nquant = "nf4"', target="h100"),
        "the adapter trains it": plan_for("", target="h100", extra='[lora]\nmodules_to_save = ["embed_tokens"]\n'),
        "the vocabulary grows": resolve(parse_spec('name = "t"\n[model]\nsource = "/x"\n[tokenizer]\nresize_vocab = 640\n'), profile("h100"),
                                        source_for(TINY_MISTRAL, tokenizer={**TOKENIZER, "vocab": {"size_after": 512, "known": {}, "added": []}})),
        "spreads the model or is a table": plan_for("", target={"capability": "9.0", "memory": "80GiB", "count": 2}),
    }
    for why, plan in kept.items():
        assert "cpu" not in plan.device_map.values(), why
        assert why in dict(plan.reasons)["offload embedding"] and "stays on the GPU" in dict(plan.reasons)["offload embedding"]
    assert "offload embedding" not in dict(plan_for("").reasons)  # a CPU target: nothing to say
    with pytest.raises(SpecError, match='offload_embedding: must be true, false or "auto", got \'yes\''):
        plan_for('offload_embedding = "yes"')


def test_trust_remote_code_recorded_and_fingerprinted():
    plain = plan_for("")
    trusted = resolve(parse_spec('name = "t"\n[model]\nsource = "/models/x"\ntrust_remote_code = true\n'), profile("cpu"),
                      source_for(TINY_MISTRAL))
    assert trusted.source["trust_remote_code"] is True and plain.source["trust_remote_code"] is False
    assert plain.fingerprint != trusted.fingerprint  # the source's own code may be saved into the artifact


@pytest.mark.gpu
def test_int8_forward_on_gpu_matches_transformers(checkpoint, write_spec, tmp_path):
    folder = checkpoint("llama")
    loadspec.build(write_spec(folder, name="i8gpu", load={"quant": "int8"}, target="auto"), cache_dir=tmp_path, progress=False)
    model, tokenizer = loadspec.load("i8gpu", cache_dir=tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda:0",
                                                     quantization_config=BitsAndBytesConfig(load_in_8bit=True)).eval()
    ids = tokenizer("What is the capital of France?", return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.gpu
def test_offload_embedding_runs_on_gpu(checkpoint, write_spec, tmp_path):
    folder = checkpoint("mistral")
    loadspec.build(write_spec(folder, name="off", load={"offload_embedding": True}, target="auto"), cache_dir=tmp_path, progress=False)
    loadspec.build(write_spec(folder, name="on", load={"offload_embedding": False}, target="auto"), cache_dir=tmp_path, progress=False)
    model, tokenizer = loadspec.load("off", cache_dir=tmp_path)
    assert model.model.embed_tokens.weight.device.type == "cpu"
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    assert model.device.type == "cuda"  # where callers put their inputs: .to(model.device)
    ids = tokenizer("a b c", return_tensors="pt").to(model.device).input_ids
    reference, _ = loadspec.load("on", cache_dir=tmp_path)
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.device.type == "cuda" and torch.equal(logits, reference(ids).logits)
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, reference.generate(ids, max_new_tokens=3, do_sample=False))


def test_chat_template_by_name_applied_in_artifact(checkpoint, write_spec, tmp_path):
    built = loadspec.build(write_spec(checkpoint("llama"), name="chatml", tokenizer={"chat_template": "chatml"}),
                           cache_dir=tmp_path, progress=False)
    assert "built-in 'chatml'" in dict(built.plan.reasons)["chat template"]
    _, tokenizer = loadspec.load("chatml", cache_dir=tmp_path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    other = plan_for("", extra='[tokenizer]\nchat_template = "llama3"\n')
    assert other.fingerprint != plan_for("", extra='[tokenizer]\nchat_template = "chatml"\n').fingerprint
    with pytest.raises(SpecError, match="'chatlm' is neither a built-in template.*Did you mean 'chatml'"):
        plan_for("", extra='[tokenizer]\nchat_template = "chatlm"\n')
