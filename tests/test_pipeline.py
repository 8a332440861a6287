"""End to end on every family: build once, load from the cache, and get transformers' own logits."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import loadspec
from tools.fixtures import FAMILIES

PROMPT = "What is the capital of France? Paris is"


def transformers_reference(folder, quant, dtype=torch.bfloat16):
    """The plain transformers (+ bitsandbytes) path on the same checkpoint."""
    kwargs = {}
    if quant != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cpu", **kwargs).eval()


def bnb_reference(folder, quantized, device="cpu", dtype=torch.bfloat16):
    """transformers' bf16 model with each planned Linear swapped for bitsandbytes 4-bit by hand.

    Needed for Falcon: transformers' own integration converts only modules whose type *is*
    nn.Linear, so it silently leaves FalconLinear layers unquantized.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import quantize_4bit

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device).eval()
    for name in quantized:
        parent_name, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=dtype,
                                compress_statistics=True, quant_type="nf4", device=device)
        packed, state = quantize_4bit(old.weight.data, blocksize=64, compress_statistics=True, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=64, compress_statistics=True,
                                       quant_type="nf4", module=new, bnb_quantized=True)
        new.quant_state = state
        if old.bias is not None:
            new.bias = old.bias
        setattr(model.get_submodule(parent_name), child, new)
    return model


def logits(model, tokenizer):
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("quant", ["nf4", "none"])
@pytest.mark.parametrize("family", FAMILIES)
def test_build_load_matches_transformers(family, quant, checkpoint, write_spec, tmp_path):
    folder = checkpoint(family)
    spec = write_spec(folder, name=f"{family}-{quant}", load={"quant": quant})
    built = loadspec.build(spec, cache_dir=tmp_path / "cache", progress=False)
    assert not built.cached
    model, tokenizer = loadspec.load(f"{family}-{quant}", cache_dir=tmp_path / "cache")
    ours = logits(model, tokenizer)
    if family == "falcon" and quant == "nf4":
        reference = bnb_reference(folder, built.plan.quantized)
    else:
        reference = transformers_reference(folder, quant)
    theirs = logits(reference, AutoTokenizer.from_pretrained(folder))
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.equal(ours, theirs), f"max diff {(ours.float() - theirs.float()).abs().max()}"
    if quant == "nf4":
        import bitsandbytes as bnb

        linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(linear4) == len(built.plan.quantized) > 0
        assert model.lm_head.weight.dtype == torch.bfloat16


def test_second_build_is_a_cache_hit_that_reads_no_weights(checkpoint, write_spec, tmp_path, monkeypatch):
    spec = write_spec(checkpoint("llama"), name="hit")
    first = loadspec.build(spec, cache_dir=tmp_path, progress=False)
    from loadspec import builder, reader

    def no_reads(*args, **kwargs):
        raise AssertionError("a cache hit must not read tensor data or build")

    monkeypatch.setattr(builder, "read_ahead", no_reads)  # how a build reads safetensors sources
    monkeypatch.setattr(builder, "_stream", no_reads)  # GGUF and pickle sources
    monkeypatch.setattr(reader, "iter_file_tensors", no_reads)
    monkeypatch.setattr(builder, "write_artifact", no_reads)
    second = loadspec.build(spec, cache_dir=tmp_path, progress=False)
    assert second.cached and second.path == first.path


def test_transformers_reads_the_artifact_directly(checkpoint, write_spec, tmp_path):
    spec = write_spec(checkpoint("qwen3"), name="direct")
    built = loadspec.build(spec, cache_dir=tmp_path, progress=False)
    ours, tokenizer = loadspec.load("direct", cache_dir=tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(built.path, device_map="cpu").eval()
    assert torch.equal(logits(ours, tokenizer), logits(plain, tokenizer))


def test_rope_scaled_artifact_carries_scaling(checkpoint, write_spec, tmp_path):
    spec = write_spec(checkpoint("mistral"), name="long", load={"max_seq_length": 1024, "quant": "none"})
    built = loadspec.build(spec, cache_dir=tmp_path, progress=False)
    model, _ = loadspec.load("long", cache_dir=tmp_path)
    rope = getattr(model.config, "rope_parameters", None) or model.config.rope_scaling
    assert rope["rope_type"] == "linear" and rope["factor"] == 4.0
    assert model.config.max_position_embeddings == 1024
    assert built.plan.config_overrides["max_position_embeddings"] == 1024


def test_tokenizer_fixes_applied(checkpoint, write_spec, tmp_path):
    spec = write_spec(checkpoint("gemma"), name="tok", tokenizer={"padding_side": "left"})
    loadspec.build(spec, cache_dir=tmp_path, progress=False)
    _, tokenizer = loadspec.load("tok", cache_dir=tmp_path)
    assert tokenizer.pad_token == "<unk>"  # the fixture has no pad token; unk is reused
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["a", "a longer text"], padding=True, return_tensors="pt")
    assert batch.attention_mask[0, 0] == 0  # left padding really happens


def test_sharded_source_builds(tmp_path, write_spec):
    from tools.fixtures import make_checkpoint

    folder = make_checkpoint("llama", tmp_path / "sharded", max_shard_size="100KB", seed=3)
    spec = write_spec(folder, name="sharded")
    loadspec.build(spec, cache_dir=tmp_path / "cache", progress=False)
    model, tokenizer = loadspec.load("sharded", cache_dir=tmp_path / "cache")
    assert torch.equal(logits(model, tokenizer), logits(transformers_reference(folder, "nf4"), tokenizer))


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma2", "falcon"])
def test_gpu_build_and_load_match_transformers(family, checkpoint, write_spec, tmp_path):
    """On a GPU: bitsandbytes' CUDA quantizer at build time, the pinned-ring reader at load time."""
    folder = checkpoint(family)
    spec = write_spec(folder, name=f"gpu-{family}", target="auto")
    built = loadspec.build(spec, cache_dir=tmp_path, progress=False)
    assert set(built.plan.device_map.values()) - {"cpu"} == {"cuda:0"}  # llama's untied embedding: host memory ("auto")
    model, tokenizer = loadspec.load(f"gpu-{family}", cache_dir=tmp_path)
    if family == "falcon":
        reference = bnb_reference(folder, built.plan.quantized, device="cuda:0")
    else:
        reference = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, device_map="cuda:0",
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16)).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    assert torch.equal(ours, theirs), f"max diff {(ours.float() - theirs.float()).abs().max()}"
    print(f"{family}: GPU build+load logits equal to transformers nf4 on {torch.cuda.get_device_name()}")
