"""Device maps beyond the strategies: explicit tables, max_memory, and one copy per torchrun rank."""
import pytest

from loadspec.api import for_this_rank
from loadspec.errors import SpecError, UsageError
from loadspec.hardware import GIB, profile
from loadspec.plan import resolve
from loadspec.spec import parse_spec
from tests.test_plan import LLAMA_8B, source_for

TWO_GPUS = '{capability = "8.0", memory = "40GiB", count = 2}'


def plan(load_lines: str, target=TWO_GPUS, config=LLAMA_8B):
    spec = parse_spec(f'name = "t"\n[model]\nsource = "/x"\n[load]\n{load_lines}\n[target]\ngpu = {target}\n')
    return resolve(spec, profile(spec.target.gpu), source_for(config))


def test_explicit_table_places_blocks_by_most_specific_prefix():
    table = 'device_map = {"model.embed_tokens" = "cuda:0", "model.layers" = "cuda:0", "model.layers.20" = "cuda:1", "model.norm" = "cuda:1", "lm_head" = "cuda:1"}'
    p = plan(table)
    assert p.device_map["model.embed_tokens"] == "cuda:0" and p.device_map["model.layers.3"] == "cuda:0"
    assert p.device_map["model.layers.20"] == "cuda:1" and p.device_map["lm_head"] == "cuda:1"
    assert set(p.memory) == {"cuda:0", "cuda:1"}
    assert "from the spec's table" in dict(p.reasons)["device map"]


def test_table_errors_name_the_problem():
    with pytest.raises(UsageError, match="matches no block.*Did you mean 'model.norm'"):
        plan('device_map = {"model.nrom" = "cuda:0", "model" = "cuda:0", "lm_head" = "cuda:0"}')
    with pytest.raises(UsageError, match="places no device for block 'lm_head'"):
        plan('device_map = {"model" = "cuda:0"}')
    with pytest.raises(UsageError, match="has 2 GPU"):
        plan('device_map = {"model" = "cuda:0", "lm_head" = "cuda:5"}')
    with pytest.raises(SpecError, match="cuda:N"):
        plan('device_map = {"model" = "gpu0"}')


def test_max_memory_replaces_the_budget():
    p = plan('device_map = "sequential"\nmax_memory = {"cuda:0" = "2GiB", "cuda:1" = "30GiB"}')
    assert p.memory["cuda:0"] <= 2 * GIB and p.memory["cuda:1"] > 2 * GIB
    with pytest.raises(UsageError, match="over its"):
        plan('device_map = {"model" = "cuda:0", "lm_head" = "cuda:0"}\nmax_memory = {"cuda:0" = "1GiB"}')
    with pytest.raises(UsageError, match="target is the CPU"):
        plan('max_memory = {"cuda:0" = "1GiB"}', target='"cpu"')


def test_each_torchrun_rank_loads_a_full_copy_on_its_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert for_this_rank({"": "cuda:0"}) == {"": "cuda:3"}
    assert for_this_rank({"model.embed_tokens": "cpu", "model.layers.0": "cuda:0"}) == {"model.embed_tokens": "cpu", "model.layers.0": "cuda:3"}
    with pytest.raises(UsageError, match="own copy"):
        for_this_rank({"model.layers.0": "cuda:0", "lm_head": "cuda:1"})
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert for_this_rank({"": "cuda:0"}) == {"": "cuda:0"}


@pytest.mark.gpu
def test_two_gpu_split_load_equals_one_gpu_load(checkpoint, write_spec, tmp_path):
    """Needs a machine with two GPUs (not lent this session): the same artifact split over two GPUs gives the one-GPU logits."""
    import torch

    import loadspec

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    folder = checkpoint("llama")
    one = write_spec(folder, name="one", target="auto")
    split = tmp_path / "split.toml"
    split.write_text(f'name = "split"\n[model]\nsource = "{folder}"\n[load]\n'
                     'device_map = {"model.embed_tokens" = "cuda:0", "model.layers.0" = "cuda:0", "model.layers.1" = "cuda:1", '
                     '"model.norm" = "cuda:1", "lm_head" = "cuda:1"}\n'
                     '[target]\ngpu = {capability = "9.0", memory = "80GiB", count = 2}\n')
    assert loadspec.build(one, cache_dir=tmp_path).plan.fingerprint == loadspec.build(split, cache_dir=tmp_path).plan.fingerprint
    ids = torch.arange(1, 17)[None]
    outputs = []
    for name in ("one", "split"):
        model, _ = loadspec.load(name, cache_dir=tmp_path)
        with torch.no_grad():
            outputs.append(model(ids.to("cuda:0")).logits.cpu())
    assert torch.equal(outputs[0], outputs[1])


def _two_placements(checkpoint, write_spec, tmp_path, target):
    """Two names on one artifact: placement is not in the fingerprint, so they share the bytes."""
    import loadspec

    plain = loadspec.build(write_spec(checkpoint("llama"), name="plain", target=target, load={"offload_embedding": False}),
                           cache_dir=tmp_path / "c", progress=False)
    offloaded = loadspec.build(write_spec(checkpoint("llama"), name="offloaded", target=target, load={"offload_embedding": True}),
                               cache_dir=tmp_path / "c", progress=False)
    assert offloaded.plan.fingerprint == plain.plan.fingerprint and offloaded.cached
    return plain.plan, offloaded.plan


def test_names_sharing_an_artifact_keep_their_own_device_map(checkpoint, write_spec, tmp_path):
    from click.testing import CliRunner

    from loadspec import cli

    plain, offloaded = _two_placements(checkpoint, write_spec, tmp_path, "h100")
    assert offloaded.device_map["model.embed_tokens"] == "cpu" and plain.device_map == {"": "cuda:0"}
    shown = {name: CliRunner().invoke(cli.main, ["inspect", name, "--cache-dir", str(tmp_path / "c")]) for name in ("plain", "offloaded")}
    assert all(result.exit_code == 0 for result in shown.values())
    assert "loads with its own device map" not in shown["plain"].output  # the artifact's plan is plain's
    assert "offloaded loads with its own device map: {'model.embed_tokens': 'cpu'" in shown["offloaded"].output


@pytest.mark.gpu
def test_offloaded_name_on_a_shared_artifact_loads_its_embedding_on_cpu(checkpoint, write_spec, tmp_path):
    import torch

    import loadspec

    _two_placements(checkpoint, write_spec, tmp_path, "auto")
    logits = {}
    for name, device in (("plain", "cuda"), ("offloaded", "cpu")):
        model, _ = loadspec.load(name, cache_dir=tmp_path / "c")
        assert model.model.embed_tokens.weight.device.type == device and model.lm_head.weight.device.type == "cuda"
        with torch.no_grad():
            logits[name] = model(torch.arange(1, 17, device="cuda")[None]).logits.cpu()
    assert torch.equal(logits["plain"], logits["offloaded"])
