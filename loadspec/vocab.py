"""Added tokens and vocabulary resizing: [tokenizer] added_tokens / added_special_tokens / resize_vocab.

Used at three times:

* spec: `SPEC_KINDS` and `check_spec` validate the keys (every problem at once, with lines).
* plan: `with_vocabulary` (I/O, only when the spec asks) opens the source's tokenizer once, adds
  the tokens to learn their ids, and records that in `source.tokenizer["vocab"]`; `plan_vocab`
  (pure) decides the embedding's rows and which rows start at the mean of the existing ones.
  Its results land in the plan's `tokenizer` dict and `config_overrides` (both fingerprinted).
* build: `add_tokens` replays the additions (checking the planned ids) and `resize_rows` grows
  the input embedding and an untied LM head as they stream by, one tensor at a time.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from .errors import LoadspecError, Problem, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from . import arch
    from .source import Source
    from .spec import Spec, TokenizerSection

MAX_ROWS = 10_000_000


# ---------------------------------------------------------------------------- spec

def _check_tokens(key: str, value: Any) -> tuple[str, str]:
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        from .spec import _type_name

        return f"must be a list of strings, got {_type_name(value)}", f'write {key} = ["<tool_call>", "</tool_call>"]'
    if any(not v.strip() for v in value):
        return "holds an empty or blank token", "remove it; every token needs visible characters"
    repeated = sorted({v for v in value if value.count(v) > 1})
    if repeated:
        return f"lists {', '.join(map(repr, repeated))} more than once", "list each token once"
    return "", ""


def _check_resize(key: str, value: Any) -> tuple[str, str]:
    if isinstance(value, bool) or (isinstance(value, int) and 1 <= value <= MAX_ROWS):
        return "", ""
    from .spec import _type_name

    got = f"got {value}" if isinstance(value, int) else f"got {_type_name(value)}"
    return (f"must be true, false or a number of rows from 1 to {MAX_ROWS}, {got}",
            f"write {key} = true (fit the tokenizer) or {key} = 32768 (no quotes)")


def _check_multiple(key: str, value: Any) -> tuple[str, str]:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65536:
        return f"must be a whole number from 0 to 65536, got {value!r}", f"write {key} = 64 (0 = no rounding)"
    return "", ""


SPEC_KINDS = {"tokens": _check_tokens, "resize": _check_resize, "multiple": _check_multiple}  # spec field kinds -> checker


def check_spec(section: "TokenizerSection", lines: dict) -> list[Problem]:
    """Contradictions between the [tokenizer] vocabulary keys."""
    problems = []
    both = [t for t in section.added_tokens if t in section.added_special_tokens]
    if both:
        problems.append(Problem("tokenizer.added_special_tokens", f"{', '.join(map(repr, both))} also in added_tokens",
                                lines.get("tokenizer.added_special_tokens"), "list each token in one of the two lists"))
    multiple, resize = section.pad_vocab_to_multiple_of, section.resize_vocab
    if multiple and (resize is False or (resize is None and not section.added_tokens and not section.added_special_tokens)):
        problems.append(Problem("tokenizer.pad_vocab_to_multiple_of", "rounds the vocabulary when it grows, but "
                                + ("resize_vocab = false never grows it" if resize is False else "nothing makes it grow"),
                                lines.get("tokenizer.pad_vocab_to_multiple_of"), "set resize_vocab = true, or remove it"))
    if multiple and not isinstance(resize, bool) and isinstance(resize, int) and resize % multiple:
        problems.append(Problem("tokenizer.resize_vocab", f"{resize} is not a multiple of pad_vocab_to_multiple_of = {multiple}",
                                lines.get("tokenizer.resize_vocab"),
                                f"set resize_vocab = {-(-resize // multiple) * multiple}, or resize_vocab = true"))
    return problems


def asks(section: "TokenizerSection") -> bool:
    """Whether the spec adds tokens or may resize the vocabulary."""
    return bool(section.added_tokens or section.added_special_tokens or section.resize_vocab)


# ---------------------------------------------------------------------------- plan

def open_tokenizer(source: "Source", **kwargs):
    """The source's tokenizer through AutoTokenizer (a GGUF file's is converted first)."""
    from transformers import AutoTokenizer

    folder = source.path
    if source.kind == "gguf":
        from . import gguf

        folder = gguf.tokenizer_folder(source.path)
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def with_vocabulary(spec: "Spec", source: "Source") -> "Source":
    """`source` with `tokenizer["vocab"]` filled in: the tokenizer's size after the spec's additions, the ids the
    new tokens get, and those of asked tokens it already has. Reads the tokenizer only when asked."""
    if not asks(spec.tokenizer) or not source.tokenizer.get("present"):
        return source
    tokenizer = open_tokenizer(source, trust_remote_code=spec.model.trust_remote_code)
    known = tokenizer.get_vocab()
    asked = [(t, False) for t in spec.tokenizer.added_tokens] + [(t, True) for t in spec.tokenizer.added_special_tokens]
    new = [{"content": t, "special": special} for t, special in asked if t not in known]
    _add(tokenizer, new)
    facts = {"size_after": len(tokenizer), "known": {t: known[t] for t, _ in asked if t in known},
             "added": [{**token, "id": tokenizer.convert_tokens_to_ids(token["content"])} for token in new]}
    return attrs.evolve(source, tokenizer={**source.tokenizer, "vocab": facts})


def _add(tokenizer, tokens: list[dict]) -> None:
    """Add plain tokens, then special ones, in the listed order (the plan's ids assume this order)."""
    tokenizer.add_tokens([t["content"] for t in tokens if not t["special"]])
    tokenizer.add_tokens([t["content"] for t in tokens if t["special"]], special_tokens=True)


def plan_vocab(spec: "Spec", source: "Source", skeleton: "arch.Skeleton", reasons: list) -> tuple[dict, dict]:
    """(entries for the plan's tokenizer dict, config.json edits) for the spec's added tokens and resize_vocab."""
    asked = spec.tokenizer
    if not asks(asked):
        return {}, {}
    facts = source.tokenizer.get("vocab")
    if facts is None:
        raise LoadspecError("internal: the source's vocabulary was not read before planning (vocab.with_vocabulary)")
    rows = source.config.get("vocab_size")
    if not isinstance(rows, int) or rows <= 0:
        raise UsageError(f"{_where(spec, 'tokenizer')}: the model's config.json has no vocab_size, so loadspec cannot tell "
                         "how many embedding rows it has; added tokens and resize_vocab need it.")
    tensors, tied = _embedding_tensors(skeleton, source, rows)
    added = facts["added"]
    needed = max([facts["size_after"]] + [t["id"] + 1 for t in added])
    target, why = _target_rows(spec, rows, needed)
    _explain_tokens(added, facts["known"], reasons)
    spare = sorted({t["id"] for t in added if t["id"] < rows})  # new tokens in rows the embedding already has
    mean_rows = _ranges(spare + list(range(rows, target)))
    if not mean_rows:
        reasons.append(("vocab", f"unchanged: the tokenizer's {needed} tokens fit the embedding's {rows} rows"))
        return {}, {}
    shown = ", ".join(tensors) + (" (the LM head is tied to it and follows)" if tied else "")
    spans = [f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in _ranges(spare)]
    starts = ([f"the new tokens' spare rows ({', '.join(spans)})"] if spare else []) + \
        ([f"the {target - rows} new rows"] if target > rows else [])
    grown = f"grown {rows} -> {target} rows ({why})" if target > rows else f"{rows} rows kept ({why})"
    reasons.append(("vocab", f"{grown}: {shown}; {' and '.join(starts)} start at the mean of the {rows} existing rows, "
                             "so the logits of existing tokens do not change"))
    vocab = {"tokenizer_size": needed, "rows_before": rows, "rows": target, "tensors": tensors, "mean_rows": mean_rows}
    return {"added_tokens": added, "vocab": vocab}, ({"vocab_size": target} if target != rows else {})


def _target_rows(spec: "Spec", rows: int, needed: int) -> tuple[int, str]:
    """The embedding's rows after the plan, and why."""
    resize, multiple = spec.tokenizer.resize_vocab, spec.tokenizer.pad_vocab_to_multiple_of
    rounded = f", rounded up to a multiple of {multiple}" if multiple else ""
    if resize is True:
        return _round_up(max(needed, rows), multiple), f"resize_vocab = true: fit the tokenizer's {needed} tokens{rounded}"
    if resize is None or resize is False:
        if needed <= rows:
            return rows, f"the tokenizer's {needed} tokens fit"
        if resize is False:
            raise UsageError(f"{_where(spec, 'tokenizer.resize_vocab')}: the added tokens take ids up to {needed - 1}, beyond "
                             f"the embedding's {rows} rows, and resize_vocab = false forbids growing it (those ids would index "
                             "past the embedding). Remove resize_vocab (or set it to true), or add fewer tokens.")
        return _round_up(needed, multiple), f"the tokenizer's {needed} tokens do not fit the embedding's {rows} rows{rounded}"
    if resize < rows:
        raise UsageError(f"{_where(spec, 'tokenizer.resize_vocab')}: {resize} rows are fewer than the embedding's {rows}; "
                         f"loadspec never drops trained rows. Set resize_vocab = {max(needed, rows)} or more, or true.")
    if resize < needed:
        raise UsageError(f"{_where(spec, 'tokenizer.resize_vocab')}: {resize} rows are fewer than the tokenizer's {needed} "
                         f"tokens (ids up to {needed - 1}). Set resize_vocab = {needed} or more, or true.")
    return resize, f"resize_vocab = {resize}"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple if multiple else value


def _ranges(ids: list[int]) -> list[list[int]]:
    """[[start, stop], ...] covering the sorted `ids`."""
    ranges: list[list[int]] = []
    for i in ids:
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    return ranges


def _explain_tokens(added: list[dict], known: dict, reasons: list) -> None:
    parts = [f"{t['content']!r} -> id {t['id']}" + (" (special)" if t["special"] else "") for t in added]
    parts += [f"{token!r} is already in the vocabulary (id {i}): not re-added" for token, i in known.items()]
    if parts:
        reasons.append(("added tokens", "; ".join(parts)))


def _embedding_tensors(skeleton: "arch.Skeleton", source: "Source", rows: int) -> tuple[list[str], bool]:
    """The stored tensors with one row per token (input embedding, untied LM head), and whether the head is tied."""
    outside = [n for n in skeleton.parameters if n.endswith(".weight") and not any(p.isdigit() for p in n.split("."))]
    tensors = [n for n in outside if n in source.tensors and len(source.tensors[n].shape) == 2 and source.tensors[n].shape[0] == rows]
    embedding = next((n for n in outside if n.endswith(EMBEDDING_SUFFIXES)), None)
    if embedding is None or embedding not in tensors:
        have = source.tensors[embedding].shape if embedding in source.tensors else None
        raise UsageError(f"cannot resize this model's vocabulary: its input embedding ({embedding or 'not found'}) "
                         f"{'has shape ' + str(list(have)) if have else 'is missing'}, not {rows} rows as config.json's vocab_size says.")
    tied = any(embedding in pair for pair in skeleton.tied)
    return tensors, tied


EMBEDDING_SUFFIXES = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight")


def _where(spec: "Spec", key: str) -> str:
    line = spec.lines.get(key) or spec.lines.get(key.rpartition(".")[0])
    return f"{spec.path}:{line}: {key}" if line else f"{spec.path}: {key}"


# ---------------------------------------------------------------------------- build

def add_tokens(tokenizer, planned: dict) -> None:
    """Add the plan's new tokens to the tokenizer; refuses if they get other ids than planned."""
    added = planned.get("added_tokens") or []
    _add(tokenizer, added)
    got = {t["content"]: tokenizer.convert_tokens_to_ids(t["content"]) for t in added}
    wrong = [f"{t['content']!r}: planned {t['id']}, got {got[t['content']]}" for t in added if got[t["content"]] != t["id"]]
    if wrong:
        raise LoadspecError(f"the tokenizer gave the added tokens other ids than the plan ({'; '.join(wrong)}); did the "
                            "source's tokenizer change since planning? Build again.")


def resize_rows(plan_tokenizer: dict, name: str, tensor: "torch.Tensor") -> "torch.Tensor":
    """`tensor` with the rows the plan gives it, the new ones (and the new tokens') set to the mean of the existing rows;
    tensors the plan does not resize come back as they are."""
    import torch

    vocab = plan_tokenizer.get("vocab")
    if not vocab or name not in vocab["tensors"]:
        return tensor
    if tensor.shape[0] != vocab["rows_before"]:
        raise LoadspecError(f"{name} has {tensor.shape[0]} rows, the plan expected {vocab['rows_before']}; the source changed "
                            "since planning. Build again.")
    mean = (tensor.sum(0, dtype=torch.float32) / tensor.shape[0]).to(tensor.dtype)
    grown = torch.cat([tensor, tensor.new_empty((vocab["rows"] - tensor.shape[0], *tensor.shape[1:]))])
    for start, stop in vocab["mean_rows"]:
        grown[start:stop] = mean
    return grown
