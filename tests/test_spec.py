"""spec.toml parsing: valid specs bind to frozen sections; every problem is reported at once, with its line."""
import pytest

from loadspec.errors import SpecError
from loadspec.spec import LoadSection, parse_spec

GOOD = """\
name = "tiny-qlora"

[model]
source = "org/model"
revision = "v1.0"

[load]
max_seq_length = 4096
quant = "nf4"
double_quant = false
skip_modules = ["o_proj"]

[target]
gpu = {capability = "8.0", memory = "40GiB", count = 2}

[tokenizer]
padding_side = "left"
"""


def problems(text):
    with pytest.raises(SpecError) as info:
        parse_spec(text, "s.toml")
    return info.value.problems, str(info.value)


def test_valid_spec_binds_every_section():
    spec = parse_spec(GOOD, "s.toml")
    assert spec.name == "tiny-qlora"
    assert spec.model.source == "org/model" and spec.model.revision == "v1.0"
    assert spec.load.max_seq_length == 4096 and spec.load.double_quant is False
    assert spec.load.skip_modules == ("o_proj",)
    assert spec.target.gpu == {"capability": "8.0", "memory": "40GiB", "count": 2}
    assert spec.tokenizer.padding_side == "left"
    assert spec.load.device_map == LoadSection().device_map  # defaults fill in


def test_spec_is_frozen():
    spec = parse_spec(GOOD)
    with pytest.raises(AttributeError):
        spec.name = "other"


def test_typo_gets_did_you_mean_with_line():
    found, text = problems('name = "x"\n[model]\nsource = "a/b"\n[load]\nquantt = "nf4"\n')
    assert [p.key for p in found] == ["load.quantt"]
    assert found[0].line == 5
    assert "Did you mean 'quant'?" in text
    assert "s.toml:5:" in text


def test_every_problem_reported_at_once():
    text = """\
name = "ok"
[model]
source = "a/b"
[load]
max_seq_length = -5
quant = "nf5"
dtype = 16
double_quant = "yes"
[tokenizer]
padding_side = "middle"
colour = "red"
"""
    found, message = problems(text)
    by_key = {p.key: p for p in found}
    assert set(by_key) == {"load.max_seq_length", "load.quant", "load.dtype", "load.double_quant",
                           "tokenizer.padding_side", "tokenizer.colour"}
    assert by_key["load.max_seq_length"].line == 5
    assert by_key["load.quant"].line == 6 and "Did you mean 'nf4'?" in by_key["load.quant"].message
    assert by_key["load.dtype"].line == 7 and "string" in by_key["load.dtype"].message
    assert by_key["load.double_quant"].line == 8
    assert by_key["tokenizer.colour"].line == 11
    assert message.startswith("s.toml: 6 problems")
    assert all(p.fix for p in found), "each problem says how to fix it"


def test_missing_source_and_name():
    found, _ = problems("[load]\nquant = \"nf4\"\n")
    keys = {p.key for p in found}
    assert "name" in keys and "model.source" in keys


def test_empty_source_rejected():
    found, _ = problems('name = "x"\n[model]\nsource = "  "\n')
    assert found[0].key == "model.source" and found[0].line == 3


def test_malformed_toml_names_line():
    found, text = problems('name = "x"\n[model]\nsource = a/b\n')
    assert found[0].line == 3
    assert "not valid TOML" in text


def test_contradiction_double_quant_without_4bit():
    found, _ = problems('name = "x"\n[model]\nsource = "a/b"\n[load]\nquant = "none"\ndouble_quant = true\n')
    assert found[0].key == "load.double_quant" and found[0].line == 6
    assert "quant = \"none\"" in found[0].message


def test_unknown_gpu_profile_and_bad_table():
    found, _ = problems('name = "x"\n[model]\nsource = "a/b"\n[target]\ngpu = "h10"\n')
    assert "Did you mean 'h100'?" in found[0].message
    found, _ = problems('name = "x"\n[model]\nsource = "a/b"\n[target]\ngpu = {capability = "eight", memory = "80GiB"}\n')
    assert "capability" in found[0].message


def test_bad_name_rejected():
    found, _ = problems('name = "../escape"\n[model]\nsource = "a/b"\n')
    assert found[0].key == "name"


def test_unknown_top_level_key():
    found, _ = problems('name = "x"\n[model]\nsource = "a/b"\n[laod]\nquant = "nf4"\n')
    assert found[0].key == "laod" and "Did you mean 'load'?" in found[0].message
