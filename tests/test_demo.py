"""The shipped demo: its precomputed runs are exactly the current demo preset, intact, and their
stored metrics are what the metrics code computes from their stored scores."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from eapcore.stats import metrics, report
from eapcore.runs import commands
from eapcore.runs.cache import Cache, import_bundle

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "demo" / "runs.zip"


def preset_keys() -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert commands.command_sweep(["--preset", "demo", "--dry-run"]) == 0
    return [line.split()[0] for line in out.getvalue().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    if not BUNDLE.is_file():
        pytest.fail("demo/runs.zip is missing: python -m eapcore sweep --preset demo && "
                    "python -m eapcore export --preset demo --out demo/runs.zip")
    cache = Cache(tmp_path_factory.mktemp("cache"))
    import_bundle(cache, BUNDLE)
    return cache


def test_bundle_holds_exactly_the_current_demo_preset(imported):
    """If the maths, the specs or the demo models change, the keys change: re-export the bundle."""
    keys = preset_keys()
    assert len(keys) == 14
    shipped = sorted(p.name for p in (imported.root / "runs").iterdir())
    assert shipped == sorted(keys), "demo/runs.zip is stale: re-run the demo sweep and export it"


def test_shipped_runs_are_intact_and_their_metrics_reproduce(imported):
    for key in preset_keys():
        assert imported.verify_run(key) == []
        folder = imported.run_dir(key)
        stored = json.loads((folder / "metrics.json").read_text())
        base, tuned = report.load_scores(folder / "base"), report.load_scores(folder / "tuned")
        fresh = metrics.compute_metrics(metrics.real_edge_scores(tuned.scores, tuned.mask), metrics.MetricSettings())
        for m in metrics.METRICS:
            np.testing.assert_allclose(stored[m]["tuned"], fresh[m], rtol=1e-9)
            assert stored[m]["n"] == base.scores.shape[0] == len(base.manifest["sample_ids"])
