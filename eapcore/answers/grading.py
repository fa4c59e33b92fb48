"""Final-answer extraction, equivalence (math-verify), accuracy and the four groups of a pair.

Conventions:
- A model's final answer is the content of its last `\\boxed{...}` (or `\\fbox{...}`), braces
  balanced; an answer with no complete boxed expression has pred "" and is wrong.
- References: GSM8K = the number after `####`; MATH = the last boxed expression of the solution;
  other datasets = the answer text with its outer `$...$` removed (see eapcore.answers.data).
- Equivalence is math-verify's `parse` + `verify` (gold first). Both sides get the same light
  normalisation: unescaped `$` removed, then wrapped in `\\boxed{}`. Each call is guarded by
  math-verify's own timeouts (signal based, main thread only); off the main thread the whole batch
  runs in a child process so that the timeouts still apply.
- Scores are keyed by the sample's `idx`.
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from eapcore.files import shorten
from eapcore.harness import first
from eapcore.specs import GROUPS

PARSE_TIMEOUT_S = 5
VERIFY_TIMEOUT_S = 5
MAX_ANSWER_CHARS = 2000  # longer answers are not parsed (graded wrong): math-verify can hang on them

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


# ---------------------------------------------------------------------------------- extraction
def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (also `\\boxed 5`), or None if absent/unclosed."""
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd_len = len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox")
    rest = text[start + cmd_len:]
    if not rest.lstrip(" ").startswith("{"):
        if rest.startswith(" "):  # `\boxed 5$`: up to the next `$` or end of line
            return re.split(r"[$\n]", rest.strip(), maxsplit=1)[0].strip() or None
        return None
    rest = rest.lstrip(" ")
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i].strip()
    return None


def extract_answer(text: str) -> str:
    """A model answer's final answer: its last boxed expression, or "" when it has none."""
    return last_boxed(text) or ""


def gsm8k_reference(answer: str) -> str:
    """GSM8K reference: the number after `####`, thousands separators removed."""
    if "####" not in answer:
        raise ValueError("GSM8K answer has no '####' marker")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


# --------------------------------------------------------------------------------- equivalence
def _normalise(answer: str) -> str:
    return _UNESCAPED_DOLLAR.sub(" ", answer).strip()


def parse_answer(answer: str) -> tuple:
    """math-verify's parse of a final answer (normalised as in the module docstring): a tuple of
    sympy objects and/or the matched string (empty when nothing was found). Main thread only."""
    return _parse(_normalise(answer))


@functools.lru_cache(maxsize=65536)
def _parse(answer: str) -> tuple:
    """Cached (references repeat across models) parse of a normalised answer."""
    from math_verify import parse

    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return ()
    return tuple(parse("\\boxed{" + answer + "}", parsing_timeout=PARSE_TIMEOUT_S))


def is_equivalent(pred: str, gt: str) -> bool:
    """True when `pred` is mathematically equivalent to the reference `gt` (math-verify).

    Must run on the main thread (math-verify's timeouts use SIGALRM); use `grade_pairs` elsewhere.
    """
    from math_verify import verify

    gold, target = _parse(_normalise(gt)), _parse(_normalise(pred))
    if not gold or not target:
        return False
    return bool(verify(list(gold), list(target), timeout_seconds=VERIFY_TIMEOUT_S))


def _grade_list(pairs: list[tuple[str, str]]) -> list[bool]:
    return [is_equivalent(pred, gt) for pred, gt in pairs]


def grade_pairs(pairs: Iterable[tuple[str, str]]) -> list[bool]:
    """[(pred, gt)] -> [equivalent]; safe from any thread (off the main thread: a child process)."""
    pairs = list(pairs)
    if threading.current_thread() is threading.main_thread() or not pairs:
        return _grade_list(pairs)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_grade_list, pairs).result()


# ------------------------------------------------------------------------------ sample scores
def score_fields(fields: Mapping[str, Any]) -> tuple[bool | None, str]:
    """A sample's stored grade from its answers-file fields: (score, how), score None if ungradable.

    Order: `score` (first element) if present, which must be true or false (anything else makes
    the sample ungradable: it is reported, never silently re-graded); else `pred` vs `gt`; else
    the last boxed expression of `code` vs `gt`. Grading here is main-thread only (see `grade_pairs`).
    """
    if "score" in fields:
        score = first(fields["score"])
        if isinstance(score, bool):
            return score, "stored"
        return None, (f"`score` is {shorten(json.dumps(fields['score'], default=str), 40)} "
                      f"({type(score).__name__}), not true or false; fix the file or regrade it (--regrade)")
    gt = fields.get("gt")
    if gt is None or isinstance(gt, (list, dict)):
        return None, "no `score` and no usable `gt` field"
    pred = first(fields.get("pred"))
    if isinstance(pred, str):
        return is_equivalent(pred, str(gt)), "pred"
    code = first(fields.get("code"))
    if isinstance(code, str):
        return is_equivalent(extract_answer(code), str(gt)), "code"
    return None, "no `score`, `pred` or `code` field"


def scores_of(samples: Iterable[Any]) -> tuple[dict[Any, bool], list[str]]:
    """{idx: correct} of harness samples (eapcore.harness.Sample), plus a message per ungradable one."""
    scores: dict[Any, bool] = {}
    problems: list[str] = []
    for sample in samples:
        score, how = score_fields(sample.extra)
        if score is None:
            problems.append(f"idx {sample.idx}: cannot grade ({how})")
        else:
            scores[sample.idx] = score
    return scores, problems


def accuracy(scores: Mapping[Any, bool]) -> dict[str, float | int]:
    """{'n', 'correct', 'accuracy'} of an {idx: correct} mapping (accuracy 0.0 when empty)."""
    n, correct = len(scores), sum(bool(v) for v in scores.values())
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0}


def sort_idx(ids: Iterable[Any]) -> list[Any]:
    """Sort idx values: integers numerically first, then strings."""
    return sorted(ids, key=lambda i: (isinstance(i, str), i if isinstance(i, str) else int(i)))


def groups(base: Mapping[Any, bool], tuned: Mapping[Any, bool]) -> dict[str, list[Any]]:
    """The four groups over the idx graded in both: both_correct, both_wrong,
    base_only (base right, tuned wrong), tuned_only (base wrong, tuned right); idx sorted."""
    key = {(True, True): "both_correct", (False, False): "both_wrong",
           (True, False): "base_only", (False, True): "tuned_only"}
    out: dict[str, list[Any]] = {g: [] for g in GROUPS}
    for idx in sort_idx(set(base) & set(tuned)):
        out[key[bool(base[idx]), bool(tuned[idx])]].append(idx)
    return out


def regrade(samples: Iterable[Any]) -> list[str]:
    """Recompute `pred` and `score` of each sample in place from its `code` and `gt`.

    Returns a message per sample that cannot be graded (no `code` text or no `gt`); those keep
    their fields unchanged.
    """
    todo, problems = [], []
    for sample in samples:
        code, gt = first(sample.extra.get("code")), sample.extra.get("gt")
        if not isinstance(code, str) or gt is None:
            problems.append(f"idx {sample.idx}: cannot regrade (needs `code` text and `gt`)")
            continue
        todo.append((sample, extract_answer(code), str(gt)))
    for (sample, pred, _), ok in zip(todo, grade_pairs((p, g) for _, p, g in todo)):
        sample.extra["pred"] = [pred]
        sample.extra["score"] = [ok]
    return problems


# ---------------------------------------------------------------------------------------- CLI
def command(argv: list[str]) -> int:
    """`python -m eapcore grade FILE [FILE ...] [--regrade] [--write] [--groups]`."""
    from eapcore.harness import read_samples, write_samples

    ap = argparse.ArgumentParser(prog="python -m eapcore grade",
                                 description="Accuracy of answers files (harness format).")
    ap.add_argument("files", nargs="+", help="answers jsonl file(s)")
    ap.add_argument("--regrade", action="store_true",
                    help="recompute pred/score from the answer text (`code`) and `gt`")
    ap.add_argument("--write", action="store_true",
                    help="write pred/score back into each file (with --regrade); unreadable lines are dropped")
    ap.add_argument("--groups", action="store_true",
                    help="with two files (base, tuned): sizes and idx of the four groups")
    args = ap.parse_args(argv)
    if args.groups and len(args.files) != 2:
        ap.error("--groups needs exactly two files: BASE TUNED")
    if args.write and not args.regrade:
        ap.error("--write only makes sense with --regrade")
    report: dict[str, Any] = {}
    all_scores = []
    for path in args.files:
        try:
            samples, read = read_samples(path)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        problems = list(read.problems)
        if args.regrade:
            problems += regrade(samples)
            if args.write:
                write_samples(path, samples)
        scores, ungraded = scores_of(samples)
        problems += ungraded
        no_box = sum(1 for s in samples if first(s.extra.get("pred")) == "")
        report[path] = {**accuracy(scores), "no_boxed_answer": no_box, "problems": problems}
        for msg in problems:
            print(f"warning: {path}: {msg}", file=sys.stderr)
        all_scores.append(scores)
    if args.groups:
        members = groups(all_scores[0], all_scores[1])
        report["groups"] = {g: {"n": len(ids), "idx": ids} for g, ids in members.items()}
    print(json.dumps(report, indent=2, default=str))
    return 0
