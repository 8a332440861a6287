"""Tiny random-weight Hugging Face checkpoints for every supported family, fully offline.

Each checkpoint is a real transformers model (its own config and model classes) shrunk to
a few hundred kilobytes, with a byte-level BPE tokenizer trained here on a built-in
corpus: no model hub, no network, and the same seed always gives byte-identical files.

    python tools/fixtures.py OUT_DIR [--family llama --family gemma2 ...]

writes OUT_DIR/<family>/ for each family asked for (all of them by default).
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch

FAMILIES: tuple[str, ...] = ("llama", "mistral", "gemma", "gemma2", "gemma3", "qwen2", "qwen3", "cohere", "granite", "falcon")

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
VOCAB_SIZE = 512  # the BPE trainer's target; the corpus below is long enough to reach it

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CORPUS = """\
What is the capital of France? Paris. What is the capital of Italy? Rome. What is the
capital of Spain? Madrid. What is the capital of Germany? Berlin. The capital of a
country is the city where its government sits, and it is often, but not always, the
largest city in that country.

Paris is the capital of France and its most populous city. The river Seine runs through
the middle of the city, and people have lived on its banks for more than two thousand
years. Visitors come to see the museums, the old churches, the long avenues and the
small cafes where people sit outside and watch the city go by.

A language model reads a sequence of tokens and predicts the next one. It is trained on
a large amount of text, and then it can be fine-tuned on a smaller set of examples so
that it follows instructions, answers questions, or writes in a particular style. To
fine-tune a large model on a single graphics card, its weights are often stored in four
bits and only small adapter matrices are trained, while the rest of the model stays
frozen.

The weather today is mild. In the morning there was a little rain, but by the afternoon
the clouds had cleared and the sun came out. Tomorrow should be warmer, with a light wind
from the south and a chance of showers in the evening. Remember to take an umbrella.

Once upon a time there was a small village at the edge of a forest. Every morning the
baker opened his shop before sunrise, and the smell of fresh bread drifted through the
streets. The children of the village would stop at his door on their way to school, and
he would give each of them a warm roll with a little butter.

Numbers and dates appear in text as well: 1, 2, 3, 10, 42, 100, 2024, 3.14 and 0.5. A
list can be written with commas, or with one item on each line. Questions end with a
question mark? Statements end with a full stop. Some sentences end with an exclamation!

Cooking is a simple pleasure. Put a pot of water on the stove, add a pinch of salt, and
wait for it to boil. Meanwhile, chop an onion, two cloves of garlic and a handful of
fresh tomatoes. Fry the onion slowly in olive oil until it is soft and golden, then add
the garlic and the tomatoes and let the sauce simmer while the pasta cooks.

The train leaves the station at seven in the morning and arrives in the city just after
nine. Passengers read newspapers, look out of the window at the fields and the rivers,
or talk quietly with their friends. When the train finally stops, everyone stands up,
takes their bags and steps out onto the busy platform.

Computers store everything as numbers. A byte holds eight bits, and text is written as a
sequence of bytes. A tokenizer splits that text into pieces that a model can read: common
words become a single token, while rare words are broken into several smaller parts.

User: Can you tell me what the capital of France is?
Assistant: Of course. The capital of France is Paris.
User: Thank you. And what is two plus two?
Assistant: Two plus two is four.
"""

# Shared by every checkpoint: tiny, yet every structural feature is present.
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 4, 2, 16
SLIDING_WINDOW = 16  # small enough that an ordinary test prompt crosses it


# ---------------------------------------------------------------------------- tokenizer

_TOKENIZER_FILES: dict[str, bytes] | None = None  # trained once per process


def _tokenizer_files() -> dict[str, bytes]:
    """File name -> contents of the trained tokenizer (trained on first use, then memoized)."""
    global _TOKENIZER_FILES
    if _TOKENIZER_FILES is not None:
        return _TOKENIZER_FILES
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[UNK, BOS, EOS],  # ids 0, 1, 2, as in Llama's tokenizer
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS], trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # Llama-style: every encoded text starts with <s>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)])

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        # no pad_token on purpose: loadspec's pad-token fix is tested against this
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    _TOKENIZER_FILES = {
        "tokenizer.json": tokenizer.to_str(pretty=True).encode(),
        "tokenizer_config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
        "special_tokens_map.json": (json.dumps(special, indent=2, sort_keys=True) + "\n").encode(),
    }
    return _TOKENIZER_FILES


def train_tokenizer(out_dir: Path) -> Path:
    """Write the fixture tokenizer (byte-level BPE, ~512 tokens, no pad token) into out_dir.

    `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it as a fast tokenizer with
    bos '<s>', eos '</s>', unk '<unk>', a chat template and no pad token. Training happens
    once per process; later calls copy the same bytes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in _tokenizer_files().items():
        (out_dir / name).write_bytes(data)
    return out_dir


def _tokenizer_facts() -> dict:
    """vocab size (special tokens included) and the special tokens' ids."""
    tokenizer = json.loads(_tokenizer_files()["tokenizer.json"])
    vocab = dict(tokenizer["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in tokenizer["added_tokens"]})
    assert sorted(vocab.values()) == list(range(len(vocab))), "tokenizer ids are not contiguous"
    return {"vocab_size": len(vocab), "bos": vocab[BOS], "eos": vocab[EOS], "unk": vocab[UNK]}


# ---------------------------------------------------------------------------- models

def _family_config(family: str, common: dict, rope_scaling: dict | None):
    """(config object, model class) for one family, built from transformers' own classes."""
    import transformers as tf

    llama_like = {**common, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
                  "intermediate_size": INTERMEDIATE}
    if family == "llama":
        config_class, model_class = tf.LlamaConfig, tf.LlamaForCausalLM
        kwargs = {**llama_like, "head_dim": HEAD_DIM}
    elif family == "mistral":  # Mistral-7B-v0.1 style: sliding window on every layer
        config_class, model_class = tf.MistralConfig, tf.MistralForCausalLM
        kwargs = {**llama_like, "head_dim": HEAD_DIM, "sliding_window": SLIDING_WINDOW}
    elif family == "qwen2":  # q/k/v biases come with the family
        config_class, model_class = tf.Qwen2Config, tf.Qwen2ForCausalLM
        kwargs = llama_like
    elif family == "qwen3":  # q_norm / k_norm per head
        config_class, model_class = tf.Qwen3Config, tf.Qwen3ForCausalLM
        kwargs = {**llama_like, "head_dim": HEAD_DIM}
    elif family == "granite":  # every multiplier away from 1 (and from its default) so a forgotten one shows
        config_class, model_class = tf.GraniteConfig, tf.GraniteForCausalLM
        kwargs = {**llama_like, "embedding_multiplier": 4.0, "residual_multiplier": 0.5,
                  "attention_multiplier": 0.125, "logits_scaling": 2.0}
    elif family == "cohere":  # LayerNorm without bias, parallel block, logit_scale, tied
        config_class, model_class = tf.CohereConfig, tf.CohereForCausalLM
        kwargs = {**llama_like, "logit_scale": 0.25}
    elif family == "gemma":
        config_class, model_class = tf.GemmaConfig, tf.GemmaForCausalLM
        kwargs = {**llama_like, "head_dim": HEAD_DIM}
    elif family == "gemma2":  # local/global layers, both soft-cappings
        config_class, model_class = tf.Gemma2Config, tf.Gemma2ForCausalLM
        kwargs = {**llama_like, "head_dim": HEAD_DIM, "query_pre_attn_scalar": HEAD_DIM,
                  "sliding_window": SLIDING_WINDOW, "layer_types": ["sliding_attention", "full_attention"],
                  "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    elif family == "gemma3":  # text-only; local/global layers with their own RoPE bases, q/k norms
        config_class, model_class = tf.Gemma3TextConfig, tf.Gemma3ForCausalLM
        kwargs = {**llama_like, "head_dim": HEAD_DIM, "query_pre_attn_scalar": HEAD_DIM,
                  "sliding_window": SLIDING_WINDOW, "sliding_window_pattern": 2,
                  "layer_types": ["sliding_attention", "full_attention"]}
    elif family == "falcon":
        # Falcon-40B/180B layout: new decoder architecture, grouped key/value heads, two
        # LayerNorms (with bias) per block, fused query_key_value, GELU MLP, tied embeddings.
        config_class, model_class = tf.FalconConfig, tf.FalconForCausalLM
        kwargs = {**common, "num_attention_heads": HEADS, "num_kv_heads": KV_HEADS, "new_decoder_architecture": True,
                  "multi_query": False, "parallel_attn": True, "bias": False, "alibi": False,
                  "ffn_hidden_size": INTERMEDIATE}
    else:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if rope_scaling is not None:
        kwargs.update(_rope_kwargs(family, config_class, rope_scaling))
    return config_class(**kwargs), model_class


def _rope_kwargs(family: str, config_class, rope_scaling: dict) -> dict:
    """rope_scaling as this transformers' config class takes it.

    transformers 5 calls it `rope_parameters` (and folds rope_theta into it); 4.x calls it
    `rope_scaling`. Gemma 3 scales only its global (full-attention) layers, as the real
    checkpoints do.
    """
    scaling = dict(rope_scaling)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if "rope_parameters" not in inspect.signature(config_class.__init__).parameters:
        return {"rope_scaling": scaling}
    if family == "gemma3":
        return {"rope_parameters": {"full_attention": {"rope_theta": 1_000_000.0, **scaling},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}}
    return {"rope_parameters": scaling}


def _write_legacy_rope(config_path: Path) -> None:
    """Rewrite config.json the way transformers 4.x (and most hub checkpoints) write RoPE:
    `rope_theta` at the top level and `rope_scaling` (null when unscaled)."""
    config = json.loads(config_path.read_text())
    rope = config.pop("rope_parameters", None)
    if rope is None:
        return
    if "full_attention" in rope:  # Gemma 3: one set per layer type
        local = rope.get("sliding_attention", {})
        config["rope_local_base_freq"] = local.get("rope_theta", 10_000.0)
        rope = dict(rope["full_attention"])
    else:
        rope = dict(rope)
    config["rope_theta"] = rope.pop("rope_theta", 10_000.0)
    config["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    config_path.write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter seeded values: matrices N(0, 0.02), vectors their init ± 0.1.

    Vectors (norm weights and biases) start at their neutral value (1 for RMSNorm/LayerNorm
    weights, 0 for Gemma's 1+weight norms and for biases); the noise makes a wrongly
    loaded or skipped one change the logits, while staying small enough for fp16/bf16.
    """
    generator = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.ndim >= 2:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        else:
            param.add_((torch.rand(param.shape, generator=generator) * 2 - 1) * 0.1)


def make_checkpoint(family: str, out_dir: Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                    max_position_embeddings: int = 256, rope_scaling: dict | None = None,
                    max_shard_size: str | None = None, tie_word_embeddings: bool | None = None,
                    rope_key: str = "rope_parameters") -> Path:
    """Write a tiny random-weight checkpoint of `family` into out_dir and return out_dir.

    out_dir gets config.json, model.safetensors (or model-0000x-of-0000y.safetensors and
    model.safetensors.index.json when max_shard_size is given), generation_config.json and
    the tokenizer files. Same arguments, same bytes.

    rope_scaling: e.g. {"rope_type": "llama3", "factor": 8.0, ...} ("type" is accepted too).
    tie_word_embeddings: None keeps the family's default (tied: gemma, gemma2, gemma3,
    cohere, falcon). rope_key: "rope_parameters" writes config.json as transformers 5 does;
    "rope_scaling" writes the transformers 4.x / hub form (top-level rope_theta plus
    rope_scaling). Both load to the same model.
    """
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if rope_key not in ("rope_parameters", "rope_scaling"):
        raise ValueError(f"rope_key must be 'rope_parameters' or 'rope_scaling', not {rope_key!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer_facts()
    common = {
        "vocab_size": tok["vocab_size"],
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": tok["bos"],
        "eos_token_id": tok["eos"],
        "pad_token_id": None,
    }
    config, model_class = _family_config(family, common, rope_scaling)
    if tie_word_embeddings is not None:
        config.tie_word_embeddings = tie_word_embeddings
    config.architectures = [model_class.__name__]

    torch.manual_seed(seed)
    model = model_class(config)
    _randomize(model, seed)
    model = model.to(dtype).eval()
    model.config.dtype = dtype  # recorded in config.json
    model.generation_config = tf.GenerationConfig(bos_token_id=tok["bos"], eos_token_id=tok["eos"])

    for stale in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a re-run with other sharding must not leave old shards
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x writes only safetensors
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    bars = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()  # no "Writing model shards" bar per fixture
    try:
        model.save_pretrained(out_dir, **kwargs)
    finally:
        if bars:
            tf.utils.logging.enable_progress_bar()
    if rope_key == "rope_scaling":
        _write_legacy_rope(out_dir / "config.json")
    train_tokenizer(out_dir)
    return out_dir


# ---------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write tiny random-weight checkpoints, one folder per family.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", action="append", choices=FAMILIES,
                        help="family to write (repeatable; default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for family in args.family or FAMILIES:
        folder = make_checkpoint(family, args.out_dir / family, seed=args.seed)
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
