"""The runs shipped with the project, imported into a cache that holds no run yet, so a fresh
checkout's dashboard opens on their results with no step first:
  - `demo/smollm2/runs.zip`: the SmolLM2-135M pairs (`eapcore sweep --preset smollm2`, computed on a
    GPU by `eapcore lab-smollm2`), the dashboard's default view;
  - `demo/runs.zip`: the toy demo pairs (`eapcore sweep --preset demo`).
Each was made by `eapcore export --preset NAME`.

Part of the runs' public API for the pages (it only installs checked bundles into the cache).
`EAP_SHIPPED_RUNS=off` in the environment turns the import off (a dashboard that starts empty).
"""
from __future__ import annotations

import os
from typing import Any

from eapcore.files import DATA_ROOT, cache_root_problem
from eapcore.runs.cache import Cache, import_bundle

BUNDLES = (DATA_ROOT / "demo" / "smollm2" / "runs.zip", DATA_ROOT / "demo" / "runs.zip")


def _has_runs(cache: Cache) -> bool:
    runs = cache.root / "runs"
    return runs.is_dir() and any(runs.iterdir())


def import_if_empty(cache: Cache | None = None) -> dict[str, Any] | None:
    """Import every bundle of BUNDLES that exists (each member checked, see cache.import_bundle)
    when the cache has no run folder: {"bundles", "runs"} (their paths relative to the data folder,
    number of runs installed); None when the cache has runs or cannot be written, no bundle exists
    or EAP_SHIPPED_RUNS is "off"."""
    cache = cache or Cache()
    bundles = [b for b in BUNDLES if b.is_file()]
    if (os.environ.get("EAP_SHIPPED_RUNS") == "off" or not bundles or _has_runs(cache)
            or cache_root_problem(cache.root)):  # a read-only cache is shown as it is
        return None
    with cache.lock("import-shipped-runs"):
        if _has_runs(cache):
            return None
        installed = [m for b in bundles for m in import_bundle(cache, b)["installed"]]
    return {"bundles": [str(b.relative_to(DATA_ROOT)) for b in bundles],
            "runs": sum(m.startswith("runs/") for m in installed)}
