"""The cache as runs use it: the content-addressed store (`eapcore.store`: entries, checksums,
locks, the events log, the hash memo) plus what only runs know.

Layout under the cache root (`cache/` in the project, or `$EAP_CACHE_DIR`), beside the store's
own (`<kind>/<key>/` entries, `work/`, `locks/`, `log.jsonl`, `hashes.jsonl`):

    generations/, grades/, selections/, scores/   the stages' entries (KINDS); `models/` holds the
                                  checkpoints the engine materialises (GGUF files, adapters)
    runs/<key>/                   finished runs (DESIGN.md), with a `manifest.json` of checksums and
                                  the entries the run was assembled from, written when it is done

Bundles (`export_bundle` / `import_bundle`) are zip files of run folders plus the entries they
reference, with a `bundle.json` of checksums; import refuses unsafe member names, and runs of
another scoring version (their scores are stale) with the entries only they use.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Iterable

from eapcore.files import cache_root, cache_root_problem, read_json, replace_dir, temp_name, write_json_atomic
from eapcore.specs import SCORING_VERSION
from eapcore.store import MANIFEST, CacheError, Store, check_name, checksum_tree, sha256_file, verify_tree

KINDS: tuple[str, ...] = ("generations", "grades", "selections", "scores")
BUNDLE_MANIFEST = "bundle.json"
BUNDLE_FORMAT = "eapcore-bundle/1"


class Cache(Store):
    """The store with run folders (`runs/<key>/`, sealed with checksums of their files)."""

    RESERVED: ClassVar[tuple[str, ...]] = ("runs", *Store.RESERVED)

    def run_dir(self, key: str) -> Path:
        check_name(key, "run key")
        return self.root / "runs" / key

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

    def run_entries(self, key: str) -> list[tuple[str, str]]:
        return [tuple(e) for e in read_json(self.run_dir(key) / MANIFEST)["entries"]]

    def describe(self, path: Path) -> str:
        """A one-line summary of a run folder (pair, dataset, alpha, stage) or of an entry."""
        if not (path / "spec.json").is_file():
            return super().describe(path)
        try:
            spec = read_json(path / "spec.json")["spec"]
            status = read_json(path / "status.json").get("stage", "?") if (path / "status.json").is_file() else "?"
            return (f"{spec['pair']['name']} | {spec['dataset']['name']} | alpha {spec['selection']['alpha']} "
                    f"| {status}")
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
                for rel, checksum in checksum_tree(folder, skip=()).items():
                    zf.write(folder / rel, f"{prefix}/{rel}")
                    files[f"{prefix}/{rel}"] = checksum
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
    check_name(path.parts[1], "key")
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
    unreadable = cache_root_problem(cache.root, write=False)
    if unreadable:  # else `list` would say "0 item(s) in" a file
        print(f"error: {unreadable}", file=sys.stderr)
        return 2
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
