"""Property-based: hundreds of malformed specs each give exit code 2 through `loadspec plan`, a message naming
the key and its line, and no traceback; valid specs generated from the schema never crash the planner.

The generators read the schema from loadspec.spec itself (each section's attrs fields and their `kind`
metadata), so a key added there is fuzzed here without editing this file; a field of a kind this file does
not know is left alone rather than guessed at.
"""
import collections
import json
import math
import re
import string
import traceback

import attrs
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from loadspec import spec as specs
from loadspec.cli import main

SCHEMA = {section: {f.name: f for f in attrs.fields(cls)} for section, cls in specs.SECTIONS.items()}
SEEN: collections.Counter = collections.Counter()  # mutation kind -> specs tried (for the report)
DETECTED: collections.Counter = collections.Counter()  # mutation kind -> specs refused with exit 2, key and line named
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
VALID = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- TOML values
# any character TOML allows in a string (not lone surrogates, not DEL), with a fair share of the ones Python's
# str.splitlines() takes for line breaks but TOML does not (they once shifted every line number after them)
SAFE_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x7f") | st.sampled_from(["\u2028", "\u2029", "\x85", "\x1c", "\r"])
IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)


def toml(value) -> str:
    """A Python value as TOML source."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Raw):
        return value.text
    raise TypeError(value)


@attrs.frozen
class Raw:
    """TOML source written as is (dates, which have no JSON form)."""

    text: str


FAMILIES = {
    "string": st.text(SAFE_CHARS, max_size=20),
    "int": st.integers(-(2**40), 2**40),
    "float": st.floats(allow_nan=False, allow_infinity=False, width=32).filter(lambda f: not f.is_integer()),
    "bool": st.booleans(),
    "int list": st.lists(st.integers(-5, 5), min_size=1, max_size=3),
    "string list": st.lists(st.text(SAFE_CHARS, max_size=8), max_size=3),
    "mixed list": st.tuples(st.text(SAFE_CHARS, max_size=5), st.integers()).map(list),
    "table": st.dictionaries(IDENT, st.integers(0, 9) | st.text(string.ascii_letters, max_size=5), max_size=3),
    "date": st.sampled_from([Raw("1979-05-27"), Raw("2024-01-01T00:00:00Z"), Raw("07:32:00")]),
}
ACCEPTS = {  # kind -> value families that can be valid for it (everything else is a wrong type)
    "str": {"string"}, "bool": {"bool"}, "int": {"int"}, "strlist": {"string list"}, "gpu": {"string", "table"},
    "rank": {"int"}, "positive": {"int", "float"}, "fraction": {"int", "float"}, "seed": {"int"},
    "targets": {"string", "string list"}, "checkpointing": {"bool", "string"}, "table": {"table"},
    "tokens": {"string list"}, "resize": {"bool", "int"}, "multiple": {"int"},
}
OUT_OF_RANGE = {
    "int": st.integers(-(2**40), -1) | st.integers(10_000_001, 2**40),
    "rank": st.integers(-(2**20), 0) | st.integers(4097, 2**40),
    "positive": st.floats(max_value=0) | st.floats(min_value=1_000_001, exclude_min=True) | st.just(math.nan),
    "fraction": st.floats(max_value=0, exclude_max=True) | st.floats(min_value=1) | st.just(math.nan),
    "seed": st.integers(-(2**40), -1),
    "resize": st.integers(-(2**40), 0) | st.integers(10_000_001, 2**40),
    "multiple": st.integers(-(2**40), -1) | st.integers(65537, 2**40),
    "gpu": st.fixed_dictionaries({"capability": st.just("8.0"), "memory": st.just("80GiB"),
                                  "count": st.integers(-5, 0) | st.integers(1025, 10**6) | st.booleans()}),
}


def known_fields(kinds=None):
    """(section, key, field) of every schema field whose kind this file knows (optionally only these kinds)."""
    return [(s, k, f) for s, fields in SCHEMA.items() for k, f in fields.items()
            if f.metadata.get("kind") in ACCEPTS and (kinds is None or f.metadata["kind"] in kinds)]


def valid_value(section, key, field, source="org/model"):
    """A strategy of values the spec parser accepts for one field."""
    kind, choices = field.metadata["kind"], field.metadata.get("choices") or ()
    if choices:
        return st.sampled_from(choices)
    if (section, key) == ("model", "source"):
        return st.just(source)
    if (section, key) == ("model", "adapter"):
        return st.sampled_from(["", "no/such/adapter-dir", source])
    if (section, key) == ("model", "revision"):
        return st.sampled_from(["main", "v1.0", "0123456789abcdef0123456789abcdef01234567"])
    if (section, key) == ("tokenizer", "pad_token"):
        return st.sampled_from(["auto", "<unk>", "</s>", "<s>"]) | st.text(SAFE_CHARS, max_size=6)
    return {
        "str": st.text(SAFE_CHARS, max_size=30),
        "bool": st.booleans(),
        "int": st.integers(0, 2048) | st.integers(0, 10_000_000),
        "strlist": st.lists(st.sampled_from(["lm_head", "q_proj", "o_proj", "down_proj"]) | IDENT, max_size=3),
        "gpu": st.sampled_from(specs.GPU_PROFILES) | st.sampled_from([p.upper() for p in specs.GPU_PROFILES])
        | st.fixed_dictionaries({"capability": st.sampled_from(["7.0", "7.5", "8.0", "8.6", "8.9", "9.0"]),
                                 "memory": st.sampled_from(["16GiB", "24GB", "40GiB", "80GiB"])},
                                optional={"count": st.integers(1, 8)}),
        "rank": st.integers(1, 4096),
        "positive": st.integers(1, 1_000_000) | st.floats(min_value=1e-3, max_value=1e6),
        "fraction": st.floats(min_value=0, max_value=0.99),
        "seed": st.integers(0, 2**40),
        "targets": st.sampled_from(specs.TARGET_SETS)
        | st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]) | IDENT,
                   min_size=1, max_size=4),
        "checkpointing": st.sampled_from([False, True, "offload"]),
        "tokens": st.lists(st.sampled_from(["<tool_call>", "</tool_call>", "the", "</s>"]), unique=True, max_size=2),
        "resize": st.booleans() | st.integers(1, 1024),
        "multiple": st.sampled_from([0, 8, 64]),
        "table": st.fixed_dictionaries({"rope_type": st.sampled_from(["linear", "yarn", "dynamic", "llama3", "default", "bogus"])},
                                       optional={"factor": st.floats(0.5, 16) | st.integers(-2, 16) | st.text(max_size=3),
                                                 "original_max_position_embeddings": st.integers(-8, 4096)}),
    }[kind]


# --------------------------------------------------------------------------- documents
@attrs.define
class Doc:
    """A spec as sections of (key, TOML source) pairs; renders to text and knows each key's line."""

    name: list  # top-level (key, source) pairs: [("name", source)], [] when missing, plus misplaced keys
    sections: dict  # section -> [(key, source)], in order

    def render(self):
        lines, where = [], {}
        for key, source in self.name:  # top-level keys come before any table, or TOML would put them in it
            lines.append(f"{key} = {source}")
            where[key] = len(lines)
        for section, entries in self.sections.items():
            lines.append(f"[{section}]")
            where[section] = len(lines)
            for key, source in entries:
                lines.append(f"{key} = {source}")
                where.setdefault(f"{section}.{key}", len(lines))
        return "\n".join(lines) + "\n", where


@st.composite
def valid_docs(draw, source="org/model"):
    name = draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True))
    sections = {}
    for section, fields in SCHEMA.items():
        if section != "model" and not draw(st.booleans()):
            continue
        chosen = [k for k, f in fields.items() if f.metadata.get("kind") in ACCEPTS
                  and (f.default is attrs.NOTHING or draw(st.booleans()))]
        sections[section] = [(k, toml(draw(valid_value(section, k, fields[k], source)))) for k in chosen]
    order = draw(st.permutations(list(sections)))
    return Doc([("name", toml(name))], {s: sections[s] for s in order})


def _set(doc, section, key, source):
    entries = [(k, v) for k, v in doc.sections.get(section, []) if k != key] + [(key, source)]
    doc.sections[section] = entries


MUTATIONS = ["wrong type", "out of range", "not a choice", "unknown key", "typo of a key", "alias of a key",
             "key in the wrong section", "unknown section", "section not a table", "top-level key", "bad name",
             "missing name", "missing source", "broken TOML"]


@st.composite
def broken_specs(draw, kinds=tuple(MUTATIONS)):
    """(spec text, expected key or None, expected line or None, mutation kind)."""
    doc = draw(valid_docs())
    kind = draw(st.sampled_from(kinds))
    key = line = None
    if kind == "wrong type":
        section, name, field = draw(st.sampled_from(known_fields()))
        family = draw(st.sampled_from(sorted(set(FAMILIES) - ACCEPTS[field.metadata["kind"]])))
        _set(doc, section, name, toml(draw(FAMILIES[family])))
        key = f"{section}.{name}"
    elif kind == "out of range":
        section, name, field = draw(st.sampled_from(known_fields(set(OUT_OF_RANGE))))
        _set(doc, section, name, toml(draw(OUT_OF_RANGE[field.metadata["kind"]])))
        key = f"{section}.{name}"
    elif kind == "not a choice":
        candidates = [(s, k, f) for s, k, f in known_fields({"str", "gpu", "targets", "checkpointing"})
                      if f.metadata.get("choices") or f.metadata["kind"] != "str"]
        section, name, field = draw(st.sampled_from(candidates))
        allowed = {"gpu": specs.GPU_PROFILES, "targets": specs.TARGET_SETS, "checkpointing": ("offload",)}.get(
            field.metadata["kind"], field.metadata.get("choices"))
        value = draw(st.text(SAFE_CHARS, max_size=12).filter(lambda v: v.lower() not in allowed and v not in allowed))
        _set(doc, section, name, toml(value))
        key = f"{section}.{name}"
    elif kind in ("unknown key", "typo of a key", "alias of a key"):
        section = draw(st.sampled_from(sorted(SCHEMA)))
        fields = SCHEMA[section]
        if kind == "unknown key":
            bad = draw(IDENT.filter(lambda k: k not in fields))
        elif kind == "typo of a key":
            real = draw(st.sampled_from(sorted(fields)))
            at = draw(st.integers(0, len(real) - 1))
            edit = draw(st.sampled_from(["drop", "double", "swap", "replace"]))
            letter = draw(st.sampled_from(string.ascii_lowercase))
            bad = {"drop": real[:at] + real[at + 1:], "double": real[:at] + real[at] + real[at:],
                   "swap": real[:at] + real[at + 1: at + 2] + real[at: at + 1] + real[at + 2:],
                   "replace": real[:at] + letter + real[at + 1:]}[edit]
            assume(bad and bad not in fields and re.fullmatch(r"[A-Za-z0-9_-]+", bad))
        else:
            aliased = sorted(s for s, f in SCHEMA.items() if any(r in f for r in getattr(specs, "KEY_ALIASES", {}).values()))
            assume(aliased)
            section = draw(st.sampled_from(aliased))
            fields = SCHEMA[section]
            bad = draw(st.sampled_from([a for a, r in specs.KEY_ALIASES.items() if r in fields and a not in fields]))
        _set(doc, section, bad, toml(draw(FAMILIES["string"] | FAMILIES["int"])))
        key = f"{section}.{bad}"
    elif kind == "key in the wrong section":
        home, name, field = draw(st.sampled_from(known_fields()))
        elsewhere = draw(st.sampled_from([s for s in SCHEMA if name not in SCHEMA[s]]))
        _set(doc, elsewhere, name, toml(draw(valid_value(home, name, field))))
        key = f"{elsewhere}.{name}"
    elif kind == "unknown section":
        section = draw(st.sampled_from(["laod", "modle", "lora_config", "quant", "targets", "tokeniser"]) | IDENT)
        assume(section not in SCHEMA and section != "name" and section not in getattr(specs, "LATER_SECTIONS", {}))
        doc.sections[section] = [("x", "1")]
        key = section
    elif kind == "section not a table":
        section = draw(st.sampled_from(sorted(s for s in SCHEMA if s != "model")))
        doc.sections.pop(section, None)
        doc.name.append((section, toml(draw(FAMILIES["int"] | FAMILIES["string"] | FAMILIES["int list"] | FAMILIES["bool"]))))
        key = section
    elif kind == "top-level key":
        section, name, field = draw(st.sampled_from([(s, k, f) for s, k, f in known_fields() if k not in SCHEMA]))
        doc.name.append((name, toml(draw(valid_value(section, name, field)))))
        key = name
    elif kind == "bad name":
        bad = draw(st.text(SAFE_CHARS, max_size=140).filter(lambda n: not specs.NAME_PATTERN.match(n))
                   | FAMILIES["int"] | FAMILIES["bool"] | FAMILIES["string list"])
        doc.name = [("name", toml(bad))]
        key = "name"
    elif kind == "missing name":
        doc.name = []
        key = "name"
    elif kind == "missing source":
        if draw(st.booleans()):
            doc.sections.pop("model")
            key, line = "model.source", None
        else:
            doc.sections["model"] = [(k, v) for k, v in doc.sections["model"] if k != "source"]
            key = "model.source"
    text, where = doc.render()
    if kind == "broken TOML":
        lines = text.split("\n")[:-1]  # TOML lines end at "\n" only (not at U+2028 and friends, as splitlines thinks)
        at = draw(st.integers(0, len(lines) - 1))
        breakage = draw(st.sampled_from(['{k} = "unterminated', "{k} = ", "[{k}", "{k} = bare words", '{k} "no equals"',
                                         "[{k}]]", "{k} = {{a = 1", "{k} = 1979-13-45", "{k} = [1, 2,, 3]", "= 5"]))
        lines.insert(at, breakage.format(k=draw(IDENT)))
        text, key, line = "\n".join(lines) + "\n", None, at + 1
    elif kind == "missing name":
        line = None  # reported at line 1, whatever is there
    elif kind == "missing source":
        line = where.get("model")  # the [model] header, or no line when the section is gone
    else:
        line = where.get(key)
    return text, key, line, kind


# --------------------------------------------------------------------------- the properties
@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "s.toml"


def plan(spec_file, text):
    spec_file.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(main, ["plan", str(spec_file)])
    crash = result.exception if result.exception is not None and not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.output, crash, result


@FUZZ
@given(case=broken_specs())
def test_malformed_specs_exit_2_naming_key_and_line(spec_file, case):
    check_refused(spec_file, case)


@pytest.mark.parametrize("kind", MUTATIONS)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_kind_of_malformation_is_tried(spec_file, kind, data):
    """The test above draws the kind too, unevenly; this makes sure each kind is tried at least 10 times."""
    check_refused(spec_file, data.draw(broken_specs(kinds=(kind,))))


def check_refused(spec_file, case):
    text, key, line, kind = case
    event(kind)
    SEEN[kind] += 1
    code, output, crash, result = plan(spec_file, text)
    context = f"{kind}: key {key!r}, line {line}\n--- spec ---\n{text}--- output ---\n{output}"
    assert crash is None, f"crashed ({crash!r}) on {context}\n" + "".join(traceback.format_exception(*result.exc_info))
    assert code == 2 and "Traceback" not in output and output.startswith("error: "), context
    if key is not None:
        assert re.search(rf"(^|\s|:){re.escape(key)}(:|\s|$)", output, re.M), f"the key is not named: {context}"
    if line is not None:
        assert f"{spec_file}:{line}:" in output, f"line {line} is not named: {context}"
    if kind == "broken TOML":
        assert "not valid TOML" in output, context
    DETECTED[kind] += 1


@pytest.fixture(scope="module")
def fixture_source(checkpoint):
    return str(checkpoint("llama"))


@VALID
@given(data=st.data())
def test_valid_specs_never_crash_the_planner(spec_file, fixture_source, data):
    doc = data.draw(valid_docs(source=fixture_source))
    text, _ = doc.render()
    code, output, crash, result = plan(spec_file, text)
    event(f"exit {code}")
    SEEN["valid spec"] += 1
    assert crash is None, f"crashed ({crash!r}) on\n{text}\n" + "".join(traceback.format_exception(*result.exc_info))
    assert code in (0, 2) and "Traceback" not in output, f"{text}\n{output}"
    if code == 2:
        assert output.startswith("error: "), output
    else:
        assert "plan for" in output
    DETECTED["valid spec: planned" if code == 0 else "valid spec: refused with a reason"] += 1


def test_zz_report_what_the_fuzzers_tried():
    """Runs after the two properties (file order): every mutation kind was tried, and every try was refused."""
    if not SEEN:
        pytest.skip("the property tests did not run in this session")
    print("\nspecs tried per kind:", dict(SEEN))
    print("refused with exit 2, key and line:", dict(DETECTED))
    malformed = sum(n for k, n in SEEN.items() if k != "valid spec")
    if malformed:
        assert malformed >= 200
        assert all(DETECTED[k] == n for k, n in SEEN.items() if k != "valid spec")
