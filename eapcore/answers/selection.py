"""The paper's sample selection and truncation (Eq. 10-12), on a base/tuned pair of answers files.

On the chosen group (idx graded in both files, by correctness), with |y| = a model's own answer
length in tokens (`generate_token_ids` as stored, EOS included when generated):
    T_ref = min(mean |y_base|, mean |y_tuned|) over the group
    T_cut = max(floor(alpha * T_ref), 1)
Rules, applied in this order (`counts["removed"]` counts each question at the first rule it fails;
`counts["failing"]` counts every question failing each rule on its own):
    prompt_length:  both prompts have the same token length
    min_length:     both answers have at least T_cut tokens
    mean_range:     floor(low * T_ref) <= (len_base + len_tuned) / 2 <= floor(high * T_ref)
    length_ratio:   |len_base - len_tuned| / mean <= beta
Draw: the kept idx are sorted (integers numerically, then strings); if more than n remain,
`numpy.random.default_rng(seed).choice(len(kept), size=n, replace=False)` picks positions, and the
drawn idx are returned in sorted order. n <= 0, or n >= len(kept), keeps all of them.
The same idx serve both models; the written samples keep their full answers (the attribute step
truncates them to T_cut, stored in selection.json).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eapcore.files import write_bytes_atomic
from eapcore.answers.grading import groups, scores_of, sort_idx
from eapcore.harness import Sample, read_joined, read_samples, write_samples
from eapcore.specs import GROUP_LABELS, GROUPS, SelectionSettings

RULES = ("prompt_length", "min_length", "mean_range", "length_ratio")


@dataclass(frozen=True)
class Lengths:
    """Token lengths of one question: prompts and answers of base and tuned."""

    prompt_base: int
    prompt_tuned: int
    answer_base: int
    answer_tuned: int


@dataclass
class Selection:
    t_ref: float
    t_cut: int
    idx: list[Any]  # drawn, sorted
    counts: dict[str, Any]
    settings: dict[str, Any]


def settings_problems(s: SelectionSettings) -> list[str]:
    """What makes selection settings unusable, one line each ([] when none): alpha a finite number
    > 0, beta finite and >= 0, low and high finite with 0 <= low <= high, n and seed integers, a
    known group."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    problems = []
    if not (number(s.alpha) and s.alpha > 0):
        problems.append(f"alpha must be a finite number > 0, not {s.alpha!r}")
    if not (number(s.beta) and s.beta >= 0):
        problems.append(f"beta must be a finite number >= 0, not {s.beta!r}")
    if not (number(s.low) and number(s.high) and 0 <= s.low <= s.high):
        problems.append(f"low and high must be finite with 0 <= low <= high, not low {s.low!r}, high {s.high!r}")
    for name in ("n", "seed"):
        value = getattr(s, name)
        if not isinstance(value, int) or isinstance(value, bool) or (name == "seed" and value < 0):
            problems.append(f"{name} must be an integer{' >= 0' if name == 'seed' else ''}, not {value!r}")
    if s.group not in GROUPS:
        problems.append(f"group must be one of {', '.join(GROUPS)}, not {s.group!r}")
    return problems


def failed_rules(lengths: Lengths, t_ref: float, t_cut: int, s: SelectionSettings) -> list[str]:
    """The rules (RULES order) that one question fails."""
    lb, lt = lengths.answer_base, lengths.answer_tuned
    mean = (lb + lt) / 2
    failed = []
    if lengths.prompt_base != lengths.prompt_tuned:
        failed.append("prompt_length")
    if min(lb, lt) < t_cut:
        failed.append("min_length")
    if not math.floor(s.low * t_ref) <= mean <= math.floor(s.high * t_ref):
        failed.append("mean_range")
    if mean > 0 and abs(lb - lt) / mean > s.beta:
        failed.append("length_ratio")
    return failed


def select(lengths: Mapping[Any, Lengths], settings: SelectionSettings) -> Selection:
    """Apply Eq. 10-12 to the group's questions {idx: Lengths}; see the module docstring.
    ValueError for unusable settings (settings_problems) or an empty group."""
    problems = settings_problems(settings)
    if problems:
        raise ValueError("invalid selection settings: " + "; ".join(problems))
    if not lengths:
        raise ValueError(f"group {settings.group!r} is empty: no question to select from")
    members = sort_idx(lengths)
    t_ref = min(sum(lengths[i].answer_base for i in members) / len(members),
                sum(lengths[i].answer_tuned for i in members) / len(members))
    t_cut = max(math.floor(settings.alpha * t_ref), 1)
    removed = dict.fromkeys(RULES, 0)
    failing = dict.fromkeys(RULES, 0)
    kept = []
    for idx in members:
        failed = failed_rules(lengths[idx], t_ref, t_cut, settings)
        for rule in failed:
            failing[rule] += 1
        if failed:
            removed[failed[0]] += 1
        else:
            kept.append(idx)
    if 0 < settings.n < len(kept):
        rng = np.random.default_rng(settings.seed)
        drawn = sort_idx(kept[i] for i in rng.choice(len(kept), size=settings.n, replace=False))
    else:
        drawn = list(kept)
    counts = {"group": len(members), "removed": removed, "failing": failing,
              "kept": len(kept), "drawn": len(drawn)}
    return Selection(t_ref, t_cut, drawn, counts, asdict(settings))


def none_kept(selection: Selection, needed: int = 1) -> str:
    """The message for a selection that kept fewer than `needed` questions."""
    kept = len(selection.idx)
    what = "no question" if not kept else f"only {kept} question{'s' if kept > 1 else ''}"
    return (f"{what} of group {selection.settings['group']!r} pass{'es' if kept < 2 else ''} the selection rules "
            f"(T_ref {selection.t_ref:.1f}, T_cut {selection.t_cut}, removed per rule {selection.counts['removed']})"
            + (f", and a run's metrics need at least {needed}" if needed > 1 else "")
            + "; relax beta/low/high, choose another group (--group) or use a larger dataset")


def empty_group_message(group: str, sizes: Mapping[str, int]) -> str:
    """Why `group` has nothing to select, naming the groups that have questions, with counts."""
    have = [f"{GROUP_LABELS[g]} ({g}): {n}" for g, n in sizes.items() if n]
    return (f"group {group!r} ({GROUP_LABELS[group]}) is empty; "
            + (f"groups with questions: {', '.join(have)}" if have else
               "no question is graded in both answer files"))


def group_lengths(base: list[Sample], tuned: list[Sample], group: str) -> tuple[dict[Any, Lengths], list[str]]:
    """{idx: Lengths} of the questions of `group`, plus messages about ungradable or duplicate
    samples. ValueError if the group is empty (empty_group_message)."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; one of {', '.join(GROUPS)}")
    messages = []
    by_model = []
    for name, samples in (("base", base), ("tuned", tuned)):
        scores, problems = scores_of(samples)
        messages += [f"{name}: {m}" for m in problems]
        by_idx: dict[Any, Sample] = {}
        for s in samples:
            if s.idx in by_idx:
                messages.append(f"{name}: duplicate idx {s.idx!r} (first one kept)")
            by_idx.setdefault(s.idx, s)
        by_model.append((scores, by_idx))
    (bscores, bsamples), (tscores, tsamples) = by_model
    by_group = groups(bscores, tscores)
    members = by_group[group]
    if not members:
        raise ValueError(empty_group_message(group, {g: len(m) for g, m in by_group.items()}))
    return {i: Lengths(len(bsamples[i].prompt_ids), len(tsamples[i].prompt_ids),
                       len(bsamples[i].answer_ids), len(tsamples[i].answer_ids)) for i in members}, messages


def write_selection(out_dir: str | Path, base: list[Sample], tuned: list[Sample], selection: Selection,
                    sources: Mapping[str, str] | None = None) -> None:
    """<out_dir>/base.jsonl, tuned.jsonl (drawn samples, same idx order) and selection.json."""
    out_dir = Path(out_dir)
    for name, samples in (("base", base), ("tuned", tuned)):
        by_idx: dict[Any, Sample] = {}
        for s in samples:
            by_idx.setdefault(s.idx, s)
        write_samples(out_dir / f"{name}.jsonl", [by_idx[i] for i in selection.idx])
    meta = {**asdict(selection), "sources": dict(sources or {})}
    write_bytes_atomic(out_dir / "selection.json", (json.dumps(meta, indent=2, default=str) + "\n").encode("utf-8"))


def read_answers(base: str | None, tuned: str | None, joined: str | None,
                 group: str) -> tuple[list[Sample], list[Sample], dict[str, str], list[str]]:
    """Both models' answers from two harness files or one joined file (whose rows are all of
    `group`): (base, tuned, sources, warnings about skipped lines)."""
    if joined:
        b, t, report = read_joined(joined, group)
        reports, sources = [report], {"joined": joined}
    else:
        (b, rb), (t, rt) = read_samples(base), read_samples(tuned)
        reports, sources = [rb, rt], {"base": base, "tuned": tuned}
    return b, t, sources, [r.summary() for r in reports if r.problems]


def command(argv: list[str]) -> int:
    """`eapcore select (--base A --tuned B | --joined FILE) [--alpha X] --out DIR [...]`."""
    d = SelectionSettings()
    ap = argparse.ArgumentParser(prog="eapcore select",
                                 description="Pick and truncate samples of a base/tuned pair (paper Eq. 10-12).")
    ap.add_argument("--base", help="base model answers jsonl (harness format)")
    ap.add_argument("--tuned", help="tuned model answers jsonl (harness format)")
    ap.add_argument("--joined", help="instead of --base/--tuned: one joined file of both models' answers "
                                     "(the authors' all_correct.jsonl); its rows are the questions of --group")
    ap.add_argument("--alpha", type=float, default=d.alpha, help="T_cut = max(floor(alpha * T_ref), 1); default %(default)s")
    ap.add_argument("--beta", type=float, default=d.beta, help="max |len_b - len_t| / mean")
    ap.add_argument("--low", type=float, default=d.low, help="mean length >= floor(low * T_ref)")
    ap.add_argument("--high", type=float, default=d.high, help="mean length <= floor(high * T_ref)")
    ap.add_argument("--n", type=int, default=d.n, help="questions to draw (<= 0: all kept)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--group", choices=GROUPS, default=d.group,
                    help="the answer group to select from (with --joined: the group the file's rows are)")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    two_files = bool(args.base and args.tuned)
    if bool(args.joined) == bool(args.base or args.tuned) or not (args.joined or two_files):
        ap.error("give --base and --tuned, or --joined")
    settings = SelectionSettings(args.alpha, args.beta, args.low, args.high, args.n, args.seed, args.group)
    problems = settings_problems(settings)
    if problems:
        ap.error("; ".join(problems))
    try:
        base, tuned, sources, warnings = read_answers(args.base, args.tuned, args.joined, settings.group)
        lengths, messages = group_lengths(base, tuned, settings.group)
        for msg in warnings + messages:
            print(f"warning: {msg}", file=sys.stderr)
        selection = select(lengths, settings)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not selection.idx:
        print(f"error: {none_kept(selection)}; nothing was written to {args.out}", file=sys.stderr)
        return 2
    write_selection(args.out, base, tuned, selection, sources)
    print(json.dumps({k: v for k, v in asdict(selection).items() if k != "idx"} | {"n_idx": len(selection.idx)},
                     indent=2, default=str))
    return 0
