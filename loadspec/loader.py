"""Read a built artifact into `(model, tokenizer)` without re-quantizing.

The model skeleton is built on the meta device (no random init, no double allocation),
Linear layers the plan quantized become bitsandbytes `Linear4bit`, and each stored tensor
is assigned in place: 4-bit weights become `Params4bit` with their `QuantState` rebuilt
from the stored statistics. Only reads; a damaged artifact is refused, never repaired.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from . import arch
from .errors import LoadspecError
from .plan import LoadPlan, block_of


def check_files(folder: Path, manifest: dict) -> None:
    """Cheap integrity check for every load: each listed file exists with its recorded size."""
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise LoadspecError(f"artifact {folder.name} is damaged: {name} is missing. "
                                "Rebuild it with 'loadspec build SPEC --force' or fetch it again with 'loadspec pull'.")
        if path.stat().st_size != entry["size"]:
            raise LoadspecError(f"artifact {folder.name} is damaged: {name} has {path.stat().st_size} bytes, the manifest says "
                                f"{entry['size']}. Rebuild it with 'loadspec build SPEC --force' or fetch it again with 'loadspec pull'.")


def load_artifact(folder: Path, plan: LoadPlan, *, device_map: dict | None = None):
    """`(model, tokenizer)` from an artifact folder, placed by `device_map` (default: the plan's)."""
    from concurrent.futures import ThreadPoolExecutor

    device_map = device_map or plan.device_map
    # Reading the weights needs neither transformers nor bitsandbytes: it runs while they are
    # imported and the skeleton is built (seconds in a fresh process), and the tokenizer parses.
    with ThreadPoolExecutor(max_workers=2) as pool:
        stored = pool.submit(_read, folder, plan, device_map)
        tokenizer = pool.submit(_tokenizer, folder)
        model = _skeleton(folder, plan)
        _assign(model, stored.result(), folder, plan)
        tokenizer = tokenizer.result()
    _place_buffers(model, device_map)
    if len(set(device_map.values())) > 1:
        from accelerate import dispatch_model

        dispatch_model(model, device_map=device_map)
    model.eval()
    return model, tokenizer


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
        yield
    finally:
        nn.Module.register_parameter = register


def _skeleton(folder: Path, plan: LoadPlan) -> nn.Module:
    from transformers import AutoModelForCausalLM, GenerationConfig

    config_dict = json.loads((folder / "config.json").read_text())
    quant_config = config_dict.pop("quantization_config", None)
    config = arch.hf_config(config_dict)
    dtype = getattr(torch, plan.dtype)
    with arch.skip_weight_init(), _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if plan.quantized:
        import bitsandbytes as bnb
        from transformers import BitsAndBytesConfig

        for name in plan.quantized:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
            setattr(parent, child, bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                                     compute_dtype=dtype, compress_statistics=plan.quant["double_quant"],
                                                     quant_type=plan.quant["method"], quant_storage=torch.uint8, device="meta"))
        model.config.quantization_config = BitsAndBytesConfig.from_dict(quant_config)
        model.is_loaded_in_4bit = True
        model.quantization_method = "bitsandbytes"
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def _device_for(name: str, device_map: dict) -> torch.device:
    if "" in device_map:
        return torch.device(device_map[""])
    block = block_of(name)
    while block not in device_map and "." in block:
        block = block.rpartition(".")[0]
    return torch.device(device_map.get(block, next(iter(device_map.values()))))


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _read(folder: Path, plan: LoadPlan, device_map: dict) -> dict[str, torch.Tensor]:
    """Every stored tensor, on the device the map gives its parameter."""
    from .reader import read_tensors

    quantized = set(plan.quantized)

    def place(key: str) -> torch.device:
        if ".quant_state." in key:
            return torch.device("cpu")  # a few hundred bytes of JSON, parsed on the host
        return _device_for(_quantized_owner(key, quantized) or key, device_map)

    return read_tensors(sorted(folder.glob("*.safetensors")), place)


def _assign(model: nn.Module, stored: dict[str, torch.Tensor], folder: Path, plan: LoadPlan) -> None:
    """Put each stored tensor in its parameter's place; 4-bit weights become Params4bit."""
    quantized = set(plan.quantized)
    for name, param in list(model.named_parameters()):
        if not param.is_meta or name not in stored:
            continue  # tied to another parameter: re-tied below
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if module_name in quantized and attr == "weight":
            module.weight = _params4bit(name, stored, module, plan.quant["method"])
        else:
            tensor = stored[name]
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    model.tie_weights()
    still_empty = [name for name, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise LoadspecError(f"artifact {folder.name} lacks {len(still_empty)} tensor(s), e.g. {still_empty[:3]}. "
                            "Rebuild it with 'loadspec build SPEC --force'.")


def _params4bit(name: str, stored: dict, module: nn.Module, method: str):
    """A bitsandbytes Params4bit with its QuantState, built from the stored tensors (no re-quantization)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    packed = stored[name]
    try:
        meta = json.loads(bytes(stored[f"{name}.quant_state.bitsandbytes__{method}"].numpy()))
        nested, offset = None, None
        if f"{name}.nested_absmax" in stored:
            nested = QuantState(absmax=stored[f"{name}.nested_absmax"], code=stored[f"{name}.nested_quant_map"],
                                blocksize=meta["nested_blocksize"], dtype=getattr(torch, meta["nested_dtype"]))
            offset = torch.tensor(float(meta["nested_offset"]), device=packed.device)
        state = QuantState(absmax=stored[f"{name}.absmax"], shape=torch.Size(meta["shape"]), code=stored[f"{name}.quant_map"],
                           blocksize=meta["blocksize"], quant_type=meta["quant_type"], dtype=getattr(torch, meta["dtype"]),
                           offset=offset, state2=nested)
    except (KeyError, ValueError) as exc:
        raise LoadspecError(f"4-bit weight {name}: its quantization state is incomplete or unreadable ({exc!r}). "
                            "Rebuild the artifact with 'loadspec build SPEC --force'.") from None
    if state.shape.numel() > 2 * packed.numel():
        raise LoadspecError(f"4-bit weight {name}: {packed.numel()} packed bytes cannot hold shape {tuple(state.shape)}.")
    module.quant_state = state
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=state.blocksize,
                             compress_statistics=nested is not None, quant_type=state.quant_type,
                             quant_storage=packed.dtype, module=module, bnb_quantized=True)


def _quantized_owner(key: str, quantized: set[str]) -> str | None:
    """The 4-bit weight a stored key belongs to ('x.weight' for 'x.weight.absmax'), if any."""
    head, sep, _ = key.partition(".weight")
    if sep and head in quantized:
        return head + ".weight"
    return None


def _place_buffers(model: nn.Module, device_map: dict) -> None:
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(_device_for(f"{module_name}.{name}", device_map))
