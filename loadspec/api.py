"""The public entry points, composing spec -> plan -> build -> store -> load."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import attrs

from . import arch, hardware, source as sources
from .errors import LoadspecError, UsageError
from .lora import check_adapter_path
from .plan import LoadPlan, resolve
from .spec import Spec, load_spec
from .store import Store
from .trace import phase
from .vocab import with_vocabulary


TRAINING_KEY = "training:"  # store index: name -> {"lora", "train", "device_map"} of the spec it was last built from


@attrs.frozen
class Planned:
    spec: Spec
    source: sources.Source
    plan: LoadPlan
    skeleton: arch.Skeleton  # the model's parameter and module names, which the build writes


@attrs.frozen
class Built:
    plan: LoadPlan
    path: Path
    cached: bool  # True: the artifact was already there; no weights were read
    seconds: float


def plan_spec(spec_path: str | Path, *, target: str | None = None, store: Store | None = None) -> Planned:
    """Validate a spec and plan it for `target` (default: the spec's [target]).

    With a `store`, the model's skeleton (derived from its config alone) is remembered there,
    so planning an already-built spec in a fresh process stays cheap.
    """
    spec = load_spec(spec_path)
    try:
        machine = hardware.profile(target if target is not None else spec.target.gpu)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_adapter_path(spec)
    src = with_vocabulary(spec, sources.resolve(spec.model))  # reads the tokenizer only if [tokenizer] adds tokens or resizes
    skeleton = _skeleton(src.config, store)
    return Planned(spec, src, resolve(spec, machine, src, skeleton), skeleton)


def _skeleton(config: dict, store: Store | None) -> arch.Skeleton:
    if store is None:
        return arch.skeleton(config)
    key = "skeleton:" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    cached = store.index.get(key)
    if cached is not None:
        return arch.skeleton_from_json(cached)
    value = arch.skeleton(config)
    store.index[key] = arch.skeleton_to_json(value)
    return value


def build(spec_path: str | Path, *, cache_dir: str | Path | None = None, target: str | None = None,
          force: bool = False, progress: bool = True) -> Built:
    """Plan a spec and build its artifact once; later calls are cache hits that read no weights."""
    from .builder import write_artifact

    started = time.perf_counter()
    store = Store(cache_dir)
    planned = plan_spec(spec_path, target=target, store=store)
    plan = planned.plan
    fingerprint = plan.fingerprint
    cached = store.has(fingerprint) and not force
    if cached:
        _check_reusable(store, fingerprint)
    elif not force:
        _check_name_format(store, plan.name)
    if not cached:
        with store.build_lock(fingerprint):
            if force or not store.has(fingerprint):
                with store.staging(fingerprint) as staged:
                    _log_build(fingerprint, staged)
                    write_artifact(plan, planned.source, planned.skeleton, staged, progress=progress)
                    store.commit(staged, fingerprint, replace=force)  # readers see the old artifact or the new one
            else:
                cached = True
                _check_reusable(store, fingerprint)
    store.set_ref(plan.name, fingerprint, spec=str(Path(spec_path).resolve()), target=plan.target["name"])
    store.index[f"{TRAINING_KEY}{plan.name}"] = {"fingerprint": fingerprint, "lora": plan.lora, "train": plan.train,
                                                 "device_map": plan.device_map}
    return Built(plan, store.artifact_path(fingerprint), cached, time.perf_counter() - started)


FORCE_HINT = "'loadspec build' does not reuse it silently: pass --force (Python: build(..., force=True)) to rebuild it."


def _check_reusable(store: Store, fingerprint: str) -> None:
    """A cached artifact of another format, or one claiming a bitsandbytes that lacks its format, is not a cache hit."""
    from .loader import IncompatibleArtifact, check_compatible

    try:
        check_compatible(store.artifact_path(fingerprint), store.manifest(fingerprint), runtime=False)
    except IncompatibleArtifact as exc:
        raise UsageError(f"{exc} {FORCE_HINT}") from None


def _check_name_format(store: Store, name: str) -> None:
    """The name's current artifact has another format version: a new build replaces it only when asked (--force)."""
    from . import plan as plans

    ref = store.ref(name)
    fingerprint = ref.get("fingerprint") if isinstance(ref, dict) else None
    if not isinstance(fingerprint, str) or not plans.parse_fingerprint(fingerprint) or not store.has(fingerprint):
        return
    try:
        theirs = store.manifest(fingerprint).get("format_version")
    except LoadspecError:
        return
    if theirs != plans.FORMAT_VERSION:
        raise UsageError(f"{name!r} is artifact {fingerprint}, built in artifact format {theirs!r}; this loadspec writes format "
                         f"{plans.FORMAT_VERSION}, so the artifact would change. {FORCE_HINT}")


def _log_build(fingerprint: str, staged: Path) -> None:
    """With $LOADSPEC_BUILD_LOG=path, append one line per build actually started (tests count them)."""
    log = os.environ.get("LOADSPEC_BUILD_LOG")
    if log:
        with open(log, "a") as handle:
            handle.write(f"{fingerprint} pid={os.getpid()} staging={staged.name}\n")


def load(name_or_spec: str | Path, *, cache_dir: str | Path | None = None, device: str | None = None,
         target: str | None = None, progress: bool = False, remote: str | None = None, verify: bool | None = None,
         patch: bool | None = None):
    """`(model, tokenizer)` for an artifact name, or for a spec file (built first if missing).

    `patch=True` applies the plan's fused kernels to the model (`patch=None`: as the spec's
    `[train] kernels` says, default off); `loadspec.patches.unpatch(model)` removes them.

    `device` ("cpu", "cuda:0", …) overrides the plan's device map, e.g. to inspect a GPU
    artifact on a CPU machine. A name missing from the cache is pulled from `remote`
    (else $LOADSPEC_REMOTE) when one is configured.

    Every load checks each file's size, the safetensors headers, and re-hashes any file whose
    size, mtime or inode changed since it was last hashed; `verify=True` (or $LOADSPEC_VERIFY=1)
    re-hashes every file, which also catches changes that kept the mtime (bit rot), at the cost
    of reading the artifact twice.
    """
    from .loader import RECOVER, check_compatible, check_files, load_artifact

    store = Store(cache_dir)
    settings = None  # the adapter, checkpointing and placement this load asks for ({"lora", "train", "device_map"})
    fresh_patches = None  # the patch list of the plan made just now (a spec), else the artifact's own
    if str(name_or_spec).endswith(".toml") or Path(name_or_spec).is_file():
        planned = build(name_or_spec, cache_dir=cache_dir, target=target, progress=progress).plan
        fingerprint, settings = planned.fingerprint, {"lora": planned.lora, "train": planned.train, "device_map": planned.device_map}
        fresh_patches = planned.patches
    else:
        name = str(name_or_spec)
        ref = store.ref(name)
        if (ref is None or not store.has(ref["fingerprint"])) and (remote or os.environ.get("LOADSPEC_REMOTE")):
            from .remote import pull as pull_artifact

            fingerprint = pull_artifact(name, remote=remote, cache_dir=cache_dir, progress=progress).fingerprint
        else:
            fingerprint = store.resolve_name(name)
    folder = store.artifact_path(fingerprint)
    manifest = store.manifest(fingerprint)
    check_files(folder, manifest)
    check_compatible(folder, manifest)
    if verify is None:
        verify = os.environ.get("LOADSPEC_VERIFY", "").strip().lower() in ("1", "true", "yes", "on")
    problems = store.recheck(fingerprint, full=verify)
    if problems:
        raise LoadspecError(f"artifact {fingerprint} is damaged: {'; '.join(problems)}. {RECOVER}")
    plan = LoadPlan.from_json((folder / "plan.json").read_text())
    if settings is None:
        settings = name_settings(store, str(name_or_spec), plan)
    device_map = {"": device} if device else for_this_rank(settings["device_map"])
    _check_devices(device_map)
    store.touch(fingerprint)
    model, tokenizer = load_artifact(folder, plan, device_map=device_map)
    if patch is None:
        patch = bool((settings.get("train") or {}).get("kernels", False))
    with phase("adapter and checkpointing"):
        model = _ready_to_train(model, settings)
    if patch:  # after the adapter is attached: the lora patch acts on its layers
        with phase("kernel cache"):
            _restore_kernels(folder)
        with phase("patches"):
            _apply_patches(model, plan, fresh_patches)
    return model, tokenizer


def _restore_kernels(folder: Path) -> None:
    """The artifact's compiled kernels into Triton's cache; a notice on stderr when the first step must compile."""
    import torch

    from .kernel_cache import restore

    if torch.cuda.is_available():
        compiles, line = restore(folder)
        if compiles:
            print(f"loadspec: {line}", file=sys.stderr)


def _apply_patches(model, plan: LoadPlan, chosen) -> None:
    """The plan's fused kernels onto the model's modules (patches are not in the fingerprint, so an artifact built
    by an older loadspec may record none: they are then chosen now, from the plan's family)."""
    from . import patches

    if not chosen:
        chosen = plan.patches or patches.choose(arch.for_model_type(plan.model_type), plan.model_type)[0]
    patches.apply(model, chosen)


def name_settings(store: Store, name: str, plan: LoadPlan) -> dict:
    """What `name` was built with beyond the artifact's bytes: its adapter and checkpointing ({"lora", "train"})
    and its placement ("device_map"). Artifacts are shared by names (none of these is in the fingerprint), so
    they are recorded per name; a pulled artifact's own plan serves its own name."""
    settings = store.index.get(f"{TRAINING_KEY}{name}")
    if not settings or settings.get("fingerprint") != plan.fingerprint:
        settings = {"lora": plan.lora, "train": plan.train} if plan.name == name else {}
    settings = {"device_map": plan.device_map, **settings}  # no record of it (older or other name): the artifact's
    lora = settings.get("lora") or {}
    if lora.get("kind") == "adapter":
        path = Path(lora["path"])
        if not (path / "adapter_config.json").is_file():
            raise UsageError(f"{name!r} attaches the LoRA adapter {path}, which is gone. Restore it, or build the spec again.")
        if sources.read_adapter(path).identity != lora["identity"]:
            raise UsageError(f"the LoRA adapter {path} changed since {name!r} was built; run 'loadspec build' on its spec "
                             "again so the new adapter is checked against the base.")
    return settings


def _ready_to_train(model, training: dict):
    """Attach the planned LoRA adapter, then set gradient checkpointing."""
    from . import checkpointing, lora

    model = lora.attach(model, training.get("lora"))
    checkpointing.enable(model, (training.get("train") or {}).get("gradient_checkpointing", False))
    return model


def prewarm(specs, *, remote: str | None = None, target: str | None = None, cache_dir: str | Path | None = None,
            workers: int = 8, progress: bool = True) -> list:
    """Build each spec for `target` here (no GPU needed for 4-bit), then push it to `remote` (else $LOADSPEC_REMOTE).

    Returns [(Built, Transfer), ...]. Nodes then call `load("name")` with the remote set.
    """
    from .remote import open_remote, push as push_artifact

    url = open_remote(remote).url  # a bad or missing remote fails before any build
    done = []
    for spec_path in [specs] if isinstance(specs, (str, Path)) else specs:
        built = build(spec_path, cache_dir=cache_dir, target=target, progress=progress)
        done.append((built, push_artifact(built.plan.name, remote=url, cache_dir=cache_dir, workers=workers, progress=progress)))
    return done


def push(name: str, *, remote: str | None = None, cache_dir: str | Path | None = None, workers: int = 8,
         progress: bool = True):
    """Upload NAME's artifact to `remote` (else $LOADSPEC_REMOTE); see `loadspec.remote.push`."""
    from .remote import push as push_artifact

    return push_artifact(name, remote=remote, cache_dir=cache_dir, workers=workers, progress=progress)


def pull(name: str, *, remote: str | None = None, cache_dir: str | Path | None = None, workers: int = 8,
         progress: bool = True):
    """Fetch NAME's artifact from `remote` (else $LOADSPEC_REMOTE), verified and resumable; see `loadspec.remote.pull`."""
    from .remote import pull as pull_artifact

    return pull_artifact(name, remote=remote, cache_dir=cache_dir, workers=workers, progress=progress)


def for_this_rank(device_map: dict) -> dict:
    """Under torchrun (LOCAL_RANK set), each rank loads a full copy onto its own GPU.

    A plan that fits one GPU is moved from cuda:0 to cuda:LOCAL_RANK; a plan spread over
    several GPUs cannot be copied per rank and is refused with the fix.
    """
    rank = os.environ.get("LOCAL_RANK")
    if rank is None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device_map
    gpus = {d for d in device_map.values() if str(d).startswith("cuda")}
    if len(gpus) > 1:
        raise UsageError(f"under torchrun each rank loads its own copy of the model, but this plan spreads it over {len(gpus)} GPUs. "
                         "Plan for one GPU per rank ([target] gpu with count = 1), or run a single process.")
    return {block: (f"cuda:{int(rank)}" if str(d).startswith("cuda") else d) for block, d in device_map.items()}


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
