"""Opening a saved tokenizer: the same tokenizer transformers opens, its tokenizer.json parsed once."""
import copy
import json
import threading

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer
from transformers import tokenization_utils_tokenizers

from loadspec import tokenizer_open

TEXT = "Hello there <s> ünïcödé tokens, 1234 and\ttabs"


def test_same_tokenizer_as_transformers_opens(checkpoint):
    folder = checkpoint("llama")
    ours, theirs = tokenizer_open.open_saved_tokenizer(folder, trust_remote_code=False), AutoTokenizer.from_pretrained(folder)
    assert type(ours) is type(theirs)
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    assert ours(TEXT)["input_ids"] == theirs(TEXT)["input_ids"]
    assert (ours.all_special_tokens, ours.pad_token, ours.padding_side) == (theirs.all_special_tokens, theirs.pad_token, theirs.padding_side)


def _backends_copied(monkeypatch, open_tokenizer) -> int:
    """How many times `copy.deepcopy` copied a tokenizers.Tokenizer while `open_tokenizer` ran."""
    copied = []
    real = copy.deepcopy

    def recording(value, memo=None):
        copied.append(type(value) is Tokenizer)
        return real(value, memo)
    monkeypatch.setattr(copy, "deepcopy", recording)
    open_tokenizer()
    monkeypatch.setattr(copy, "deepcopy", real)
    return sum(copied)


def test_the_parsed_backend_is_not_copied_again(checkpoint, monkeypatch):
    folder = checkpoint("llama")
    assert _backends_copied(monkeypatch, lambda: AutoTokenizer.from_pretrained(folder)) == 1  # transformers' own path
    assert _backends_copied(monkeypatch, lambda: tokenizer_open.open_saved_tokenizer(folder, trust_remote_code=False)) == 0


def test_two_opens_do_not_share_a_backend(checkpoint):
    folder = checkpoint("llama")
    first = tokenizer_open.open_saved_tokenizer(folder, trust_remote_code=False)
    second = tokenizer_open.open_saved_tokenizer(folder, trust_remote_code=False)
    first.add_tokens(["<only_in_first>"])
    assert "<only_in_first>" not in second.get_vocab() and first.backend_tokenizer is not second.backend_tokenizer


def test_other_threads_and_other_objects_still_get_real_copies(checkpoint):
    backend = Tokenizer.from_file(str(checkpoint("llama") / "tokenizer.json"))
    from_other_thread = []
    with tokenizer_open._backend_parsed_once():
        assert tokenization_utils_tokenizers.copy.deepcopy(backend) is backend
        nested = {"a": [1, 2]}
        assert tokenization_utils_tokenizers.copy.deepcopy(nested) == nested and tokenization_utils_tokenizers.copy.deepcopy(nested) is not nested
        worker = threading.Thread(target=lambda: from_other_thread.append(tokenization_utils_tokenizers.copy.deepcopy(backend)))
        worker.start()
        worker.join()
    assert from_other_thread[0] is not backend and from_other_thread[0].to_str() == backend.to_str()
    assert tokenization_utils_tokenizers.copy is copy


def test_copy_is_restored_after_a_failed_open(tmp_path):
    with pytest.raises(Exception):
        tokenizer_open.open_saved_tokenizer(tmp_path / "missing", trust_remote_code=False)
    assert tokenization_utils_tokenizers.copy is copy
