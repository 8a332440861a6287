"""The cache: immutable artifacts by fingerprint, and an index of names.

Layout (like the hub cache: blobs by content, names as refs):
    <root>/artifacts/<fingerprint>/   immutable once renamed into place
    <root>/tmp/                       builds in progress, unique names
    <root>/index/                     diskcache: name -> {fingerprint, spec, target, created}
    <root>/locks/                     advisory per-fingerprint locks (only to avoid duplicate builds)

The rename of a finished staging folder into `artifacts/` is the commit point: a reader
either sees a whole artifact or none. Locks never decide correctness.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs

from .errors import LoadspecError, UsageError

DEFAULT_CACHE = Path("~/.cache/loadspec")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """--cache-dir, else $LOADSPEC_CACHE, else ~/.cache/loadspec."""
    chosen = cache_dir or os.environ.get("LOADSPEC_CACHE") or DEFAULT_CACHE
    return Path(chosen).expanduser().resolve()


NO_LOCKS_ENV = "LOADSPEC_NO_LOCKS"
LOCKLESS_GRACE_SECONDS = 6 * 3600  # without locks, gc spares tmp folders touched more recently than this


def locks_enabled() -> bool:
    """False when $LOADSPEC_NO_LOCKS=1: concurrent builders may then duplicate work, never publish a partial artifact."""
    return os.environ.get(NO_LOCKS_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


@attrs.frozen
class Entry:
    """One name in the index and the artifact it points to."""

    name: str
    fingerprint: str
    path: Path
    present: bool
    size: int
    target: str
    created: str
    last_used: float | None
    spec: str


@attrs.frozen
class Removal:
    """Something `gc` or `rm` deletes (or would, with --dry-run)."""

    path: Path
    size: int
    why: str


class Store:
    """A loadspec cache directory."""

    def __init__(self, root: str | Path | None = None):
        self.root = cache_root(root)
        self.artifacts = self.root / "artifacts"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        try:
            for folder in (self.artifacts, self.tmp, self.locks):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LoadspecError(f"cannot use cache directory {self.root}: {exc.strerror}. "
                                "Pick another with --cache-dir or $LOADSPEC_CACHE.") from None
        self._index = None

    @property
    def index(self):
        if self._index is None:
            self._index = _open_index(self.root / "index")
        return self._index

    # artifacts ---------------------------------------------------------------
    def artifact_path(self, fingerprint: str) -> Path:
        return self.artifacts / fingerprint

    def has(self, fingerprint: str) -> bool:
        return (self.artifact_path(fingerprint) / "manifest.json").is_file()

    @contextlib.contextmanager
    def staging(self, fingerprint: str) -> Iterator[Path]:
        """A fresh private folder to build into; removed if the block fails (or is interrupted)."""
        folder = self.tmp / f"{fingerprint}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        try:
            yield folder
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def commit(self, staged: Path, fingerprint: str) -> Path:
        """Atomically publish a finished staging folder; if another build won the race, keep theirs."""
        final = self.artifact_path(fingerprint)
        try:
            os.rename(staged, final)
        except OSError:
            if not self.has(fingerprint):
                raise
            shutil.rmtree(staged, ignore_errors=True)
        return final

    def delete_artifact(self, fingerprint: str) -> None:
        """Remove an artifact (atomically gone for readers) to make room for a forced rebuild."""
        if self.artifact_path(fingerprint).exists():
            self._delete(self.artifact_path(fingerprint))

    @contextlib.contextmanager
    def build_lock(self, fingerprint: str) -> Iterator[None]:
        """Advisory lock so concurrent builders of one fingerprint wait instead of duplicating work."""
        if not locks_enabled():
            yield
            return
        with open(self.locks / f"{fingerprint}.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def manifest(self, fingerprint: str) -> dict:
        path = self.artifact_path(fingerprint) / "manifest.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise LoadspecError(f"artifact {fingerprint} is not in the cache {self.root}.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LoadspecError(f"artifact {fingerprint}: manifest.json is damaged ({exc}). Rebuild it with 'loadspec build --force'.") from None

    # names -------------------------------------------------------------------
    def set_ref(self, name: str, fingerprint: str, *, spec: str = "", target: str = "") -> None:
        current = self.ref(name)
        if current and (current["fingerprint"], current["spec"], current["target"]) == (fingerprint, spec, target):
            return  # a cache hit writes nothing
        self.index[f"ref:{name}"] = {"fingerprint": fingerprint, "spec": spec, "target": target,
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def ref(self, name: str) -> dict | None:
        return self.index.get(f"ref:{name}")

    def refs(self) -> dict[str, dict]:
        return {key[4:]: self.index[key] for key in sorted(self.index.iterkeys()) if key.startswith("ref:")}

    def resolve_name(self, name: str) -> str:
        """The fingerprint a name points to, or a UsageError saying how to build it."""
        entry = self.ref(name)
        if entry is None:
            known = ", ".join(self.refs()) or "none yet"
            raise UsageError(f"no artifact named {name!r} in {self.root} (known: {known}). "
                             f"Build it with 'loadspec build SPEC.toml', or fetch it with 'loadspec pull {name}'.")
        return entry["fingerprint"]

    def touch(self, fingerprint: str) -> None:
        """Record that an artifact was just used (for `ls` and `gc`)."""
        self.index[f"used:{fingerprint}"] = time.time()

    # housekeeping -------------------------------------------------------------
    def entries(self) -> list[Entry]:
        result = []
        for name, ref in self.refs().items():
            fp = ref["fingerprint"]
            path = self.artifact_path(fp)
            result.append(Entry(name, fp, path, self.has(fp), _folder_size(path), ref.get("target", ""),
                                ref.get("created", ""), self.index.get(f"used:{fp}"), ref.get("spec", "")))
        return result

    def verify(self, fingerprint: str) -> list[str]:
        """Re-hash every file against the manifest; returns the problems found (empty if sound)."""
        from .builder import sha256_file

        folder = self.artifact_path(fingerprint)
        problems = []
        manifest = self.manifest(fingerprint)
        listed = manifest.get("files", {})
        for name, entry in sorted(listed.items()):
            path = folder / name
            if not path.is_file():
                problems.append(f"{name}: missing")
            elif path.stat().st_size != entry["size"]:
                problems.append(f"{name}: size {path.stat().st_size} bytes, manifest says {entry['size']}")
            elif sha256_file(path) != entry["sha256"]:
                problems.append(f"{name}: contents changed (sha256 differs from the manifest)")
        for path in sorted(folder.iterdir()):
            if path.name not in listed and path.name != "manifest.json":
                problems.append(f"{path.name}: not listed in the manifest")
        return problems

    def remove_name(self, name: str, *, dry_run: bool = False) -> list[Removal]:
        """Drop a name; its artifact goes too unless another name still points to it."""
        fingerprint = self.resolve_name(name)
        removals = [Removal(Path(f"index:{name}"), 0, "name")]
        others = [n for n, ref in self.refs().items() if ref["fingerprint"] == fingerprint and n != name]
        path = self.artifact_path(fingerprint)
        if not others and path.exists():
            removals.append(Removal(path, _folder_size(path), f"artifact of {name}"))
        if not dry_run:
            del self.index[f"ref:{name}"]
            if len(removals) > 1:
                self._delete(path)
        return removals

    def gc(self, *, dry_run: bool = False, older_than: float | None = None, max_size: int | None = None) -> list[Removal]:
        """Remove leftovers of dead builds and artifacts no name points to.

        `older_than` (days): also evict artifacts not used for that long; `max_size` (bytes):
        then evict the least recently used until the artifacts fit. An evicted artifact's
        names go with it.
        """
        refs = self.refs()
        referenced = {ref["fingerprint"] for ref in refs.values()}
        removals = []
        for path in sorted(self.tmp.iterdir()):
            if not self._build_alive(path.name.split(".")[0], path):
                removals.append(Removal(path, _folder_size(path), "unfinished build"))
        kept = []
        for path in sorted(self.artifacts.iterdir()):
            if path.name not in referenced:
                removals.append(Removal(path, _folder_size(path), "no name points to it"))
            else:
                kept.append((self.last_used(path.name), _folder_size(path), path))
        kept.sort(key=lambda item: item[0])
        evicted = []
        if older_than is not None:
            cutoff = time.time() - older_than * 86400
            evicted += [(p, s, f"not used for {older_than:g} days") for used, s, p in kept if used < cutoff]
            kept = [item for item in kept if item[0] >= cutoff]
        if max_size is not None:
            total = sum(s for _, s, _ in kept)
            for used, size, path in kept:
                if total <= max_size:
                    break
                evicted.append((path, size, f"least recently used, over the {_human(max_size)} budget"))
                total -= size
        for path, size, why in evicted:
            removals += [Removal(Path(f"index:{n}"), 0, "name of an evicted artifact") for n, r in refs.items() if r["fingerprint"] == path.name]
            removals.append(Removal(path, size, why))
        if not dry_run:
            for removal in removals:
                if str(removal.path).startswith("index:"):
                    self.index.pop(f"ref:{str(removal.path)[6:]}", None)
                else:
                    self._delete(removal.path)
        return removals

    def last_used(self, fingerprint: str) -> float:
        """When an artifact was last loaded, else when it was committed."""
        used = self.index.get(f"used:{fingerprint}")
        if used is not None:
            return used
        try:
            return self.artifact_path(fingerprint).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _build_alive(self, fingerprint: str, path: Path | None = None) -> bool:
        if not locks_enabled():  # no lock to ask: spare anything touched recently
            return path is not None and time.time() - path.stat().st_mtime < LOCKLESS_GRACE_SECONDS
        lock = self.locks / f"{fingerprint}.lock"
        if not lock.exists():
            return False
        with open(lock, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    def _delete(self, path: Path) -> None:
        """Make a folder vanish atomically (rename into tmp), then delete it."""
        if path.parent == self.tmp:
            shutil.rmtree(path, ignore_errors=True)
            return
        doomed = self.tmp / f"deleting.{path.name}.{uuid.uuid4().hex[:8]}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


_indexes: dict[Path, object] = {}


def _open_index(path: Path):
    """The diskcache index at `path`, opened once per process (opening costs ~15 ms)."""
    if path not in _indexes:
        import diskcache

        _indexes[path] = diskcache.Cache(str(path))
    return _indexes[path]


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.4g} {unit}"
        size /= 1024
    return f"{size:.4g} TiB"


def _folder_size(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
