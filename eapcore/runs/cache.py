"""Content-addressed on-disk cache: atomic writes, sha256 checksums verified on read, file locks.

Layout under the cache root (`cache/` in the project, or `$EAP_CACHE_DIR`):

    <kind>/<key>/manifest.json   one entry: {"kind", "key", "created", "meta", "files": {relpath:
    <kind>/<key>/<files>          {"sha256", "size"}}}; kinds are the stages ("generations",
                                  "grades", "selections", "scores"), keys are content hashes
    runs/<key>/                   finished runs (DESIGN.md), with a `manifest.json` of checksums and
                                  the entries the run was assembled from, written when it is done
    work/<kind>-<key>/            scratch of a stage in progress (kept across crashes, to resume)
    locks/<name>.lock             fcntl locks (`filelock`), released by the OS if a process dies
    log.jsonl                     one line per computed or corrupted entry (kind, key, pid, time)
    hashes.jsonl                  the sha256 memo of files outside the entries (model weights, run
                                  files): one line per file version (path, size, mtime_ns, inode)

An entry is written in a temporary folder next to its final place, its files and folder fsynced,
and renamed into it in one `os.replace` (then the parent folder is fsynced), under the entry's own
lock, so a reader sees a whole entry or none, two processes writing the same entry never race,
and a crash keeps what was put. `get` checks every file's size and sha256: a missing, truncated or
altered entry is reported (logger warning and `Cache.problems`), removed, and treated as absent,
so the caller recomputes it.

Bundles (`export_bundle` / `import_bundle`) are zip files of run folders plus the entries they
reference, with a `bundle.json` of checksums; import refuses unsafe member names, and runs of
another scoring version (their scores are stale) with the entries only they use.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from filelock import FileLock, Timeout

from eapcore.files import cache_root, cache_root_problem, fsync_path, fsync_tree, read_json, replace_dir, temp_name, write_json_atomic
from eapcore.specs import SCORING_VERSION

log = logging.getLogger("eapcore.cache")

KINDS: tuple[str, ...] = ("generations", "grades", "selections", "scores")
RESERVED = ("runs", "work", "locks")
MANIFEST = "manifest.json"
BUNDLE_MANIFEST = "bundle.json"
BUNDLE_FORMAT = "eapcore-bundle/1"
HASHES = "hashes.jsonl"
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


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """A verified cache entry. `path` is its folder; `manifest["meta"]` what its writer recorded."""

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
class Cache:
    root: Path = field(default_factory=cache_root)
    problems: list[str] = field(default_factory=list)  # corrupted entries seen by this object

    def __post_init__(self):
        self.root = Path(self.root).expanduser()

    # ---- places ----------------------------------------------------------------------------
    def entry_path(self, kind: str, key: str) -> Path:
        _check_name(kind, "kind")
        _check_name(key, "key")
        if kind in RESERVED:
            raise CacheError(f"{kind!r} is a reserved folder of the cache, not an entry kind")
        return self.root / kind / key

    def run_dir(self, key: str) -> Path:
        _check_name(key, "run key")
        return self.root / "runs" / key

    def work_dir(self, kind: str, key: str) -> Path:
        """Persistent scratch for a stage in progress (remove it with `drop_work` when done)."""
        path = self.root / "work" / f"{kind}-{key}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def drop_work(self, kind: str, key: str) -> None:
        shutil.rmtree(self.root / "work" / f"{kind}-{key}", ignore_errors=True)

    def lock(self, name: str, timeout: float = -1) -> FileLock:
        """An inter-process lock (`with cache.lock(name): ...`); blocks until free by default."""
        _check_name(name, "lock name")
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / "locks" / f"{name}.lock"), timeout=timeout)

    def is_locked(self, name: str) -> bool:
        """Whether another process holds lock `name` right now (never, in a cache this process
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
        """Remove an entry or run folder (renamed away first, so no reader sees it half-gone)."""
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
        """Append one JSON line to log.jsonl (O_APPEND: concurrent lines do not interleave)."""
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": time.time(), "event": event, "kind": kind, "key": key,
                           "pid": os.getpid(), **extra}, default=str) + "\n"
        fd = os.open(self.root / "log.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def events(self) -> list[dict[str, Any]]:
        path = self.root / "log.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # ---- runs ------------------------------------------------------------------------------
    def seal_run(self, key: str, entries: Iterable[tuple[str, str]], skip: Iterable[str] = ()) -> dict:
        """Write runs/<key>/manifest.json: checksums of its files (except `skip`, e.g. the
        mutable status.json) and the (kind, key) entries it was assembled from."""
        folder = self.run_dir(key)
        manifest = {"key": key, "sealed": time.time(), "entries": sorted({tuple(e) for e in entries}),
                    "files": checksum_tree(folder, skip=(MANIFEST, *skip))}
        write_json_atomic(folder / MANIFEST, manifest)
        return manifest

    def verify_run(self, key: str, memo: bool = False) -> list[str]:
        """Problems of a sealed run folder ([] when intact); an unsealed one is a problem too.
        memo: hash each file version once (file_sha256), for readers that verify often."""
        folder = self.run_dir(key)
        try:
            return verify_tree(folder, read_json(folder / MANIFEST)["files"],
                               self.file_sha256 if memo else sha256_file)
        except (OSError, ValueError, KeyError, TypeError) as err:
            return [f"{MANIFEST}: unreadable or missing ({type(err).__name__})"]

    # ---- the hash memo ---------------------------------------------------------------------------
    def file_sha256(self, path: str | os.PathLike) -> str:
        """sha256 of a file's whole content, computed once per file version: memoised by (path,
        size, mtime_ns, inode) in this process and in hashes.jsonl, which other processes share
        (best effort: in a read-only cache the memo stays in memory)."""
        path = Path(path).resolve()
        st = path.stat()
        version = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        if version not in _HASHES:
            self._read_hashes()
        if version not in _HASHES:
            digest = sha256_file(path)
            _HASHES[version] = digest
            line = json.dumps({"path": version[0], "size": version[1], "mtime_ns": version[2], "inode": version[3],
                               "sha256": digest}) + "\n"
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.root / HASHES, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)
            except OSError:
                pass  # read-only or full: the memo stays in this process
        return _HASHES[version]

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

    def run_entries(self, key: str) -> list[tuple[str, str]]:
        return [tuple(e) for e in read_json(self.run_dir(key) / MANIFEST)["entries"]]

    # ---- listing and removal ------------------------------------------------------------------
    def list_entries(self) -> list[dict[str, Any]]:
        """Every entry and run folder: kind, key, bytes, created, and a short description."""
        rows = []
        if not self.root.is_dir():
            return rows
        for kind_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if kind_dir.name in ("work", "locks"):
                continue
            for path in sorted(p for p in kind_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                rows.append({"kind": kind_dir.name, "key": path.name, "bytes": _tree_size(path),
                             "created": path.stat().st_mtime, "about": _describe(path)})
        return rows

    def size(self) -> dict[str, int]:
        """Bytes per top-level folder of the cache (entries of each kind, runs, work)."""
        if not self.root.is_dir():
            return {}
        return {p.name: _tree_size(p) for p in sorted(self.root.iterdir()) if p.is_dir()}

    def find(self, key: str) -> list[Path]:
        """Folders (entries or runs) whose key is `key` or starts with it (at least 4 characters)."""
        if len(key) < 4:
            raise CacheError(f"key {key!r} is too short: give at least 4 characters of it")
        _check_name(key, "key")
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
        """Remove every entry/run whose key starts with `key`; returns "kind/key" of each."""
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


def _check_name(name: str, what: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise CacheError(f"invalid {what} {name!r}: use letters, digits, '-', '_' and '.' only")


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _describe(path: Path) -> str:
    """A one-line summary of an entry or run folder from its JSON files."""
    try:
        if (path / "spec.json").is_file():
            spec = read_json(path / "spec.json")["spec"]
            status = read_json(path / "status.json").get("stage", "?") if (path / "status.json").is_file() else "?"
            return (f"{spec['pair']['name']} | {spec['dataset']['name']} | alpha {spec['selection']['alpha']} "
                    f"| {status}")
        meta = read_json(path / MANIFEST).get("meta", {})
        return ", ".join(f"{k}={v}" for k, v in meta.items() if isinstance(v, (str, int, float)))[:120]
    except (OSError, ValueError, KeyError, TypeError):
        return "(unreadable)"


# ---------------------------------------------------------------------------------------------
# Bundles
# ---------------------------------------------------------------------------------------------

def export_bundle(cache: Cache, run_keys: Iterable[str], out: str | os.PathLike) -> dict[str, Any]:
    """Write a zip of the sealed runs `run_keys` and every entry they reference; returns its
    bundle.json (checksum of each member). Damaged runs or entries are refused."""
    run_keys = list(dict.fromkeys(run_keys))
    if not run_keys:
        raise CacheError("nothing to export: give at least one run key")
    folders: list[tuple[str, Path]] = []  # (archive prefix, folder)
    entries: set[tuple[str, str]] = set()
    for key in run_keys:
        problems = cache.verify_run(key)
        if problems:
            raise CacheError(f"run {key} is not a finished, intact run ({'; '.join(problems)}); "
                             "run it again before exporting")
        folders.append((f"runs/{key}", cache.run_dir(key)))
        entries.update(cache.run_entries(key))
    for kind, key in sorted(entries):
        if cache.get(kind, key) is None:
            raise CacheError(f"run references entry {kind}/{key}, which is missing or damaged; "
                             "run the spec again to rebuild it, then export")
        folders.append((f"{kind}/{key}", cache.entry_path(kind, key)))
    files = {}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(out)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for prefix, folder in folders:
                for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
                    name = f"{prefix}/{path.relative_to(folder).as_posix()}"
                    zf.write(path, name)
                    files[name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
            bundle = {"format": BUNDLE_FORMAT, "created": time.time(), "runs": run_keys,
                      "entries": sorted(entries), "files": files}
            zf.writestr(BUNDLE_MANIFEST, json.dumps(bundle, indent=1))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return bundle


def _safe_member(name: str, info: zipfile.ZipInfo) -> PurePosixPath:
    """The member's relative path, or CacheError if it could escape the cache or is a link."""
    path = PurePosixPath(name)
    is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
    if (not name or "\\" in name or path.is_absolute() or ".." in path.parts or ":" in path.parts[0]
            or is_link or len(path.parts) < 3 or (path.parts[0] != "runs" and path.parts[0] not in KINDS)):
        raise CacheError(f"bundle member {name!r} is not allowed (absolute, '..', link, or outside "
                         "runs/ and the entry folders); the file is not a valid bundle, refusing it")
    _check_name(path.parts[1], "key")
    return path


def _stale(zf: zipfile.ZipFile, key: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(why run `key` of a bundle cannot be imported or None, the entries its manifest lists):
    its spec and score manifests must carry this code's SCORING_VERSION."""
    def member(name: str) -> Any:
        try:
            return json.loads(zf.read(f"runs/{key}/{name}"))
        except (KeyError, ValueError):
            return None

    manifest = member(MANIFEST)
    entries = [tuple(e) for e in manifest.get("entries", [])] if isinstance(manifest, dict) else []
    spec = member("spec.json")
    versions = {spec.get("spec", {}).get("scoring_version") if isinstance(spec, dict) else None}
    versions |= {m.get("scoring_version") for m in (member("base/manifest.json"), member("tuned/manifest.json"))
                 if isinstance(m, dict)}
    if versions == {SCORING_VERSION}:
        return None, entries
    other = sorted(map(repr, versions - {SCORING_VERSION}))
    return (f"computed with scoring version {', '.join(other)} while this code computes {SCORING_VERSION!r}: "
            "its scores are stale, so it is not imported; run its spec again here"), entries


def import_bundle(cache: Cache, bundle_path: str | os.PathLike, overwrite: bool = False) -> dict[str, list[str]]:
    """Check every member against bundle.json, then install runs and entries atomically.

    Existing intact entries are kept (same key, same settings); existing runs are kept unless
    `overwrite`. Runs of another scoring version, and the entries only they use, are not
    installed. Returns {"installed": [...], "kept": [...]} as "kind/key" strings and "stale":
    one line per run refused for its scoring version."""
    bundle_path = Path(bundle_path)
    try:
        zf = zipfile.ZipFile(bundle_path)
    except (OSError, zipfile.BadZipFile) as err:
        raise CacheError(f"{bundle_path}: not a readable zip bundle ({err})") from None
    with zf:
        try:
            bundle = json.loads(zf.read(BUNDLE_MANIFEST))
        except (KeyError, ValueError) as err:
            raise CacheError(f"{bundle_path}: no valid {BUNDLE_MANIFEST}; not an eapcore bundle ({err})") from None
        if bundle.get("format") != BUNDLE_FORMAT:
            raise CacheError(f"{bundle_path}: bundle format {bundle.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        files: dict[str, dict] = bundle["files"]
        members = {i.filename: i for i in zf.infolist() if i.filename != BUNDLE_MANIFEST and not i.is_dir()}
        if len(members) != len([i for i in zf.infolist() if not i.is_dir()]) - 1:
            raise CacheError(f"{bundle_path}: duplicate member names; refusing it")
        if set(members) != set(files):
            extra, missing = sorted(set(members) - set(files)), sorted(set(files) - set(members))
            raise CacheError(f"{bundle_path}: members and checksum list differ (unlisted {extra[:3]}, "
                             f"missing {missing[:3]}); the bundle is damaged")
        groups: dict[tuple[str, str], list[tuple[str, PurePosixPath]]] = {}
        for name, info in members.items():
            path = _safe_member(name, info)
            if info.file_size != files[name]["size"]:
                raise CacheError(f"{bundle_path}: member {name} has {info.file_size} bytes, "
                                 f"listed {files[name]['size']}; the bundle is damaged")
            groups.setdefault((path.parts[0], path.parts[1]), []).append((name, PurePosixPath(*path.parts[2:])))
        need = sum(i.file_size for i in members.values())
        cache.root.mkdir(parents=True, exist_ok=True)
        if need > shutil.disk_usage(cache.root).free:
            raise CacheError(f"importing needs {need / 1e9:.2f} GB but the cache disk has less free")
        result: dict[str, list[str]] = {"installed": [], "kept": [], "stale": []}
        stale, current = set(), set()  # the stale runs and their entries; the entries of current runs
        for kind, key in groups:
            if kind == "runs":
                why, entries = _stale(zf, key)
                (stale if why else current).update(entries)
                if why:
                    stale.add(("runs", key))
                    result["stale"].append(f"runs/{key}: {why}")
        skip = stale - current
        for (kind, key), items in sorted(groups.items()):
            label = f"{kind}/{key}"
            if (kind, key) in skip:
                continue
            dest = cache.run_dir(key) if kind == "runs" else cache.entry_path(kind, key)
            present = (not cache.verify_run(key)) if kind == "runs" else cache.get(kind, key) is not None
            if present and not (overwrite and kind == "runs"):
                result["kept"].append(label)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_name(dest)
            try:
                for name, rel in items:
                    target = tmp / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    h = hashlib.sha256()
                    with zf.open(name) as src, open(target, "wb") as dst:
                        while block := src.read(1 << 20):
                            h.update(block)
                            dst.write(block)
                    if h.hexdigest() != files[name]["sha256"]:
                        raise CacheError(f"{bundle_path}: member {name} fails its checksum; the bundle "
                                         "is damaged, nothing of this entry was installed")
                problems = verify_tree(tmp, read_json(tmp / MANIFEST)["files"]) if (tmp / MANIFEST).is_file() \
                    else [f"{MANIFEST}: missing"]
                if problems:
                    raise CacheError(f"{bundle_path}: {label} is inconsistent ({'; '.join(problems)})")
                replace_dir(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            result["installed"].append(label)
    return result


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def command(argv: list[str]) -> int:
    """`python -m eapcore cache [list|size|rm KEY...|clear --yes]`."""
    p = argparse.ArgumentParser(prog="python -m eapcore cache",
                                description=f"Show and remove cache entries (root: {cache_root()}; "
                                            "set EAP_CACHE_DIR to use another).")
    sub = p.add_subparsers(dest="action")
    sub.add_parser("list", help="every entry and run: kind, key, size, what it is")
    sub.add_parser("size", help="bytes per kind and in total")
    rm = sub.add_parser("rm", help="remove entries/runs by key (or a unique prefix of 4+ characters)")
    rm.add_argument("keys", nargs="+")
    clear = sub.add_parser("clear", help="remove everything")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    args = p.parse_args(argv or ["list"])
    cache = Cache()
    try:
        if args.action == "list":
            rows = cache.list_entries()
            for r in rows:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"]))
                print(f"{r['kind']:<12} {r['key']:<20} {_human(r['bytes']):>9}  {when}  {r['about']}")
            print(f"{len(rows)} item(s) in {cache.root}")
        elif args.action == "size":
            sizes = cache.size()
            for name, n in sizes.items():
                print(f"{name:<12} {_human(n):>9}")
            print(f"{'total':<12} {_human(sum(sizes.values())):>9}  ({cache.root})")
        elif args.action == "rm":
            status = 0
            for key in args.keys:
                removed = cache.remove(key)
                if not removed:
                    print(f"error: no cache entry or run with key {key!r} (see `cache list`)", file=sys.stderr)
                    status = 1
                for item in removed:
                    print(f"removed {item}")
            return status
        elif args.action == "clear":
            if not args.yes and not (sys.stdin.isatty() and input(f"remove everything in {cache.root}? [y/N] ")
                                     .strip().lower() == "y"):
                print("nothing removed (pass --yes to confirm)")
                return 1
            print(f"removed {_human(cache.clear())} from {cache.root}")
    except CacheError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only cache or one that is not a folder
        print(f"error: {cache_root_problem(cache.root) or f'{err.strerror}: {err.filename}'}", file=sys.stderr)
        return 2
    return 0
