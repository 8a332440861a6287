"""Loader pieces a whole load does not show on its own (the whole load: test_pipeline, test_options)."""
import pytest
import torch

from loadspec import loader

bnb = pytest.importorskip("bitsandbytes")


def test_empty_copy_of_a_4bit_layer_shares_nothing_mutable_with_its_prototype():
    prototype = bnb.nn.Linear4bit(96, 80, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
    copy = loader._empty_copy(prototype)
    assert type(copy) is bnb.nn.Linear4bit
    assert (copy.in_features, copy.out_features, copy.compute_dtype) == (96, 80, torch.bfloat16)
    for name in ("weight", "bias"):
        mine, theirs = copy._parameters[name], prototype._parameters[name]
        assert mine is not theirs and mine.is_meta
        assert (mine.shape, mine.dtype, mine.requires_grad) == (theirs.shape, theirs.dtype, theirs.requires_grad)
    copy.register_forward_hook(lambda *args: None)
    copy.weight = torch.nn.Parameter(torch.zeros(80, 96), requires_grad=False)
    assert not prototype._forward_hooks and prototype.weight.is_meta  # the prototype is untouched


def test_empty_copy_refuses_modules_with_submodules():
    with pytest.raises(ValueError, match="submodules"):
        loader._empty_copy(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.fixture(scope="module")
def nf4_artifact(tmp_path_factory, checkpoint):
    """(folder, plan) of a tiny Llama built in NF4 with double quantization, for the CPU."""
    import loadspec
    from loadspec.plan import LoadPlan

    root = tmp_path_factory.mktemp("nf4")
    spec = root / "tiny.toml"
    spec.write_text(f'name = "tiny"\n[model]\nsource = "{checkpoint("llama")}"\n[target]\ngpu = "cpu"\n[load]\nquant = "nf4"\n')
    folder = loadspec.build(spec, cache_dir=root / "cache", progress=False).path
    return folder, LoadPlan.from_json((folder / "plan.json").read_text())


def _artifact_copy(nf4_artifact, tmp_path, edit):
    """A copy of the artifact whose weights file went through `edit(tensors) -> tensors`."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder, plan = nf4_artifact
    copy = tmp_path / "artifact"
    shutil.copytree(folder, copy)
    (weights,) = copy.glob("*.safetensors")
    save_file(edit(load_file(weights)), weights, metadata={"format": "pt"})
    return copy, plan


def test_4bit_weights_get_their_stored_state_and_one_offset_each(nf4_artifact):
    from safetensors.torch import load_file

    folder, plan = nf4_artifact
    model, _ = loader.load_artifact(folder, plan)
    stored = load_file(next(folder.glob("*.safetensors")))
    assert plan.quantized
    for name in plan.quantized:
        module = model.get_submodule(name)
        weight, state = module.weight, module.quant_state
        assert isinstance(weight, bnb.nn.Params4bit) and weight.quant_state is state and weight.module is module
        assert torch.equal(weight.data, stored[f"{name}.weight"]) and torch.equal(state.absmax, stored[f"{name}.weight.absmax"])
        assert state.offset.ndim == 0 and state.offset.item() == pytest.approx(state.as_dict()["nested_offset"])
    offsets = {model.get_submodule(name).quant_state.offset.item() for name in plan.quantized}
    assert len(offsets) > 1  # each weight its own offset, though they arrive together


@pytest.mark.parametrize("damage, message", [
    (lambda t: {k: v for k, v in t.items() if not k.endswith("q_proj.weight.quant_state.bitsandbytes__nf4")}, "quantization state is incomplete"),
    (lambda t: {k: v for k, v in t.items() if not k.endswith("layers.0.input_layernorm.weight")}, "lacks 1 tensor"),
    (lambda t: {k: (torch.tensor(list(b'{"shape": [1, 2]}'), dtype=torch.uint8) if k.endswith("q_proj.weight.quant_state.bitsandbytes__nf4") else v)
                for k, v in t.items()}, "quantization state is incomplete"),
])
def test_a_damaged_artifact_is_refused_with_the_way_back(nf4_artifact, tmp_path, damage, message):
    from loadspec.errors import LoadspecError

    folder, plan = _artifact_copy(nf4_artifact, tmp_path, damage)
    with pytest.raises(LoadspecError, match=message) as caught:
        loader.load_artifact(folder, plan)
    assert "loadspec build SPEC --force" in str(caught.value)


def test_gpu_warm_up_that_fails_is_silent_and_leaves_nothing_running(monkeypatch):
    """The cuBLAS warm-up runs beside the load and is not waited for; if it cannot run, it says nothing (the first
    forward reports the real error) and its thread ends."""
    import threading

    hooked = []
    monkeypatch.setattr(threading, "excepthook", hooked.append)
    monkeypatch.setattr(torch, "ones", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("no CUDA here")))
    loader._warm_gpu_libraries({torch.device("cuda:0")}, torch.bfloat16)
    warm = [t for t in threading.enumerate() if t.name == "loadspec-gpu-warm-up"]
    for thread in warm:
        thread.join(timeout=30)
    assert hooked == [] and not any(t.is_alive() for t in warm)
    loader._warm_gpu_libraries({torch.device("cpu")}, torch.bfloat16)  # nothing to warm: no thread at all
    assert not [t for t in threading.enumerate() if t.name == "loadspec-gpu-warm-up"]


@pytest.mark.gpu
def test_gpu_a_script_that_exits_right_after_loading_exits_cleanly(checkpoint, write_spec, tmp_path, fresh_python):
    """The load returns before its cuBLAS warm-up ends; the interpreter waits for it at exit (no crash, no noise),
    and a forward straight after the load works."""
    import loadspec

    spec = write_spec(checkpoint("llama"), name="warm", target="auto", load={"quant": "nf4"})
    loadspec.build(spec, cache_dir=tmp_path, progress=False)
    for forward in ("", "model(torch.tensor([[1, 2, 3]], device='cuda'));"):
        result, stderr = fresh_python(
            "import json, torch, transformers.modeling_utils, loadspec; "
            f"model, tok = loadspec.load('warm', cache_dir={str(tmp_path)!r}); {forward} "
            "print('RESULT', json.dumps({'loaded': type(model).__name__}))")
        assert result == {"loaded": "LlamaForCausalLM"}
        assert "Traceback" not in stderr and "Error" not in stderr, stderr
