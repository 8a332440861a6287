"""Compiled Triton kernels shipped in the artifact, so a fresh process's first step does not compile them.

Build (`start` ... `finish`): when the plan's patches are wanted (`[train] kernels = true`) and a CUDA GPU
of the target's capability is present, a subprocess (`loadspec.kernel_warmup`) runs every patched kernel
forward and backward on a one-layer copy of the model, with Triton's cache pointed at an empty folder;
it runs while the weights are written. That folder becomes `kernels.tar.gz`, and `kernels.json` records
the Triton version, GPU, kernel versions and each compiled variant's launch settings (its autotune
choice). Without a matching GPU, `kernels.json` says why nothing was compiled.

Load (`restore`): if the artifact's binaries match this GPU and Triton, the entries missing from Triton's
cache folder are unpacked into it (each by an atomic rename), so Triton finds them instead of compiling;
otherwise a notice says the first step compiles. `LOADSPEC_KERNEL_CACHE=0` skips the restore.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .errors import LoadspecError

KERNELS_JSON = "kernels.json"
KERNELS_TAR = "kernels.tar.gz"
WARMUP_TIMEOUT_S = 600
_ENTRY = re.compile(r"^[A-Za-z0-9_-]{8,128}$")  # a Triton cache key folder


def _gpu() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": [props.major, props.minor]}


def _triton_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return None


def _skip_reason(plan) -> str | None:
    if not plan.patches:
        return "the plan patches no kernels"
    if not (plan.train or {}).get("kernels"):
        return "[train] kernels is off (set it to true to ship compiled kernels)"
    if plan.target.get("kind") == "cpu":
        return "the target is a CPU"
    if _triton_version() is None:
        return "triton is not installed"
    gpu = _gpu()
    if gpu is None:
        return "built without a CUDA GPU; the first step compiles the kernels"
    wanted = plan.target.get("capability")
    if wanted and list(wanted) != gpu["capability"]:
        return (f"this GPU ({gpu['name']}, capability {gpu['capability'][0]}.{gpu['capability'][1]}) is not the "
                f"target's ({plan.target.get('name')}, capability {wanted[0]}.{wanted[1]})")
    return None


class Warmup:
    """A kernel-compiling subprocess started before the weights are written and joined after."""

    def __init__(self, plan, folder: Path):
        self.folder = folder
        self.plan = plan
        self.skipped = _skip_reason(plan)
        self.process = None
        if self.skipped:
            return
        self.work = Path(tempfile.mkdtemp(prefix="kernels-", dir=folder.parent))
        env = dict(os.environ, TRITON_CACHE_DIR=str(self.work / "cache"), LOADSPEC_KERNEL_CACHE="0")
        env.pop("TRITON_INTERPRET", None)
        self.started = time.perf_counter()
        (self.work / "plan.json").write_text(plan.to_json())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loadspec.kernel_warmup", str(folder), str(self.work / "plan.json"),
             str(self.work / "compiled.json")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)

    def finish(self) -> dict:
        """Wait for the warm-up, pack what it compiled into the artifact, write kernels.json; returns the record."""
        record = {"kernels": {p["kernel"]: p["version"] for p in self.plan.patches}, "triton": _triton_version()}
        if self.process is None:
            record.update(compiled=False, reason=self.skipped)
        else:
            try:
                record.update(self._collect())
            finally:
                shutil.rmtree(self.work, ignore_errors=True)
        (self.folder / KERNELS_JSON).write_text(json.dumps(record, indent=2, sort_keys=True))
        return record

    def abort(self) -> None:
        """Stop the warm-up of a build that failed (nothing of it is kept)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.work, ignore_errors=True)

    def _collect(self) -> dict:
        try:
            output, _ = self.process.communicate(timeout=WARMUP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate()
            return {"compiled": False, "reason": f"the kernel warm-up took over {WARMUP_TIMEOUT_S} s and was stopped"}
        seconds = round(time.perf_counter() - self.started, 2)
        if self.process.returncode != 0:
            tail = " | ".join(output.strip().splitlines()[-3:])
            return {"compiled": False, "reason": f"the kernel warm-up failed (exit {self.process.returncode}): {tail}"}
        compiled = json.loads((self.work / "compiled.json").read_text())
        cache = self.work / "cache"
        with tarfile.open(self.folder / KERNELS_TAR, "w:gz") as tar:
            for entry in sorted(cache.iterdir()):
                tar.add(entry, arcname=entry.name)
        return {"compiled": True, "gpu": _gpu(), "warmup_seconds": seconds, **compiled}


def cache_dir() -> Path:
    """Triton's cache folder, as Triton itself resolves it ($TRITON_CACHE_DIR, else $TRITON_HOME/.triton/cache)."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return Path(os.environ["TRITON_CACHE_DIR"])
    return Path(os.environ.get("TRITON_HOME", os.path.expanduser("~/"))) / ".triton" / "cache"


def restore(folder: Path) -> tuple[bool, str]:
    """Unpack the artifact's compiled kernels into Triton's cache when they fit this GPU and Triton.

    Returns (whether the first step must compile, one line for the user saying what was restored or why not).
    """
    compiles = "; the first step compiles them"
    if os.environ.get("LOADSPEC_KERNEL_CACHE", "1").strip().lower() in ("0", "false", "off", "no"):
        return True, "compiled kernels: not restored ($LOADSPEC_KERNEL_CACHE=0)" + compiles
    path = folder / KERNELS_JSON
    if not path.is_file():
        return True, "compiled kernels: none in this artifact (built by an older loadspec)" + compiles
    record = json.loads(path.read_text())
    if not record.get("compiled"):
        return True, f"compiled kernels: none in this artifact ({record.get('reason')})" + compiles
    gpu, triton = _gpu(), _triton_version()
    if gpu is None:
        return False, "compiled kernels: not used (no CUDA GPU here)"
    if gpu["capability"] != record["gpu"]["capability"] or triton != record.get("triton"):
        return True, (f"compiled kernels: built for {record['gpu']['name']} (capability {record['gpu']['capability']}) with "
                      f"triton {record.get('triton')}, but this is {gpu['name']} (capability {gpu['capability']}) with triton "
                      f"{triton}" + compiles)
    added = _unpack(folder / KERNELS_TAR, cache_dir())
    return False, (f"compiled kernels: {added} restored into {cache_dir()} "
                   f"({len(record.get('variants', []))} variants built for this GPU)")


def _repoint_groups(staging: Path, entry: Path) -> None:
    """Triton's `__grp__*.json` files list their entry's files by absolute path (where the build compiled them);
    Triton treats a group whose paths are missing as a miss, so they are pointed at the entry's new home."""
    for group in staging.glob("__grp__*.json"):
        try:
            data = json.loads(group.read_text())
            children = data["child_paths"]
            data["child_paths"] = {name: str(entry / Path(path).name) if (staging / Path(path).name).is_file() else path
                                   for name, path in children.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # not a group Triton can read either: it compiles, as without the cache
        group.write_text(json.dumps(data))


def _unpack(archive: Path, target: Path) -> int:
    """Each cache entry (a folder named by its key) not in `target` yet, unpacked beside it and renamed in."""
    target.mkdir(parents=True, exist_ok=True)
    added = 0
    with tarfile.open(archive, "r:gz") as tar:
        members: dict[str, list[tarfile.TarInfo]] = {}
        for member in tar.getmembers():
            parts = member.name.split("/")
            if not _ENTRY.match(parts[0]) or len(parts) > 2 or not (member.isfile() or member.isdir()) \
                    or any(p in ("", ".", "..") for p in parts):
                raise LoadspecError(f"{archive} holds {member.name!r}, which is no Triton cache entry; "
                                    "rebuild the artifact with 'loadspec build SPEC --force'.")
            if member.isfile():
                members.setdefault(parts[0], []).append(member)
        for entry, files in members.items():
            if (target / entry).exists():
                continue
            staging = Path(tempfile.mkdtemp(prefix=f".{entry}.", dir=target))
            try:
                for member in files:
                    with tar.extractfile(member) as source, open(staging / member.name.split("/")[1], "wb") as out:
                        shutil.copyfileobj(source, out)
                _repoint_groups(staging, target / entry)
                os.rename(staging, target / entry)
                added += 1
            except OSError:  # another process put the same entry in first: theirs is as good
                shutil.rmtree(staging, ignore_errors=True)
    return added
