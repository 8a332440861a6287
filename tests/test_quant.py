"""loadspec.quant against real bitsandbytes on the CPU: every serialized tensor byte-identical,
dequantized output bit-identical, and a Linear4bit built from our tensors computing the same."""
import itertools
import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

from loadspec import quant  # noqa: E402

PREFIX = "model.layers.0.self_attn.q_proj.weight"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHAPES = {"64x64": (64, 64), "128x96": (128, 96), "7x13": (7, 13), "1d": (1000,)}


@pytest.fixture(autouse=True, scope="module")
def eager_bitsandbytes():
    """bnb wraps its torch dequantize fallback in torch.compile; eager is the same math, without minutes of compiling."""
    import torch._dynamo

    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = previous


def bnb_reference(weight, quant_type, double_quant, blocksize=64):
    packed, state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                       quant_type=quant_type)
    tensors = {PREFIX: packed, **{f"{PREFIX}.{k}": v for k, v in state.as_dict(packed=True).items()}}
    return tensors, bnbf.dequantize_4bit(packed, state)


def bits(t):
    """A tensor's raw bytes, so that -0.0 != 0.0 and NaN == NaN."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_matches_bnb(weight, quant_type, double_quant, blocksize=64):
    ours = quant.quantize_4bit(weight, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                               name=PREFIX)
    expected, expected_dq = bnb_reference(weight, quant_type, double_quant, blocksize)
    got = ours.state_dict(PREFIX)
    assert list(got) == list(expected)
    for key, want in expected.items():
        have = got[key]
        assert (have.dtype, tuple(have.shape)) == (want.dtype, tuple(want.shape)), key
        assert torch.equal(have, want), f"{key} differs from bitsandbytes"
    dequantized = quant.dequantize_4bit(ours)
    assert dequantized.dtype == weight.dtype and dequantized.shape == weight.shape
    # bnb hands 1-D even-length weights back as [1, n]; compare the values bit for bit
    assert torch.equal(bits(dequantized), bits(expected_dq)), "dequantized output differs from bitsandbytes"
    return ours


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("quant_type", quant.QUANT_TYPES)
def test_random_matches_bnb(quant_type, double_quant, dtype, shape):
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    ours = assert_matches_bnb(weight, quant_type, double_quant)
    assert ours.packed.shape == ((weight.numel() + 1) // 2, 1) and ours.packed.dtype == torch.uint8
    assert ours.shape == weight.shape and ours.dtype == dtype and ours.nested == double_quant


def _edge_weights():
    gen = torch.Generator().manual_seed(1)
    mixed = torch.randn(64, 64, generator=gen)
    mixed[:8] = 0.0  # whole zero blocks
    mixed[8:16] = 2.5  # whole blocks of one value
    mixed[16:24, ::2] = -mixed[16:24, 1::2]  # +-a pairs
    short_tail = torch.randn(130, generator=gen)
    short_tail[128:] = 0.0  # a zero-valued short last block stores absmax 1e-38
    return {
        "zeros": torch.zeros(64, 64),
        "zeros-odd": torch.zeros(7, 13),
        "all-equal": torch.full((64, 64), 0.37),
        "all-equal-negative": torch.full((32, 96), -3.0),
        "mixed-blocks": mixed,
        "zero-short-tail": short_tail,
        "large": (torch.rand(64, 64, generator=gen) * 2 - 1) * 6e4,
        "tiny": torch.randn(64, 64, generator=gen) * 1e-6,
        "only-a-short-block": torch.randn(33, generator=gen),
        "three-values": torch.randn(3, generator=gen),
        "3-d": torch.randn(3, 5, 17, generator=gen),
        "many-blocks": torch.randn(300, 257, generator=gen),
    }


EDGE = _edge_weights()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", EDGE, ids=EDGE.keys())
def test_edge_cases_match_bnb(case, dtype):
    weight = EDGE[case].to(dtype)
    for quant_type, double_quant in itertools.product(quant.QUANT_TYPES, (True, False)):
        assert_matches_bnb(weight, quant_type, double_quant)


def _on_midpoints(quant_type):
    """Values exactly on, and one float32 step either side of, every midpoint of bnb's code table,
    plus the code values themselves, in blocks whose absmax is exactly 1 (so the scale is exactly 1)."""
    ordered = bnbf.get_4bit_type(quant_type, device="cpu").sort().values
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    up, down = torch.nextafter(midpoints, torch.tensor(2.0)), torch.nextafter(midpoints, torch.tensor(-2.0))
    values = torch.cat([midpoints, up, down, ordered, torch.tensor([0.0, -0.0, 1e-4, -1e-4, 2e-3, 3e-3])])
    return _at_scale_one(values)


def _at_scale_one(values):
    """Blocks of 64 led by 1.0, so that bnb's scaled value is the float32 value itself."""
    values = torch.cat([values, torch.zeros(-values.numel() % 63)]).view(-1, 63)
    return torch.cat([torch.ones(values.shape[0], 1), values], dim=1)


@pytest.mark.parametrize("quant_type", quant.QUANT_TYPES)
def test_bucket_arithmetic_on_every_cell_edge(quant_type):
    """The first and last float32 of every 16-bit cell the bucket arithmetic uses (|x| <= 1), and
    random values over every exponent down to subnormals: the same codes as bnb's bucketize."""
    cell = torch.arange(1 << 16, dtype=torch.int64) << 16
    edges = torch.cat([cell, cell | 0xFFFF])
    edges = (edges - (edges >= 1 << 31).long() * (1 << 32)).to(torch.int32).view(torch.float32)
    edges = edges[torch.isfinite(edges) & (edges.abs() <= 1)]
    gen = torch.Generator().manual_seed(8)
    exponents = torch.rand(100_000, generator=gen) * 149
    signs = torch.where(torch.rand(100_000, generator=gen) < 0.5, -1.0, 1.0)
    spread = (signs * torch.exp2(-exponents.double())).float()
    assert_matches_bnb(_at_scale_one(torch.cat([edges, spread])), quant_type, False)


@pytest.mark.parametrize("scale", [1.0, 8.0, 0.75], ids=["x1", "x8", "x0.75"])
@pytest.mark.parametrize("quant_type", quant.QUANT_TYPES)
def test_values_on_code_midpoints(quant_type, scale):
    weight = _on_midpoints(quant_type) * scale
    for dtype, double_quant in itertools.product((torch.float32, torch.bfloat16, torch.float16), (True, False)):
        assert_matches_bnb(weight.to(dtype), quant_type, double_quant)


@pytest.mark.parametrize("quant_type", quant.QUANT_TYPES)
def test_float32_extremes(quant_type):
    gen = torch.Generator().manual_seed(2)
    cases = [
        (torch.rand(64, 64, generator=gen) * 2 - 1) * 3e38,  # near float32 max
        torch.randn(300, 64, generator=gen) * 1e-42,  # subnormal: absmax clamped to 1e-38
        torch.full((300, 64), 1e-40),  # nested centred absmax is subnormal: 1/absmax is inf
        torch.where(torch.arange(300 * 64).view(300, 64) % 3 == 0, 3e-40, 1e-40),
    ]
    for weight, double_quant in itertools.product(cases, (True, False)):
        assert_matches_bnb(weight, quant_type, double_quant)
    # bf16 near its max: bnb's nested absmax overflows to inf and dequantizes to NaN; we match its NaN bits
    assert_matches_bnb(cases[0].to(torch.bfloat16), quant_type, True)


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_other_blocksizes(blocksize):
    weight = torch.randn(96, 4096 + 96, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    for quant_type in quant.QUANT_TYPES:
        assert_matches_bnb(weight, quant_type, True, blocksize)


def test_many_chunks_on_threads(monkeypatch):
    """Small chunks: many of them, a short last one, spread over threads, and a short last block."""
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 4096)
    weight = torch.randn(517, 300, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    before = torch.get_num_threads()
    for quant_type, double_quant in itertools.product(quant.QUANT_TYPES, (True, False)):
        assert_matches_bnb(weight, quant_type, double_quant)
    assert torch.get_num_threads() == before
    torch.set_num_threads(1)
    try:
        assert_matches_bnb(weight, "nf4", True)
    finally:
        torch.set_num_threads(before)


def test_concurrent_calls_and_thread_setting_restored():
    import threading

    weights = [torch.randn(200, 640, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16) for i in range(4)]
    expected = [bnb_reference(w, "nf4", True)[0] for w in weights]
    before = torch.get_num_threads()
    results = [None] * len(weights)

    def run(i):
        results[i] = quant.quantize_4bit(weights[i]).state_dict(PREFIX)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(weights))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.get_num_threads() == before
    for got, want in zip(results, expected):
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError):
        quant.quantize_4bit(torch.full((64, 64), float("nan")))
    assert torch.get_num_threads() == before


def test_nested_lookup_matches_bnb_kernel():
    """The nested step reproduces libbitsandbytes_cpu's 65536-bin table, including where it differs from
    the nearest code: every bin edge, one float32 step either side, and code midpoints, at scale exactly 1."""
    code = bnbf.create_dynamic_map()
    assert torch.equal(quant._dynamic_code(), code)
    grid = torch.arange(1 << 16, dtype=torch.float32) * 2 / 65535 - 1
    edges = (torch.arange(1 << 16, dtype=torch.float32) + 0.5) / 65535 * 2 - 1
    mids = (code[:-1] + code[1:]) * 0.5
    values = [grid, edges, mids, torch.rand(200_000, generator=torch.Generator().manual_seed(5)) * 2 - 1]
    values += [torch.nextafter(v, torch.tensor(s)) for v in (edges, mids) for s in (2.0, -2.0)]
    values = torch.cat(values).clamp(-1, 1)
    values = torch.cat([values, torch.zeros(-values.numel() % 255)]).view(-1, 255)
    blocks = torch.cat([torch.ones(values.shape[0], 1), values], dim=1).reshape(-1)  # absmax 1 per block
    expected, state = bnbf.quantize_blockwise(blocks, blocksize=256)
    codes, absmax = quant._quantize_absmax(blocks)
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(codes, expected)


def test_state_dict_format():
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    sd = quant.quantize_4bit(weight, quant_type="nf4", double_quant=True).state_dict("w")
    assert list(sd) == ["w", "w.absmax", "w.quant_map", "w.nested_absmax", "w.nested_quant_map",
                        "w.quant_state.bitsandbytes__nf4"]
    info = json.loads(bytes(sd["w.quant_state.bitsandbytes__nf4"].tolist()))
    assert list(info) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                          "nested_offset"]
    assert info["dtype"] == "bfloat16" and info["shape"] == [96, 128] and info["nested_blocksize"] == 256
    plain = quant.quantize_4bit(weight, quant_type="fp4", double_quant=False).state_dict("w")
    assert list(plain) == ["w", "w.absmax", "w.quant_map", "w.quant_state.bitsandbytes__fp4"]
    # two weights' tensors share no memory, so safetensors can save them side by side
    from safetensors.torch import save

    other = quant.quantize_4bit(weight, quant_type="nf4", double_quant=True).state_dict("v")
    assert save({**sd, **other})


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_non_finite_raises_naming_the_tensor(bad, dtype):
    weight = torch.randn(128, 96).to(dtype)
    weight[70, 5] = float(bad)
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.up_proj\.weight") as info:
        quant.quantize_4bit(weight, name="model.layers.3.mlp.up_proj.weight")
    message = str(info.value)
    assert ("NaN" if bad == "nan" else "inf") in message and "non-finite" in message
    assert "flat index 6725" in message
    # in the short last block too
    tail = torch.randn(70).to(dtype)
    tail[-1] = float(bad)
    with pytest.raises(ValueError, match="tail_weight"):
        quant.quantize_4bit(tail, name="tail_weight", double_quant=False)


def test_bad_arguments_raise():
    weight = torch.randn(64, 64)
    with pytest.raises(ValueError, match="w1.*quant_type"):
        quant.quantize_4bit(weight, quant_type="int4", name="w1")
    with pytest.raises(ValueError, match="w2.*blocksize"):
        quant.quantize_4bit(weight, blocksize=48, name="w2")
    with pytest.raises(ValueError, match="w3.*float64"):
        quant.quantize_4bit(weight.double(), name="w3")
    with pytest.raises(ValueError, match="w4.*empty"):
        quant.quantize_4bit(torch.empty(0, 64), name="w4")


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("quant_type", quant.QUANT_TYPES)
def test_linear4bit_from_our_state_dict(quant_type, double_quant):
    """Params4bit.from_prequantized over our tensors: same saved state and same CPU forward as bnb's own."""
    dtype = torch.bfloat16
    torch.manual_seed(7)
    dense = torch.nn.Linear(128, 96, bias=True).to(dtype)
    reference = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=dtype, compress_statistics=double_quant,
                                  quant_type=quant_type).to(dtype)
    reference.load_state_dict(dense.state_dict())
    reference = reference.to("cpu")  # bnb quantizes here

    stats = quant.quantize_4bit(dense.weight.data, quant_type=quant_type, double_quant=double_quant).state_dict("weight")
    saved = reference.state_dict()
    assert list(saved) == ["weight", "bias", *list(stats)[1:]]
    for key, value in stats.items():
        assert torch.equal(saved[key], value), key

    ours = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=dtype, compress_statistics=double_quant,
                             quant_type=quant_type, device="meta")
    data = stats.pop("weight")
    ours.weight = bnb.nn.Params4bit.from_prequantized(data=data, quantized_stats=stats, device="cpu", module=ours)
    ours.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    x = torch.randn(5, 128, dtype=dtype)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert got.dtype == dtype and got.shape == (5, 96)
    assert torch.equal(got, expected)
