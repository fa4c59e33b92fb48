"""Project paths and safe file writes, shared by every layer (imports nothing of eapcore).

- PROJECT_ROOT: the folder holding `eapcore/`; in a checkout (or an editable install of one:
  IN_CHECKOUT) also `app.py`, `pages/`, `demo/`, `registry.json`.
- DATA_ROOT: the folder holding `demo/` (the demo checkpoints, problems and runs): the checkout,
  or inside the installed package (a wheel ships them as package data, `eapcore/demo/`).
- cache_root(): the cache folder (`$EAP_CACHE_DIR`, else `<checkout>/cache`, else for an installed
  package `$XDG_CACHE_HOME/eapcore`, i.e. `~/.cache/eapcore`), `~` expanded.
- registry_file(): the user registry (`$EAP_REGISTRY`, else `<checkout>/registry.json`, else
  `$XDG_CONFIG_HOME/eapcore/registry.json`, i.e. `~/.config/eapcore/registry.json`).
- looks_like_path(): whether a model or dataset reference is meant as a local path rather than a
  hub id (`name` or `org/name`).
- Atomic, durable writes (a temporary file or folder next to the target, fsynced, then
  `os.replace` and an fsync of the folder, so readers see the old or the new content, never half,
  and a crash or power loss after the write keeps it) and a tolerant JSON reader for files another
  process may be writing.
- shorten(): a value echoed in a message, cut to a readable length.
- cache_root_problem(): why the cache root cannot be written (read-only, not a folder) or read
  (not a folder), if so.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_ROOT.parent
IN_CHECKOUT = (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "app.py").is_file()
DATA_ROOT = PROJECT_ROOT if IN_CHECKOUT else PACKAGE_ROOT


def _user_dir(xdg: str, default: str) -> Path:
    return Path(os.environ.get(xdg) or default).expanduser() / "eapcore"


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """The cache folder: `root`, else $EAP_CACHE_DIR, else <checkout>/cache, else (installed)
    $XDG_CACHE_HOME/eapcore; `~` expanded."""
    default = PROJECT_ROOT / "cache" if IN_CHECKOUT else _user_dir("XDG_CACHE_HOME", "~/.cache")
    return Path(root or os.environ.get("EAP_CACHE_DIR") or default).expanduser()


def registry_file() -> Path:
    """The user registry: $EAP_REGISTRY, else <checkout>/registry.json, else (installed)
    $XDG_CONFIG_HOME/eapcore/registry.json; `~` expanded."""
    default = PROJECT_ROOT / "registry.json" if IN_CHECKOUT else _user_dir("XDG_CONFIG_HOME", "~/.config") / "registry.json"
    return Path(os.environ.get("EAP_REGISTRY") or default).expanduser()


def looks_like_path(name: str) -> bool:
    """True when `name` can only be a local path: it starts with `.`, `/` or `~`, has more than one
    `/`, or a backslash. Hub ids are `name` or `org/name` (which may also be a local folder:
    check the disk for those)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def cache_root_problem(root: str | os.PathLike | None = None, write: bool = True) -> str | None:
    """Why nothing can be written to the cache root (not a folder, read-only), or None if it can
    (a missing root can be: it is created on first use). Finished runs stay readable when it is
    read-only, so with `write=False` only a root that is not a folder is a problem."""
    root = cache_root(root)
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return f"the cache root {root} is not a folder ({existing} is a file); set EAP_CACHE_DIR to a folder"
    if write and not os.access(existing, os.W_OK | os.X_OK):
        return (f"the cache root {root} is read-only: finished runs can be viewed, but no run can start or "
                "resume; set EAP_CACHE_DIR to a writable folder (or copy the cache there) to compute")
    return None


def shorten(value: object, limit: int = 200) -> str:
    """str(value) cut to `limit` characters (with how much was left out), for echoing in messages."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def temp_name(path: Path) -> Path:
    return path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's content (a folder: its entries, e.g. a rename) to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (itself included), deepest first."""
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        if not path.is_symlink():
            fsync_path(path)
    fsync_path(folder)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, `os.replace`, fsync of the folder:
    readers never see half, and the new content survives a crash once this returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, replacing what is there (the old copy is renamed away first)."""
    old = None
    if dst.exists():
        old = temp_name(dst)
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_path(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_json_checked(path: Path, fix: str) -> Any:
    """The decoded JSON file; ValueError in one line naming the file, what is wrong (not UTF-8,
    the JSON error with its line and column, unreadable) and `fix`, what to do about it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); {fix}") from None
    except OSError as err:
        raise ValueError(f"{path} cannot be read ({err.strerror}); {fix}") from None


def read_json_or_none(path: Path) -> Any:
    """The decoded JSON file, or None if it is missing or not valid JSON (for status and result
    files that another process may be writing or may not have written yet)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None
