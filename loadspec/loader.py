"""Read a built artifact into `(model, tokenizer)` without re-quantizing.

The model skeleton is built on the meta device (no random init, no double allocation),
Linear layers the plan quantized become bitsandbytes `Linear4bit` / `Linear8bitLt` (fp8:
`loadspec.fp8.Fp8Linear`), and each stored tensor
is assigned in place: 4-bit weights become `Params4bit` with their `QuantState` rebuilt
from the stored statistics. Only reads; a damaged artifact is refused, never repaired.
"""
from __future__ import annotations

import contextlib
import json
import sys
import threading
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import arch
from .deferred_imports import import_model_libraries
from .errors import LoadspecError
from .plan import LoadPlan, block_of
from .trace import phase


RECOVER = "Rebuild it with 'loadspec build SPEC --force' or fetch it again with 'loadspec pull NAME'."
MIN_BITSANDBYTES = (0, 41)  # the first bitsandbytes that stores a 4-bit QuantState beside its weight (our format)


def check_files(folder: Path, manifest: dict) -> None:
    """Cheap integrity check for every load: the manifest lists every file (and only plain names), and each
    listed file exists with its recorded size."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise LoadspecError(f"artifact {folder.name} is damaged: manifest.json lists no files. {RECOVER}")
    for name, entry in files.items():
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise LoadspecError(f"artifact {folder.name} is damaged: manifest.json lists {name!r}, which is not a plain "
                                f"file name inside the artifact. {RECOVER}")
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
            raise LoadspecError(f"artifact {folder.name} is damaged: manifest.json entry {name!r} has no size and sha256. {RECOVER}")
        path = folder / name
        if not path.is_file():
            raise LoadspecError(f"artifact {folder.name} is damaged: {name} is missing. {RECOVER}")
        if path.stat().st_size != entry["size"]:
            raise LoadspecError(f"artifact {folder.name} is damaged: {name} has {path.stat().st_size} bytes, the manifest says "
                                f"{entry['size']}. {RECOVER}")
    unlisted = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != "manifest.json" and p.name not in files)
    if unlisted:  # the loader reads every *.safetensors it finds: an unlisted one would go unchecked
        raise LoadspecError(f"artifact {folder.name} is damaged: {', '.join(unlisted)} not listed in manifest.json. {RECOVER}")


def check_compatible(folder: Path, manifest: dict, *, runtime: bool = True) -> None:
    """Refuse an artifact this loadspec / bitsandbytes cannot read (another format version, a bitsandbytes
    without the 4-bit serialization); says whether to upgrade or to rebuild with --force. `runtime`: also
    check the installed bitsandbytes (a build reusing an artifact does not need it)."""
    from importlib import metadata

    from . import plan as plans

    ours = plans.FORMAT_VERSION
    theirs = manifest.get("format_version")
    try:
        planned = json.loads((folder / "plan.json").read_text())
    except (OSError, ValueError):
        planned = {}
    if not isinstance(theirs, int) or isinstance(theirs, bool) or theirs != (planned.get("format_version") if isinstance(planned, dict) else None):
        raise IncompatibleArtifact(f"artifact {folder.name}: manifest.json and plan.json disagree on the artifact format "
                                   f"({theirs!r} vs {planned.get('format_version') if isinstance(planned, dict) else None!r}); "
                                   f"it is damaged or not a loadspec artifact. {RECOVER}")
    built_with = manifest.get("versions") if isinstance(manifest.get("versions"), dict) else {}
    loadspec_version = built_with.get("loadspec", "unknown")
    if theirs > ours:
        raise IncompatibleArtifact(f"artifact {folder.name} uses artifact format {theirs} (written by loadspec {loadspec_version}); "
                                   f"this loadspec reads format {ours}. Upgrade loadspec (pip install -U loadspec), or rebuild "
                                   "it with this version: 'loadspec build SPEC --force'.")
    if theirs < ours:
        raise IncompatibleArtifact(f"artifact {folder.name} uses the older artifact format {theirs} (written by loadspec "
                                   f"{loadspec_version}); this loadspec reads format {ours}. Rebuild it: 'loadspec build SPEC --force' "
                                   "(or pull a copy built by this version).")
    quant = planned.get("quant") or {}
    if quant.get("method", "none") in ("nf4", "fp4"):
        recorded = built_with.get("bitsandbytes", "")
        if _version(recorded) and _version(recorded) < MIN_BITSANDBYTES:
            raise IncompatibleArtifact(f"artifact {folder.name}: its manifest says it was built with bitsandbytes {recorded}, which "
                                       f"predates the 4-bit format it claims (bitsandbytes >= {'.'.join(map(str, MIN_BITSANDBYTES))}); "
                                       f"it cannot be trusted. {RECOVER}")
        if not runtime:
            return
        try:
            installed = metadata.version("bitsandbytes")
        except metadata.PackageNotFoundError:
            installed = ""
        if not _version(installed) or _version(installed) < MIN_BITSANDBYTES:
            have = f"bitsandbytes {installed} is installed" if installed else "bitsandbytes is not installed"
            raise IncompatibleArtifact(f"artifact {folder.name} stores 4-bit ({quant['method']}) weights, but {have}; reading them "
                                       f"needs bitsandbytes >= {'.'.join(map(str, MIN_BITSANDBYTES))}: pip install -U bitsandbytes.")


class IncompatibleArtifact(LoadspecError):
    """An artifact this installation cannot read (format or library versions)."""


def _version(text) -> tuple[int, ...]:
    """(0, 41) for "0.41.3"; () when unparseable ("not installed")."""
    import re

    match = re.match(r"(\d+)\.(\d+)", str(text))
    return (int(match[1]), int(match[2])) if match else ()


def load_artifact(folder: Path, plan: LoadPlan, *, device_map: dict | None = None):
    """`(model, tokenizer)` from an artifact folder, placed by `device_map` (default: the plan's)."""
    from concurrent.futures import Future, ThreadPoolExecutor

    device_map = device_map or plan.device_map
    # While transformers and bitsandbytes are imported, the skeleton is built and the tokenizer read (seconds in a
    # fresh process), the reading thread gets ready: headers, the GPU arena, pinned buffers, CUDA's start. It reads
    # once they are done. Beside it, Python work is slowed and slows it: its 12 threads each need Python's lock
    # briefly per chunk, and a thread holding it stalls them all (an 8B skeleton took 0.03 s alone on the H100
    # machine, 0.25-0.3 s beside the readers; a 49k-token tokenizer, which holds the lock for 0.1 s at a time while
    # `tokenizers` parses it, took an 8B read from 0.11-0.25 s to 0.47-0.88 s).
    python_done: Future = Future()  # True: read now; False: the skeleton or the tokenizer failed, read nothing
    devices, dtype = {torch.device(d) for d in device_map.values()}, getattr(torch, plan.dtype)
    config = json.loads((folder / "config.json").read_text())
    with ThreadPoolExecutor(max_workers=1) as pool:
        stored = pool.submit(_read, folder, plan, device_map, python_done)
        # cuBLAS starts beside the imports when there are any (seconds in a fresh process); otherwise beside the read:
        # beside the skeleton, it slowed the skeleton down (a first in-process load's skeleton took 0.14 s, not 0.06)
        beside_imports = "transformers.modeling_utils" not in sys.modules
        if beside_imports:  # and then the decoder's kernels, which load with Python's lock released
            _warm_gpu_libraries(devices, dtype, _head_dim(config))
        try:
            # transformers' lazy module is not safe to import from two threads at once in a fresh process (an
            # intermittent "cannot import name AutoModelForCausalLM"): the model classes and AutoTokenizer are
            # imported here, first
            with phase("imports"):
                import_model_libraries(bitsandbytes=plan.quant["method"] in ("nf4", "fp4", "int8") and bool(plan.quantized))
            with phase("skeleton"):
                model = _skeleton(folder, plan, config)
            with phase("tokenizer"):
                tokenizer = _tokenizer(folder, plan)
        except BaseException:
            python_done.set_result(False)
            raise
        python_done.set_result(True)
        if not beside_imports:
            _warm_gpu_libraries(devices, dtype)
        with phase("weights"):
            weights = stored.result()
        with phase("assign"):
            _assign(model, weights, folder, plan)
    _place_buffers(model, device_map)
    if "cpu" in device_map.values() and len(set(device_map.values())) > 1:
        _run_on_cpu(model, device_map)  # offload_embedding: the plan keeps one GPU beside it
    elif len(set(device_map.values())) > 1:
        from accelerate import dispatch_model

        dispatch_model(model, device_map=device_map)
    model.eval()
    return model, tokenizer


def _warm_gpu_libraries(devices: set[torch.device], dtype: torch.dtype, head_dim: int | None = None) -> None:
    """Start, on each GPU and on a thread of its own, what a first forward would: cuBLAS (library, handle,
    workspace; 0.1-0.2 s of a fresh process's first forward on the H100 machine) and, with `head_dim`, the
    kernels of a decoder layer (CUDA loads each kernel's code at its first launch). Meant to run while the main
    thread imports (seconds in a fresh process: the kernels load with Python's lock released) or the weights
    are read. The load does not wait for it: it is the first forward's work done early (the cuBLAS start
    alone took 0.13-0.15 s in a process's first in-process load, as long as the read), and that forward waits for
    whatever is left. Not a daemon: the interpreter lets it finish before it exits."""
    def start() -> None:
        try:
            for device in devices:
                if device.type == "cuda":
                    square = torch.ones(64, 64, dtype=dtype, device=device)
                    square @ square
                    if head_dim:
                        _decoder_kernels(device, dtype, head_dim)
                    torch.cuda.synchronize(device)
        except Exception:  # nothing lost: the first forward starts them itself and reports what goes wrong
            pass

    if any(device.type == "cuda" for device in devices):
        threading.Thread(target=start, name="loadspec-gpu-warm-up").start()


def _head_dim(config: dict) -> int | None:
    """The attention head size a config.json gives (None when it names none we know)."""
    try:
        return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def _decoder_kernels(device: torch.device, dtype: torch.dtype, head_dim: int) -> None:
    """Launch, on tiny inputs, the kernels a decoder layer's forward does: RMSNorm in float32, the rotary
    embedding, causal attention for this head size, SiLU gating, the cast of the logits to float32."""
    import torch.nn.functional as F

    hidden = torch.ones(1, 4, 2 * head_dim, dtype=dtype, device=device)
    variance = hidden.float().pow(2).mean(-1, keepdim=True)
    hidden = (hidden.float() * torch.rsqrt(variance + 1e-6)).to(dtype) * hidden
    query = hidden.view(1, 4, 2, head_dim).transpose(1, 2)
    half = head_dim // 2
    rotated = torch.cat((-query[..., half:], query[..., :half]), dim=-1)
    query = query * torch.ones_like(query) + rotated * torch.zeros_like(query)
    attended = F.scaled_dot_product_attention(query, query, query, is_causal=True)
    gated = F.silu(attended) * attended
    gated.float()


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no init);
    buffers stay real, so computed ones such as RoPE frequencies are correct."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        with _EmptyOnMeta():
            yield
    finally:
        nn.Module.register_parameter = register


class _EmptyOnMeta(TorchFunctionMode):
    """In this thread only, `torch.empty` with no device makes a meta tensor. nn.Linear and nn.Embedding make their
    weights with it, so they are never allocated: an 8B skeleton otherwise maps and unmaps 226 buffers of up to
    117 MB, and an unmap in a process whose reading threads are running costs every core they ran on."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _skeleton(folder: Path, plan: LoadPlan, config_json: dict) -> nn.Module:
    """The model `config_json` (the artifact's config.json) describes, its parameters on the meta device."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config_dict = {key: value for key, value in config_json.items() if key != "quantization_config"}
    quant_config = config_json.get("quantization_config")
    try:
        config = arch.hf_config(config_dict)
    except (KeyError, ValueError) as exc:  # a model_type this transformers does not know
        import transformers

        raise IncompatibleArtifact(f"artifact {folder.name}: transformers {transformers.__version__} cannot build its model "
                                   f"(model_type {config_dict.get('model_type')!r}: {exc}); it was built with transformers "
                                   f"{plan.versions.get('transformers', 'unknown')}. Upgrade transformers.") from None
    dtype = getattr(torch, plan.dtype)
    with arch.skip_weight_init(), _parameters_on_meta():  # the quantized layers too: no init, nothing allocated
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if plan.quant["method"] == "fp8":
            from .fp8 import Fp8Linear

            _replace_linears(model, plan.quantized, lambda old: Fp8Linear(old.in_features, old.out_features, old.bias is not None,
                                                                          scaling=plan.quant["scaling"], dtype=dtype))
        elif plan.quantized:
            _swap_bitsandbytes_linears(model, plan, quant_config)
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def _replace_linears(model: nn.Module, names, make) -> None:
    """Put `make(old)` in place of each named Linear module of the skeleton."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(getattr(parent, child)))


def _swap_bitsandbytes_linears(model: nn.Module, plan: LoadPlan, quant_config: dict | None) -> None:
    """Replace the plan's quantized Linear layers with empty bitsandbytes 4-bit / 8-bit ones."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    int8 = plan.quant["method"] == "int8"
    compute = getattr(torch, plan.quant.get("compute_dtype", plan.dtype))  # a pre-quantized source's own

    def build(in_features: int, out_features: int, bias: bool) -> nn.Module:
        if int8:
            return bnb.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False,
                                       threshold=plan.quant["threshold"], device="meta")
        return bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute,
                                 compress_statistics=plan.quant["double_quant"], quant_type=plan.quant["method"],
                                 quant_storage=torch.uint8, device="meta")
    prototypes: dict[tuple, nn.Module] = {}  # one layer built by bitsandbytes per shape; the others are copies of it

    def make(old: nn.Linear) -> nn.Module:
        shape = (old.in_features, old.out_features, old.bias is not None)
        if shape not in prototypes:
            prototypes[shape] = build(*shape)
        return _empty_copy(prototypes[shape])
    _replace_linears(model, plan.quantized, make)
    model.config.quantization_config = BitsAndBytesConfig.from_dict(quant_config)
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = not int8, int8
    model.quantization_method = "bitsandbytes"


def _empty_copy(prototype: nn.Module) -> nn.Module:
    """A module of `prototype`'s class and settings made without running its constructor: its attributes, with
    containers copied, and a fresh empty meta parameter for each of its parameters (the stored tensors replace
    them in `_assign`). An 8B skeleton needs 224 bitsandbytes layers: 160 us each to construct, 30 us to copy."""
    if prototype._modules or prototype._buffers:
        raise ValueError(f"{type(prototype).__name__} has submodules or buffers; build it instead")
    module = object.__new__(type(prototype))
    for key, value in prototype.__dict__.items():
        module.__dict__[key] = value.copy() if isinstance(value, (dict, set, list)) else value
    with torch._C.DisableTorchFunctionSubclass():  # bitsandbytes' parameters run Python for every attribute read
        for name, param in prototype._parameters.items():
            if param is not None:
                empty = torch.empty(param.shape, dtype=param.dtype, device="meta")
                module._parameters[name] = nn.Parameter(empty, requires_grad=param.requires_grad)
    return module


def _device_for(name: str, device_map: dict) -> torch.device:
    if "" in device_map:
        return torch.device(device_map[""])
    block = block_of(name)
    while block not in device_map and "." in block:
        block = block.rpartition(".")[0]
    return torch.device(device_map.get(block, next(iter(device_map.values()))))


def _tokenizer(folder: Path, plan: LoadPlan):
    from .tokenizer_open import open_saved_tokenizer

    # the source's own Python code runs only when the spec allowed it (recorded in the plan)
    return open_saved_tokenizer(folder, trust_remote_code=bool(plan.source.get("trust_remote_code", False)))


def _read(folder: Path, plan: LoadPlan, device_map: dict, go=None) -> dict[str, torch.Tensor]:
    """Every stored tensor, on the device the map gives its parameter (see `read_tensors` for `go`)."""
    from .reader import read_tensors

    quantized = set(plan.quantized)

    def place(key: str) -> torch.device:
        if ".quant_state." in key:
            return torch.device("cpu")  # a few hundred bytes of JSON, parsed on the host
        return _device_for(_quantized_owner(key, quantized) or key, device_map)

    try:
        return read_tensors(sorted(folder.glob("*.safetensors")), place, go=go)
    except LoadspecError as exc:  # a header pointing outside its file, a file that ends early: never half-read weights
        raise LoadspecError(f"artifact {folder.name} is damaged: {exc}. {RECOVER}") from None


def _assign(model: nn.Module, stored: dict[str, torch.Tensor], folder: Path, plan: LoadPlan) -> None:
    """Put each stored tensor in its parameter's place; 4-bit weights become Params4bit. Parameters are set in
    their modules' dicts, one walk over the modules (an 8B model has ~300: the per-parameter lookups and
    attribute hooks were a third of this step)."""
    quantized, method = set(plan.quantized), plan.quant["method"]
    unfilled, four_bit = [], []  # (module, attribute, name) of parameters not stored (tied ones), of 4-bit weights
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for attr, param in list(module._parameters.items()):
            name = prefix + attr
            if param is None or not param.is_meta:
                continue
            if name not in stored:
                unfilled.append((module, attr, name))  # tied to another parameter: re-tied below
            elif module_name in quantized and attr != "bias" and method == "fp8":
                module._parameters[attr] = nn.Parameter(stored[name], requires_grad=False)  # fp8 codes and their scales
            elif module_name in quantized and attr == "weight" and method == "int8":
                module._parameters[attr] = _int8_params(name, stored)
            elif module_name in quantized and attr == "weight":
                four_bit.append((module, attr, name))
            else:
                tensor = stored[name]
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    for (module, attr, _), params in zip(four_bit, _params4bit([(module, name) for module, _, name in four_bit], stored, method)):
        module.quant_state = params.quant_state
        module._parameters[attr] = params
    model.tie_weights()
    still_empty = [name for module, attr, name in unfilled if module._parameters[attr].is_meta]
    if still_empty:
        raise LoadspecError(f"artifact {folder.name} lacks {len(still_empty)} tensor(s), e.g. {still_empty[:3]}. "
                            "Rebuild it with 'loadspec build SPEC --force'.")


def _params4bit(weights: list[tuple[nn.Module, str]], stored: dict, method: str) -> list:
    """A bitsandbytes Params4bit with its QuantState for each (module, weight name), built from the stored tensors (no
    re-quantization). The double-quantization offsets of all of them reach each GPU in one copy, not one each."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    metas, nested = [], []
    offsets: dict[torch.device, list] = {}
    for _, name in weights:
        try:
            metas.append(json.loads(bytes(stored[f"{name}.quant_state.bitsandbytes__{method}"].numpy())))
            nested.append(f"{name}.nested_absmax" in stored)
            if nested[-1]:
                offsets.setdefault(stored[name].device, []).append(float(metas[-1]["nested_offset"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise _incomplete_state(name, exc) from None
    on_device = {device: iter(torch.tensor(values, device=device)) for device, values in offsets.items()}
    result = []
    for (module, name), meta, has_nested in zip(weights, metas, nested):
        packed = stored[name]
        try:
            inner, offset = None, None
            if has_nested:
                inner = QuantState(absmax=stored[f"{name}.nested_absmax"], code=stored[f"{name}.nested_quant_map"],
                                   blocksize=meta["nested_blocksize"], dtype=getattr(torch, meta["nested_dtype"]))
                offset = next(on_device[packed.device])
            state = QuantState(absmax=stored[f"{name}.absmax"], shape=torch.Size(meta["shape"]), code=stored[f"{name}.quant_map"],
                               blocksize=meta["blocksize"], quant_type=meta["quant_type"], dtype=getattr(torch, meta["dtype"]),
                               offset=offset, state2=inner)
        except (KeyError, ValueError, TypeError) as exc:
            raise _incomplete_state(name, exc) from None
        if state.shape.numel() > 2 * packed.numel():
            raise LoadspecError(f"4-bit weight {name}: {packed.numel()} packed bytes cannot hold shape {tuple(state.shape)}.")
        result.append(bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=state.blocksize,
                                        compress_statistics=inner is not None, quant_type=state.quant_type,
                                        quant_storage=packed.dtype, module=module, bnb_quantized=True))
    return result


def _incomplete_state(name: str, exc: Exception) -> LoadspecError:
    return LoadspecError(f"4-bit weight {name}: its quantization state is incomplete or unreadable ({exc!r}). "
                         "Rebuild the artifact with 'loadspec build SPEC --force'.")


def _int8_params(name: str, stored: dict):
    """A bitsandbytes Int8Params from the stored int8 rows and their float32 scales (no re-quantization)."""
    import bitsandbytes as bnb

    rows, scales = stored[name], stored.get(f"{name[: -len('.weight')]}.SCB")
    if scales is None or rows.dtype != torch.int8 or scales.shape != rows.shape[:1]:
        raise LoadspecError(f"int8 weight {name}: its SCB row scales are missing or do not match its {tuple(rows.shape)} rows. "
                            "Rebuild the artifact with 'loadspec build SPEC --force'.")
    return bnb.nn.Int8Params(rows, requires_grad=False, has_fp16_weights=False, CB=rows, SCB=scales)


def _quantized_owner(key: str, quantized: set[str]) -> str | None:
    """The 4-bit weight a stored key belongs to ('x.weight' for 'x.weight.absmax'), if any."""
    head, sep, _ = key.partition(".weight")
    if sep and head in quantized:
        return head + ".weight"
    return None


def _run_on_cpu(model: nn.Module, device_map: dict) -> None:
    """Blocks mapped to "cpu" next to one GPU (offload_embedding) compute on the CPU: their inputs move
    there and their outputs move to the GPU. No accelerate hooks: those would stream the weights to the GPU.
    Each such block is moved last among its siblings, so the model's first parameter, hence `model.device`
    (where callers put their inputs), is the GPU's."""
    gpus = sorted({d for d in device_map.values() if d != "cpu"})
    if len(gpus) != 1:
        raise LoadspecError(f"a device map with CPU blocks needs exactly one GPU beside them, got {gpus}.")
    gpu = torch.device(gpus[0])
    for block, device in device_map.items():
        if device == "cpu" and block:
            parent_name, _, child = block.rpartition(".")
            parent = model.get_submodule(parent_name)
            module = parent._modules.pop(child)
            parent._modules[child] = module
            module.register_forward_pre_hook(lambda _m, args: tuple(a.to("cpu") if torch.is_tensor(a) else a for a in args))
            module.register_forward_hook(lambda _m, _args, out: out.to(gpu, non_blocking=True))


def _place_buffers(model: nn.Module, device_map: dict) -> None:
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(_device_for(f"{module_name}.{name}", device_map))
