"""[tokenizer] added_tokens / added_special_tokens / resize_vocab: planned, built into the artifact, loaded."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

import loadspec
from loadspec.errors import SpecError, UsageError

PROMPT = "What is the capital of France? Paris is"
NEW = ["<tool_call>", "</tool_call>"]
SPECIAL = ["<|pad|>"]
ADDED = {"added_tokens": [*NEW, "the"], "added_special_tokens": SPECIAL, "pad_vocab_to_multiple_of": 64}


def stored(folder, name):
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            if name in handle.keys():
                return handle.get_tensor(name)
    return None


@pytest.mark.parametrize("family, quant", [("llama", "nf4"), ("gemma", "nf4"), ("qwen2", "int8"), ("falcon", "none")])
def test_added_tokens_grow_the_embedding_and_keep_old_logits(family, quant, checkpoint, write_spec, tmp_path):
    folder = checkpoint(family)
    cache = tmp_path / "cache"
    built = loadspec.build(write_spec(folder, name="grown", load={"quant": quant}, tokenizer=ADDED), cache_dir=cache, progress=False)
    loadspec.build(write_spec(folder, name="plain", load={"quant": quant}), cache_dir=cache, progress=False)
    size = len(AutoTokenizer.from_pretrained(folder))  # 512; Qwen2Tokenizer adds its own <|endoftext|> as 512
    reasons = dict(built.plan.reasons)
    assert "'the' is already in the vocabulary (id 401): not re-added" in reasons["added tokens"]
    assert f"grown 512 -> 576 rows (the tokenizer's {size + 3} tokens do not fit the embedding's 512 rows, rounded up to a " \
           "multiple of 64)" in reasons["vocab"]
    assert json.loads((built.path / "config.json").read_text())["vocab_size"] == 576
    embedding = next(n for n in built.plan.tokenizer["vocab"]["tensors"] if "emb" in n)
    source, grown = stored(folder, embedding), stored(built.path, embedding)
    assert grown.shape == (576, 64) and grown.dtype == torch.bfloat16  # 16-bit under nf4/int8 too
    assert torch.equal(grown[:512], source)
    mean = (source.sum(0, dtype=torch.float32) / 512).to(torch.bfloat16)
    assert torch.equal(grown[512:], mean.expand(64, -1))
    head = stored(built.path, "lm_head.weight")
    assert (head is None) == (family in ("gemma", "falcon"))  # tied: stored once, as the embedding
    if head is not None:
        assert head.shape == (576, 64) and head.dtype == torch.bfloat16
        assert torch.equal(head[512:], (stored(folder, "lm_head.weight").sum(0, dtype=torch.float32) / 512)
                           .to(torch.bfloat16).expand(64, -1))

    model, tokenizer = loadspec.load("grown", cache_dir=cache)
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == 576
    assert model.config.vocab_size == 576
    if head is None:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    new_ids = [size, size + 1, size + 2]
    assert tokenizer.convert_tokens_to_ids([*NEW, *SPECIAL]) == new_ids
    ids = tokenizer("call <tool_call>x</tool_call> done<|pad|>").input_ids
    assert [i for i in ids if i >= 512] == new_ids
    assert "<|pad|>" not in tokenizer.decode(ids, skip_special_tokens=True) and "<tool_call>" in tokenizer.decode(ids)
    assert tokenizer("the").input_ids == loadspec.load("plain", cache_dir=cache)[1]("the").input_ids  # 'the' not re-added

    plain, plain_tokenizer = loadspec.load("plain", cache_dir=cache)
    prompt = plain_tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = model(prompt).logits, plain(prompt).logits
    assert ours.shape[-1] == 576 and torch.equal(ours[..., :512], theirs)


def plan(write_spec, folder, **tokenizer):
    return loadspec.plan_spec(write_spec(folder, name="p", load={"quant": "none"}, tokenizer=tokenizer)).plan


def test_resize_vocab_decisions_and_fingerprints(checkpoint, write_spec):
    folder = checkpoint("llama")
    base = plan(write_spec, folder)
    exact = plan(write_spec, folder, resize_vocab=600)
    assert exact.config_overrides["vocab_size"] == 600 and "grown 512 -> 600 rows (resize_vocab = 600)" in dict(exact.reasons)["vocab"]
    assert exact.fingerprint != base.fingerprint
    fit = plan(write_spec, folder, resize_vocab=True, pad_vocab_to_multiple_of=100)
    assert fit.config_overrides["vocab_size"] == 600 and "resize_vocab = true: fit the tokenizer's 512 tokens, rounded up" in \
        dict(fit.reasons)["vocab"]
    for nothing_changes in (plan(write_spec, folder, resize_vocab=True), plan(write_spec, folder, added_tokens=["the", "</s>"])):
        assert nothing_changes.fingerprint == base.fingerprint and "vocab_size" not in nothing_changes.config_overrides
        assert "unchanged: the tokenizer's 512 tokens fit the embedding's 512 rows" in dict(nothing_changes.reasons)["vocab"]
    assert "'</s>' is already in the vocabulary (id 2)" in dict(plan(write_spec, folder, added_tokens=["</s>"]).reasons)["added tokens"]
    default = plan(write_spec, folder, added_tokens=NEW)
    assert default.config_overrides["vocab_size"] == 514 and default.tokenizer["added_tokens"] == [
        {"content": "<tool_call>", "special": False, "id": 512}, {"content": "</tool_call>", "special": False, "id": 513}]


@pytest.mark.parametrize("tokenizer, message", [
    ({"resize_vocab": 500}, r"p\.toml:\d+: tokenizer\.resize_vocab: 500 rows are fewer than the embedding's 512; loadspec never "
                            r"drops trained rows\. Set resize_vocab = 512 or more"),
    ({"resize_vocab": 513, "added_tokens": NEW}, r"p\.toml:\d+: tokenizer\.resize_vocab: 513 rows are fewer than the tokenizer's "
                                                 r"514 tokens \(ids up to 513\)\. Set resize_vocab = 514 or more, or true"),
    ({"resize_vocab": False, "added_tokens": NEW}, r"p\.toml:\d+: tokenizer\.resize_vocab: the added tokens take ids up to 513, "
                                                   r"beyond the embedding's 512 rows.*Remove resize_vocab"),
])
def test_impossible_sizes_refused_at_plan_time_with_fix(tokenizer, message, checkpoint, write_spec):
    with pytest.raises(UsageError, match=message):
        plan(write_spec, checkpoint("llama"), **tokenizer)


def test_tokens_fitting_spare_rows_start_at_the_mean_without_growing(checkpoint, write_spec, tmp_path):
    padded = loadspec.build(write_spec(checkpoint("llama"), name="padded", load={"quant": "none"}, tokenizer={"resize_vocab": 520}),
                            cache_dir=tmp_path, progress=False).path  # an artifact is a valid source: 520 rows, 512 tokens
    plan_ = plan(write_spec, padded, added_tokens=NEW)
    assert "vocab_size" not in plan_.config_overrides and plan_.tokenizer["vocab"]["mean_rows"] == [[512, 514]]
    assert "520 rows kept (the tokenizer's 514 tokens fit): model.embed_tokens.weight, lm_head.weight; the new tokens' spare rows " \
           "(512-513) start at the mean" in dict(plan_.reasons)["vocab"]


def test_spec_problems_reported_together_with_lines(tmp_path):
    from click.testing import CliRunner

    from loadspec.cli import main

    spec = tmp_path / "s.toml"
    spec.write_text('name = "x"\n[model]\nsource = "a/b"\n[tokenizer]\nadded_tokens = ["<a>", "<a>"]\n'
                    'added_special_tokens = ["<b>"]\nresize_vocab = "yes"\n')
    result = CliRunner().invoke(main, ["plan", str(spec)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "s.toml:5: tokenizer.added_tokens: lists '<a>' more than once" in result.output
    assert "s.toml:7: tokenizer.resize_vocab: must be true, false or a number of rows" in result.output
    both = 'name = "x"\n[model]\nsource = "a/b"\n[tokenizer]\nadded_tokens = ["<b>"]\nadded_special_tokens = ["<b>"]\n' \
           'resize_vocab = 600\npad_vocab_to_multiple_of = 64\n'
    with pytest.raises(SpecError) as error:
        loadspec.spec.parse_spec(both, "s.toml")
    assert [(p.key, p.line) for p in error.value.problems] == [("tokenizer.added_special_tokens", 6), ("tokenizer.resize_vocab", 7)]
    assert "fix: set resize_vocab = 640, or resize_vocab = true" in str(error.value)
    with pytest.raises(SpecError, match="pad_vocab_to_multiple_of: rounds the vocabulary when it grows, but nothing makes it grow"):
        loadspec.spec.parse_spec('name = "x"\n[model]\nsource = "a/b"\n[tokenizer]\npad_vocab_to_multiple_of = 64\n')


@pytest.mark.gpu
def test_added_tokens_on_gpu_keep_old_logits(checkpoint, write_spec, tmp_path):
    for name, tokenizer in (("grown", ADDED), ("plain", None)):
        loadspec.build(write_spec(checkpoint("llama"), name=name, target="auto", tokenizer=tokenizer), cache_dir=tmp_path, progress=False)
    (grown, tokenizer), (plain, _) = (loadspec.load(n, cache_dir=tmp_path) for n in ("grown", "plain"))
    ids = tokenizer(PROMPT + " <tool_call>", return_tensors="pt").input_ids.cuda()
    assert ids[0, -1].item() == 512 and grown.get_input_embeddings().weight.shape[0] == 576
    with torch.no_grad():
        # the LM head's GEMM has 576 columns instead of 512: cuBLAS may pick another kernel, so allow bf16 rounding
        torch.testing.assert_close(grown(ids[:, :-1]).logits[..., :512], plain(ids[:, :-1]).logits)
        assert grown(ids).logits.shape[-1] == 576
