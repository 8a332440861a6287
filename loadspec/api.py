"""The public entry points, composing spec -> plan -> build -> store -> load."""
from __future__ import annotations

import time
from pathlib import Path

import attrs

from . import arch, hardware, source as sources
from .errors import LoadspecError, UsageError
from .plan import LoadPlan, resolve
from .spec import Spec, load_spec
from .store import Store


@attrs.frozen
class Planned:
    spec: Spec
    source: sources.Source
    plan: LoadPlan


@attrs.frozen
class Built:
    plan: LoadPlan
    path: Path
    cached: bool  # True: the artifact was already there; no weights were read
    seconds: float


def plan_spec(spec_path: str | Path, *, target: str | None = None) -> Planned:
    """Validate a spec and plan it for `target` (default: the spec's [target])."""
    spec = load_spec(spec_path)
    try:
        machine = hardware.profile(target if target is not None else spec.target.gpu)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    src = sources.resolve(spec.model)
    if "quantization_config" in src.config:
        raise UsageError(f"{src.location} is already quantized ({src.config['quantization_config'].get('quant_method')}); "
                         "this loadspec version needs a 16/32-bit source. Point source at the unquantized model.")
    return Planned(spec, src, resolve(spec, machine, src, arch.skeleton(src.config)))


def build(spec_path: str | Path, *, cache_dir: str | Path | None = None, target: str | None = None,
          force: bool = False, progress: bool = True) -> Built:
    """Plan a spec and build its artifact once; later calls are cache hits that read no weights."""
    from .builder import write_artifact

    started = time.perf_counter()
    planned = plan_spec(spec_path, target=target)
    plan = planned.plan
    store = Store(cache_dir)
    fingerprint = plan.fingerprint
    cached = store.has(fingerprint) and not force
    if not cached:
        with store.build_lock(fingerprint):
            if force or not store.has(fingerprint):
                with store.staging(fingerprint) as staged:
                    write_artifact(plan, planned.source, staged, progress=progress)
                    if force and store.has(fingerprint):
                        store.delete_artifact(fingerprint)
                    store.commit(staged, fingerprint)
            else:
                cached = True
    store.set_ref(plan.name, fingerprint, spec=str(Path(spec_path).resolve()), target=plan.target["name"])
    return Built(plan, store.artifact_path(fingerprint), cached, time.perf_counter() - started)


def load(name_or_spec: str | Path, *, cache_dir: str | Path | None = None, device: str | None = None,
         target: str | None = None, progress: bool = False):
    """`(model, tokenizer)` for an artifact name, or for a spec file (built first if missing).

    `device` ("cpu", "cuda:0", …) overrides the plan's device map, e.g. to inspect a GPU
    artifact on a CPU machine.
    """
    from .loader import check_files, load_artifact

    store = Store(cache_dir)
    if str(name_or_spec).endswith(".toml") or Path(name_or_spec).is_file():
        fingerprint = build(name_or_spec, cache_dir=cache_dir, target=target, progress=progress).plan.fingerprint
    else:
        fingerprint = store.resolve_name(str(name_or_spec))
    folder = store.artifact_path(fingerprint)
    manifest = store.manifest(fingerprint)
    check_files(folder, manifest)
    plan = LoadPlan.from_json((folder / "plan.json").read_text())
    device_map = {"": device} if device else plan.device_map
    _check_devices(device_map)
    store.touch(fingerprint)
    return load_artifact(folder, plan, device_map=device_map)


def _check_devices(device_map: dict) -> None:
    import torch

    wants_cuda = [d for d in device_map.values() if str(d).startswith("cuda")]
    if wants_cuda and not torch.cuda.is_available():
        raise UsageError("this artifact was planned for a GPU, but torch sees no CUDA device here. "
                         "Load it on the CPU with device='cpu' (CLI: --device cpu), or build for --target cpu.")
    if wants_cuda:
        highest = max(int(str(d).partition(":")[2] or 0) for d in wants_cuda)
        if highest >= torch.cuda.device_count():
            raise LoadspecError(f"the plan places layers on cuda:{highest}, but only {torch.cuda.device_count()} GPU(s) are visible. "
                                "Rebuild for this machine (--target auto), or pass device='cuda:0'.")
