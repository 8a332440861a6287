"""GGUF files (llama.cpp's format) as a weight source.

Planning needs a source's config and tensor headers only. A GGUF holds both in its header:
the metadata key/values (llama.cpp's names for the config and the tokenizer) and a table of
tensors (name, shape, storage type, offset). `read_config`, `tensor_specs` and
`save_tokenizer` parse that header with a small reader of their own, which skips the big
vocabulary arrays unless the tokenizer is wanted, so they cost milliseconds and read no
tensor data.

`iter_tensors` streams the weights one tensor at a time from a memory map (`gguf.GGUFReader`),
dequantized with `gguf.quants.dequantize` and renamed and post-processed exactly as
transformers does when it loads a GGUF (`from_pretrained(..., gguf_file=...)`, which goes
through `transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`):

* names: the parameters of the model the config describes (built on the meta device) looked
  up in gguf-py's table of llama.cpp names, as `get_gguf_hf_weights_map` does, giving
  {gguf name: transformers name} (`blk.3.attn_q.weight` ->
  `model.layers.3.self_attn.q_proj.weight`, `token_embd.weight` ->
  `model.embed_tokens.weight`, `output.weight` -> `lm_head.weight`, ...);
* values: the architecture's transformers `TensorProcessor` — for llama, llama.cpp stores
  the q/k projections with the rows of each head reordered for its rotary kernel, and
  `LlamaTensorProcessor` puts them back.

Only architectures whose tensors convert independently of each other, and that the tests
compare against transformers, are accepted; anything else gets a `GGUFError` saying so.
"""
from __future__ import annotations

import atexit
import functools
import mmap
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 (2023) used 32-bit counts; llama.cpp has not written it since
DEFAULT_ALIGNMENT = 32

# GGUF architecture -> transformers model_type, for the architectures loadspec converts.
# Each needs (a) a config that transformers' generic key renaming gets right, with no
# special case in `load_gguf_checkpoint`, and (b) a tensor processor that converts every
# tensor on its own (the MoE ones merge several GGUF tensors into one parameter).
SUPPORTED = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# transformers sets tie_word_embeddings when the file has no output.weight, and always for these
ALWAYS_TIED = ("falcon", "bloom")

TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")

# metadata value types: fixed-size scalars (struct format), and the two variable ones
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class GGUFError(UsageError, ValueError):
    """A GGUF file loadspec cannot use: not GGUF, truncated or corrupt, or an unsupported architecture."""


# ----------------------------------------------------------------------------- header


@dataclass(frozen=True)
class TensorEntry:
    """One row of a GGUF tensor table."""

    name: str
    shape: tuple[int, ...]  # torch order: slowest-varying dimension first (GGUF stores the reverse)
    ggml_type: int
    start: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    """Everything in a GGUF file except the tensor data."""

    path: Path
    version: int
    metadata: dict  # string arrays not asked for are left as their length
    tensors: tuple[TensorEntry, ...]

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def tensor_names(self) -> set[str]:
        return {t.name for t in self.tensors}


class _Cursor:
    """Bounds-checked little-endian reads from a buffer, with errors that name the file."""

    def __init__(self, buffer, path: Path):
        self.buffer = buffer
        self.size = len(buffer)
        self.path = path
        self.pos = 0
        self.where = "the file header"

    def _need(self, count: int) -> int:
        start = self.pos
        if count < 0 or start + count > self.size:
            raise GGUFError(f"{self.path} is truncated: it ends at byte {self.size} in the middle of {self.where} "
                            f"(an interrupted download or copy?). Fetch the file again.")
        self.pos = start + count
        return start

    def unpack(self, fmt: struct.Struct):
        return fmt.unpack_from(self.buffer, self._need(fmt.size))

    def u32(self) -> int:
        return self.unpack(_U32)[0]

    def u64(self) -> int:
        return self.unpack(_U64)[0]

    def string(self) -> str:
        length = self.u64()
        start = self._need(length)
        try:
            return bytes(self.buffer[start:start + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path} is corrupt: {self.where} holds a string that is not UTF-8.") from None

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            self._need(self.u64())

    def value(self, value_type: int, keep_strings: bool):
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_struct(_SCALAR_FORMATS[value_type]))[0]
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            element_type, count = self.unpack(_struct("<IQ"))
            if count > self.size:
                raise GGUFError(f"{self.path} is corrupt: {self.where} claims an array of {count} elements.")
            if element_type in _ARRAY_DTYPES:
                dtype = np.dtype(_ARRAY_DTYPES[element_type])
                start = self._need(count * dtype.itemsize)
                return np.frombuffer(self.buffer, dtype=dtype, count=count, offset=start).tolist()
            if element_type == _STRING and not keep_strings:
                self.skip_strings(count)
                return count
            return [self.value(element_type, keep_strings) for _ in range(count)]
        raise GGUFError(f"{self.path} is corrupt: {self.where} has unknown value type {value_type}.")


_STRUCTS: dict[str, struct.Struct] = {}


def _struct(fmt: str) -> struct.Struct:
    if fmt not in _STRUCTS:
        _STRUCTS[fmt] = struct.Struct(fmt)
    return _STRUCTS[fmt]


def is_gguf(path: Path) -> bool:
    """Whether `path` is a file starting with the GGUF magic bytes (the suffix is not looked at)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == MAGIC
    except OSError:
        return False


def read_header(path: Path, keep_strings: tuple[str, ...] = ()) -> Header:
    """Parse a GGUF file's metadata and tensor table; reads no tensor data.

    String arrays (the vocabulary, the merges) are returned as their length unless their key
    is in `keep_strings`. Raises `GGUFError` naming the file for anything that is not a
    complete, readable GGUF file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        handle = open(path, "rb")
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read the GGUF file ({exc.strerror or exc}).") from None
    with handle:
        head = handle.read(4)
        if head != MAGIC:
            what = f"it starts with {head!r}" if head else "it is empty"
            raise GGUFError(f"{path} is not a GGUF file: {what}, not the magic bytes b'GGUF'.")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _parse(mapped, path, size, keep_strings)


def _parse(buffer, path: Path, size: int, keep_strings: tuple[str, ...]) -> Header:
    cursor = _Cursor(buffer, path)
    cursor._need(4)  # the magic, checked by the caller
    version = cursor.u32()
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " It looks big-endian; loadspec reads little-endian GGUF only." if swapped in VERSIONS else ""
        raise GGUFError(f"{path} is GGUF version {version}; loadspec reads versions {VERSIONS[0]} and {VERSIONS[1]}.{hint}")
    tensor_count, kv_count = cursor.u64(), cursor.u64()
    if tensor_count > size // 24 or kv_count > size // 12:
        raise GGUFError(f"{path} is corrupt: its header claims {tensor_count} tensors and {kv_count} metadata keys "
                        f"in a file of {size} bytes.")
    metadata: dict = {}
    for index in range(kv_count):
        cursor.where = f"metadata entry {index + 1} of {kv_count}"
        key = cursor.string()
        cursor.where = f"the value of metadata key {key!r}"
        metadata[key] = cursor.value(cursor.u32(), keep_strings=key in keep_strings)
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str):
        raise GGUFError(f"{path} has no general.architecture in its metadata, so it does not say what model it holds.")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path} is corrupt: general.alignment is {alignment!r}, not a power of two.")

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    table = []
    for index in range(tensor_count):
        cursor.where = f"tensor table entry {index + 1} of {tensor_count}"
        name = cursor.string()
        cursor.where = f"the tensor table entry of {name!r}"
        ndims = cursor.u32()
        if ndims > 8:
            raise GGUFError(f"{path} is corrupt: tensor {name!r} claims {ndims} dimensions.")
        dims = cursor.unpack(_struct(f"<{ndims}Q"))
        ggml_type, offset = cursor.unpack(_struct("<IQ"))
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise GGUFError(f"{path}: tensor {name!r} is stored as ggml type {ggml_type}, which the installed gguf "
                            f"package does not know (a newer llama.cpp quantization?). Upgrade gguf (pip install -U gguf).") from None
        elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if dims and dims[0] % block:
            raise GGUFError(f"{path} is corrupt: tensor {name!r} has rows of {dims[0]} values, not a multiple of the "
                            f"{GGMLQuantizationType(ggml_type).name} block of {block}.")
        table.append((name, tuple(int(d) for d in reversed(dims)), ggml_type, offset, elements // block * block_bytes))
    data_start = -(-cursor.pos // alignment) * alignment

    tensors = tuple(TensorEntry(name, shape, ggml_type, data_start + offset, nbytes)
                    for name, shape, ggml_type, offset, nbytes in table)
    needed = max((t.start + t.nbytes for t in tensors), default=0)
    if needed > size:
        first = min((t for t in tensors if t.start + t.nbytes > size), key=lambda t: t.start)
        raise GGUFError(f"{path} is truncated: it is {size} bytes long but its tensor table needs {needed} "
                        f"(tensor {first.name!r} is the first that does not fit; an interrupted download or copy?). "
                        f"Fetch the file again.")
    return Header(path, version, metadata, tensors)


# ----------------------------------------------------------------------------- config


def _check_supported(header: Header) -> str:
    """The transformers model_type for this file's architecture, or a GGUFError."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = header.architecture
    if architecture in SUPPORTED:
        return SUPPORTED[architecture]
    convert = ("convert it to safetensors with transformers: AutoModelForCausalLM.from_pretrained(folder, "
               "gguf_file=name, dtype=torch.bfloat16).save_pretrained(out_dir) plus AutoTokenizer likewise, and point "
               "the spec's source at out_dir")
    if architecture in GGUF_SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"GGUF architecture {architecture!r} ({header.path}) is not supported by loadspec yet "
                        f"(supported: {', '.join(sorted(SUPPORTED))}); {convert}.")
    raise GGUFError(f"GGUF architecture {architecture!r} ({header.path}) is not supported by loadspec yet, nor by the "
                    f"installed transformers; convert the original model to safetensors instead.")


def _raw_config(header: Header) -> dict:
    """The config dict `load_gguf_checkpoint` derives: llama.cpp keys renamed to transformers ones."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    model_type = _check_supported(header)
    architecture = header.architecture
    renames = {architecture: GGUF_CONFIG_MAPPING[model_type], "tokenizer": GGUF_CONFIG_MAPPING["tokenizer"]}
    config: dict = {"model_type": model_type}
    for key, value in header.metadata.items():
        section, _, rest = key.partition(".")
        target = renames.get(section, {}).get(rest)
        if target is not None and target != -1:
            config[target] = value
    names = header.tensor_names()
    config["tie_word_embeddings"] = "output.weight" not in names or architecture in ALWAYS_TIED
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}).items():
        config.setdefault(key, value)
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    if "vocab_size" not in config and tokens is not None:  # the vocabulary, or its length if it was skipped
        config["vocab_size"] = tokens if isinstance(tokens, int) else len(tokens)
    dropped = sorted(k for k in header.metadata if k.startswith(f"{architecture}.rope.scaling."))
    if dropped or "rope_freqs.weight" in names:
        warnings.warn(f"{header.path} declares RoPE scaling ({', '.join(dropped) or 'rope_freqs.weight'}) that transformers' "
                      "GGUF loader ignores; loadspec follows transformers, so long-context quality may suffer. "
                      "Converting the original safetensors model keeps the scaling.", stacklevel=3)
    return config


def _hf_config(raw: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(**raw)


def read_config(path: Path) -> dict:
    """The Hugging Face config.json dict for a GGUF file, from its metadata alone."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    raw = _raw_config(read_header(path))
    config = {k: v for k, v in _hf_config(raw).to_dict().items() if not k.startswith("_")}
    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[raw["model_type"]]]
    # gguf.quants.dequantize returns float32 for every storage type, and so does transformers
    config["dtype"] = config["torch_dtype"] = "float32"
    return config


# ----------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class _Layout:
    raw_config: dict
    names: dict[str, str]  # gguf name -> transformers name
    shapes: dict[str, tuple[int, ...]]  # transformers name -> shape, every tensor the model loads, model order
    processor: object  # transformers' TensorProcessor for the architecture


def _layout(header: Header) -> _Layout:
    """Map the file's tensors onto the transformers model its config describes (built on the meta device)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    raw = _raw_config(header)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_hf_config(raw))
    processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=raw)
    state = model.state_dict()
    names = _gguf_names(header.architecture, raw["num_hidden_layers"], state, processor)
    first_name: dict[int, str] = {}
    aliases = set()  # tied duplicates (lm_head.weight when tie_word_embeddings): loaded via their twin
    for name, param in model.named_parameters(remove_duplicate=False):
        if first_name.setdefault(id(param), name) != name:
            aliases.add(name)
    shapes = {name: tuple(t.shape) for name, t in state.items() if name not in aliases}
    return _Layout(raw, names, shapes, processor)


def _gguf_names(architecture: str, num_layers: int, state: dict, processor) -> dict[str, str]:
    """{gguf name: transformers name} for a model's state dict.

    The same lookup `transformers.modeling_gguf_pytorch_utils.get_gguf_hf_weights_map` does
    at the top level of the model: gguf-py's own table of llama.cpp names
    (`gguf.get_tensor_name_map`) queried with each parameter's module path. That function
    then repeats the lookup for every submodule, which adds nothing for the architectures
    in SUPPORTED and takes seconds (it rebuilds the table per module), so it is not called;
    tests/test_gguf.py compares the loaded tensors with transformers' own GGUF loading.
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == architecture), None)
    if arch is None:
        raise GGUFError(f"the installed gguf package does not know architecture {architecture!r}; upgrade it (pip install -U gguf).")
    table = get_tensor_name_map(arch, num_layers)
    names = {}
    for hf_name in state:
        hf_name = processor.preprocess_name(hf_name)
        module, suffix = hf_name, ""
        if hf_name.endswith((".weight", ".bias")):
            module, _, leaf = hf_name.rpartition(".")
            suffix = "." + leaf
        gguf_name = table.get_name(module)
        if gguf_name is not None:
            names[gguf_name + suffix] = hf_name
    return names


def _selected(header: Header, layout: _Layout) -> list[tuple[TensorEntry, str]]:
    """(GGUF tensor, transformers name) for every tensor the model loads; errors if any is missing or misshapen."""
    chosen = []
    for entry in header.tensors:
        name = layout.names.get(entry.name)
        if name is None or name not in layout.shapes:
            continue  # not a parameter (rope_freqs.weight) or a tied alias: transformers skips these too
        if entry.shape != layout.shapes[name]:
            raise GGUFError(f"{header.path}: tensor {entry.name!r} has shape {list(entry.shape)}, but {name} in the model "
                            f"its metadata describes has shape {list(layout.shapes[name])} (inconsistent GGUF).")
        chosen.append((entry, name))
    missing = sorted(set(layout.shapes) - {name for _, name in chosen})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise GGUFError(f"{header.path} has no tensors for {shown}, which the model its metadata describes needs.")
    return chosen


def tensor_specs(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Transformers parameter name -> (shape, dtype after dequantization), from the header alone.

    A tied lm_head is left out, as in safetensors checkpoints of tied models.
    """
    header = read_header(path)
    layout = _layout(header)
    found = {name for _, name in _selected(header, layout)}
    return {name: (shape, torch.float32) for name, shape in layout.shapes.items() if name in found}


def iter_tensors(path: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, tensor) one at a time, dequantized and cast to `dtype`, in file order.

    Values equal what `AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)` loads.
    Only the tensor being yielded is in memory; the file is memory-mapped.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    header = read_header(path)
    layout = _layout(header)
    wanted = {entry.name: name for entry, name in _selected(header, layout)}
    try:
        reader = GGUFReader(path)
    except (ValueError, KeyError, IndexError) as exc:
        raise GGUFError(f"{path}: gguf could not read the file ({exc}).") from None
    for tensor in reader.tensors:
        name = wanted.pop(tensor.name, None)
        if name is None:
            continue
        values = dequantize(tensor.data, tensor.tensor_type)
        result = layout.processor.process(weights=values, name=tensor.name, tensor_key_mapping=layout.names,
                                          parsed_parameters={"tensors": {}})
        if result.name != tensor.name:
            raise GGUFError(f"{path}: transformers' converter for {header.architecture!r} renamed {tensor.name!r} to "
                            f"{result.name!r}; loadspec does not handle that yet.")
        values = result.weights
        if not (values.flags.writeable and values.flags.c_contiguous):
            values = np.array(values)  # a read-only view of the map, or a permuted view: make it a plain array
        out = torch.from_numpy(values).to(dtype)
        if tuple(out.shape) != layout.shapes[name]:
            raise GGUFError(f"{path}: tensor {tensor.name!r} came out of dequantization as {list(out.shape)}, "
                            f"expected {list(layout.shapes[name])} for {name}.")
        yield name, out
        del values, out
    if wanted:
        raise GGUFError(f"{path}: gguf's reader did not find tensors {sorted(wanted)[:5]} that the header lists.")


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_folder(path: Path) -> Path:
    """A folder with the file's tokenizer converted by `save_tokenizer`, for AutoTokenizer: converted once per
    process and version of the file (planning, vocabulary checks and the build all read it; each conversion
    took 1.4 s for SmolLM2 on the 2-core machine). Removed when the process exits; callers only read it."""
    stat = path.stat()
    return _converted_tokenizer(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _converted_tokenizer(path: str, size: int, mtime_ns: int) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="loadspec-gguf-tok-"))
    atexit.register(shutil.rmtree, folder, True)
    save_tokenizer(Path(path), folder)
    return folder


def save_tokenizer(path: Path, out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json (special tokens, chat template) converted from the metadata.

    The vocabulary, merges and pre-tokenizer come from transformers' GGUF converter
    (`convert_gguf_tokenizer`). The special tokens are the ones the file declares by id:
    transformers' llama converter takes both bos and eos from `bos_token_id` and sets no
    pad token, which loadspec does not copy.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.ggml import GGUF_TO_FAST_CONVERTERS, GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    header = read_header(path, keep_strings=TOKENIZER_ARRAYS)
    model_type = _check_supported(header)
    meta = header.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFError(f"{path} has no tokenizer.ggml.tokens, so no tokenizer can be built from it.")
    if model_type not in GGUF_TO_FAST_CONVERTERS:
        raise GGUFError(f"{path}: transformers has no GGUF tokenizer converter for {model_type!r}.")
    renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
    description = {renames[key[len("tokenizer."):]]: value for key, value in meta.items()
                   if key.startswith("tokenizer.") and key[len("tokenizer."):] in renames}
    backend, converter_kwargs = convert_gguf_tokenizer(model_type, description)

    def token(key: str):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens):
            raise GGUFError(f"{path}: tokenizer.ggml.{key} is {token_id}, outside the vocabulary of {len(tokens)}.")
        return tokens[token_id]

    kwargs = {k: v for k, v in converter_kwargs.items() if k not in ("bos_token", "eos_token", "unk_token")}
    # transformers skips this clean-up for BPE vocabularies anyway (with a warning); off, decoding is exact
    kwargs["clean_up_tokenization_spaces"] = False
    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    kwargs.update({k: v for k, v in special.items() if v is not None})
    for flag in ("add_bos_token", "add_eos_token"):  # llama.cpp's say on whether encoding adds them
        if isinstance(meta.get(f"tokenizer.ggml.{flag}"), bool):
            kwargs[flag] = meta[f"tokenizer.ggml.{flag}"]
    if isinstance(meta.get("tokenizer.chat_template"), str):
        kwargs["chat_template"] = meta["tokenizer.chat_template"]
    context = meta.get(f"{header.architecture}.context_length")
    if isinstance(context, int) and context > 0:
        kwargs["model_max_length"] = context
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
