"""LoRA from the spec, existing adapters, save and resume — on the tiny llama fixture, on the CPU."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import loadspec
from loadspec.cli import main
from loadspec.plan import LoadPlan

TEXT = "Paris is the capital of France and its most populous city. The river Seine runs through the middle of the city."
FLOAT32 = {"dtype": "float32"}  # float32 matmuls are several times faster than bfloat16 ones on this CPU


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------- training, save, resume

def test_qlora_trains_and_the_saved_adapter_reloads_with_the_same_logits(checkpoint, write_spec, tmp_path):
    base = checkpoint("llama")
    cache = tmp_path / "cache"
    spec = write_spec(base, name="qlora", load={"quant": "nf4", **FLOAT32},
                      lora={"r": 8, "alpha": 16, "target_modules": "all-linear"}, train={"gradient_checkpointing": "offload"})
    model, tokenizer = loadspec.load(spec, cache_dir=cache)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    ids = tokenizer([TEXT] * 2, return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses  # ln(512) = 6.24 at the start; the adapter learns the text
    assert all(b <= a + 1e-3 for a, b in zip(losses[::5], losses[5::5])), losses

    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base.resolve()) and saved["r"] == 8
    expected = logits(model, ids)

    # resume through a spec: the same base artifact (cache hit), the adapter attached frozen
    resume = write_spec(base, name="resumed", load={"quant": "nf4", **FLOAT32}, model={"adapter": str(adapter)})
    built = loadspec.build(resume, cache_dir=cache, progress=False)
    assert built.cached and built.plan.fingerprint == loadspec.plan_spec(spec).plan.fingerprint
    reloaded, _ = loadspec.load("resumed", cache_dir=cache)
    assert torch.equal(logits(reloaded, ids), expected)
    assert not any(p.requires_grad for p in reloaded.parameters())

    # the adapter folder as the source: its base resolves from adapter_config.json, still the same artifact
    as_source = write_spec(adapter, name="from-adapter", load={"quant": "nf4", **FLOAT32}, model={"adapter_trainable": True})
    planned = loadspec.plan_spec(as_source).plan
    assert planned.fingerprint == built.plan.fingerprint and planned.lora["trainable"] is True
    trainable, _ = loadspec.load(as_source, cache_dir=cache)
    assert torch.equal(logits(trainable, ids), expected)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {n for n in lora_state(trainable)}


# ---------------------------------------------------------------------------- initialisation, freezing

def test_random_state_fixes_the_adapter_bytes_and_the_base_is_frozen(checkpoint, write_spec, tmp_path):
    base = checkpoint("llama")
    cache = tmp_path / "cache"
    states = []
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        spec = write_spec(base, name=name, load={"quant": "none", **FLOAT32},
                          lora={"r": 4, "random_state": seed, "init": "gaussian", "target_modules": ["q_proj", "v_proj"]})
        torch.manual_seed(0)
        model, _ = loadspec.load(spec, cache_dir=cache)
        states.append(lora_state(model))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(states[-1]) and len(trainable) == 2 * 2 * 2  # A and B, q and v, 2 layers
        assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    same, other = states[0], states[2]
    assert all(torch.equal(same[n], states[1][n]) for n in same)  # same random_state: byte-identical
    assert all(not torch.equal(same[n], other[n]) for n in same if "lora_A" in n)
    assert all(not v.any() for n, v in same.items() if "lora_B" in n)  # B = 0: the adapter starts as a no-op


def test_loading_with_lora_leaves_the_callers_rng_alone(checkpoint, write_spec, tmp_path):
    spec = write_spec(checkpoint("llama"), load={"quant": "none", **FLOAT32}, lora={"r": 4})
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    loadspec.load(spec, cache_dir=tmp_path / "cache")
    assert torch.equal(torch.rand(3), expected)


def test_lora_settings_do_not_change_the_fingerprint(checkpoint, write_spec):
    base = checkpoint("llama")
    plain = loadspec.plan_spec(write_spec(base, name="plain")).plan
    tuned = loadspec.plan_spec(write_spec(base, name="tuned", lora={"r": 64, "alpha": 128, "dropout": 0.1},
                                          train={"gradient_checkpointing": True})).plan
    assert plain.lora is None and tuned.lora["r"] == 64 and tuned.train == {"gradient_checkpointing": True}
    assert plain.fingerprint == tuned.fingerprint
    assert tuned.lora["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert "lora targets" in tuned.explain() and "scaling 2" in tuned.explain()
    assert LoadPlan.from_json(tuned.to_json()) == tuned


# ---------------------------------------------------------------------------- invalid settings: exit 2 with the line

SPEC_HEAD = 'name = "x"\n[model]\nsource = "{source}"\n[target]\ngpu = "cpu"\n'  # 5 lines: the next one is line 6
INVALID = {
    # spec-level: type and range problems, reported before the source is even looked at
    "rank zero": ("[lora]\nr = 0\n", ["s.toml:7", "lora.r", "between 1 and 4096"]),
    "rank as text": ('[lora]\nr = "16"\n', ["s.toml:7", "whole number"]),
    "alpha zero": ("[lora]\nalpha = 0\n", ["s.toml:7", "lora.alpha", "above 0"]),
    "alpha as text": ('[lora]\nalpha = "32"\n', ["s.toml:7", "must be a number"]),
    "dropout one": ("[lora]\ndropout = 1.0\n", ["s.toml:7", "below 1"]),
    "dropout negative": ("[lora]\ndropout = -0.1\n", ["s.toml:7", "at least 0"]),
    "bias": ('[lora]\nbias = "lora-only"\n', ["s.toml:7", "Did you mean 'lora_only'?"]),
    "rslora as text": ('[lora]\nuse_rslora = "yes"\n', ["s.toml:7", "true or false"]),
    "target keyword typo": ('[lora]\ntarget_modules = "attension"\n', ["s.toml:7", "Did you mean 'attention'?"]),
    "targets not strings": ("[lora]\ntarget_modules = [1, 2]\n", ["s.toml:7", "list of strings"]),
    "targets empty": ("[lora]\ntarget_modules = []\n", ["s.toml:7", "at least one module"]),
    "modules_to_save a string": ('[lora]\nmodules_to_save = "lm_head"\n', ["s.toml:7", "list of strings"]),
    "init unsupported": ('[lora]\ninit = "pissa"\n', ["s.toml:7", "not one of default, gaussian, orthogonal"]),
    "orthogonal odd rank": ('[load]\nquant = "none"\n[lora]\nr = 7\ninit = "orthogonal"\n', ["s.toml:10", "even r"]),
    "orthogonal on 4-bit": ('[lora]\ninit = "orthogonal"\n', ["s.toml:7", "16-bit base"]),
    "seed negative": ("[lora]\nrandom_state = -1\n", ["s.toml:7", "0 or more"]),
    "seed fractional": ("[lora]\nrandom_state = 1.5\n", ["s.toml:7", "whole number"]),
    "peft spelling": ("[lora]\nlora_alpha = 32\n", ["s.toml:7", "loadspec calls it 'alpha'"]),
    "unknown key": ("[lora]\nrr = 8\n", ["s.toml:7", "unknown key"]),
    "checkpointing unsloth": ('[train]\ngradient_checkpointing = "unsloth"\n', ["s.toml:7", "loadspec's \"offload\""]),
    "checkpointing number": ("[train]\ngradient_checkpointing = 1\n", ["s.toml:7", "true, false or \"offload\""]),
    "new and existing adapter": ('[lora]\nr = 8\n', ["s.toml:7", "cannot be combined"], {"adapter": "/nowhere"}),
    # plan-level: checked against the model's real module names
    "target typo": ('[lora]\ntarget_modules = ["q_prj", "v_proj"]\n', ["s.toml:7", "lora.target_modules", "'q_prj'",
                                                                         "Did you mean 'q_proj'?"]),
    "target of another family": ('[lora]\ntarget_modules = ["query_key_value"]\n', ["s.toml:7", "matches no Linear module"]),
    "modules_to_save typo": ('[lora]\nmodules_to_save = ["lm_haed"]\n', ["s.toml:7", "Did you mean 'lm_head'?"]),
    "modules_to_save also a target": ('[load]\nquant = "none"\n[lora]\ntarget_modules = "all-linear"\nmodules_to_save = ["o_proj"]\n',
                                      ["s.toml:10", "also a LoRA target"]),
    "modules_to_save stored in 4 bits": ('[lora]\ntarget_modules = ["q_proj"]\nmodules_to_save = ["o_proj"]\n',
                                         ["s.toml:8", "stored in 4 bits", "skip_modules"]),
    "adapter_trainable without adapter": ("", ["s.toml:4", "no adapter to train"], {"adapter_trainable": True}),
    "adapter not an adapter folder": ("", ["s.toml:4", "not a peft adapter folder"], {"adapter": "/tmp"}),
    "adapter missing": ("", ["s.toml:4", "model.adapter", "/nowhere/adapter", "does not exist"], {"adapter": "/nowhere/adapter"}),
}


@pytest.fixture
def plan_cli(tmp_path):
    runner = CliRunner()

    def plan(text):
        spec = tmp_path / "s.toml"
        spec.write_text(text)
        result = runner.invoke(main, ["plan", str(spec)], catch_exceptions=False)
        return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")

    return plan


@pytest.mark.parametrize("case", INVALID)
def test_invalid_lora_setting_fails_plan_with_exit_2_and_its_line(case, plan_cli, checkpoint):
    body, expected, *model_keys = INVALID[case]
    head = SPEC_HEAD.format(source=checkpoint("llama"))
    if model_keys:  # extra [model] keys go right after source (line 4)
        extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in model_keys[0].items())
        head = head.replace("[target]", extra + "[target]")
    code, output = plan_cli(head + body)
    assert code == 2, output
    assert "Traceback" not in output
    for fragment in expected:
        assert fragment in output, (fragment, output)


# ---------------------------------------------------------------------------- existing adapters that do not fit

def fake_adapter(folder, *, r=4, target_modules=("q_proj",), shapes=None, base="", peft_type="LORA"):
    """A peft-format adapter folder written by hand: adapter_config.json + adapter_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": peft_type, "r": r, "lora_alpha": 2 * r, "target_modules": list(target_modules),
              "base_model_name_or_path": base, "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    shapes = shapes or {"model.layers.0.self_attn.q_proj": ((r, 64), (64, r))}
    tensors = {}
    for module, (a, b) in shapes.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(a)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(b)
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


MISFITS = {
    "target missing in the base": (dict(target_modules=("query_key_value",),
                                        shapes={"transformer.h.0.self_attention.query_key_value": ((4, 64), (192, 4))}),
                                   ["'query_key_value' is not in the base", "the base has no such module"]),
    "shape mismatch": (dict(shapes={"model.layers.0.self_attn.q_proj": ((4, 128), (64, 4))}),
                       ["model.layers.0.self_attn.q_proj", "128 -> 64 layer, the base's is 64 -> 64"]),
    "rank inconsistent with r": (dict(r=8, shapes={"model.layers.0.self_attn.q_proj": ((4, 64), (64, 4))}),
                                 ["rank 4 in the weights, but adapter_config.json says r = 8"]),
    "A and B ranks differ": (dict(shapes={"model.layers.0.self_attn.q_proj": ((4, 64), (64, 8))}), ["do not share a rank"]),
    "not LoRA": (dict(peft_type="IA3"), ["IA3 adapter", "LoRA adapters only"]),
}


@pytest.mark.parametrize("case", MISFITS)
def test_adapter_that_does_not_fit_the_base_is_a_plan_time_error(case, checkpoint, write_spec, tmp_path):
    kwargs, expected = MISFITS[case]
    adapter = fake_adapter(tmp_path / "adapter", **kwargs)
    spec = write_spec(checkpoint("llama"), model={"adapter": str(adapter)})
    with pytest.raises(loadspec.UsageError) as caught:
        loadspec.plan_spec(spec)
    if case != "not LoRA":  # (that one is refused while reading the folder, before planning)
        assert f"{spec}:4: model.adapter" in str(caught.value)
    for fragment in expected:
        assert fragment in str(caught.value), str(caught.value)


def test_adapter_as_source_needs_a_base_and_refuses_a_second_lora(checkpoint, write_spec, tmp_path):
    orphan = fake_adapter(tmp_path / "orphan")
    with pytest.raises(loadspec.UsageError, match="does not name its base model"):
        loadspec.plan_spec(write_spec(orphan, name="orphan"))
    fitting = fake_adapter(tmp_path / "fitting", base=str(checkpoint("llama")))
    planned = loadspec.plan_spec(write_spec(fitting, name="fits")).plan
    assert planned.lora["kind"] == "adapter" and planned.lora["trainable"] is False
    assert planned.lora["target_modules"] == ["q_proj"] and planned.source["location"] == str(checkpoint("llama"))
    with pytest.raises(loadspec.UsageError, match=r"s\.toml|fits\.toml|the source is an existing LoRA adapter"):
        loadspec.plan_spec(write_spec(fitting, name="fits", lora={"r": 8}))
