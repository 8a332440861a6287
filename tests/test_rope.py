"""RoPE planning on the rope blocks real models ship (written inline, as their config.json has them).

The tiny layer sizes keep skeletons cheap; the rope blocks, contexts and theta values are the
real ones. Each test checks what a user notices: the config.json edits and the plan's reason.
"""
import pytest

from loadspec.errors import SpecError, UsageError
from loadspec.hardware import profile
from loadspec.plan import resolve
from loadspec.spec import parse_spec
from tests.test_plan import source_for

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": False}
# meta-llama/Llama-3.1-8B config.json
LLAMA_31 = {**TINY, "model_type": "llama", "max_position_embeddings": 131072, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
# meta-llama/Llama-3.2-1B config.json
LLAMA_32 = {**TINY, "model_type": "llama", "max_position_embeddings": 131072, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
# Qwen/Qwen2.5-7B-Instruct config.json ships rope_scaling null; its model card says to add this yarn block
QWEN25_YARN = {**TINY, "model_type": "qwen2", "max_position_embeddings": 32768, "rope_theta": 1000000.0,
               "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}}
QWEN25 = {**QWEN25_YARN, "rope_scaling": None}
# mistralai/Mistral-7B-Instruct-v0.3 config.json: plain RoPE
MISTRAL = {**TINY, "model_type": "mistral", "max_position_embeddings": 32768, "rope_theta": 1000000.0}
# google/gemma-3-1b-it as transformers 5 saves it: per-layer-type rope_parameters
GEMMA3 = {**TINY, "model_type": "gemma3_text", "head_dim": 16, "max_position_embeddings": 32768, "sliding_window": 512,
          "layer_types": ["sliding_attention", "full_attention"],
          "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
# microsoft/Phi-3-mini-128k-instruct style longrope (factor lists sized for this head_dim of 16)
LONGROPE = {**TINY, "model_type": "llama", "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.4, 1.8, 2.5],
                             "long_factor": [1.1, 1.3, 1.9, 3.0, 5.5, 9.0, 14.0, 20.0]}}
# a dynamic-NTK fine-tune (e.g. the Llama 2 dynamic-NTK community configs)
DYNAMIC = {**TINY, "model_type": "llama", "max_position_embeddings": 4096, "rope_theta": 10000.0,
           "rope_scaling": {"type": "dynamic", "factor": 2.0}}


def plan(config, load="", target="h100"):
    spec = parse_spec(f'name = "t"\n[model]\nsource = "/models/x"\n[load]\nquant = "none"\n{load}')
    return resolve(spec, profile(target), source_for(config))


def why(p):
    return dict(p.reasons)["rope"]


@pytest.mark.parametrize("config,own", [(LLAMA_31, 8.0), (LLAMA_32, 32.0)])
def test_llama3_type_kept_factor_multiplied(config, own):
    p = plan(config, "max_seq_length = 262144")
    scaled = p.config_overrides["rope_scaling"]
    assert scaled == {**config["rope_scaling"], "factor": own * 2}  # low/high/original untouched
    assert p.config_overrides["max_position_embeddings"] == 262144
    assert "llama3 scaling kept" in why(p) and "extension 2x" in why(p)


def test_llama3_within_context_changes_nothing():
    p = plan(LLAMA_31, "max_seq_length = 8192")
    assert p.config_overrides == {} and why(p).startswith("unchanged")


def test_qwen25_yarn_from_card_already_covers_4x():
    p = plan(QWEN25_YARN, "max_seq_length = 131072")  # 32768 x yarn 4 = 131072: nothing to change
    assert p.config_overrides == {}
    assert "yarn scaling already covers 131072" in why(p)


def test_qwen25_yarn_extended_keeps_original_context():
    p = plan(QWEN25_YARN, "max_seq_length = 262144")
    scaled = p.config_overrides["rope_scaling"]
    assert scaled["type"] == "yarn" and scaled["factor"] == 8.0  # 262144 / 32768, not 4 x 8
    assert scaled["original_max_position_embeddings"] == 32768
    assert p.config_overrides["max_position_embeddings"] == 262144  # = original x factor: transformers sees no mismatch
    assert "262144 / original context 32768" in why(p)


def test_qwen25_plain_gets_linear_and_beyond_4x_needs_override():
    p = plan(QWEN25, "max_seq_length = 65536")
    assert p.config_overrides["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(UsageError, match=r"8\.0x.*at most 4x.*rope_scaling = \{rope_type = \"yarn\", factor = 8"):
        plan(QWEN25, "max_seq_length = 262144")


def test_mistral_default_becomes_linear():
    p = plan(MISTRAL, "max_seq_length = 131072")
    scaled = p.config_overrides["rope_scaling"]
    assert scaled["rope_type"] == "linear" and scaled["factor"] == 4.0
    assert "linear scaling, factor 4 = 131072 / 32768" in why(p)


def test_gemma3_per_layer_rope_scales_full_attention_only():
    p = plan(GEMMA3, "max_seq_length = 65536")
    scaled = p.config_overrides["rope_parameters"]
    assert scaled["full_attention"] == {"rope_type": "linear", "factor": 16.0, "rope_theta": 1000000.0}
    assert scaled["sliding_attention"] == GEMMA3["rope_parameters"]["sliding_attention"]
    assert set(scaled) == {"full_attention", "sliding_attention"}  # no stray top-level rope_type
    assert "sliding_attention unchanged" in why(p)
    from loadspec import arch

    config = arch.hf_config({**GEMMA3, **p.config_overrides})  # transformers accepts the edited block
    assert config.rope_parameters["full_attention"]["factor"] == 16.0


def test_longrope_refused_with_reason():
    assert plan(LONGROPE, "max_seq_length = 131072").config_overrides == {}
    with pytest.raises(UsageError, match="longrope.*cannot extend them correctly.*rope_scaling"):
        plan(LONGROPE, "max_seq_length = 262144")


def test_dynamic_keeps_config_and_says_why():
    p = plan(DYNAMIC, "max_seq_length = 16384")
    assert p.config_overrides == {}  # raising max_position_embeddings would move dynamic NTK's threshold
    assert "rescales RoPE at run time" in why(p) and "4096 kept" in why(p)
    with pytest.raises(UsageError, match="at most 4x"):
        plan(DYNAMIC, "max_seq_length = 32768")


def test_override_honoured_exactly_beyond_4x():
    p = plan(MISTRAL, 'max_seq_length = 262144\nrope_scaling = {rope_type = "yarn", factor = 8.0, original_max_position_embeddings = 32768}')
    assert p.config_overrides == {"rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32768},
                                  "max_position_embeddings": 262144}
    assert "explicit [load] rope_scaling honoured" in why(p)


def test_override_on_rope_parameters_carries_theta_and_keeps_sliding():
    p = plan(GEMMA3, 'max_seq_length = 262144\nrope_scaling = {rope_type = "linear", factor = 64.0}')
    scaled = p.config_overrides["rope_parameters"]
    assert scaled["full_attention"] == {"rope_type": "linear", "factor": 64.0, "rope_theta": 1000000.0}
    assert scaled["sliding_attention"]["rope_type"] == "default"


def test_override_checked_at_plan_time():
    with pytest.raises(UsageError, match=r"rope_type 'yran'.*Did you mean 'yarn'"):
        plan(MISTRAL, 'rope_scaling = {rope_type = "yran", factor = 8.0}')
    with pytest.raises(UsageError, match="yarn RoPE needs original_max_position_embeddings"):
        plan(MISTRAL, 'rope_scaling = {rope_type = "yarn", factor = 8.0}')
    with pytest.raises(UsageError, match="covers 131072 positions, less than max_seq_length 262144"):
        plan(MISTRAL, 'max_seq_length = 262144\nrope_scaling = {rope_type = "yarn", factor = 4.0, original_max_position_embeddings = 32768}')
    with pytest.raises(SpecError, match="rope_scaling.*must be a non-empty table"):
        plan(MISTRAL, 'rope_scaling = "yarn"')
    for written, shown in (("0", "0"), ("-4", "-4"), ("1.5", "1.5"), ('"32k"', "'32k'")):  # 0 divided by zero (test_spec_fuzz)
        with pytest.raises(UsageError, match=f"original_max_position_embeddings must be a whole number.*got {shown}"):
            plan(MISTRAL, f'rope_scaling = {{rope_type = "yarn", factor = 1.0, original_max_position_embeddings = {written}}}')


def test_rope_edits_change_the_fingerprint_only_when_bytes_change():
    assert plan(MISTRAL, "max_seq_length = 1024").fingerprint == plan(MISTRAL, "max_seq_length = 32768").fingerprint
    assert plan(MISTRAL, "max_seq_length = 65536").fingerprint != plan(MISTRAL, "max_seq_length = 131072").fingerprint
