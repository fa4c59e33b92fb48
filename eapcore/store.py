"""Content-addressed on-disk store: entries written atomically and durably, sha256 checksums
verified on read, a lock per entry, an events log and a memo of file hashes. Imports nothing of
the subpackages: the engine materialises GGUF files and adapters here (`models/<key>`), and
`eapcore.runs.cache.Cache` is this store plus what only runs know (run folders, bundles, the
`cache` command).

Layout under the root (the cache root, `eapcore.files.cache_root()`):

    <kind>/<key>/manifest.json   one entry: {"kind", "key", "created", "meta", "files": {relpath:
    <kind>/<key>/<files>          {"sha256", "size"}}}; keys are content hashes
    work/<kind>-<key>/            scratch of a computation in progress (kept across crashes, to resume)
    locks/<name>.lock             fcntl locks (`filelock`), released by the OS if a process dies
    log.jsonl                     one line per computed or corrupted entry (kind, key, pid, time)
    hashes.jsonl                  the sha256 memo of files outside the entries (model weights, run
                                  files): one line per file version (path, size, mtime_ns, inode)

An entry is written in a temporary folder next to its final place, its files and folder fsynced,
and renamed into it in one `os.replace` (then the parent folder is fsynced), under the entry's own
lock, so a reader sees a whole entry or none, two processes writing the same entry never race,
and a crash keeps what was put. `get` checks every file's size and sha256: a missing, truncated or
altered entry is reported (logger warning and `Store.problems`), removed, and treated as absent,
so the caller recomputes it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

from filelock import FileLock, Timeout

from eapcore.files import cache_root, fsync_path, fsync_tree, read_json, temp_name, write_json_atomic

log = logging.getLogger("eapcore.cache")

MANIFEST = "manifest.json"
HASHES = "hashes.jsonl"
SCRATCH = ("work", "locks")  # top-level folders that hold no entries
_HASHES: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256, this process's copy of the memo


class CacheError(RuntimeError):
    """A cache or bundle problem; the message says what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------
# Files: checksums
# ---------------------------------------------------------------------------------------------

def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _version(path: Path) -> tuple[str, int, int, int]:
    """The hash memo's key of a (resolved) file: (path, size, mtime_ns, inode)."""
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns, st.st_ino


def _fingerprinted(path: Path) -> list[Path]:
    """The files a fingerprint covers: the file itself, or those directly in a folder (no dot files)."""
    return [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def checksum_tree(folder: Path, skip: Iterable[str] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """{posix relpath: {"sha256", "size"}} of every regular file under `folder` except `skip`."""
    skip = set(skip)
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(folder).as_posix()
        if rel not in skip:
            out[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return out


def verify_tree(folder: Path, files: dict[str, dict[str, Any]],
                sha: Callable[[Path], str] = sha256_file) -> list[str]:
    """Problems ("name: why") of the files listed in a manifest; [] when all match."""
    problems = []
    for rel, want in files.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, expected {want['size']} (truncated?)")
        elif sha(path) != want["sha256"]:
            problems.append(f"{rel}: sha256 mismatch (altered or corrupted)")
    return problems


def check_name(name: str, what: str) -> None:
    """CacheError unless `name` is safe as one folder or file name of the store."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise CacheError(f"invalid {what} {name!r}: use letters, digits, '-', '_' and '.' only")


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """A verified entry. `path` is its folder; `manifest["meta"]` what its writer recorded."""

    kind: str
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.get("meta", {})

    def file(self, name: str) -> Path:
        return self.path / name


@dataclass
class Store:
    """The entries under `root` (default: the cache root; module docstring)."""

    root: Path = field(default_factory=cache_root)
    problems: list[str] = field(default_factory=list)  # corrupted entries seen by this object
    RESERVED: ClassVar[tuple[str, ...]] = SCRATCH  # top-level folder names that are no entry kind

    def __post_init__(self):
        self.root = Path(self.root).expanduser()

    # ---- places ----------------------------------------------------------------------------
    def entry_path(self, kind: str, key: str) -> Path:
        check_name(kind, "kind")
        check_name(key, "key")
        if kind in self.RESERVED:
            raise CacheError(f"{kind!r} is a reserved folder of the cache, not an entry kind")
        return self.root / kind / key

    def work_dir(self, kind: str, key: str) -> Path:
        """Persistent scratch for a computation in progress (remove it with `drop_work` when done)."""
        path = self.root / "work" / f"{kind}-{key}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def drop_work(self, kind: str, key: str) -> None:
        shutil.rmtree(self.root / "work" / f"{kind}-{key}", ignore_errors=True)

    def lock(self, name: str, timeout: float = -1) -> FileLock:
        """An inter-process lock (`with store.lock(name): ...`); blocks until free by default."""
        check_name(name, "lock name")
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / "locks" / f"{name}.lock"), timeout=timeout)

    def is_locked(self, name: str) -> bool:
        """Whether another process holds lock `name` right now (never, in a store this process
        cannot write: no worker of it runs there)."""
        try:
            lock = self.lock(name, timeout=0)
            lock.acquire()
        except Timeout:
            return True
        except OSError:
            return False
        lock.release()
        return False

    # ---- entries -----------------------------------------------------------------------------
    def get(self, kind: str, key: str) -> Entry | None:
        """The verified entry, or None if absent. A damaged entry is reported, removed, None."""
        path = self.entry_path(kind, key)
        if not path.exists():
            return None
        try:
            manifest = read_json(path / MANIFEST)
            problems = verify_tree(path, manifest["files"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            problems = [f"{MANIFEST}: unreadable ({type(err).__name__}: {err})"]
        if not problems:
            return Entry(kind, key, path, manifest)
        self.report(f"cache entry {kind}/{key} is damaged and will be recomputed: {'; '.join(problems)}")
        self.log_event("corrupted", kind, key, problems=problems)
        self.discard(path)
        return None

    def put(self, kind: str, key: str, write: Callable[[Path], Any], meta: dict | None = None) -> Entry:
        """Create entry kind/key: `write(folder)` fills a fresh temporary folder; its files are
        checksummed and fsynced, and the folder renamed into place under the entry's lock. If a
        valid entry appeared meanwhile, it is kept and the new files dropped."""
        with self.lock(f"{kind}-{key}"):
            return self._put_locked(kind, key, write, meta)

    def _put_locked(self, kind: str, key: str, write: Callable[[Path], Any], meta: dict | None) -> Entry:
        final = self.entry_path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(final)
        tmp.mkdir()
        started = time.time()
        try:
            write(tmp)
            manifest = {"kind": kind, "key": key, "created": time.time(), "meta": meta or {},
                        "files": checksum_tree(tmp)}
            write_json_atomic(tmp / MANIFEST, manifest)
            existing = self.get(kind, key) if final.exists() else None  # damaged: reported, removed
            if existing is None:
                fsync_tree(tmp)
                os.replace(tmp, final)
                fsync_path(final.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.log_event("computed", kind, key, seconds=round(time.time() - started, 3), stored=existing is None)
        return existing or Entry(kind, key, final, manifest)

    def get_or_compute(self, kind: str, key: str, write: Callable[[Path], Any],
                       meta: dict | None = None) -> tuple[Entry, bool]:
        """(entry, computed?). Under the entry's lock, so concurrent callers compute it once."""
        entry = self.get(kind, key)
        if entry is not None:
            return entry, False
        with self.lock(f"{kind}-{key}"):
            entry = self.get(kind, key)
            if entry is not None:
                return entry, False
            return self._put_locked(kind, key, write, meta), True

    def discard(self, path: Path) -> None:
        """Remove an entry or other folder (renamed away first, so no reader sees it half-gone)."""
        gone = temp_name(path)
        try:
            os.replace(path, gone)
        except FileNotFoundError:  # already gone (another process removed it)
            return
        shutil.rmtree(gone, ignore_errors=True)

    def report(self, message: str) -> None:
        self.problems.append(message)
        log.warning(message)

    def log_event(self, event: str, kind: str, key: str, **extra: Any) -> None:
        """Append one line to log.jsonl."""
        self._append(self.root / "log.jsonl", {"time": time.time(), "event": event, "kind": kind, "key": key,
                                               "pid": os.getpid(), **extra})

    def _append(self, path: Path, row: dict[str, Any]) -> None:
        """Append `row` as one JSON line (O_APPEND: lines of concurrent writers do not interleave)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row, default=str) + "\n").encode())
        finally:
            os.close(fd)

    def events(self) -> list[dict[str, Any]]:
        path = self.root / "log.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # ---- the hash memo ---------------------------------------------------------------------------
    def file_sha256(self, path: str | os.PathLike) -> str:
        """sha256 of a file's whole content, computed once per file version: memoised by (path,
        size, mtime_ns, inode) in this process and in hashes.jsonl, which other processes share
        (best effort: in a read-only cache the memo stays in memory)."""
        path = Path(path).resolve()
        version = _version(path)
        if version not in _HASHES:
            self._read_hashes()
        if version not in _HASHES:
            digest = sha256_file(path)
            _HASHES[version] = digest
            try:
                self._append(self.root / HASHES, {"path": version[0], "size": version[1], "mtime_ns": version[2],
                                                  "inode": version[3], "sha256": digest})
            except OSError:
                pass  # read-only or full: the memo stays in this process
        return _HASHES[version]

    def fingerprint(self, path: str | os.PathLike) -> dict[str, str]:
        """{name: sha256} of a file, or of the files directly in a folder (a checkpoint; dot files
        left out): whole contents, each hashed once per file version (`file_sha256`)."""
        return {f.name: self.file_sha256(f) for f in _fingerprinted(Path(path))}

    def unhashed_bytes(self, path: str | os.PathLike) -> int:
        """Bytes that `fingerprint(path)` would read now: the sizes of its files whose version the
        memo lacks (0 for a path that does not exist)."""
        if not Path(path).exists():
            return 0
        self._read_hashes()
        versions = [_version(f.resolve()) for f in _fingerprinted(Path(path))]
        return sum(v[1] for v in versions if v not in _HASHES)

    def _read_hashes(self) -> None:
        try:
            lines = (self.root / HASHES).read_text().splitlines()
        except OSError:
            return
        for line in lines:
            try:
                row = json.loads(line)
                _HASHES[(row["path"], row["size"], row["mtime_ns"], row["inode"])] = row["sha256"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash

    # ---- listing and removal ------------------------------------------------------------------
    def list_entries(self) -> list[dict[str, Any]]:
        """Every entry (and run) folder: kind, key, bytes, created, and `describe(folder)`."""
        rows = []
        if not self.root.is_dir():
            return rows
        for kind_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if kind_dir.name in SCRATCH:
                continue
            for path in sorted(p for p in kind_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                rows.append({"kind": kind_dir.name, "key": path.name, "bytes": _tree_size(path),
                             "created": path.stat().st_mtime, "about": self.describe(path)})
        return rows

    def describe(self, path: Path) -> str:
        """A one-line summary of an entry folder: the plain values of its manifest's meta."""
        try:
            meta = read_json(path / MANIFEST).get("meta", {})
            return ", ".join(f"{k}={v}" for k, v in meta.items() if isinstance(v, (str, int, float)))[:120]
        except (OSError, ValueError, KeyError, TypeError):
            return "(unreadable)"

    def size(self) -> dict[str, int]:
        """Bytes per top-level folder of the cache (entries of each kind, runs, work)."""
        if not self.root.is_dir():
            return {}
        return {p.name: _tree_size(p) for p in sorted(self.root.iterdir()) if p.is_dir()}

    def find(self, key: str) -> list[Path]:
        """Folders (entries or runs) whose key is `key` or starts with it (at least 4 characters)."""
        if len(key) < 4:
            raise CacheError(f"key {key!r} is too short: give at least 4 characters of it")
        check_name(key, "key")
        if not self.root.is_dir():
            return []
        found = []
        for kind_dir in (p for p in self.root.iterdir() if p.is_dir() and p.name != "locks"):
            for path in (p for p in kind_dir.iterdir() if p.is_dir()):
                name = path.name.split("-", 1)[-1] if kind_dir.name == "work" else path.name
                if name.startswith(key):
                    found.append(path)
        return found

    def remove(self, key: str) -> list[str]:
        """Remove every entry (or run) whose key starts with `key`; returns "kind/key" of each."""
        removed = []
        for path in self.find(key):
            self.discard(path)
            removed.append(f"{path.parent.name}/{path.name}")
        return removed

    def clear(self) -> int:
        """Remove everything the cache holds; returns bytes freed."""
        freed = sum(self.size().values())
        for path in list(self.root.iterdir()) if self.root.is_dir() else []:
            if path.name == ".gitkeep":
                continue
            if path.is_dir():
                self.discard(path)
            else:
                path.unlink(missing_ok=True)
        return freed


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
