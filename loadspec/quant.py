"""4-bit blockwise quantization (NF4 / FP4), byte-identical to bitsandbytes on the CPU, but fast.

What bitsandbytes (0.50) does on a CPU tensor, and what this module reproduces bit for bit:

* 4-bit step (`bitsandbytes::quantize_4bit`, the pure-torch "default" backend; no C kernel):
  the flattened input is widened to float32 and cut into blocks of `blocksize` values.
  A full block's absmax is `max|x|` (stored as is, so an all-zero block stores 0); its values
  are scaled by `x * reciprocal(max(absmax, 1e-38))`.  The last, short block (when
  `numel % blocksize != 0`) is different: its absmax is stored already clamped to 1e-38 and
  its values are scaled by true division `x / absmax`.  Scaled values are clamped to [-1, 1]
  and an odd count is padded with one 0.0.  The 4-bit index is the number of code midpoints
  strictly below the value (`torch.bucketize(..., right=False)`), the midpoints being
  `(a + b) / 2` in float32 between neighbours of the *sorted* code.  For NF4 the sorted order
  is the code order; for FP4 the bucket is mapped back through the stable argsort of the code,
  so +0.0 lands on index 0, but small positive values (0 < x <= 0.0026) land on index 8.
  Two values go in a byte, the first in the high nibble.  Storage: uint8 `[ceil(n/2), 1]`.
* nested ("double") quantization of the absmax (`compress_statistics=True`): `offset` is the
  float32 `absmax.mean()` -- torch's summation order, which depends on torch.get_num_threads(),
  so it is computed with the caller's setting, as bnb's own call would be.  `absmax - offset`
  is quantized with the 256-entry signed dynamic map in blocks of 256 by the C kernel
  `quantize_cpu_impl<float>` (libbitsandbytes_cpu, x86-64).  That kernel is not a nearest-code
  search: it stores a block's `max|x|`, writes code index 0 for an all-zero block, and otherwise
  looks the value up in a 65536-entry table:
  `i = (uint16) trunc(fma((clamp(x * (1/absmax), -1, 1) + 1) * 0.5, 65535, 0.5))` and
  `table[i] = #{midpoints < -1 + 2i/65535}` (all float32).  About 0.1% of codes differ from the
  nearest code; this module reproduces the table, not the ideal.
* dequantization (`dequantize_4bit` on CPU): nested absmax is `code8[q] * nested_absmax + offset`
  (float32, two roundings); values are `code4[nibble] * absmax` in float32, rounded to the
  weight dtype (round-to-nearest-even).  The C kernel used when the last dimension is even
  has -0.0 at FP4 index 8 and rounds to bfloat16 by bit arithmetic (a NaN keeps its sign); the
  torch fallback used for an odd last dimension has +0.0 and torch's rounding.

Speed: bnb spends most of its time in `torch.bucketize` (a scalar binary search per value).
Here the bucket comes from integer arithmetic on the scaled float32's bits plus one table
look-up per value (see `_tables4`; exact, including values on a midpoint), absmax from an
integer max over the input's bit patterns, and pairs are packed with one int16 add.  The work
runs in chunks of ~128K values with preallocated buffers (12 bytes a value per thread), on
`torch.get_num_threads()` Python threads (torch releases the GIL inside ops) while torch's own
intra-op threading is set to 1 (restored afterwards).  Calls are serialized by a lock, since
the thread setting is process-wide.  Extra memory: the outputs (n/2 + 4n/blocksize bytes) plus
~1.5 MB per thread; a non-contiguous input is first copied by `reshape`.
"""
from __future__ import annotations

import functools
import json
import math
import os
import threading

import attrs
import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
NESTED_BLOCKSIZE = 256
CHUNK_ELEMENTS = 1 << 17  # values per chunk: 1.5 MB of scratch per thread; larger spills out of cache
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ABSMAX_FLOOR = 1e-38  # bitsandbytes clamps the divisor to this (as float32) before scaling
_LOCK = threading.Lock()  # quantize_4bit changes torch's process-wide thread count while it runs

# NF4: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA); the values bitsandbytes hardcodes.
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)
# FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, before dividing by the max (12).
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def _code4(quant_type: str) -> torch.Tensor:
    """The 16-entry float32 quant map exactly as bitsandbytes builds it (a fresh tensor)."""
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    return torch.tensor(_FP4_RAW, dtype=torch.float32) / 12.0  # float32 division, as bnb's div_


@functools.cache
def _dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)), float32[256], sorted.

    Seven exponent levels 1e-6 .. 1; level i holds 2**i evenly spaced fraction means in (0.1, 1),
    both signs; plus 0 and 1.  Computed with the same float32 torch arithmetic.
    """
    values: list[float] = []
    for level in range(7):
        edges = torch.linspace(0.1, 1, 2**level + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (level - 6)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@attrs.frozen
class _Tables4:
    """Everything the 4-bit quantizer needs for one quant type, built once (see `_tables4`)."""

    midpoints: torch.Tensor  # float32[15], between neighbours of the sorted code
    order: torch.Tensor  # int64[16]: sorted position -> code index
    cells: torch.Tensor  # int32[32768]: per cell of folded bits, the bucket arithmetic's constant
    byte_remap: torch.Tensor | None  # uint8[256]: packed sorted positions -> packed code indices (FP4 only)


def _folded_to_float(folded: torch.Tensor) -> torch.Tensor:
    """Inverse of the fold `u = b ^ (b >> 31)` of float32 bits b, for int64 u in [0, 2**31)."""
    negative = folded >= 1 << 30
    bits = torch.where(negative, folded ^ 0xFFFFFFFF, folded)  # the flipped bits of a negative float
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


@functools.cache
def _tables4(quant_type: str) -> _Tables4:
    """The bucket of a scaled value x, `count(midpoints < x)`, by integer arithmetic and one look-up.

    |x| < 2 always (|a| <= absmax, and the reciprocal is within 2**-22 relative).  Fold x's float32
    bits b into u = b ^ (b >> 31): positive x keep their bits (u < 2**30); a negative x gets all bits
    flipped (u >= 2**30), so within a "cell" of u's top 17..31 bits (`u >> 16`) x grows with u's low
    16 bits.  No cell spans two midpoints (checked), so `count = below + (low16(u) > low16(u_mid))`.
    With cells[c] = 65536*below + (0xFFFF - low16(u_mid), or 0 when no midpoint) - (c << 16), that is
    exactly `(cells[u >> 16] + u) >> 16`.
    """
    code = _code4(quant_type)
    order = torch.argsort(code, stable=True)
    ordered = code[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    cell = torch.arange(1 << 15, dtype=torch.int64)
    first, last = _folded_to_float(cell << 16), _folded_to_float((cell << 16) | 0xFFFF)
    possible = (first.abs() < 2) & (last.abs() < 2)
    below = torch.searchsorted(midpoints, first)  # midpoints strictly below the cell's smallest x
    spanned = torch.where(possible, torch.searchsorted(midpoints, last) - below, 0)
    assert int(spanned.min()) >= 0 and int(spanned.max()) <= 1, "a cell spans two midpoints"
    inside = midpoints[below.clamp(max=len(midpoints) - 1)]  # the midpoint in the cell, where there is one
    inside_bits = inside.view(torch.int32).to(torch.int64)
    inside_low = (inside_bits ^ (inside_bits >> 31)) & 0xFFFF  # low 16 bits of the midpoint's folded bits
    constant = torch.where(possible, below << 16, 0) + torch.where(spanned == 1, 0xFFFF - inside_low, 0)
    cells = (constant - (cell << 16)).to(torch.int32)
    byte_remap = None
    if not torch.equal(order, torch.arange(16)):
        byte = torch.arange(256)
        byte_remap = ((order[byte >> 4] << 4) | order[byte & 0xF]).to(torch.uint8)
    return _Tables4(midpoints=midpoints, order=order, cells=cells, byte_remap=byte_remap)


@functools.cache
def _dynamic_lookup() -> torch.Tensor:
    """The 65536-entry table libbitsandbytes_cpu builds for the dynamic map: uint8 code index per bin."""
    code = _dynamic_code()
    midpoints = (code[:-1] + code[1:]) * 0.5
    steps = torch.arange(1 << 16, dtype=torch.float32) * 2
    bins = steps / torch.full_like(steps, 65535.0) - 1.0  # elementwise true division, like the C loop
    return torch.searchsorted(midpoints, bins).to(torch.uint8)


@functools.cache
def _dequant_code4(quant_type: str, c_kernel: bool) -> torch.Tensor:
    """The table bitsandbytes multiplies by when dequantizing: the C kernel's FP4 table has -0.0 at index 8."""
    code = _code4(quant_type)
    if c_kernel and quant_type == "fp4":
        code[8] = -0.0
    return code


@attrs.frozen(eq=False)
class Quant4bit:
    """One 4-bit quantized weight in bitsandbytes' layout (what `Params4bit` + `QuantState` hold)."""

    packed: torch.Tensor  # uint8 [ceil(n/2), 1], two values a byte, first value in the high nibble
    absmax: torch.Tensor  # float32 [blocks], or uint8 [blocks] codes when double-quantized
    code: torch.Tensor  # float32 [16], the quant map
    shape: torch.Size  # the weight's shape
    dtype: torch.dtype  # the weight's dtype (QuantState.dtype)
    blocksize: int
    quant_type: str
    nested_absmax: torch.Tensor | None = None  # float32 [ceil(blocks/256)]
    nested_code: torch.Tensor | None = None  # float32 [256], the dynamic map
    offset: torch.Tensor | None = None  # float32 0-d: the mean absmax subtracted before nesting
    nested_blocksize: int | None = None

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def quant_state_json(self) -> str:
        """The non-tensor part of `QuantState.as_dict(packed=True)`, as the JSON bitsandbytes writes."""
        info = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                "shape": list(self.shape)}
        if self.nested:
            info.update({"nested_blocksize": self.nested_blocksize, "nested_dtype": "float32",
                         "nested_offset": self.offset.item()})
        return json.dumps(info)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors exactly as bitsandbytes/transformers serialize a `Params4bit` weight under `prefix`:
        the packed weight at `prefix`, then `.absmax`, `.quant_map`, (`.nested_absmax`,
        `.nested_quant_map`,) and `.quant_state.bitsandbytes__<type>` (the JSON as uint8) --
        same keys, order, dtypes, shapes and bytes as `Linear4bit` saves."""
        out = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        if self.nested:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_code.clone()  # bnb un-shares it too
        blob = self.quant_state_json().encode("utf-8")
        out[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quantize_4bit(weight: torch.Tensor, *, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = True, name: str = "tensor") -> Quant4bit:
    """Quantize `weight` (float32/float16/bfloat16, any shape) to bitsandbytes' 4-bit format.

    Byte-identical to `bitsandbytes.functional.quantize_4bit(weight.cpu(), blocksize=blocksize,
    compress_statistics=double_quant, quant_type=quant_type)`.  Raises ValueError, naming the
    tensor, for inf/NaN values, an empty tensor, or an unsupported dtype, type or blocksize.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{name}: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{name}: blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if weight.dtype not in _INPUT_DTYPES:
        raise ValueError(f"{name}: 4-bit quantization needs a float32, float16 or bfloat16 tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{name}: cannot quantize an empty tensor (shape {tuple(weight.shape)})")
    with torch.no_grad(), _LOCK:
        flat = weight.detach().to("cpu").reshape(-1)
        threads = torch.get_num_threads()
        try:
            # Our parallelism is over chunks (Python threads); torch's own intra-op threads would
            # only contend, and stall on a busy machine, so they are off while we work.
            torch.set_num_threads(1)
            packed, absmax = _quantize_flat(flat, quant_type, blocksize, workers=threads)
            if not bool(torch.isfinite(absmax).all()):
                _raise_not_finite(flat, name)
        finally:
            torch.set_num_threads(threads)
        fields = dict(packed=packed.unsqueeze(1), code=_code4(quant_type), shape=torch.Size(weight.shape),
                      dtype=weight.dtype, blocksize=blocksize, quant_type=quant_type)
        if not double_quant:
            return Quant4bit(absmax=absmax, **fields)
        # torch's float32 mean sums in an order that depends on the thread count: computed with
        # the caller's setting, exactly the call bitsandbytes makes.
        offset = absmax.mean()
        try:
            torch.set_num_threads(1)
            codes, nested_absmax = _quantize_absmax(absmax - offset)
        finally:
            torch.set_num_threads(threads)
        return Quant4bit(absmax=codes, nested_absmax=nested_absmax, nested_code=_dynamic_code().clone(),
                         offset=offset, nested_blocksize=NESTED_BLOCKSIZE, **fields)


def _raise_not_finite(flat: torch.Tensor, name: str) -> None:
    nan, inf = int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
    first = int(torch.nonzero(~torch.isfinite(flat))[0, 0])
    what = " and ".join(f"{count} {kind}" for count, kind in ((nan, "NaN"), (inf, "inf")) if count)
    raise ValueError(f"{name}: cannot quantize a tensor with non-finite values: {what} "
                     f"(first at flat index {first}); fix the checkpoint or skip quantizing this tensor")


# --------------------------------------------------------------------------- the 4-bit step


def _quantize_flat(flat: torch.Tensor, quant_type: str, blocksize: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed uint8 [ceil(n/2)] and float32 absmax [ceil(n/blocksize)] for a contiguous 1-D tensor."""
    n = flat.numel()
    full_blocks, tail = divmod(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(full_blocks + (tail > 0), dtype=torch.float32)
    if full_blocks:
        blocks = flat[: full_blocks * blocksize].view(full_blocks, blocksize)
        _run_chunked(blocks, _tables4(quant_type), packed, absmax, workers)
    if tail:
        _quantize_tail(flat[full_blocks * blocksize:], quant_type, packed[full_blocks * blocksize // 2:], absmax[-1:])
    return packed, absmax


def _quantize_tail(values: torch.Tensor, quant_type: str, out: torch.Tensor, absmax_out: torch.Tensor) -> None:
    """The short last block, the way bitsandbytes treats it: clamped absmax, true division."""
    tables = _tables4(quant_type)
    x = values.float()
    scale = x.abs().max().clamp(min=_ABSMAX_FLOOR)
    absmax_out[0] = scale
    scaled = torch.clamp(x / scale, -1, 1)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    index = tables.order[torch.bucketize(scaled, tables.midpoints)]
    out.copy_((index[0::2] << 4) | index[1::2])


class _Scratch:
    """One thread's buffers for chunks of `rows` blocks: three of 4 bytes a value, reused as the
    work goes on (cache footprint), with every view made once (each torch call costs microseconds)."""

    def __init__(self, rows: int, blocksize: int, dtype: torch.dtype):
        size = rows * blocksize
        self.bits_dtype = torch.int32 if dtype == torch.float32 else torch.int16
        self.sign_mask = 0x7FFFFFFF if dtype == torch.float32 else 0x7FFF
        self.block_max = torch.empty(rows, dtype=self.bits_dtype)
        self.block_max_float = self.block_max.view(dtype)
        self.recip = torch.empty(rows, 1, dtype=torch.float32)
        self.recip_flat = self.recip.view(rows)
        first = torch.empty(rows, blocksize, dtype=torch.float32)
        second = torch.empty(size, dtype=torch.int32)
        third = torch.empty(size, dtype=torch.int32)
        # first: the scaled values; their bits folded in place; then the packed bytes (int16)
        self.scaled = first
        self.folded = first.view(torch.int32).view(size)
        self.byte = first.view(torch.int16).view(-1)[: size // 2]
        # second: sign masks, then cell numbers; then the 4-bit indices (uint8) and, for FP4,
        # the packed bytes as an index (int32, in its upper half)
        self.key = second
        self.index = second.view(torch.uint8)[:size]
        self.index_pairs = self.index.view(torch.int16)
        self.byte_index = second.view(torch.uint8)[2 * size:].view(torch.int32)
        # third: |a| as integer bit patterns; then the looked-up cell constants
        self.magnitude = third.view(self.bits_dtype)[:size].view(rows, blocksize)
        self.cell = third

    def run(self, a: torch.Tensor, a_bits: torch.Tensor, tables: _Tables4, out: torch.Tensor,
            absmax_out: torch.Tensor) -> None:
        """Quantize blocks `a` [rows, blocksize] (`a_bits`: the same memory as integers) into
        `out` (uint8 [rows*blocksize/2]) and `absmax_out` (float32 [rows])."""
        # absmax: max of |a| compared as integer bit patterns (exact, and NaN/inf survive for the check)
        torch.bitwise_and(a_bits, self.sign_mask, out=self.magnitude)
        torch.amax(self.magnitude, dim=1, out=self.block_max)
        absmax_out.copy_(self.block_max_float)
        torch.clamp(absmax_out, min=_ABSMAX_FLOOR, out=self.recip_flat)
        self.recip.reciprocal_()
        torch.mul(a, self.recip, out=self.scaled)
        # bucket = (cells[u >> 16] + u) >> 16 with u = bits ^ (bits >> 31); see _tables4
        torch.bitwise_right_shift(self.folded, 31, out=self.key)
        self.folded.bitwise_xor_(self.key)
        torch.bitwise_right_shift(self.folded, 16, out=self.key)
        torch.index_select(tables.cells, 0, self.key, out=self.cell)
        self.cell.add_(self.folded)
        torch.bitwise_right_shift(self.cell, 16, out=self.index)
        # pack pairs: read as int16 (little-endian) a pair is even + 256*odd, so odd + 16*pair has
        # the low byte 16*even + odd (the product wraps: int16 math is done in int and stored modulo)
        torch.bitwise_right_shift(self.index_pairs, 8, out=self.byte)
        self.byte.add_(self.index_pairs, alpha=16)
        if tables.byte_remap is None:
            out.copy_(self.byte)  # int16 -> uint8 keeps the low byte
        else:
            torch.bitwise_and(self.byte, 0xFF, out=self.byte_index)
            torch.index_select(tables.byte_remap, 0, self.byte_index, out=out)


def _run_chunked(blocks: torch.Tensor, tables: _Tables4, packed: torch.Tensor, absmax: torch.Tensor,
                 workers: int) -> None:
    """Quantize [n_blocks, blocksize] in chunks of rows on up to `workers` threads (torch's threads must be 1)."""
    n_blocks, blocksize = blocks.shape
    rows = max(1, CHUNK_ELEMENTS // blocksize)
    bits_dtype = torch.int32 if blocks.dtype == torch.float32 else torch.int16
    chunks = list(zip(blocks.split(rows), blocks.view(bits_dtype).split(rows),
                      packed[: n_blocks * blocksize // 2].split(rows * blocksize // 2), absmax[:n_blocks].split(rows)))
    workers = max(1, min(workers, os.cpu_count() or 1, len(chunks)))
    pending = iter(chunks)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            torch.set_num_threads(1)  # already the global setting; this pins the thread's own OpenMP state
            scratch: dict[int, _Scratch] = {}
            while True:
                with lock:
                    chunk = next(pending, None)
                if chunk is None:
                    return
                count = chunk[0].shape[0]
                if count not in scratch:
                    scratch[count] = _Scratch(count, blocksize, blocks.dtype)
                scratch[count].run(*chunk[:2], tables, *chunk[2:])
        except BaseException as exc:  # re-raised on the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=work, name=f"loadspec-quant-{i}", daemon=True) for i in range(workers - 1)]
    for thread in threads:
        thread.start()
    work()  # the calling thread works too
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------- nested absmax


def _quantize_absmax(centered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The C kernel's 8-bit blockwise quantization of `absmax - offset`: (uint8 codes, float32 block absmax)."""
    n = centered.numel()
    groups = -(-n // NESTED_BLOCKSIZE)
    if n % NESTED_BLOCKSIZE:
        padded = torch.zeros(groups * NESTED_BLOCKSIZE, dtype=torch.float32)
        padded[:n] = centered  # zero padding changes no block's max|x|
    else:
        padded = centered
    padded = padded.view(groups, NESTED_BLOCKSIZE)
    nested_absmax = padded.abs().amax(dim=1)
    inverse = torch.reciprocal(nested_absmax)  # 1.0f / absmax in the kernel; inf for tiny absmax
    half = (padded * inverse[:, None]).clamp_(-1, 1).add_(1.0).mul_(0.5)
    # fma(half, 65535, 0.5) rounded once to float32: exact in float64 since half is a multiple of 2**-25
    index = half.double().mul_(65535.0).add_(0.5).float()
    if not bool((torch.isfinite(inverse) & torch.isfinite(nested_absmax)).all()):
        # 0 * inf, or an inf offset (the absmax sum overflowed): the kernel's NaN converts to
        # 0x80000000, whose low 16 bits are bin 0
        index.nan_to_num_(nan=0.0)
    codes = torch.index_select(_dynamic_lookup(), 0, index.view(-1).to(torch.int32))  # truncation, as the kernel
    empty = nested_absmax == 0
    if bool(empty.any()):
        codes.view(groups, NESTED_BLOCKSIZE)[empty] = 0  # the kernel writes code 0 for an all-zero block
    return codes[:n].clone() if n % NESTED_BLOCKSIZE else codes, nested_absmax


def _dequantize_absmax(q: Quant4bit) -> torch.Tensor:
    n = q.absmax.numel()
    groups = q.nested_absmax.numel()
    values = torch.zeros(groups * q.nested_blocksize, dtype=torch.float32)
    values[:n] = q.nested_code[q.absmax.long()]
    values = (values.view(groups, -1) * q.nested_absmax[:, None]).view(-1)[:n]
    return values + q.offset


# --------------------------------------------------------------------------- dequantization


def dequantize_4bit(q: Quant4bit) -> torch.Tensor:
    """The weight back in `q.dtype` and `q.shape`, equal to bitsandbytes' CPU `dequantize_4bit`."""
    absmax = _dequantize_absmax(q) if q.nested else q.absmax.float()
    n = math.prod(q.shape)
    # bnb uses its C kernel when the last dimension is even, else a torch fallback; they differ
    # only in the sign of FP4's zero at index 8.
    c_kernel = len(q.shape) >= 1 and q.shape[-1] % 2 == 0
    code = _dequant_code4(q.quant_type, c_kernel)
    packed = q.packed.reshape(-1)
    out = torch.empty(n, dtype=q.dtype)
    step = max(1, CHUNK_ELEMENTS // q.blocksize) * q.blocksize  # even, whole blocks
    for start in range(0, n, step):
        stop = min(start + step, n)
        pairs = packed[start // 2: (stop + 1) // 2]
        nibbles = torch.stack([pairs >> 4, pairs & 0xF], dim=1).view(-1)[: stop - start]
        values = code[nibbles.long()]
        scale = absmax[start // q.blocksize: -(-stop // q.blocksize)].repeat_interleave(q.blocksize)
        product = values * scale[: stop - start]
        out[start:stop] = _bf16_like_c(product) if c_kernel and q.dtype == torch.bfloat16 else product.to(q.dtype)
    return out.view(q.shape)


def _bf16_like_c(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 the way bnb's C kernel rounds: add 0x7FFF + lsb to the bits, keep the top half.

    Same as torch's round-to-nearest-even for every number; differs only for NaN (torch makes a
    positive quiet NaN, the kernel keeps the sign), which bnb produces when a nested absmax overflows.
    """
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    return rounded.to(torch.int32).to(torch.int16).view(torch.bfloat16)
