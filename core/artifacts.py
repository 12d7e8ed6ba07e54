"""Model artifacts fetched by URI into a node-local, content-addressed cache.

:class:`ArtifactStore` turns a model URI (``file://``, ``http(s)://``, ``s3://``;
through fsspec) into a local path. Downloads stream in chunks into a temporary
file inside the cache, are hashed while streaming, verified against the
expected SHA-256 when one is given, and renamed atomically to
``blobs/<sha256>``; an index maps each URI to its blob. Concurrent fetches of
one artifact, in threads or processes, at worst download it twice: every
writer renames a complete, verified file onto the same name.

Cache hits need no network: a fetch with a ``sha256`` that is already cached
returns at once, and so does a fetch without one for a URI fetched before (so
pin a ``sha256`` where the object behind a URI may change).

``file://`` artifacts without a ``sha256`` are used in place, not copied: the
file is already local, and there is nothing to verify. With a ``sha256`` they
are copied into the cache while hashing, so that what was verified is what gets
loaded even if the original changes later.

s3 endpoints and credentials come from ``storage_options["s3"]`` (any
``s3fs.S3FileSystem`` argument) or from the usual environment variables
(``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).

``fetch`` is synchronous and may block on the network: async callers run it in
a thread (``asyncio.to_thread``).

A process that keeps copies here for itself only (a node's shard copies) records
them in a :class:`CopyLedger`, locked while it lives, so that the copies can be
deleted once it is gone, however it went (:meth:`ArtifactStore.sweep_ledgers`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import fsspec

from gpufaas.core.uripolicy import UriNotAllowed, UriPolicy

__all__ = ["ArtifactError", "ArtifactStore", "CopyLedger", "write_atomically"]

_CHUNK_BYTES = 1 << 20
_S3_BLOCK_BYTES = 8 << 20
_STALE_TMP_SECONDS = 24 * 3600
_LEDGERS = "ledgers"  # CopyLedger folders and their lock files
_LOCK = ".lock"
_SWEEPING = "sweeping"  # a sweep holds it exclusively; a record and its fetch, shared
_CLAIMED = ".discarded"  # a blob claim() took out of the cache, for its caller to delete
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ArtifactError(Exception):
    """An artifact that cannot be fetched; the message names the URI and what went wrong."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(f"artifact {uri}: {reason}")

    def __reduce__(self) -> tuple[type[ArtifactError], tuple[str, str]]:
        return type(self), (self.uri, self.reason)


class ArtifactStore:
    """A node-local cache of model artifacts under ``root``."""

    def __init__(
        self,
        root: Path,
        *,
        allowed_schemes: Sequence[str] = ("file", "http", "https", "s3"),
        storage_options: Mapping[str, Mapping[str, Any]] | None = None,
        max_bytes: int | None = None,
        uri_policy: UriPolicy | None = None,
    ) -> None:
        self.root = Path(root)
        self.uri_policy = uri_policy or UriPolicy()
        self.allowed_schemes = tuple(s.lower() for s in allowed_schemes)
        self.storage_options = {k.lower(): dict(v) for k, v in (storage_options or {}).items()}
        self.max_bytes = max_bytes
        self._blobs = self.root / "blobs"
        self._index = self.root / "uris"
        self._tmp = self.root / "tmp"
        for folder in (self._blobs, self._index, self._tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp_files()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

    def fetch(self, uri: str, *, sha256: str | None = None) -> Path:
        """A local path holding the artifact at ``uri``, verified when ``sha256`` is given."""
        scheme = urllib.parse.urlsplit(uri).scheme.lower()
        if scheme not in self.allowed_schemes:
            allowed = ", ".join(self.allowed_schemes) or "none"
            raise ArtifactError(uri, f"scheme {scheme or '(none)'!r} is not allowed ({allowed})")
        try:
            self.uri_policy.check(uri, s3_endpoint=self._s3_endpoint() if scheme == "s3" else None)
        except UriNotAllowed as e:
            raise ArtifactError(uri, f"not allowed: {e}") from None
        expected = sha256.lower() if sha256 is not None else None
        if expected is not None and not _SHA256.fullmatch(expected):
            raise ArtifactError(uri, f"sha256 {sha256!r} is not 64 hex digits")

        with self._lock(expected or uri):
            if expected is not None and self._blob(expected).is_file():
                self._remember(uri, expected)
                return self._blob(expected)
            if scheme == "file":
                local = _local_path(uri)
                if expected is None:
                    return self._in_place(uri, local)
                with _opened_local(uri, local) as source:
                    return self._ingest(uri, source, expected=expected)
            if expected is None and (known := self._recall(uri)) is not None:
                return known
            with self._opened_remote(uri, scheme) as source:
                return self._ingest(uri, source, expected=expected)

    def discard(self, uri: str, *, sha256: str | None = None, blob: bool = True) -> bool:
        """Delete ``uri``'s index record and (``blob``) this cache's copy of it, the blob
        :meth:`fetch` with the same arguments returns; never a ``file://`` artifact used in
        place. True where a blob was deleted; False where there was none, or a fetch under the
        same key is under way in another thread (nothing is deleted). Other URIs recorded for
        the same blob are fetched again on their next use. The deletion blocks for as long as
        the file system takes to free the blob: callers on an event loop use :meth:`claim`."""
        claimed = self.claim(uri, sha256=sha256, blob=blob)
        if claimed is None:
            return False
        claimed.unlink(missing_ok=True)
        return True

    def claim(self, uri: str, *, sha256: str | None = None, blob: bool = True) -> Path | None:
        """:meth:`discard`'s first half, which never waits for the blob's bytes to be freed:
        the index record goes and the blob is renamed out of the cache, so no fetch finds it
        from here on. The caller deletes the returned file (in a thread: unlinking a large
        file can take a while); if the process dies first, the next store opened on this root
        deletes it. None where :meth:`discard` would return False."""
        expected = sha256.lower() if sha256 is not None else None
        if expected is not None and not _SHA256.fullmatch(expected):
            return None
        lock = self._lock(expected or uri)
        if not lock.acquire(blocking=False):
            return None
        try:
            copy = self._blob(expected) if expected is not None else self._recall(uri)
            self._index_file(uri).unlink(missing_ok=True)
            if not blob or copy is None:
                return None
            claimed = self._tmp / f"{copy.name}.{uuid.uuid4().hex}{_CLAIMED}"
            try:
                os.rename(copy, claimed)  # one directory entry moved: no bytes are freed
            except FileNotFoundError:  # not there, or another process deleted it first
                return None
            return claimed
        finally:
            lock.release()

    def ledger(self) -> CopyLedger:
        """A new ledger of the copies this process keeps here for itself (its lock held until
        :meth:`CopyLedger.close`)."""
        return CopyLedger(self.root / _LEDGERS)

    def sweep_ledgers(self) -> list[str]:
        """Delete the copies that processes now gone recorded in their ledgers, and those
        ledgers; returns the URIs whose records were deleted. A copy stays while a live
        process's ledger records its URI; a blob stays while any other URI's record (a
        model's, another process's shard) points at it. Synchronous, and it waits for other
        processes' record-and-fetch steps under way (:meth:`CopyLedger.recording`): run it
        at start-up, before this process fetches anything."""
        folder = self.root / _LEDGERS
        folder.mkdir(parents=True, exist_ok=True)
        with _flocked(folder / _SWEEPING, fcntl.LOCK_EX):  # no record-and-fetch under way
            live, dead = _ledgers(folder)
            try:
                swept = self._sweep(live, [_records(ledger) for _, ledger in dead])
                for lock, ledger in dead:  # kept where the sweep failed: the next one retries
                    shutil.rmtree(ledger, ignore_errors=True)
                    lock.path.unlink(missing_ok=True)
                return swept
            finally:
                for lock, _ in dead:
                    lock.release()

    def _sweep(self, live: list[_Recorded], dead: list[list[_Recorded]]) -> list[str]:
        uris = {r.uri for r in live}
        gone = {r.uri: r for records in dead for r in records if r.uri not in uris}
        kept = {r.sha256 for r in live} | {
            record.get("sha256")
            for path in self._index.glob("*.json")
            if isinstance(record := _read_json(path), dict) and record.get("uri") not in gone
        }
        for record in gone.values():
            digest = record.sha256 or self._recorded_digest(record.uri)
            self.discard(record.uri, sha256=digest, blob=digest not in kept)
        return sorted(gone)

    # --- internals ---

    def _blob(self, digest: str) -> Path:
        return self._blobs / digest

    def _in_place(self, uri: str, local: Path) -> Path:
        if not local.is_file():
            raise ArtifactError(uri, f"not found ({local} is not a file)")
        size = local.stat().st_size
        if self.max_bytes is not None and size > self.max_bytes:
            raise ArtifactError(uri, _too_big(self.max_bytes, size))
        return local

    def _ingest(self, uri: str, source: IO[bytes], *, expected: str | None) -> Path:
        """Stream ``source`` into the cache, hashing it, and return its blob."""
        declared = getattr(source, "size", None)
        if self.max_bytes is not None and isinstance(declared, int) and declared > self.max_bytes:
            raise ArtifactError(uri, _too_big(self.max_bytes, declared))
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="fetch-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := _read(uri, source, _CHUNK_BYTES):
                    size += len(chunk)
                    if self.max_bytes is not None and size > self.max_bytes:
                        raise ArtifactError(uri, _too_big(self.max_bytes))
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            actual = digest.hexdigest()
            if expected is not None and actual != expected:
                raise ArtifactError(uri, f"sha256 mismatch: expected {expected}, got {actual}")
            tmp.chmod(0o444)
            blob = self._blob(actual)
            os.replace(tmp, blob)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._remember(uri, actual)
        return blob

    def _s3_endpoint(self) -> str | None:
        options = self.storage_options.get("s3", {})
        endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get(
            "endpoint_url"
        )
        return str(endpoint) if endpoint else _env_s3_endpoint()

    @contextlib.contextmanager
    def _opened_remote(self, uri: str, scheme: str) -> Iterator[IO[bytes]]:
        options = dict(self.storage_options.get(scheme, {}))
        open_options: dict[str, Any] = {}
        if scheme in ("http", "https"):
            open_options["block_size"] = 0  # stream the body; no range requests
        elif scheme == "s3":
            open_options["block_size"] = _S3_BLOCK_BYTES
            endpoint = _env_s3_endpoint()
            client_kwargs = options.get("client_kwargs") or {}
            if endpoint and "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
                options["endpoint_url"] = endpoint
        try:
            fs, path = fsspec.core.url_to_fs(uri, **options)
            source = fs.open(path, "rb", **open_options)
        except Exception as e:
            raise _fetch_error(uri, e) from None
        try:
            yield source
        finally:
            with contextlib.suppress(Exception):
                source.close()

    def _remember(self, uri: str, digest: str) -> None:
        record = {"uri": uri, "sha256": digest, "size": self._blob(digest).stat().st_size}
        write_atomically(self._index_file(uri), json.dumps(record).encode())

    def _recall(self, uri: str) -> Path | None:
        try:
            record = json.loads(self._index_file(uri).read_text())
        except (OSError, ValueError):
            return None
        digest = record.get("sha256") if isinstance(record, dict) else None
        if record.get("uri") != uri or not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            return None
        blob = self._blob(digest)
        return blob if blob.is_file() else None

    def _recorded_digest(self, uri: str) -> str | None:
        record = _read_json(self._index_file(uri))
        digest = record.get("sha256") if isinstance(record, dict) else None
        return digest if isinstance(digest, str) and _SHA256.fullmatch(digest) else None

    def _index_file(self, uri: str) -> Path:
        return self._index / f"{hashlib.sha256(uri.encode()).hexdigest()}.json"

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _remove_stale_temp_files(self) -> None:
        # Left by processes killed mid-download; fresh ones may belong to a live fetch.
        cutoff = time.time() - _STALE_TMP_SECONDS
        for leftover in self._tmp.glob("*.part"):
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
        # Claimed blobs whose claimer died before deleting them: nothing can use them any
        # more (at worst a live claimer's own deletion then finds nothing to delete).
        for leftover in self._tmp.glob(f"*{_CLAIMED}"):
            with contextlib.suppress(OSError):
                leftover.unlink()


@dataclasses.dataclass(frozen=True)
class _Recorded:
    uri: str
    sha256: str | None


class CopyLedger:
    """The copies one process keeps in an artifact store for itself (a node's shard copies),
    recorded on disk, so that they can be found and deleted once that process is gone, however
    it went (a crash, a restart): :meth:`ArtifactStore.sweep_ledgers`.

    The ledger is a folder of records under ``<store>/ledgers/<id>/`` beside a lock file that
    this process holds (``flock``) while it lives; the kernel releases the lock when the
    process dies, and that is what marks the ledger's copies as nobody's. Several processes
    may share one store (``gpufaas up --nodes N``): each sweeps only dead ledgers. Record a
    copy before fetching it, and forget it once it is deleted or another owner took it."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        # Locked under a temporary name, then renamed into place: a sweeper never sees this
        # ledger's lock file unheld.
        lock = _Lock.taken(folder / f".{name}{_LOCK}", create=True)
        assert lock is not None  # a new file nobody else can have opened
        os.rename(lock.path, folder / f"{name}{_LOCK}")
        self._lock: _Lock | None = _Lock(folder / f"{name}{_LOCK}", lock.fd)
        self.folder = folder / name
        self.folder.mkdir()

    @contextlib.contextmanager
    def recording(self, uri: str, *, sha256: str | None) -> Iterator[None]:
        """Record ``uri``'s copy, then fetch it inside: no sweep runs from the record to the
        end of the block, so a sweep either runs first (and the fetch finds no blob it
        deletes) or sees this record (and keeps the blob)."""
        with _flocked(self.folder.parent / _SWEEPING, fcntl.LOCK_SH):
            self.record(uri, sha256=sha256)
            yield

    def record(self, uri: str, *, sha256: str | None) -> None:
        """Note that this process keeps (or is about to fetch) ``uri``'s copy."""
        body = json.dumps({"uri": uri, "sha256": sha256.lower() if sha256 else None})
        write_atomically(self._file(uri, sha256), body.encode())

    def forget(self, uri: str, *, sha256: str | None) -> None:
        self._file(uri, sha256).unlink(missing_ok=True)

    def close(self) -> None:
        """Release the lock; the records stay, for the next sweep (the process is going)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _file(self, uri: str, sha256: str | None) -> Path:
        key = f"{uri}\n{sha256.lower() if sha256 else ''}"
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


@dataclasses.dataclass(frozen=True)
class _Lock:
    """An open lock file and its exclusive ``flock``."""

    path: Path
    fd: int

    @staticmethod
    def taken(path: Path, *, create: bool = False) -> _Lock | None:
        """The lock, if nobody holds it (or it no longer exists: its owner is gone too)."""
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            return _Lock(path, -1)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return _Lock(path, fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # and with it the flock


@contextlib.contextmanager
def _flocked(path: Path, operation: int) -> Iterator[None]:
    """``flock`` on ``path`` (created if missing) for the block, on a descriptor of its own."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)


def _ledgers(folder: Path) -> tuple[list[_Recorded], list[tuple[_Lock, Path]]]:
    """The records of the live ledgers in ``folder``, and the dead ledgers, their locks
    taken (a lock file with no folder is one whose process died before making it)."""
    live: list[_Recorded] = []
    dead: list[tuple[_Lock, Path]] = []
    for ledger in sorted(p for p in folder.iterdir() if p.is_dir()):
        lock = _Lock.taken(ledger.with_suffix(_LOCK))
        if lock is None:
            live.extend(_records(ledger))
        else:
            dead.append((lock, ledger))
    for path in folder.glob(f"*{_LOCK}"):
        if not path.with_suffix("").is_dir() and (lock := _Lock.taken(path)) is not None:
            dead.append((lock, path.with_suffix("")))
    return live, dead


def _records(ledger: Path) -> list[_Recorded]:
    found = []
    for path in ledger.glob("*.json"):
        record = _read_json(path)
        if not isinstance(record, dict) or not isinstance(uri := record.get("uri"), str):
            continue
        digest = record.get("sha256")
        found.append(_Recorded(uri, digest if isinstance(digest, str) else None))
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write a file so that readers see either nothing or all of it (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _env_s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _local_path(uri: str) -> Path:
    parts = urllib.parse.urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ArtifactError(uri, "file URIs must be absolute: file:///path/to/model")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise ArtifactError(uri, "file URIs must be absolute: file:///path/to/model")
    return Path(path)


@contextlib.contextmanager
def _opened_local(uri: str, path: Path) -> Iterator[IO[bytes]]:
    if not path.is_file():
        raise ArtifactError(uri, f"not found ({path} is not a file)")
    try:
        source = path.open("rb")
    except OSError as e:
        raise _fetch_error(uri, e) from None
    with source:
        yield source


def _read(uri: str, source: IO[bytes], size: int) -> bytes:
    try:
        return source.read(size)
    except Exception as e:
        raise _fetch_error(uri, e) from None


def _fetch_error(uri: str, error: BaseException) -> ArtifactError:
    if isinstance(error, ArtifactError):
        return error
    cause = error.__cause__
    if isinstance(error, FileNotFoundError) and cause and not isinstance(cause, FileNotFoundError):
        # fsspec's http reports any failure to reach the server as FileNotFoundError.
        return _fetch_error(uri, cause)
    if isinstance(error, FileNotFoundError):
        return ArtifactError(uri, "not found")
    if isinstance(error, PermissionError):
        return ArtifactError(uri, "access denied (check the credentials)")
    if isinstance(error, IsADirectoryError):
        return ArtifactError(uri, "is a directory, not a file")
    message = (str(error).strip().splitlines() or [""])[0][:300]
    return ArtifactError(uri, f"could not fetch ({type(error).__name__}: {message})")


def _too_big(limit: int, size: int | None = None) -> str:
    actual = f" ({size} bytes)" if size is not None else ""
    return f"larger than the size limit of {limit} bytes{actual}"
