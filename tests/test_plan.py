"""Planning decisions: dtype per target, RoPE scaling, quantized modules, device maps, fingerprints."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from loadspec import arch
from loadspec.errors import UsageError
from loadspec.hardware import GIB, profile
from loadspec.plan import LoadPlan, resolve
from loadspec.source import Source, TensorInfo
from loadspec.spec import parse_spec

LLAMA_8B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            # Llama 3.1's real rope block, as its config.json ships it
            "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
TINY_MISTRAL = {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 1024}
TOKENIZER = {"present": True, "eos_token": "</s>", "unk_token": "<unk>"}


def source_for(config, identity="id-1", tokenizer=TOKENIZER):
    """A Source with real tensor shapes for `config`, without any files."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch.hf_config(config))
    tensors = {n: TensorInfo(tuple(p.shape), "bfloat16", "model.safetensors") for n, p in model.state_dict().items()}
    return Source("local", "/models/x", None, "", identity, config, tensors, tokenizer)


def plan_for(text_extra="", config=TINY_MISTRAL, target="cpu", **kw):
    spec = parse_spec(f'name = "t"\n[model]\nsource = "/models/x"\n{text_extra}')
    return resolve(spec, profile(target), source_for(config, **kw))


def test_dtype_follows_capability():
    assert plan_for(target="t4").dtype == "float16"
    assert plan_for(target="v100").dtype == "float16"
    assert plan_for(target="h100").dtype == "bfloat16"
    assert plan_for(target="a100").dtype == "bfloat16"


def test_fp16_overflowing_family_gets_float32_on_old_gpus():
    gemma3 = {**TINY_MISTRAL, "model_type": "gemma3_text", "head_dim": 16}
    plan = plan_for(config=gemma3, target="t4")
    assert plan.dtype == "float32"
    assert "float16" in dict(plan.reasons)["dtype"]


def test_bfloat16_on_old_gpu_is_an_error_with_fix():
    with pytest.raises(UsageError, match="capability 8.0.*float16"):
        plan_for('[load]\ndtype = "bfloat16"\n', target="t4")


def test_rope_linear_factor_from_max_seq_length():
    plan = plan_for("[load]\nmax_seq_length = 4096\n")  # 4x the 1024 context
    overrides = plan.config_overrides
    key = "rope_parameters" if "rope_parameters" in overrides else "rope_scaling"
    assert overrides[key]["rope_type"] == "linear" and overrides[key]["factor"] == 4.0
    assert overrides["max_position_embeddings"] == 4096
    assert "4x" in dict(plan.reasons)["rope"]


def test_rope_llama3_keeps_its_fields_and_scales_factor():
    plan = plan_for(f"[load]\nmax_seq_length = {4 * 131072}\nquant = \"none\"\n", config=LLAMA_8B, target="h100")
    scaled = plan.config_overrides["rope_scaling"]
    assert scaled["rope_type"] == "llama3"
    assert scaled["factor"] == 8.0 * 4.0  # the model's own 8x, extended 4x more
    assert scaled["low_freq_factor"] == 1.0 and scaled["high_freq_factor"] == 4.0
    assert scaled["original_max_position_embeddings"] == 8192
    assert plan.config_overrides["max_position_embeddings"] == 4 * 131072
    assert "extension 4x" in dict(plan.reasons)["rope"]


def test_rope_beyond_4x_refused():
    with pytest.raises(UsageError, match="at most 4x"):
        plan_for("[load]\nmax_seq_length = 8192\n")


def test_max_seq_length_within_context_changes_no_bytes():
    assert plan_for("[load]\nmax_seq_length = 512\n").fingerprint == plan_for("[load]\nmax_seq_length = 1000\n").fingerprint
    assert plan_for("[load]\nmax_seq_length = 512\n").fingerprint != plan_for("[load]\nmax_seq_length = 2048\n").fingerprint


def test_fingerprint_covers_bytes_not_placement():
    base = plan_for(target="h100")
    assert base.fingerprint == plan_for(target="a100").fingerprint  # same dtype and bytes: one artifact
    assert base.fingerprint != plan_for(target="t4").fingerprint  # float16 changes the bytes
    assert base.fingerprint != plan_for("[load]\ndouble_quant = false\n", target="h100").fingerprint
    assert base.fingerprint != plan_for(target="h100", identity="id-2").fingerprint  # weights changed


def test_nf4_quantizes_linears_but_not_lm_head():
    plan = plan_for()
    assert "model.layers.0.self_attn.q_proj" in plan.quantized
    assert "lm_head" not in plan.quantized
    assert len(plan.quantized) == 2 * 7


def test_skip_modules_typo_is_caught_at_plan_time():
    with pytest.raises(UsageError, match="Did you mean 'o_proj'"):
        plan_for('[load]\nskip_modules = ["o_prj"]\n')
    plan = plan_for('[load]\nskip_modules = ["o_proj"]\n')
    assert not any(name.endswith("o_proj") for name in plan.quantized)


def test_device_map_uses_quantized_sizes():
    nf4 = plan_for('[load]\noffload_embedding = false\n', config=LLAMA_8B, target="h100")
    bf16 = plan_for('[load]\nquant = "none"\n', config=LLAMA_8B, target="h100")
    assert nf4.device_map == {"": "cuda:0"}
    assert nf4.memory["cuda:0"] < 0.36 * bf16.memory["cuda:0"]  # the 16-bit embedding and LM head: 35.5 %
    offloaded = plan_for(config=LLAMA_8B, target="h100")  # offload_embedding = "auto"
    assert offloaded.device_map["model.embed_tokens"] == "cpu"
    assert offloaded.memory["cuda:0"] < 0.30 * bf16.memory["cuda:0"]
    assert 14.5 * GIB < bf16.memory["cuda:0"] < 15.5 * GIB  # 8B params in bf16


def test_device_map_spills_to_second_gpu_and_refuses_when_too_big():
    small = {"capability": "8.0", "memory": "8GiB", "count": 2}
    spec = parse_spec('name = "t"\n[model]\nsource = "/x"\n[load]\nquant = "none"\n')
    with pytest.raises(UsageError, match="need 15"):
        resolve(spec, profile(small), source_for(LLAMA_8B))
    spec_nf4 = parse_spec('name = "t"\n[model]\nsource = "/x"\n')
    plan = resolve(spec_nf4, profile(small), source_for(LLAMA_8B))
    assert set(plan.device_map.values()) == {"cuda:0"}
    balanced = resolve(parse_spec('name = "t"\n[model]\nsource = "/x"\n[load]\ndevice_map = "balanced"\n'), profile(small), source_for(LLAMA_8B))
    assert set(balanced.device_map.values()) == {"cuda:0", "cuda:1"}
    assert balanced.device_map["model.embed_tokens"] == "cuda:0" and balanced.device_map["lm_head"] == "cuda:1"


def test_pad_token_fix():
    assert plan_for().tokenizer["pad_token"] == "<unk>"
    assert plan_for(tokenizer={"present": True, "eos_token": "</s>"}).tokenizer["pad_token"] == "</s>"
    assert plan_for(tokenizer={"present": True, "pad_token": "<pad>", "unk_token": "<unk>"}).tokenizer["pad_token"] == "<pad>"
    with pytest.raises(UsageError, match="no tokenizer"):
        plan_for(tokenizer={"present": False})


def test_plan_json_round_trips_canonically():
    plan = plan_for("[load]\nmax_seq_length = 2048\n", target="h100")
    text = plan.to_json()
    again = LoadPlan.from_json(text)
    assert again == plan and again.to_json() == text and again.fingerprint == plan.fingerprint
    assert json.loads(text)["dtype"] == "bfloat16"


def test_unsupported_family_is_named():
    with pytest.raises(UsageError, match="gpt2.*not a supported family"):
        plan_for(config={"model_type": "gpt2", "n_embd": 64, "n_layer": 1, "n_head": 4, "vocab_size": 100})
