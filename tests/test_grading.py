"""Grading: boxed extraction, math-verify equivalence on the real references, accuracy, groups.

Grading every reference of the four files (9637) takes about 2 minutes on one core, mostly College
Math (about 40 ms each; 3 ms for the others), too slow for this suite. So by default the reference
tests use a fixed-seed sample: per file 300 references at random plus 150 of those containing
fractions, intervals, roots, units, degrees, percentages or text (College Math: 100 + 50). Set
EAPCORE_ALL_REFERENCES=1 to grade all of them (the known failures below hold for the full set).
"""
from __future__ import annotations

import json
import os
import random
import re
import threading

import pytest
import sympy

from eapcore import cli
from eapcore.answers.data import read_problems_file
from eapcore.answers.grading import (accuracy, extract_answer, grade_pairs, groups, gsm8k_reference,
                             is_equivalent, last_boxed, parse_answer, scores_of)
from eapcore.harness import Sample, read_samples

FILES = ("math_test.jsonl", "math500_test.jsonl", "gsm8k_test.jsonl", "college_math_test.jsonl")
HARD = re.compile(r"\\[d]?frac|\\infty|\\cup|[\[(].*,.*[\])]|\\text|\\mbox|\\mathrm|\\circ|\\%|\\sqrt|\\pi")
ALL = os.environ.get("EAPCORE_ALL_REFERENCES") == "1"


def sampled_references(shared_data) -> list[tuple[str, object, str]]:
    """[(file, idx, reference)]: the fixed-seed sample described above (or all with ALL)."""
    rng = random.Random(0)
    out = []
    for name in FILES:
        problems, _ = read_problems_file(shared_data / name)
        if not ALL:
            n_random, n_hard = (100, 50) if name.startswith("college") else (300, 150)
            chosen = rng.sample(problems, n_random)
            ids = {p.idx for p in chosen}
            hard = [p for p in problems if HARD.search(p.answer) and p.idx not in ids]
            chosen += rng.sample(hard, min(n_hard, len(hard)))
            problems = chosen
        out += [(name, p.idx, p.answer) for p in problems]
    return out


# ------------------------------------------------------------------------------------ extraction
@pytest.mark.parametrize("text, expected", [
    (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{\{2, 3\}}", r"\{2, 3\}"),
    (r"\boxed{a{b{c}}d}", "a{b{c}}d"),
    (r"\fbox{7}", "7"),
    (r"The answer is \boxed 5$.", "5"),
    (r"\boxed {4}", "4"),
    (r"unclosed \boxed{3", None),
    ("no box here: 42", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected
    assert extract_answer(text) == (expected or "")


def test_gsm8k_reference():
    assert gsm8k_reference("a\nb <<2*3=6>>6\n#### 1,234") == "1234"
    with pytest.raises(ValueError, match="####"):
        gsm8k_reference("no marker")


# ----------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("pred, gt", [
    ("0.5", r"\frac12"), (r"\dfrac{3}{4}", r"\frac{3}{4}"), ("(1,2]", r"\left(1, 2\right]"),
    ("5", r"5\text{ cm}"), (r"90^\circ", "90"), ("x^2+1", "1+x^2"), (r"$10-4 n$", "10-4n"),
    ("3,4", "4,3"), (r"\sqrt{8}", r"2\sqrt{2}"), ("1000", "1,000"), (r"50\%", "50"),
])
def test_equivalent_forms(pred, gt):
    assert is_equivalent(pred, gt)


@pytest.mark.parametrize("pred, gt", [
    ("19", "18"), ("(1,2)", "(1,2]"), (r"\frac{2}{3}", r"\frac{3}{4}"), ("", "3"), ("3", ""),
    ("x^2", "x^3"),
])
def test_not_equivalent(pred, gt):
    assert not is_equivalent(pred, gt)


def test_oversized_answer_is_wrong_without_parsing():
    assert parse_answer("1+" * 2000 + "1") == ()
    assert not is_equivalent("1+" * 2000 + "1", "2001")


def test_grade_pairs_off_main_thread():
    """Off the main thread math-verify's SIGALRM timeouts fail; grade_pairs uses a child process."""
    result: list = []
    worker = threading.Thread(target=lambda: result.append(grade_pairs([("0.5", r"\frac12"), ("2", "3")])))
    worker.start()
    worker.join(120)
    assert result == [[True, False]]


# ------------------------------------------------------------------------- real reference answers
@pytest.fixture(scope="module")
def references(shared_data):
    return sampled_references(shared_data)


# References that math-verify does not find equivalent to themselves, over all 9637 (both are
# piecewise functions written with \\left\\{\\begin{array}...).
KNOWN_SELF_FAILURES = {("college_math_test.jsonl", 1130), ("college_math_test.jsonl", 1253)}


def test_every_reference_boxed_grades_correct(references):
    """A model answer that boxes the reference grades correct (through extraction + math-verify)."""
    failures = []
    for name, idx, ref in references:
        answer = f"Let us work it out.\nTherefore the final answer is $\\boxed{{{ref}}}$. Done."
        pred = extract_answer(answer)
        if pred != ref.strip() or not is_equivalent(pred, ref):
            failures.append((name, idx))
    assert set(failures) <= KNOWN_SELF_FAILURES, failures


# References that math-verify matches only as a string (no maths parsed), over all 9637: MATH 1
# (idx 1598, "\\frac{12}{5,\\!525}"), College Math 140 (answers in words or prose, "\\approx",
# "\\bigcup_k", "No solution"). They grade correct against the identical string only. In the
# default sample: College Math idx 1105, 1615, 2261, 2336, 2451, 2465 (prose around the maths).
STRING_ONLY_MAX = {"math_test.jsonl": 1, "math500_test.jsonl": 0, "gsm8k_test.jsonl": 0,
                   "college_math_test.jsonl": 140 if ALL else 6}


def _is_maths(value) -> bool:
    return isinstance(value, (sympy.Basic, sympy.MatrixBase))


def test_references_parse_to_maths(references):
    string_only: dict[str, list] = {name: [] for name in FILES}
    for name, idx, ref in references:
        if not any(_is_maths(p) for p in parse_answer(ref)):
            string_only[name].append((idx, ref))
    counts = {n: len(v) for n, v in string_only.items()}
    assert all(counts[n] <= STRING_ONLY_MAX[n] for n in FILES), (counts, string_only)


def _altered(ref: str) -> str | None:
    """A different value of the same kind: number + 1, fraction + 1, interval shifted by 1."""
    parsed = [p for p in parse_answer(ref) if _is_maths(p)]
    if not parsed:
        return None
    value = parsed[0]
    if isinstance(value, sympy.Number) and value.is_finite:
        return sympy.latex(value + 1)
    if isinstance(value, sympy.Interval) and value.start.is_finite and value.end.is_finite:
        shifted = sympy.Interval(value.start + 1, value.end + 1, value.left_open, value.right_open)
        return sympy.latex(shifted)
    return None


def test_altered_references_grade_wrong(references):
    altered, still_right = 0, []
    for name, idx, ref in references:
        alt = _altered(ref)
        if alt is None:
            continue
        altered += 1
        if is_equivalent(alt, ref):
            still_right.append((name, idx, ref, alt))
    assert altered > 0.6 * len(references)  # numbers, fractions and intervals: most of them
    assert still_right == []


def test_math500_answers_match_their_solutions(shared_data):
    """MATH-500's `answer` field against the last boxed expression of its own solution."""
    rows = [json.loads(line) for line in (shared_data / "math500_test.jsonl").read_text().splitlines()]
    mismatches = [(i, r["answer"], last_boxed(r["solution"])) for i, r in enumerate(rows)
                  if not is_equivalent(last_boxed(r["solution"]) or "", r["answer"])]
    assert len(mismatches) <= 0, mismatches


# ------------------------------------------------------------------------------ accuracy, groups
def test_groups_and_accuracy():
    base = {0: True, 1: True, 2: False, 3: False, 4: True}
    tuned = {0: True, 1: False, 2: True, 3: False, 5: True}
    assert groups(base, tuned) == {"both_correct": [0], "both_wrong": [3], "base_only": [1],
                                   "tuned_only": [2]}
    assert accuracy(base) == {"n": 5, "correct": 3, "accuracy": 0.6}
    assert accuracy({}) == {"n": 0, "correct": 0, "accuracy": 0.0}


def test_scores_from_stored_pred_or_code():
    samples = [Sample(0, [1], [2], {"score": [True]}),
               Sample(1, [1], [2], {"pred": ["3"], "gt": "3"}),
               Sample(2, [1], [2], {"code": [r"so \boxed{\frac{1}{2}}"], "gt": "0.5"}),
               Sample(3, [1], [2], {"code": ["no box"], "gt": "1"}),
               Sample(4, [1], [2], {"code": ["x"]})]
    scores, problems = scores_of(samples)
    assert scores == {0: True, 1: True, 2: True, 3: False}
    assert len(problems) == 1 and "idx 4" in problems[0]


def _harness_line(idx, text, gt, score=None):
    row = {"idx": idx, "question": "q", "gt": gt, "prompt_token_ids": [1, 2],
           "generate_token_ids": [[3, 4]], "code": [text]}
    if score is not None:
        row["score"] = [score]
    return json.dumps(row)


def test_grade_command_reports_accuracy(tmp_path, capsys):
    path = tmp_path / "answers.jsonl"
    lines = [_harness_line(0, r"so \boxed{18}", "18"), _harness_line(1, r"\boxed{\frac{1}{2}}", "0.5"),
             _harness_line(2, r"\boxed{7}", "8"), _harness_line(3, "I give up", "4"), "{not json"]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"idx": 9, "code": ["\xff"]}\n')
    assert cli.main(["grade", str(path), "--regrade", "--write"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)[str(path)]
    assert (report["n"], report["correct"], report["no_boxed_answer"]) == (4, 2, 1)
    assert report["accuracy"] == 0.5
    assert "line 5: malformed JSON" in out.err and "line 6: not UTF-8" in out.err
    samples, read = read_samples(path)  # written back: scores stored, bad lines dropped
    assert [s.extra["score"] for s in samples] == [[True], [True], [False], [False]]
    assert samples[3].extra["pred"] == [""] and read.problems == []


def test_grade_command_groups_and_errors(tmp_path, capsys):
    base, tuned = tmp_path / "b.jsonl", tmp_path / "t.jsonl"
    base.write_text("\n".join(_harness_line(i, "", "1", s) for i, s in enumerate([True, True, False])))
    tuned.write_text("\n".join(_harness_line(i, "", "1", s) for i, s in enumerate([True, False, True])))
    assert cli.main(["grade", str(base), str(tuned), "--groups"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {g: v["idx"] for g, v in report["groups"].items()} == {
        "both_correct": [0], "both_wrong": [], "base_only": [1], "tuned_only": [2]}
    assert cli.main(["grade", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_score_of_the_wrong_type_is_reported_not_regraded(tmp_path, capsys):
    """`score` must be true or false: "yes", 1 or null make the sample ungradable, with a message
    naming the value, instead of a silent re-grade from `pred`."""
    samples = [Sample(0, [1], [2], {"score": ["yes"], "pred": ["3"], "gt": "3"}),
               Sample(1, [1], [2], {"score": 1, "pred": ["3"], "gt": "3"}),
               Sample(2, [1], [2], {"score": [None], "pred": ["3"], "gt": "3"}),
               Sample(3, [1], [2], {"score": [False], "pred": ["3"], "gt": "3"})]
    scores, problems = scores_of(samples)
    assert scores == {3: False}
    assert problems == [
        'idx 0: cannot grade (`score` is ["yes"] (str), not true or false; fix the file or regrade it (--regrade))',
        "idx 1: cannot grade (`score` is 1 (int), not true or false; fix the file or regrade it (--regrade))",
        "idx 2: cannot grade (`score` is [null] (NoneType), not true or false; fix the file or regrade it (--regrade))"]
    path = tmp_path / "a.jsonl"
    path.write_text(_harness_line(0, r"\boxed{1}", "1", "yes") + "\n" + _harness_line(1, r"\boxed{1}", "1", True) + "\n")
    assert cli.main(["grade", str(path)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)[str(path)]["n"] == 1
    assert f"warning: {path}: idx 0: cannot grade (`score` is [\"yes\"] (str), not true or false" in out.err
