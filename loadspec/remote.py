"""Shared storage for artifacts: push what one machine built, pull it where nothing can be built.

Layout of a remote (the same for every kind):
    <remote>/artifacts/<fingerprint>/<file>   the artifact's files; manifest.json is written last
    <remote>/refs/<name>.json                 {"fingerprint", "target", "created"}: the remote's commit point

A remote is a folder (a plain path, e.g. an NFS mount, or file:///path), any other fsspec
URL such as s3://bucket/prefix (S3-compatible servers through $LOADSPEC_S3_ENDPOINT or
$AWS_ENDPOINT_URL), or a hub repo, hf://org/repo[@revision][/prefix] (huggingface_hub,
token from $HF_TOKEN). The URL comes from --remote / remote=..., else $LOADSPEC_REMOTE.

Nothing read from a remote is trusted: names and fingerprints are checked before they
become paths, and every file's sha256 is checked against the manifest as it arrives.
Verified files wait in a resumable folder, `<cache>/tmp/<fingerprint>.pull/`, stored under
their sha256 (so a file found there is a file already verified), until all are present;
only then are they linked into a staging folder that the store commits by its atomic
rename. A pull that dies half-way leaves nothing visible, and the next one fetches only
what is still missing; `loadspec gc` treats a resumable folder like an unfinished build.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import attrs

from .errors import LoadspecError, UsageError
from .plan import parse_fingerprint
from .spec import NAME_PATTERN
from .store import Store, disk_errors, locks_enabled, sha256_file

REMOTE_ENV = "LOADSPEC_REMOTE"
S3_ENDPOINT_ENVS = ("LOADSPEC_S3_ENDPOINT", "AWS_ENDPOINT_URL")
CHUNK = 8 * 1024 * 1024
DEFAULT_WORKERS = 8
SHA256 = re.compile(r"[0-9a-f]{64}")
PULL_SUFFIX = ".pull"


@attrs.frozen
class Transfer:
    """What one push or pull did."""

    name: str
    fingerprint: str
    url: str
    copied: int  # files uploaded or downloaded by this call
    kept: int  # files not copied: already on the other side, or verified by an earlier, interrupted pull
    bytes: int  # bytes copied by this call
    seconds: float
    cached: bool  # the other side already had the whole artifact


# --- what a remote may say ----------------------------------------------------------------
def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise UsageError(f"{name!r} is not an artifact name (letters, digits, '.', '_', '-'; starting with a letter or digit).")
    return name


def check_fingerprint(fingerprint, where: str) -> str:
    if not isinstance(fingerprint, str) or not parse_fingerprint(fingerprint):
        raise LoadspecError(f"refusing {where}: fingerprint {fingerprint!r} is not 24 lowercase hex digits "
                            "(a damaged or hostile remote; nothing was written).")
    return fingerprint


def check_file_name(name, where: str) -> str:
    """A manifest entry must name a plain file inside the artifact folder, nothing else."""
    unsafe = (not isinstance(name, str) or not name or name in (".", "..") or ".." in name or name.startswith(".")
              or any(c in name for c in "/\\:") or os.path.isabs(name) or any(ord(c) < 32 for c in name)
              or name == "manifest.json")
    if unsafe:
        raise LoadspecError(f"refusing {where}: file name {name!r} would not stay a plain file inside the artifact folder "
                            "(names with '/', '\\', '..', or absolute paths are rejected; nothing was written).")
    return name


def check_manifest(manifest, fingerprint: str, where: str) -> dict[str, dict]:
    """The manifest's files ({name: {size, sha256}}), after checking every name and entry."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise LoadspecError(f"refusing {where}: it is not a loadspec manifest (no 'files' table).")
    if manifest.get("fingerprint", fingerprint) != fingerprint:
        raise LoadspecError(f"refusing {where}: it describes artifact {manifest.get('fingerprint')!r}, not {fingerprint}.")
    for name, entry in manifest["files"].items():
        check_file_name(name, where)
        if (not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or entry["size"] < 0
                or not isinstance(entry.get("sha256"), str) or not SHA256.fullmatch(entry["sha256"])):
            raise LoadspecError(f"refusing {where}: entry {name!r} needs a size in bytes and a sha256 (64 lowercase hex digits).")
    return manifest["files"]


def check_ref(ref, name: str, where: str) -> dict:
    if not isinstance(ref, dict):
        raise LoadspecError(f"refusing {where}: not a JSON object.")
    check_fingerprint(ref.get("fingerprint"), where)
    if not isinstance(ref.get("target", ""), str) or not isinstance(ref.get("created", ""), str):
        raise LoadspecError(f"refusing {where}: 'target' and 'created' must be strings.")
    return ref


def _parse_json(data: bytes, where: str):
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadspecError(f"refusing {where}: not valid JSON ({exc}).") from None


# --- choosing a remote -------------------------------------------------------------------
def remote_url(remote: str | os.PathLike | None = None) -> str:
    """The remote to use: the argument, else $LOADSPEC_REMOTE, else a UsageError saying how to set one."""
    url = str(remote) if remote else os.environ.get(REMOTE_ENV, "").strip()
    if not url:
        raise UsageError(f"no remote configured: pass --remote URL (Python: remote=...) or set ${REMOTE_ENV} to a folder, "
                         "file:///path, s3://bucket/prefix or hf://org/repo.")
    return url


def open_remote(remote: str | os.PathLike | None = None) -> "Remote":
    """A Remote for a URL (or $LOADSPEC_REMOTE): hf:// -> HubRemote, anything else -> FsRemote (fsspec)."""
    url = remote_url(remote)
    if url.startswith("hf://"):
        return HubRemote(url)
    return FsRemote(url)


class Remote:
    """Shared storage for artifacts. Subclasses move bytes; push/pull above keep the rules."""

    url: str

    def read_ref(self, name: str) -> dict | None:
        raise NotImplementedError

    def write_ref(self, name: str, ref: dict) -> None:
        raise NotImplementedError

    def push_artifact(self, folder: Path, fingerprint: str, files: dict, *, workers: int, bar) -> tuple[int, int, int]:
        """Upload an artifact (manifest last); returns (files copied, files kept, bytes copied)."""
        raise NotImplementedError

    def fetch_artifact(self, resume: Path, fingerprint: str, *, workers: int, bar) -> tuple[bytes, dict, int, int, int]:
        """Bring every file into `resume` as verified blobs named by sha256.

        Returns (manifest bytes, checked files, files copied, files kept, bytes copied)."""
        raise NotImplementedError


class FsRemote(Remote):
    """A folder or any fsspec URL (s3://, gs://, …)."""

    def __init__(self, url: str):
        import fsspec

        self.url = url
        if url.startswith("s3://"):
            try:
                import s3fs
            except ImportError:
                raise UsageError(f"remote {url} needs s3fs: pip install s3fs") from None
            endpoint = next((os.environ[e] for e in S3_ENDPOINT_ENVS if os.environ.get(e)), None)
            self.fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, use_listings_cache=False)
            self.root = url[len("s3://"):].strip("/")
            if not self.root:
                raise UsageError(f"remote {url!r} names no bucket: use s3://bucket or s3://bucket/prefix.")
        elif "://" in url and not url.startswith("file://"):
            try:
                self.fs, root = fsspec.core.url_to_fs(url)
            except (ImportError, ValueError) as exc:
                raise UsageError(f"remote {url}: {exc}") from None
            self.root = root.rstrip("/")
        else:
            path = Path(url[len("file://"):] if url.startswith("file://") else url).expanduser().resolve()
            self.fs = fsspec.filesystem("file")
            self.root = str(path)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.local = "file" in protocols  # a folder: writes go through a temporary name and a rename

    def _path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    @contextlib.contextmanager
    def _errors(self, what: str):
        try:
            yield
        except (LoadspecError, KeyboardInterrupt):
            raise
        except Exception as exc:  # missing bucket, credentials, permissions, network: say which remote and what
            detail = str(exc) or type(exc).__name__
            raise LoadspecError(f"remote {self.url}: cannot {what}: {detail}") from None

    def read_bytes(self, relative: str) -> bytes | None:
        with self._errors(f"read {relative}"):
            try:
                return self.fs.cat_file(self._path(relative))
            except FileNotFoundError:
                return None

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write a small file; on a folder remote through a temporary name and a rename."""
        target = self._path(relative)
        with self._errors(f"write {relative}"):
            if not self.local:
                self.fs.pipe_file(target, data)  # an object appears whole or not at all
                return
            os.makedirs(os.path.dirname(target), exist_ok=True)
            temp = f"{os.path.dirname(target)}/.{os.path.basename(target)}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with open(temp, "wb") as handle:
                    handle.write(data)
                os.replace(temp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)

    def size(self, relative: str) -> int | None:
        with self._errors(f"look at {relative}"):
            try:
                return int(self.fs.size(self._path(relative)))
            except FileNotFoundError:
                return None

    def read_ref(self, name: str) -> dict | None:
        data = self.read_bytes(f"refs/{name}.json")
        if data is None:
            return None
        where = f"{self.url} refs/{name}.json"
        return check_ref(_parse_json(data, where), name, where)

    def write_ref(self, name: str, ref: dict) -> None:
        self.write_bytes(f"refs/{name}.json", json.dumps(ref, indent=2, sort_keys=True).encode())

    def put_file(self, local: Path, relative: str, bar) -> None:
        """Upload one file; on a folder remote through a temporary name and a rename."""
        target = self._path(relative)
        with self._errors(f"upload {relative}"):
            if not self.local:
                self.fs.put_file(str(local), target)  # an object appears whole or not at all
                bar.update(local.stat().st_size)
                return
            os.makedirs(os.path.dirname(target), exist_ok=True)
            temp = f"{os.path.dirname(target)}/.{os.path.basename(target)}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with open(local, "rb") as src, open(temp, "wb") as out:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
                os.replace(temp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)

    def push_artifact(self, folder, fingerprint, files, *, workers, bar):
        base = f"artifacts/{fingerprint}"
        if self.read_bytes(f"{base}/manifest.json") is not None:
            return 0, len(files), 0  # manifest.json is written last: its presence means complete
        todo = [n for n, e in files.items() if self.size(f"{base}/{n}") != e["size"]]
        bar.reset(total=sum(files[n]["size"] for n in todo))
        _run_all(workers, [(self.put_file, folder / n, f"{base}/{n}", bar) for n in todo], bar)
        self.write_bytes(f"{base}/manifest.json", (folder / "manifest.json").read_bytes())
        return len(todo), len(files) - len(todo), sum(files[n]["size"] for n in todo)

    def fetch_artifact(self, resume, fingerprint, *, workers, bar):
        base = f"artifacts/{fingerprint}"
        where = f"{self.url} {base}/manifest.json"
        data = self.read_bytes(f"{base}/manifest.json")
        if data is None:
            raise LoadspecError(f"remote {self.url} has no complete artifact {fingerprint} (its manifest.json is missing; "
                                "the push that wrote it did not finish). Push it again.")
        files = check_manifest(_parse_json(data, where), fingerprint, where)
        todo = {e["sha256"]: (n, e) for n, e in files.items() if not (resume / e["sha256"]).is_file()}
        bar.reset(total=sum(e["size"] for _, e in todo.values()))
        _run_all(workers, [(fetch_file, self, f"{base}/{n}", resume / sha, e, bar) for sha, (n, e) in todo.items()], bar)
        return data, files, len(todo), len(files) - len(todo), sum(e["size"] for _, e in todo.values())


def fetch_file(remote: FsRemote, relative: str, blob: Path, entry: dict, bar) -> None:
    """Download one file into `blob` (named by its sha256) while hashing; keep it only if it matches."""
    with disk_errors(blob.parent, "download into"):
        blob.parent.mkdir(parents=True, exist_ok=True)
    part = blob.with_name(f".{blob.name}.{uuid.uuid4().hex[:8]}.part")
    digest, size = hashlib.sha256(), 0
    try:
        # a full or read-only local disk is said as such, not blamed on the remote
        with remote._errors(f"download {relative}"), disk_errors(blob.parent, "download into"):
            try:
                src = remote.fs.open(remote._path(relative), "rb", block_size=CHUNK)
            except FileNotFoundError:
                raise LoadspecError(f"remote {remote.url} lacks {relative}, which its manifest lists; push the artifact again.") from None
            with src, open(part, "wb") as out:
                while chunk := src.read(CHUNK):
                    size += len(chunk)
                    if size > entry["size"]:
                        break  # longer than the manifest says: refused below without reading the rest
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
        if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
            raise LoadspecError(f"remote {remote.url}: {relative} does not match its manifest ({size} bytes, sha256 "
                                f"{digest.hexdigest()[:16]}…; expected {entry['size']} bytes, {entry['sha256'][:16]}…). "
                                "The remote copy is damaged; push it again from a machine whose 'loadspec verify' passes.")
        os.replace(part, blob)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()


class HubRemote(Remote):
    """A Hugging Face hub repo, hf://[datasets/]org/repo[@revision][/prefix], token from $HF_TOKEN."""

    KINDS = {"datasets": "dataset", "spaces": "space", "models": "model"}

    def __init__(self, url: str):
        self.url = url
        rest = url[len("hf://"):].strip("/")
        parts = rest.split("/")
        self.repo_type = "model"
        if parts and parts[0] in self.KINDS:
            self.repo_type = self.KINDS[parts.pop(0)]
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise UsageError(f"hub remote {url!r} must look like hf://org/repo, hf://datasets/org/repo, "
                             "optionally with @revision and a folder: hf://org/repo@main/artifacts-of-team-a")
        repo, _, revision = parts[1].partition("@")
        self.repo_id = f"{parts[0]}/{repo}"
        self.revision = revision or None
        self.prefix = "".join(f"{p}/" for p in parts[2:] if p)
        if any(p in (".", "..") for p in parts[2:]):
            raise UsageError(f"hub remote {url!r}: the folder may not contain '.' or '..'.")
        self.token = os.environ.get("HF_TOKEN") or None
        self.endpoint = os.environ.get("HF_ENDPOINT") or None

    @contextlib.contextmanager
    def _hub(self, what: str):
        from huggingface_hub import errors

        if os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on"):
            raise LoadspecError(f"cannot {what} on hub remote {self.url}: HF_HUB_OFFLINE=1 is set. Offline nodes pull from a "
                                "folder or s3:// remote; prewarm into one of those from a machine that has network.")
        try:
            yield
        except (LoadspecError, KeyboardInterrupt):
            raise
        except errors.GatedRepoError:
            raise LoadspecError(f"hub remote {self.url}: access to {self.repo_id} is gated; accept it on the hub and set $HF_TOKEN.") from None
        except errors.RepositoryNotFoundError:
            hint = "" if self.token else " If it is private, set $HF_TOKEN to a token that can read it."
            raise LoadspecError(f"hub remote {self.url}: repo {self.repo_id} ({self.repo_type}) was not found.{hint}") from None
        except errors.RevisionNotFoundError:
            raise LoadspecError(f"hub remote {self.url}: repo {self.repo_id} has no revision {self.revision!r}.") from None
        except Exception as exc:  # no network, refused connection, HTTP errors
            detail = str(exc).splitlines()[0].rstrip(". ") if str(exc) else type(exc).__name__
            endpoint = self.endpoint or "https://huggingface.co"
            raise LoadspecError(f"cannot {what} on hub remote {self.url} (hub at {endpoint}): {detail}. "
                                "Check the network and $HF_TOKEN; offline nodes should use a folder or s3:// remote.") from None

    def _download(self, filename: str, local_dir: Path) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.repo_id, filename, repo_type=self.repo_type, revision=self.revision,
                                    local_dir=local_dir, token=self.token, endpoint=self.endpoint))

    def read_ref(self, name: str) -> dict | None:
        from huggingface_hub import errors

        where = f"{self.url} {self.prefix}refs/{name}.json"
        with self._hub(f"read refs/{name}.json"), tempfile.TemporaryDirectory(prefix="loadspec-ref-") as tmp:
            try:
                data = self._download(f"{self.prefix}refs/{name}.json", Path(tmp)).read_bytes()
            except errors.RemoteEntryNotFoundError:
                return None
        return check_ref(_parse_json(data, where), name, where)

    def write_ref(self, name: str, ref: dict) -> None:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token)
        with self._hub(f"write refs/{name}.json"):
            api.upload_file(path_or_fileobj=json.dumps(ref, indent=2, sort_keys=True).encode(),
                            path_in_repo=f"{self.prefix}refs/{name}.json", repo_id=self.repo_id, repo_type=self.repo_type,
                            revision=self.revision, commit_message=f"loadspec: {name} -> {ref['fingerprint']}")

    def push_artifact(self, folder, fingerprint, files, *, workers, bar):
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token)
        base = f"{self.prefix}artifacts/{fingerprint}"
        with self._hub(f"upload artifact {fingerprint}"):
            api.create_repo(self.repo_id, repo_type=self.repo_type, private=True, exist_ok=True)
            if api.file_exists(self.repo_id, f"{base}/manifest.json", repo_type=self.repo_type, revision=self.revision):
                return 0, len(files), 0
            # one hub commit holds every file, so the artifact appears whole; the ref is the next commit
            api.upload_folder(repo_id=self.repo_id, folder_path=folder, path_in_repo=base, repo_type=self.repo_type,
                              revision=self.revision, allow_patterns=[*files, "manifest.json"],
                              commit_message=f"loadspec: artifact {fingerprint}")
        total = sum(e["size"] for e in files.values())
        bar.reset(total=total)
        bar.update(total)
        return len(files), 0, total

    def fetch_artifact(self, resume, fingerprint, *, workers, bar):
        from huggingface_hub import errors, snapshot_download

        base = f"{self.prefix}artifacts/{fingerprint}"
        where = f"{self.url} {base}/manifest.json"
        download = resume / "hub"  # huggingface_hub's own resumable local_dir
        with self._hub(f"download artifact {fingerprint}"):
            try:
                data = self._download(f"{base}/manifest.json", download).read_bytes()
            except errors.RemoteEntryNotFoundError:
                raise LoadspecError(f"hub remote {self.url} has no complete artifact {fingerprint}; push it again.") from None
            files = check_manifest(_parse_json(data, where), fingerprint, where)
            todo = {e["sha256"]: (n, e) for n, e in files.items() if not (resume / e["sha256"]).is_file()}
            if todo:
                snapshot_download(self.repo_id, repo_type=self.repo_type, revision=self.revision, local_dir=download,
                                  allow_patterns=[f"{base}/{n}" for n, _ in todo.values()], token=self.token,
                                  endpoint=self.endpoint, max_workers=workers)
        bar.reset(total=sum(e["size"] for _, e in todo.values()))

        def adopt(sha, name, entry):
            arrived = download / base / name
            if not arrived.is_file():
                raise LoadspecError(f"hub remote {self.url} lacks {base}/{name}, which its manifest lists; push the artifact again.")
            bar.check()
            if arrived.stat().st_size != entry["size"] or sha256_file(arrived) != sha:
                arrived.unlink()
                raise LoadspecError(f"hub remote {self.url}: {base}/{name} does not match its manifest; the remote copy "
                                    "is damaged; push it again from a machine whose 'loadspec verify' passes.")
            os.replace(arrived, resume / sha)
            bar.update(entry["size"])

        _run_all(workers, [(adopt, sha, n, e) for sha, (n, e) in todo.items()], bar)
        return data, files, len(todo), len(files) - len(todo), sum(e["size"] for _, e in todo.values())


# --- the engine --------------------------------------------------------------------------
def _run_all(workers: int, calls: list[tuple], bar: "_Bar") -> None:
    """Run calls in a thread pool; the first failure (or Ctrl-C) stops the others at their next chunk and is raised."""
    if not calls:
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, len(calls))), thread_name_prefix="loadspec-io")
    futures = [pool.submit(fn, *args) for fn, *args in calls]
    try:
        for future in concurrent.futures.as_completed(futures):
            future.result()
    except BaseException:
        bar.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


class _Bar:
    """A thread-safe byte progress bar (tqdm, shown once there is something to copy) that also tells workers to stop."""

    def __init__(self, desc: str, progress: bool):
        self._desc, self._progress, self._bar = desc, progress, None
        self._lock = threading.Lock()
        self.stop = threading.Event()

    def check(self) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt

    def reset(self, total: int) -> None:
        from tqdm.auto import tqdm

        with self._lock:
            if self._bar is not None:
                self._bar.reset(total=total)
            elif total and self._progress:
                self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self._desc)

    def update(self, n: int) -> None:
        self.check()
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def push(name: str, *, remote: str | None = None, cache_dir: str | Path | None = None, workers: int = DEFAULT_WORKERS,
         progress: bool = True) -> Transfer:
    """Upload NAME's artifact (files, then manifest.json, then refs/NAME.json) to the remote.

    Every local file is re-hashed first, so a damaged artifact is never published.
    """
    started = time.perf_counter()
    check_name(name)
    target = open_remote(remote)
    store = Store(cache_dir)
    fingerprint = store.resolve_name(name)
    if not store.has(fingerprint):
        raise LoadspecError(f"{name} points to artifact {fingerprint}, which is not in {store.root}; rebuild it with "
                            "'loadspec build SPEC' before pushing.")
    folder = store.artifact_path(fingerprint)
    files = check_manifest(store.manifest(fingerprint), fingerprint, f"local manifest of {name}")
    bar = _Bar(f"push {name}", progress)
    try:
        _check_local(folder, files, workers, name)
        copied, kept, size = target.push_artifact(folder, fingerprint, files, workers=workers, bar=bar)
    finally:
        bar.close()
    local_ref = store.ref(name) or {}
    target.write_ref(name, {"fingerprint": fingerprint, "target": local_ref.get("target", ""), "name": name,
                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return Transfer(name, fingerprint, target.url, copied, kept, size, time.perf_counter() - started, copied == 0)


def _check_local(folder: Path, files: dict, workers: int, name: str) -> None:
    problems = []

    def check(file, entry):
        path = folder / file
        if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            problems.append(file)

    _run_all(workers, [(check, f, e) for f, e in files.items()], _Bar("hash", False))
    if problems:
        raise LoadspecError(f"{name}: {', '.join(sorted(problems))} no longer match the manifest, so nothing was pushed. "
                            "See 'loadspec verify'; rebuild with 'loadspec build SPEC --force'.")


def pull(name: str, *, remote: str | None = None, cache_dir: str | Path | None = None, workers: int = DEFAULT_WORKERS,
         progress: bool = True) -> Transfer:
    """Fetch NAME's artifact from the remote into the cache, verifying every file; resumes an interrupted pull.

    Concurrent pulls of one artifact into one cache wait for each other (the store's build
    lock); without locks they may both download, and the atomic rename keeps one copy.
    """
    started = time.perf_counter()
    check_name(name)
    source = open_remote(remote)
    store = Store(cache_dir)
    ref = source.read_ref(name)
    if ref is None:
        raise UsageError(f"remote {source.url} has no artifact named {name!r}. Push it from the machine that built it: "
                         f"'loadspec push {name} --remote {source.url}' (or 'loadspec prewarm SPEC --remote ...').")
    fingerprint = ref["fingerprint"]
    copied = kept = size = 0
    cached = store.has(fingerprint)
    if not cached:
        with store.build_lock(fingerprint):
            cached = store.has(fingerprint)
            if not cached:
                copied, kept, size = _fetch(store, source, fingerprint, workers, progress, name)
    store.set_ref(name, fingerprint, spec="", target=ref.get("target", ""))
    return Transfer(name, fingerprint, source.url, copied, kept, size, time.perf_counter() - started, cached)


def _fetch(store: Store, source: Remote, fingerprint: str, workers: int, progress: bool, name: str) -> tuple[int, int, int]:
    resume = store.tmp / f"{fingerprint}{PULL_SUFFIX}"
    with disk_errors(store.root):
        resume.mkdir(exist_ok=True)
    if locks_enabled():  # we hold the lock: any partial file is a leftover of a killed pull
        for stale in resume.glob(".*.part"):
            stale.unlink(missing_ok=True)
    bar = _Bar(f"pull {name}", progress)
    try:
        data, files, copied, kept, size = source.fetch_artifact(resume, fingerprint, workers=workers, bar=bar)
        with store.staging(fingerprint) as staged:
            for file, entry in files.items():
                _link(resume / entry["sha256"], staged / file)
            (staged / "manifest.json").write_bytes(data)
            store.commit(staged, fingerprint)
    except Exception:
        if store.has(fingerprint):  # without locks, a concurrent pull finished first (and took our folder away)
            shutil.rmtree(resume, ignore_errors=True)
            return 0, 0, 0
        raise
    finally:
        bar.close()
    shutil.rmtree(resume, ignore_errors=True)
    return copied, kept, size


def _link(blob: Path, dest: Path) -> None:
    try:
        os.link(blob, dest)
    except OSError:
        shutil.copyfile(blob, dest)
