"""Base vs tuned attribution results -> the metrics report (metrics.json) and the `metrics` command.

`load_scores` is the one reader of an `attribute` output directory (DESIGN.md: scores.safetensors,
graph.json, manifest.json), for every layer that reads results (the runner's metrics stage, the
dashboard's run loader, the command line). It builds on `metrics` (the three metrics) and
`analysis` (the paired tests around them); neither imports this module.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from eapcore.specs import MetricSettings
from eapcore.stats.analysis import paired_comparison
from eapcore.stats.metrics import METRICS, real_edge_scores


class ScoreFile(NamedTuple):
    """One `attribute` output directory. scores float32 [N, F, B]; mask bool [F, B]; loss float32
    [N] (the clean loss per sample, None if the file has none)."""

    scores: np.ndarray
    mask: np.ndarray
    graph: dict[str, Any]
    manifest: dict[str, Any]
    loss: np.ndarray | None = None


def load_scores(directory: str | Path) -> ScoreFile:
    """Read an `attribute` output directory (DESIGN.md) and check its parts agree."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    for name in ("scores.safetensors", "graph.json", "manifest.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: missing {name} (not an `attribute` output directory)")
    tensors = load_file(directory / "scores.safetensors")
    for key in ("scores", "real_edge_mask"):
        if key not in tensors:
            raise ValueError(f"{directory}/scores.safetensors: no tensor {key!r} (has {sorted(tensors)})")
    scores, mask = tensors["scores"], tensors["real_edge_mask"].astype(bool)
    graph = json.loads((directory / "graph.json").read_text())
    manifest = json.loads((directory / "manifest.json").read_text())
    f, b = len(graph["forward"]), len(graph["backward"])
    if scores.ndim != 3 or scores.shape[1:] != (f, b) or mask.shape != (f, b):
        raise ValueError(f"{directory}: scores {scores.shape} / mask {mask.shape} do not match the "
                         f"graph's {f} forward x {b} backward nodes")
    ids = manifest.get("sample_ids")
    if ids is not None and len(ids) != scores.shape[0]:
        raise ValueError(f"{directory}: {scores.shape[0]} score matrices but {len(ids)} sample_ids")
    return ScoreFile(scores, mask, graph, manifest, tensors.get("loss"))


def _jsonable(value: Any) -> Any:
    """NaN / inf -> None (strict JSON), numpy scalars -> Python numbers, recursively."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def check_paired(base: ScoreFile, tuned: ScoreFile) -> None:
    """Raise ValueError unless base and tuned share graph, mask and sample ids (same order)."""
    keys = ("granularity", "n_layers", "n_heads", "n_kv_heads", "forward", "backward")
    diff = [k for k in keys if base.graph.get(k) != tuned.graph.get(k)]
    if diff:
        raise ValueError(f"base and tuned graphs differ in {diff}; scores are not comparable")
    if not np.array_equal(base.mask, tuned.mask):
        raise ValueError("base and tuned real_edge_mask differ")
    ids_b, ids_t = base.manifest.get("sample_ids"), tuned.manifest.get("sample_ids")
    if ids_b is None or ids_t is None:
        raise ValueError("manifest.json lacks sample_ids: cannot check the samples are paired")
    if list(ids_b) != list(ids_t):
        only_b = sorted(set(ids_b) - set(ids_t), key=str)[:5]
        only_t = sorted(set(ids_t) - set(ids_b), key=str)[:5]
        what = (f"only in base {only_b}, only in tuned {only_t}" if only_b or only_t
                else "same ids in a different order")
        raise ValueError(f"base and tuned sample_ids differ ({len(ids_b)} vs {len(ids_t)}; {what}); "
                         "the comparison is paired by question")



def metrics_result(base: ScoreFile, tuned: ScoreFile, settings: MetricSettings = MetricSettings(),
                   n_bootstrap: int = 1000, n_permutations: int = 9999, confidence: float = 0.95,
                   seed: int = 0) -> dict[str, Any]:
    """The `metrics` command's JSON-ready result for two loaded score files (paired by question).

    Checks pairing (`check_paired`), then one object per metric as `analysis.paired_comparison`
    returns it, plus provenance; NaN becomes None.
    """
    check_paired(base, tuned)
    result = paired_comparison(real_edge_scores(base.scores, base.mask),
                               real_edge_scores(tuned.scores, tuned.mask), settings,
                               n_bootstrap=n_bootstrap, n_permutations=n_permutations,
                               confidence=confidence, seed=seed)
    return _jsonable({
        "base_model": base.manifest.get("model"), "tuned_model": tuned.manifest.get("model"),
        "granularity": base.graph.get("granularity"), "n_real_edges": int(base.mask.sum()),
        "sample_ids": list(base.manifest["sample_ids"]),
        "settings": {"entropy": settings.entropy, "kurtosis": settings.kurtosis,
                     "kurtosis_of": settings.kurtosis_of, "histogram_bins": settings.histogram_bins},
        "bootstrap": n_bootstrap, "permutations": n_permutations, "confidence": confidence,
        "seed": seed, **result,
    })


def command(argv: list[str]) -> int:
    """`python -m eapcore metrics --base DIR --tuned DIR --out FILE.json [options]`."""
    defaults = MetricSettings()
    p = argparse.ArgumentParser(prog="python -m eapcore metrics",
                                description="The paper's three metrics of base vs tuned EAP scores "
                                            "(paired by question), with tests and bootstrap CIs.")
    p.add_argument("--base", required=True, help="`attribute` output directory of the base model")
    p.add_argument("--tuned", required=True, help="`attribute` output directory of the tuned model")
    p.add_argument("--out", required=True, help="result JSON file")
    p.add_argument("--entropy", choices=("pooled", "per_sample", "histogram"), default=defaults.entropy)
    p.add_argument("--histogram-bins", type=int, default=defaults.histogram_bins)
    p.add_argument("--kurtosis", choices=("fisher", "pearson"), default=defaults.kurtosis)
    p.add_argument("--kurtosis-of", choices=("signed", "absolute"), default=defaults.kurtosis_of)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no CI)")
    p.add_argument("--permutations", type=int, default=9999, help="permutation-test resamples")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.histogram_bins < 1:
        p.error("--histogram-bins must be >= 1")
    if args.bootstrap < 0 or args.permutations < 1 or not 0 < args.confidence < 1:
        p.error("need --bootstrap >= 0, --permutations >= 1 and 0 < --confidence < 1")
    settings = MetricSettings(entropy=args.entropy, kurtosis=args.kurtosis,
                              kurtosis_of=args.kurtosis_of, histogram_bins=args.histogram_bins)
    try:
        result = metrics_result(load_scores(args.base), load_scores(args.tuned), settings,
                                n_bootstrap=args.bootstrap, n_permutations=args.permutations,
                                confidence=args.confidence, seed=args.seed)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", flush=True)
        return 2
    out = {"base_dir": str(args.base), "tuned_dir": str(args.tuned), **result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for m in METRICS:
        r = result[m]
        print(f"{m:<24} base {_fmt(r['base'])}  tuned {_fmt(r['tuned'])}  "
              f"change {_fmt(r['relative_change'], '+.2f')}%  p {_fmt(r['p_value'], '.3g')}  n {r['n']}")
    print(f"wrote {args.out}")
    return 0


def _fmt(value: float | None, spec: str = ".6g") -> str:
    return "n/a" if value is None else format(value, spec)
