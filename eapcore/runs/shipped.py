"""The runs shipped with the project: `demo/runs.zip` (the demo preset, made by
`eapcore sweep --preset demo` and `eapcore export --preset demo`), imported into a cache that holds
no run yet, so a fresh checkout's dashboard opens on the demo pair's results with no step first.

Part of the runs' public API for the pages (it only installs a checked bundle into the cache).
`EAP_SHIPPED_RUNS=off` in the environment turns the import off (a dashboard that starts empty).
"""
from __future__ import annotations

import os
from typing import Any

from eapcore.files import DATA_ROOT, cache_root_problem
from eapcore.runs.cache import Cache, import_bundle

BUNDLE = DATA_ROOT / "demo" / "runs.zip"


def _has_runs(cache: Cache) -> bool:
    runs = cache.root / "runs"
    return runs.is_dir() and any(runs.iterdir())


def import_if_empty(cache: Cache | None = None) -> dict[str, Any] | None:
    """Import BUNDLE (every member checked, see cache.import_bundle) when the cache has no run
    folder: {"bundle", "runs"} (path, number of runs installed); None when the cache has runs or
    cannot be written, the bundle is missing or EAP_SHIPPED_RUNS is "off"."""
    cache = cache or Cache()
    if (os.environ.get("EAP_SHIPPED_RUNS") == "off" or not BUNDLE.is_file() or _has_runs(cache)
            or cache_root_problem(cache.root)):  # a read-only cache is shown as it is
        return None
    with cache.lock("import-shipped-runs"):
        if _has_runs(cache):
            return None
        result = import_bundle(cache, BUNDLE)
    return {"bundle": str(BUNDLE), "runs": sum(m.startswith("runs/") for m in result["installed"])}
