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
- Atomic writes (a temporary file or folder next to the target, then `os.replace`, so readers see
  the old or the new content, never half) and a tolerant JSON reader for files another process
  may be writing.
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


def temp_name(path: Path) -> Path:
    return path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same folder and `os.replace` (readers never see half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
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
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_json_or_none(path: Path) -> Any:
    """The decoded JSON file, or None if it is missing or not valid JSON (for status and result
    files that another process may be writing or may not have written yet)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None
