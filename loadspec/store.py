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
import hashlib
import errno
import fcntl
import json
import os
import re
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


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def disk_errors(root: Path, what: str = "write to") -> Iterator[None]:
    """Turn "disk full" and "not writable" OSErrors on files under `root` into one clear LoadspecError naming `root`."""
    try:
        yield
    except OSError as exc:
        name = exc.filename
        inside = name is None or not isinstance(name, (str, os.PathLike)) or os.path.realpath(name).startswith(str(root))
        if not inside or exc.errno not in DISK_FULL + NOT_WRITABLE:
            raise
        why = ("the disk is full (no space left on device)" if exc.errno in DISK_FULL
               else f"it is not writable ({exc.strerror})")
        raise LoadspecError(f"cannot {what} the cache directory {root}: {why}. Nothing half-written was published. "
                            + ("Free some space there" if exc.errno in DISK_FULL else "Fix its permissions")
                            + ", or pick another cache with --cache-dir or $LOADSPEC_CACHE.") from None


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
            self._index = _Index(self.root / "index")
        return self._index

    # artifacts ---------------------------------------------------------------
    def artifact_path(self, fingerprint: str) -> Path:
        return self.artifacts / fingerprint

    def has(self, fingerprint: str) -> bool:
        if not isinstance(fingerprint, str) or not fingerprint or "/" in fingerprint or fingerprint in (".", ".."):
            return False  # not a name inside artifacts/ (a damaged or tampered index)
        return (self.artifact_path(fingerprint) / "manifest.json").is_file()

    @contextlib.contextmanager
    def staging(self, fingerprint: str) -> Iterator[Path]:
        """A fresh private folder to build into; removed if the block fails (or is interrupted)."""
        folder = self.tmp / f"{fingerprint}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        with disk_errors(self.root):
            folder.mkdir()
        try:
            with disk_errors(self.root):
                yield folder
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def commit(self, staged: Path, fingerprint: str, *, replace: bool = False) -> Path:
        """Atomically publish a finished staging folder; if another build won the race, keep theirs.

        `replace` (a forced rebuild): the old artifact is renamed away and the new one renamed in
        straight after, so readers see one or the other; the old one is deleted only then.
        """
        final = self.artifact_path(fingerprint)
        doomed = None
        if replace and final.exists():
            doomed = self.tmp / f"deleting.{fingerprint}.{uuid.uuid4().hex[:8]}"
            os.rename(final, doomed)
        try:
            os.rename(staged, final)
        except OSError:
            if doomed is not None:
                os.rename(doomed, final)  # put the old one back rather than leave nothing
            if not self.has(fingerprint) or doomed is not None:
                raise
            shutil.rmtree(staged, ignore_errors=True)
        else:
            self.stamp(fingerprint)
        if doomed is not None:
            shutil.rmtree(doomed, ignore_errors=True)
        return final

    # integrity between loads ---------------------------------------------------
    # A load checks every file's size (cheap); a changed byte of the same size needs a re-hash.
    # Re-hashing on every load would read every artifact twice, so the index remembers each
    # file's (size, mtime, inode) when its sha256 was last checked (at commit: just hashed by the
    # build or pull), and a load re-hashes exactly the files whose stat changed since. What this
    # cannot see is a change that keeps size and mtime (bit rot, deliberate mtime restores):
    # `loadspec verify`, or load(verify=True) / LOADSPEC_VERIFY=1, re-hashes everything.
    def _stats(self, fingerprint: str, names) -> dict[str, list[int]]:
        folder = self.artifact_path(fingerprint)
        stats = {}
        for name in names:
            with contextlib.suppress(OSError):
                st = (folder / name).stat()
                stats[name] = [st.st_size, st.st_mtime_ns, st.st_ino]
        return stats

    def stamp(self, fingerprint: str) -> None:
        """Remember the stat of every listed file of a just-verified artifact."""
        with contextlib.suppress(LoadspecError):
            self.index[f"stamp:{fingerprint}"] = self._stats(fingerprint, self.manifest(fingerprint).get("files", {}))

    def recheck(self, fingerprint: str, *, full: bool = False) -> list[str]:
        """Re-hash the files changed since their last check (all with `full`); returns the problems found."""
        listed = self.manifest(fingerprint).get("files", {})
        folder = self.artifact_path(fingerprint)
        known = {} if full else (self.index.get(f"stamp:{fingerprint}") or {})
        now = self._stats(fingerprint, listed)
        problems = []
        for name, entry in sorted(listed.items()):
            if name in now and now[name] == known.get(name):
                continue
            if name not in now:
                problems.append(f"{name}: missing")
            elif now[name][0] != entry.get("size"):
                problems.append(f"{name}: size {now[name][0]} bytes, manifest says {entry.get('size')}")
            elif sha256_file(folder / name) != entry.get("sha256"):
                problems.append(f"{name}: contents changed (sha256 differs from the manifest)")
        if not problems and now != known:
            self.index[f"stamp:{fingerprint}"] = now
        return problems

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
        with disk_errors(self.root):
            handle = open(self.locks / f"{fingerprint}.lock", "a+")
        with handle:
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
            raise LoadspecError(f"artifact {fingerprint}: manifest.json is damaged ({exc}). Rebuild it with 'loadspec build SPEC "
                                "--force' or fetch it again with 'loadspec pull NAME'.") from None

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
        if not isinstance(name, str) or not _NAME.match(name):
            raise UsageError(f"{name!r} is not an artifact name (letters, digits, '.', '_', '-', starting with a letter "
                             "or digit); names never contain paths.")
        entry = self.ref(name)
        if entry is None:
            known = ", ".join(self.refs()) or "none yet"
            raise UsageError(f"no artifact named {name!r} in {self.root} (known: {known}). "
                             f"Build it with 'loadspec build SPEC.toml', or fetch it with 'loadspec pull {name}'.")
        fingerprint = entry.get("fingerprint") if isinstance(entry, dict) else None
        if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
            raise LoadspecError(f"the cache index {self.root / 'index'} maps {name!r} to {fingerprint!r}, which is not a "
                                f"fingerprint (damaged index); nothing was touched. Run 'loadspec build SPEC --force' for it.")
        return fingerprint

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
        if path.parent == self.artifacts:
            self.index.pop(f"stamp:{path.name}", None)
        shutil.rmtree(doomed, ignore_errors=True)


HASH_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_indexes: dict[Path, object] = {}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # spec.NAME_PATTERN (spec imports nothing from here)
_FINGERPRINT = re.compile(r"[0-9a-f]{24}")


class _Index:
    """The diskcache index, with SQLite's "disk full" and "read-only" errors said in words that name the folder."""

    def __init__(self, path: Path):
        self._path = path
        self._cache = self._call(_open_index, path)

    def _call(self, fn, *args):
        import sqlite3

        try:
            return fn(*args)
        except sqlite3.OperationalError as exc:
            full = "full" in str(exc)
            why = "the disk is full" if full else f"it is not writable or readable ({exc})"
            raise LoadspecError(f"cannot use the cache index {self._path}: {why}. "
                                + ("Free some space there" if full else "Fix the cache directory's permissions (or mount)")
                                + ", or pick another cache with --cache-dir or $LOADSPEC_CACHE.") from None
        except sqlite3.DatabaseError as exc:  # not a database any more: a power cut while it was written, or overwritten
            raise LoadspecError(f"the cache index {self._path} is damaged ({exc}); the artifacts beside it are not. Move it "
                                f"away (mv {self._path} {self._path}.damaged), then run 'loadspec build SPEC' for each name you "
                                "use: each is a cache hit that reads no weights.") from None

    def __getattr__(self, name):
        attr = getattr(self._cache, name)
        return (lambda *args, **kwargs: self._call(lambda: attr(*args, **kwargs))) if callable(attr) else attr

    def __getitem__(self, key):
        return self._call(self._cache.__getitem__, key)

    def __setitem__(self, key, value):
        self._call(self._cache.__setitem__, key, value)

    def __delitem__(self, key):
        self._call(self._cache.__delitem__, key)

    def __contains__(self, key):
        return self._call(self._cache.__contains__, key)


def _open_index(path: Path):
    """The diskcache index at `path`, opened once per process (opening costs ~15 ms).

    SQLite never waits for the disk here (`synchronous` off): with it on, opening the index and recording a use
    made a load wait for six fdatasyncs, which take as long as the disk is busy with other writes (one load
    spent 1.6 s in those two steps on an H100 lease, against ~10 ms). The index holds only names and bookkeeping over the
    artifacts, which are fsynced before they are committed: a power cut can lose its last changes (a name is
    back with one `loadspec build`, a cache hit) or damage it, which every command then reports with the fix."""
    if path not in _indexes:
        import diskcache

        _indexes[path] = diskcache.Cache(str(path), sqlite_synchronous=0)
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
