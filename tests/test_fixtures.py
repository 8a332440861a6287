"""tools/fixtures.py: every family's tiny checkpoint is a real, loadable, deterministic model."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tools.fixtures import FAMILIES, main, make_checkpoint, train_tokenizer

PROMPT = "What is the capital of France?"
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}

# family -> (model class, model_type, tied embeddings, config values that make the family what it is)
EXPECTED = {
    "llama": ("LlamaForCausalLM", "llama", False, {"num_key_value_heads": 2}),
    "mistral": ("MistralForCausalLM", "mistral", False, {"num_key_value_heads": 2, "sliding_window": 16}),
    "gemma": ("GemmaForCausalLM", "gemma", True, {"head_dim": 16}),
    "gemma2": ("Gemma2ForCausalLM", "gemma2", True, {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                                                     "sliding_window": 16,
                                                     "layer_types": ["sliding_attention", "full_attention"]}),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text", True, {"sliding_window": 16,
                                                          "layer_types": ["sliding_attention", "full_attention"]}),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False, {"num_key_value_heads": 2}),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False, {"head_dim": 16}),
    "cohere": ("CohereForCausalLM", "cohere", True, {"logit_scale": 0.25}),
    "granite": ("GraniteForCausalLM", "granite", False, {"embedding_multiplier": 4.0, "residual_multiplier": 0.5,
                                                         "attention_multiplier": 0.125, "logits_scaling": 2.0}),
    "falcon": ("FalconForCausalLM", "falcon", True, {"new_decoder_architecture": True, "num_kv_heads": 2,
                                                     "alibi": False}),
}
# tensors only some families have: a fixture without them would not exercise the family
MARKERS = {
    "qwen2": "model.layers.0.self_attn.q_proj.bias",
    "qwen3": "model.layers.0.self_attn.q_norm.weight",
    "gemma2": "model.layers.0.pre_feedforward_layernorm.weight",
    "gemma3": "model.layers.0.self_attn.k_norm.weight",
    "falcon": "transformer.h.0.ln_mlp.bias",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixtures")
    return {family: make_checkpoint(family, root / family) for family in FAMILIES}


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def prompt_logits(folder, dtype=torch.float32):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, model, model(ids).logits


def test_families_match_the_expectations_table():
    assert set(FAMILIES) == set(EXPECTED) and len(FAMILIES) == 10


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_loads_and_runs(family, built):
    folder = built[family]
    class_name, model_type, tied, values = EXPECTED[family]
    ids, model, logits = prompt_logits(folder)
    assert type(model).__name__ == class_name
    assert model.config.model_type == model_type
    assert model.config.architectures == [class_name]
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.01  # random weights give varied logits, not a constant
    for key, value in values.items():
        assert getattr(model.config, key) == value, key
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.num_attention_heads == 4 and model.config.max_position_embeddings == 256
    assert model.config.tie_word_embeddings is tied


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_are_bf16_small_and_all_perturbed(family, built):
    folder = built[family]
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= files
    assert (folder / "model.safetensors").stat().st_size < 5_000_000
    weights = tensors(folder / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    _, tied, _ = EXPECTED[family][1:]
    assert ("lm_head.weight" in weights) is not tied
    if family in MARKERS:
        assert MARKERS[family] in weights
    for name, tensor in weights.items():
        t = tensor.float()
        assert t.std() > 0, f"{name} is constant: not perturbed"
        if t.ndim == 1:  # norm weights / biases: near their neutral value 0 or 1
            neutral = 1.0 if abs(t.mean() - 1) < 0.05 else 0.0
            assert abs(t.mean() - neutral) < 0.05, name
            assert (t - neutral).abs().max() <= 0.1 + 2**-7, name  # ± 0.1, plus bf16 rounding
        else:
            assert 0.015 < t.std() < 0.025, name


def test_forward_is_finite_in_half_precision(built):
    for family in ("gemma2", "granite", "falcon"):
        for dtype in (torch.bfloat16, torch.float16):
            _, _, logits = prompt_logits(built[family], dtype)
            assert logits.dtype == dtype and torch.isfinite(logits).all(), (family, dtype)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = make_checkpoint("qwen3", tmp_path / "a", seed=7)
    b = make_checkpoint("qwen3", tmp_path / "b", seed=7)
    c = make_checkpoint("qwen3", tmp_path / "c", seed=8)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "config.json").read_bytes() == (c / "config.json").read_bytes()


def test_tokenizer_round_trips_and_has_no_pad(built, tmp_path):
    folder = train_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.is_fast
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert tokenizer.pad_token is None and tokenizer.pad_token_id is None
    ids = tokenizer(PROMPT).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) < len(PROMPT) // 2  # trained merges, not one token per byte
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    assert len(tokenizer) == 512
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.startswith("<s>") and PROMPT in chat and chat.endswith("<|assistant|>\n")
    for family in FAMILIES:  # every checkpoint ships the same tokenizer, sized to its embeddings
        config = AutoConfig.from_pretrained(built[family])
        assert config.vocab_size == len(tokenizer)
        assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
        assert (built[family] / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_sharded_checkpoint_loads_the_same_model(built, tmp_path):
    folder = make_checkpoint("llama", tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    merged = {}
    for shard in shards:
        merged.update(tensors(shard))
    whole = tensors(built["llama"] / "model.safetensors")
    assert merged.keys() == whole.keys() == index["weight_map"].keys()
    assert all(torch.equal(merged[k], whole[k]) for k in whole)
    assert torch.equal(prompt_logits(folder)[2], prompt_logits(built["llama"])[2])


def test_llama3_rope_scaling_lands_in_config(tmp_path):
    folder = make_checkpoint("llama", tmp_path / "rope", rope_scaling=LLAMA3, max_position_embeddings=131072)
    written = json.loads((folder / "config.json").read_text())
    assert written["rope_parameters"]["rope_type"] == "llama3"  # transformers 5's key
    config = AutoConfig.from_pretrained(folder)
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 8192
    _, model, logits = prompt_logits(folder)
    assert model.model.rotary_emb.rope_type == "llama3"

    legacy = make_checkpoint("llama", tmp_path / "legacy", rope_scaling=LLAMA3, max_position_embeddings=131072,
                             rope_key="rope_scaling")
    old = json.loads((legacy / "config.json").read_text())
    assert "rope_parameters" not in old and old["rope_scaling"]["rope_type"] == "llama3"
    assert old["rope_theta"] == 10000.0
    assert torch.equal(prompt_logits(legacy)[2], logits)


def test_dtype_and_tying_options(tmp_path):
    folder = make_checkpoint("llama", tmp_path / "f16", dtype=torch.float16, tie_word_embeddings=True)
    weights = tensors(folder / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in weights.values())
    assert "lm_head.weight" not in weights
    _, model, logits = prompt_logits(folder)
    assert model.config.tie_word_embeddings and torch.isfinite(logits).all()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        make_checkpoint("gpt2", tmp_path / "x")


def test_cli_writes_one_folder_per_family(tmp_path, capsys):
    assert main([str(tmp_path), "--family", "gemma", "--family", "falcon"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["falcon", "gemma"]
    assert AutoConfig.from_pretrained(tmp_path / "falcon").model_type == "falcon"
    assert str(tmp_path / "gemma") in capsys.readouterr().out
