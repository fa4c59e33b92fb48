"""Finished runs in the cache, read-only: list the run folders, read one's spec and status, load
a finished one (scores, graph, selection, metrics.json, answers) into memory.

A finished run is the folder `runs/<key>/` of DESIGN.md ("A finished run in the cache"), sealed by
its manifest.json and computed with this code's SCORING_VERSION (an older one is listed with stage
"stale" and never loaded). `load_run` verifies every file against the manifest's checksums first,
as the command line does, and refuses an altered run (RunDamaged, saying how to rebuild it); each
file version is hashed once (the cache's hash memo), so verifying again costs a stat per file.
Nothing here computes attributions or writes to the cache but that memo, and nothing else is
memoised: the dashboard keeps loaded runs in its one cache layer (pages/common.py), keyed by
`RunInfo.signature` (the mtimes and sizes of the run's files), so a rewritten run is never served
stale.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from eapcore.files import cache_root, read_json_or_none, shorten
from eapcore.graph import Graph
from eapcore.runs.cache import Cache
from eapcore.specs import GROUP_LABELS, SCORING_VERSION, MetricSettings, RunSpec, from_dict
from eapcore.stats import metrics, report

_RUN_FILES = ("spec.json", "status.json", "selection.json", "metrics.json", "answers_base.jsonl",
              "answers_tuned.jsonl", "base/scores.safetensors", "base/graph.json", "base/manifest.json",
              "tuned/scores.safetensors", "tuned/graph.json", "tuned/manifest.json", "manifest.json")
_SIGNED_FILES = (*_RUN_FILES, "plan.json")  # every file the run's manifest may list


# ---- listing runs --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunInfo:
    """One run folder: its spec (as stored), status and the signature of its files."""

    key: str
    path: Path
    spec_dict: dict = field(compare=False, hash=False)
    status: dict = field(compare=False, hash=False)
    signature: tuple = ()

    @cached_property
    def spec(self) -> RunSpec | None:
        try:
            return from_dict(RunSpec, self.spec_dict)
        except (TypeError, ValueError, KeyError):
            return None

    def _get(self, *path: str, default: Any = None) -> Any:
        value: Any = self.spec_dict
        for p in path:
            if not isinstance(value, dict) or p not in value:
                return default
            value = value[p]
        return value

    @property
    def scoring_version(self) -> str:
        return str(self._get("scoring_version", default="?"))

    @property
    def stage(self) -> str:
        """status.json's stage, but "stale" for a done run of another scoring version."""
        stage = str(self.status.get("stage", "unknown"))
        return "stale" if stage == "done" and self.scoring_version != SCORING_VERSION else stage

    @property
    def finished(self) -> bool:
        """Done and every file a page reads is there."""
        return self.stage == "done" and all((self.path / f).is_file() for f in _RUN_FILES)

    @property
    def pair(self) -> str:
        return str(self._get("pair", "name", default="?"))

    @property
    def dataset(self) -> str:
        return str(self._get("dataset", "name", default="?"))

    @property
    def alpha(self) -> float:
        return float(self._get("selection", "alpha", default=float("nan")))

    @property
    def group(self) -> str:
        return str(self._get("selection", "group", default="both_correct"))

    @property
    def granularity(self) -> str:
        return str(self._get("attribution", "granularity", default="layer"))

    @property
    def n_requested(self) -> int:
        return int(self._get("selection", "n", default=0))

    @cached_property
    def n_used(self) -> int | None:
        """Questions the run scored (selection.json's idx), None before its selection is written."""
        selection = read_json_or_none(self.path / "selection.json")
        idx = selection.get("idx") if isinstance(selection, dict) else None
        return len(idx) if isinstance(idx, list) else None

    @cached_property
    def clock(self) -> dict[str, dict[str, Any]]:
        """{stage: {"seconds", "device", "executions"}} from clock.json: each stage's wall time summed
        over the executions of this run (a resumed run was executed more than once), and where the
        longest of them ran (an execution that found the stage cached takes about 0 s)."""
        record = read_json_or_none(self.path / "clock.json")
        runs = record.get("executions") if isinstance(record, dict) else None
        out: dict[str, dict[str, Any]] = {}
        longest: dict[str, float] = {}
        for run in runs if isinstance(runs, list) else []:
            for c in (run.get("stages") or []) if isinstance(run, dict) else ():
                seconds = c.get("seconds") if isinstance(c, dict) else None
                if not isinstance(seconds, (int, float)):
                    continue
                stage = str(c.get("stage"))
                entry = out.setdefault(stage, {"seconds": 0.0, "device": None, "executions": 0})
                entry["seconds"] += seconds
                entry["executions"] += 1
                if seconds >= longest.get(stage, -1.0):
                    longest[stage], entry["device"] = seconds, c.get("device")
        return out

    @cached_property
    def quick(self) -> dict | None:
        """quick.json of a quick run (None for a run on the whole dataset, or before it answered)."""
        record = read_json_or_none(self.path / "quick.json")
        return record if isinstance(record, dict) else None

    @property
    def updated(self) -> float:
        return float(self.status.get("updated") or 0.0)

    @property
    def label(self) -> str:
        return (f"{self.pair} · {self.dataset} · α={self.alpha:g} · {GROUP_LABELS.get(self.group, self.group)}"
                f" · {self.granularity} · n={self.n_used if self.n_used is not None else '?'} · {self.key[:8]}")

    def settings_without(self, *dropped: tuple[str, str | None]) -> str:
        """Canonical JSON of the spec minus the (section, name) settings given (name None: the whole
        section): runs equal here differ only in those settings."""
        spec = json.loads(json.dumps(self.spec_dict))
        for section, name in dropped:
            if name is None:
                spec.pop(section, None)
            elif isinstance(spec.get(section), dict):
                spec[section].pop(name, None)
        return json.dumps(spec, sort_keys=True)


def quick_summary(quick: dict) -> str:
    """One line of a quick run's quick.json: questions answered, rounds, tokens saved."""
    tokens = sum(quick["answer_tokens"].values())
    return (f"{quick['questions']} of {quick['of']} questions answered in {len(quick['rounds'])} round(s), "
            f"{quick['kept']} pass the selection (N = {quick['n']}); {tokens:,} answer tokens, about "
            f"{quick['tokens_saved_estimate']:,} fewer than the whole dataset would take (estimated from the "
            "mean answer length so far)")


def _signature(path: Path) -> tuple:
    out = []
    for name in _SIGNED_FILES:
        try:
            st = (path / name).stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((name, None, None))
    return tuple(out)


def read_run(path: Path) -> RunInfo | None:
    spec = read_json_or_none(path / "spec.json")
    if not isinstance(spec, dict):
        return None
    status = read_json_or_none(path / "status.json")
    return RunInfo(str(spec.get("key") or path.name), path, spec.get("spec") or {},
                   status if isinstance(status, dict) else {"stage": "unknown"}, _signature(path))


def list_runs(root: str | os.PathLike | None = None) -> list[RunInfo]:
    """Every run folder with a readable spec.json, most recently updated first."""
    runs_dir = cache_root(root) / "runs"
    if not runs_dir.is_dir():
        return []
    runs = [r for p in sorted(runs_dir.iterdir()) if p.is_dir() and (r := read_run(p)) is not None]
    return sorted(runs, key=lambda r: -r.updated)


def finished_runs(root: str | os.PathLike | None = None) -> list[RunInfo]:
    return [r for r in list_runs(root) if r.finished]


def get_run(key: str, root: str | os.PathLike | None = None) -> RunInfo | None:
    """The run folder of `key`, None if there is none (or `key` is not a run key at all)."""
    if not is_run_key(key):
        return None
    path = cache_root(root) / "runs" / key
    return read_run(path) if path.is_dir() else None


def is_run_key(key: Any) -> bool:
    """Whether `key` has the form of a run key (spec_key: 16 lowercase hex digits)."""
    return isinstance(key, str) and len(key) == 16 and all(c in "0123456789abcdef" for c in key)


# ---- loading one run -------------------------------------------------------------------------------

@dataclass
class RunData:
    """A finished run in memory. Arrays are read-only and float32 as stored; statistics compute in
    float64 where they need it (eapcore.stats converts its inputs)."""

    info: RunInfo
    base: report.ScoreFile
    tuned: report.ScoreFile
    selection: dict
    metrics: dict
    answers: dict  # {"base"|"tuned": {idx: row dict}}

    @property
    def loss(self) -> dict[str, np.ndarray | None]:
        """{"base"|"tuned": float32 [N] clean loss, or None if the scores file has none}."""
        return {"base": self.base.loss, "tuned": self.tuned.loss}

    @property
    def key(self) -> str:
        return self.info.key

    @cached_property
    def graph(self) -> Graph:
        return Graph.from_json(self.base.graph)

    @property
    def mask(self) -> np.ndarray:
        return self.base.mask

    @property
    def sample_ids(self) -> list:
        return list(self.base.manifest["sample_ids"])

    @property
    def t_cut(self) -> int:
        return int(self.selection.get("t_cut") or self.base.manifest.get("cut_len") or 0)

    @cached_property
    def metric_settings(self) -> MetricSettings:
        s = self.metrics.get("settings") or {}
        known = {k: s[k] for k in ("entropy", "kurtosis", "kurtosis_of", "histogram_bins") if k in s}
        return MetricSettings(**known)

    @cached_property
    def real_edges(self) -> dict[str, np.ndarray]:
        """{"base"|"tuned": float32 [N, E]} real-edge scores (metrics.real_edge_cells), read-only."""
        out = {"base": metrics.real_edge_cells(self.base.scores, self.mask),
               "tuned": metrics.real_edge_cells(self.tuned.scores, self.mask)}
        for cells in out.values():
            cells.setflags(write=False)
        return out


def _read_answers(path: Path) -> dict:
    out = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and "idx" in row:
                    out[row["idx"]] = row
    return out


def read_metrics(info: RunInfo) -> dict:
    """The run's metrics.json ({} while missing or unreadable)."""
    return read_json_or_none(info.path / "metrics.json") or {}


def has_answers(info: RunInfo) -> bool:
    """Both models' graded answers (the whole dataset) are written."""
    return all((info.path / f"answers_{w}.jsonl").is_file() for w in ("base", "tuned"))


def read_answers(info: RunInfo, which: str) -> dict:
    """{idx: row} of the graded answers of `which` (base|tuned) of the run."""
    return _read_answers(info.path / f"answers_{which}.jsonl")


def read_graph(info: RunInfo) -> dict | None:
    """The run's graph.json (the base model's; both sides share it), None while missing or unreadable."""
    graph = read_json_or_none(info.path / "base" / "graph.json")
    return graph if isinstance(graph, dict) else None


class RunNotReady(RuntimeError):
    """The run folder is not a finished run (still running, failed, incomplete or stale)."""


class RunDamaged(RunNotReady):
    """A finished run whose files do not match its manifest's checksums (altered or damaged)."""


def verify_run(info: RunInfo) -> list[str]:
    """Problems of a run folder's files against its manifest's checksums ([] when intact), each
    file version hashed once (Cache.file_sha256's memo)."""
    return Cache(info.path.parent.parent).verify_run(info.path.name, memo=True)


def load_run(info: RunInfo | str, root: str | os.PathLike | None = None) -> RunData:
    """Load a finished run: its files verified against its manifest, both score files
    (stats.report.load_scores, checked paired), the selection, metrics.json and both models'
    answers. RunNotReady if it is not finished or stale, RunDamaged if a file was altered."""
    if isinstance(info, str):
        found = get_run(info, root)
        if found is None:
            raise KeyError(f"no run {info!r} in {cache_root(root) / 'runs'}")
        info = found
    if info.stage == "stale":
        raise RunNotReady(f"run {info.key} was computed with scoring version {info.scoring_version!r} and this code "
                          f"computes {SCORING_VERSION!r}: its scores are stale. Run its settings again (Run page, "
                          "or python -m eapcore run) to see them")
    if not info.finished:
        missing = [f for f in _RUN_FILES if not (info.path / f).is_file()]
        raise RunNotReady(f"run {info.key} is not finished (stage {info.stage}; missing {missing or 'nothing'})")
    problems = verify_run(info)
    if problems:
        raise RunDamaged(f"run {info.key}'s files do not match its manifest ({shorten('; '.join(problems), 300)}), "
                         "so it is not shown: its scores may have been altered. Rebuild it from its cached stages "
                         f"with `python -m eapcore run --spec-json {info.path / 'spec.json'}`, or remove it with "
                         f"`python -m eapcore cache rm {info.key}`")
    base, tuned = report.load_scores(info.path / "base"), report.load_scores(info.path / "tuned")
    report.check_paired(base, tuned)
    for sf in (base, tuned):
        sf.scores.setflags(write=False)
    return RunData(info, base, tuned, read_json_or_none(info.path / "selection.json") or {},
                   read_metrics(info), {w: read_answers(info, w) for w in ("base", "tuned")})
