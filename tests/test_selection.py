"""Selection (paper Eq. 10-12) against hand-computed expectations on constructed answer files."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from eapcore import cli
from eapcore.harness import Sample, read_samples, write_jsonl
from eapcore.answers.selection import Lengths, failed_rules, group_lengths, select
from eapcore.specs import SelectionSettings

# idx: (prompt_base, prompt_tuned, answer_base, answer_tuned, base_right, tuned_right)
QUESTIONS = {
    0: (5, 5, 10, 10, True, True),
    1: (5, 5, 12, 8, True, True),    # ratio 4/10 = 0.4: kept
    2: (5, 6, 10, 10, True, True),   # prompt lengths differ
    3: (5, 5, 1, 1, True, True),     # shorter than T_cut (and mean below the range)
    4: (5, 5, 30, 30, True, True),   # mean 30 above floor(1.5 T_ref) = 16
    5: (5, 5, 4, 16, True, True),    # ratio 12/10 = 1.2 > 0.5
    6: (5, 5, 10, 9, True, True),
    7: (5, 5, 12, 20, True, True),   # mean 16 = upper bound, ratio 8/16 = 0.5 = beta: kept
    8: (5, 5, 10, 10, False, True),  # tuned_only
    9: (5, 5, 10, 10, False, False),  # both_wrong
}
# both_correct = 0..7: mean |y_base| = 89/8 = 11.125, mean |y_tuned| = 104/8 = 13
T_REF = 11.125
T_CUT = 3  # floor(0.3 * 11.125) = floor(3.3375)
KEPT = [0, 1, 6, 7]  # mean range [floor(5.5625), floor(16.6875)] = [5, 16]


def samples(side: int) -> list[Sample]:
    """side 0 = base, 1 = tuned; tokens are distinct per model so the outputs can be told apart."""
    out = []
    for idx, q in QUESTIONS.items():
        prompt, answer, right = q[side], q[2 + side], q[4 + side]
        out.append(Sample(idx, list(range(prompt)), [100 * (side + 1) + t for t in range(answer)],
                          {"gt": "1", "pred": ["1" if right else "2"]}))
    return out


def test_lengths_and_rules_by_hand():
    lengths, messages = group_lengths(samples(0), samples(1), "both_correct")
    assert messages == [] and sorted(lengths) == list(range(8))
    assert lengths[2] == Lengths(5, 6, 10, 10)
    s = SelectionSettings(alpha=0.3)
    assert failed_rules(lengths[3], T_REF, T_CUT, s) == ["min_length", "mean_range"]
    assert failed_rules(lengths[7], T_REF, T_CUT, s) == []
    assert failed_rules(Lengths(5, 5, 12, 21), T_REF, T_CUT, s) == ["mean_range", "length_ratio"]


def test_select_counts_every_rule():
    lengths, _ = group_lengths(samples(0), samples(1), "both_correct")
    sel = select(lengths, SelectionSettings(alpha=0.3, n=100))
    assert sel.t_ref == T_REF and sel.t_cut == T_CUT
    assert sel.idx == KEPT
    assert sel.counts == {
        "group": 8, "kept": 4, "drawn": 4,
        "removed": {"prompt_length": 1, "min_length": 1, "mean_range": 1, "length_ratio": 1},
        "failing": {"prompt_length": 1, "min_length": 1, "mean_range": 2, "length_ratio": 1}}


def test_parameters_move_the_bounds():
    lengths, _ = group_lengths(samples(0), samples(1), "both_correct")
    assert select(lengths, SelectionSettings(alpha=0.3, beta=0.45)).idx == [0, 1, 6]  # 7 has ratio 0.5
    assert select(lengths, SelectionSettings(alpha=0.3, high=1.4)).idx == [0, 1, 6]  # bound 15 < 16
    assert select(lengths, SelectionSettings(alpha=0.3, high=3.0)).idx == [0, 1, 4, 6, 7]
    assert select(lengths, SelectionSettings(alpha=0.3, low=0.0)).idx == KEPT  # 3 still below T_cut
    # alpha = 0.9: T_cut = floor(10.0125) = 10, so 1 (tuned 8) and 6 (tuned 9) are too short
    sel = select(lengths, SelectionSettings(alpha=0.9))
    assert sel.t_cut == 10 and sel.idx == [0, 7]
    assert select(lengths, SelectionSettings(alpha=0.01)).t_cut == 1  # max(floor(0.11), 1)


def test_draw_is_seeded_and_documented():
    lengths, _ = group_lengths(samples(0), samples(1), "both_correct")
    draws = {}
    for seed in range(6):
        sel = select(lengths, SelectionSettings(alpha=0.3, n=2, seed=seed))
        expected = sorted(KEPT[i] for i in np.random.default_rng(seed).choice(4, size=2, replace=False))
        assert sel.idx == expected and sel.counts["drawn"] == 2
        assert select(lengths, SelectionSettings(alpha=0.3, n=2, seed=seed)).idx == sel.idx
        draws[seed] = tuple(sel.idx)
    assert len(set(draws.values())) > 1  # the seed changes the draw
    assert select(lengths, SelectionSettings(alpha=0.3, n=0)).idx == KEPT  # n <= 0: all kept


def test_other_groups():
    for group, members in (("tuned_only", [8]), ("both_wrong", [9])):
        lengths, _ = group_lengths(samples(0), samples(1), group)
        assert sorted(lengths) == members
    # an empty group names the groups that have questions, with their counts
    with pytest.raises(ValueError, match=r"'base_only' .* is empty; groups with questions: both correct "
                                         r"\(both_correct\): 8, both wrong \(both_wrong\): 1, base wrong, tuned right "
                                         r"\(tuned_only\): 1$"):
        group_lengths(samples(0), samples(1), "base_only")
    with pytest.raises(ValueError, match="empty"):
        select({}, SelectionSettings(group="base_only"))
    with pytest.raises(ValueError, match="unknown group"):
        group_lengths(samples(0), samples(1), "everything")


def write_answers(path, side, drop_scores=False):
    rows = []
    for s in samples(side):
        right = s.extra["pred"] == ["1"]
        row = s.to_json() | {"code": [f"\\boxed{{{s.extra['pred'][0]}}}"]}
        if not drop_scores:
            row |= {"score": [right]}
            row.pop("pred")
        rows.append(row)
    write_jsonl(path, rows)


@pytest.mark.parametrize("drop_scores", [False, True])
def test_select_command_writes_attribute_input(tmp_path, capsys, drop_scores):
    """Scores come from `score`, or (absent) from grading `pred` against `gt`."""
    base, tuned, out = tmp_path / "base_in.jsonl", tmp_path / "tuned_in.jsonl", tmp_path / "sel"
    write_answers(base, 0, drop_scores)
    write_answers(tuned, 1, drop_scores)
    with open(base, "a") as fh:
        fh.write("{broken\n")
    rc = cli.main(["select", "--base", str(base), "--tuned", str(tuned), "--alpha", "0.3",
                   "--n", "3", "--seed", "7", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    assert "line 11: malformed JSON" in captured.err
    meta = json.loads((out / "selection.json").read_text())
    expected = sorted(KEPT[i] for i in np.random.default_rng(7).choice(4, size=3, replace=False))
    assert meta["idx"] == expected and meta["t_ref"] == T_REF and meta["t_cut"] == T_CUT
    assert meta["settings"] == {"alpha": 0.3, "beta": 0.5, "low": 0.5, "high": 1.5, "n": 3, "seed": 7,
                                "group": "both_correct"}
    assert meta["counts"]["removed"] == {"prompt_length": 1, "min_length": 1, "mean_range": 1,
                                         "length_ratio": 1}
    b, rb = read_samples(out / "base.jsonl")
    t, rt = read_samples(out / "tuned.jsonl")
    assert rb.problems == rt.problems == []
    assert [s.idx for s in b] == [s.idx for s in t] == expected
    for s in b:  # full answers, each model's own
        assert s.answer_ids == [100 + k for k in range(QUESTIONS[s.idx][2])]
    for s in t:
        assert s.answer_ids == [200 + k for k in range(QUESTIONS[s.idx][3])]


def test_select_command_errors(tmp_path, capsys):
    base, tuned = tmp_path / "b.jsonl", tmp_path / "t.jsonl"
    write_answers(base, 0)
    write_answers(tuned, 1)
    args = ["select", "--base", str(base), "--tuned", str(tuned), "--alpha", "0.5", "--out", str(tmp_path / "o")]
    assert cli.main(args + ["--group", "base_only"]) == 2
    err = capsys.readouterr().err
    assert "group 'base_only' (base right, tuned wrong) is empty; groups with questions:" in err
    assert "both correct (both_correct): 8" in err and "both wrong (both_wrong): 1" in err
    assert cli.main(["select", "--base", str(tmp_path / "nope.jsonl"), "--tuned", str(tuned),
                     "--alpha", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli.main(["select", "--base", str(empty), "--tuned", str(tuned), "--alpha", "0.5",
                     "--out", str(tmp_path / "o")]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_select_that_keeps_no_question_fails_and_writes_nothing(tmp_path, capsys):
    base, tuned, out = tmp_path / "b.jsonl", tmp_path / "t.jsonl", tmp_path / "o"
    write_answers(base, 0)
    write_answers(tuned, 1)
    assert cli.main(["select", "--base", str(base), "--tuned", str(tuned), "--alpha", "0.5", "--beta", "0",
                     "--low", "1.4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no question of group 'both_correct' passes the selection rules (T_ref ")
    assert err.rstrip().endswith("relax beta/low/high, choose another group (--group) or use a larger dataset; "
                                 f"nothing was written to {out}")
    assert not out.exists()


@pytest.mark.parametrize("option, value, said", [
    ("--alpha", "inf", "alpha must be a finite number > 0, not inf"),
    ("--alpha", "nan", "alpha must be a finite number > 0, not nan"),
    ("--alpha", "0", "alpha must be a finite number > 0, not 0.0"),
    ("--beta", "-0.1", "beta must be a finite number >= 0, not -0.1"),
    ("--low", "2", "low and high must be finite with 0 <= low <= high, not low 2.0, high 1.5"),
])
def test_bad_selection_settings_are_refused_up_front(tmp_path, capsys, option, value, said):
    base, tuned = tmp_path / "b.jsonl", tmp_path / "t.jsonl"
    write_answers(base, 0)
    write_answers(tuned, 1)
    args = {"--alpha": "0.5", option: value}
    with pytest.raises(SystemExit) as exit_:
        cli.main(["select", "--base", str(base), "--tuned", str(tuned), *[x for kv in args.items() for x in kv],
                  "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().endswith(f"error: {said}")
    assert not (tmp_path / "o").exists()
    settings = SelectionSettings(**{"alpha": 0.5, option[2:]: float(value)})
    with pytest.raises(ValueError, match=f"invalid selection settings: {re.escape(said)}"):
        select({0: Lengths(3, 3, 10, 10)}, settings)
    from eapcore.runs.keys import check_spec
    from eapcore.runs.errors import RunError
    from eapcore.specs import DatasetSpec, ModelSpec, PairSpec, RunSpec

    spec = RunSpec(PairSpec("p", ModelSpec("a"), ModelSpec("b")), DatasetSpec("d"), selection=settings)
    with pytest.raises(RunError, match=f"invalid run spec: {re.escape(said)}"):
        check_spec(spec)


def harness_rows(side: int) -> list[dict]:
    """What the evaluation harness writes: prompt and answer ids as one list per sampled answer."""
    rows = []
    for row in (s.to_json() for s in samples(side)):
        right = row.pop("pred") == ["1"]
        rows.append(row | {"prompt_token_ids": [row["prompt_token_ids"]], "score": [right]})
    return rows


def joined_rows(group_members, ranges: bool = True) -> list[dict]:
    """The authors' joined format for the given idx: both models' prompt and answer tokens side by side."""
    base, tuned = ({s.idx: s for s in samples(side)} for side in (0, 1))
    rows = []
    for i in group_members:
        row = {"idx": i, "question": f"question {i}"}
        for prefix, s in (("base", base[i]), ("rl", tuned[i])):
            row[f"{prefix}_prompt_tokens"] = s.prompt_ids
            row[f"{prefix}_answer_tokens"] = s.answer_ids
            if ranges:
                row[f"{prefix}_answer_tokens_range"] = [len(s.prompt_ids), len(s.prompt_ids) + len(s.answer_ids)]
        rows.append(row)
    return rows


def _select(tmp_path, name, inputs, capsys) -> tuple[dict, list, list]:
    out = tmp_path / name
    assert cli.main(["select", *inputs, "--alpha", "0.3", "--n", "3", "--seed", "7", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    meta = json.loads((out / "selection.json").read_text())
    return meta, read_samples(out / "base.jsonl")[0], read_samples(out / "tuned.jsonl")[0]


def test_harness_files_as_the_harness_writes_them(tmp_path, capsys):
    """prompt_token_ids as one list per sampled answer ([[...]]) reads as its first list, and
    `select` on such files gives what it gives on flat files."""
    nested = [tmp_path / "b_nested.jsonl", tmp_path / "t_nested.jsonl"]
    for side, path in enumerate(nested):
        write_jsonl(path, harness_rows(side))
    read, report = read_samples(nested[0])
    assert report.problems == [] and [s.prompt_ids for s in read] == [s.prompt_ids for s in samples(0)]
    flat = [tmp_path / "b.jsonl", tmp_path / "t.jsonl"]
    for side, path in enumerate(flat):
        write_answers(path, side)
    got = _select(tmp_path, "nested", ["--base", str(nested[0]), "--tuned", str(nested[1])], capsys)
    want = _select(tmp_path, "flat", ["--base", str(flat[0]), "--tuned", str(flat[1])], capsys)
    assert got[0]["idx"] == want[0]["idx"] == sorted(KEPT[i] for i in np.random.default_rng(7).choice(4, 3, replace=False))
    assert [(s.prompt_ids, s.answer_ids) for s in got[1] + got[2]] == [(s.prompt_ids, s.answer_ids) for s in want[1] + want[2]]


def test_select_joined_file_equals_two_files(tmp_path, capsys):
    """`select --joined all_correct.jsonl` (the both-correct questions, joined) draws the same
    questions, T_ref, T_cut and counts as --base/--tuned on the two harness files, and writes the
    same samples; a bad range or a row missing a model's tokens is reported and skipped."""
    flat = [tmp_path / "b.jsonl", tmp_path / "t.jsonl"]
    for side, path in enumerate(flat):
        write_answers(path, side)
    joined = tmp_path / "all_correct.jsonl"
    rows = joined_rows(range(8))
    bad_range = dict(rows[0], idx=50, base_answer_tokens_range=[0, 10])
    no_rl = {k: v for k, v in rows[0].items() if not k.startswith("rl_")} | {"idx": 51}
    write_jsonl(joined, rows + [bad_range, no_rl])
    got = _select(tmp_path, "joined", ["--joined", str(joined)], capsys)
    err = capsys.readouterr().err
    assert "line 9: `base_answer_tokens_range` is [0, 10] but the answer sits at [5, 15)" in err
    assert "line 10: missing field(s) rl_prompt_tokens, rl_answer_tokens" in err
    want = _select(tmp_path, "two", ["--base", str(flat[0]), "--tuned", str(flat[1])], capsys)
    for k in ("idx", "t_ref", "t_cut", "counts", "settings"):
        assert got[0][k] == want[0][k], k
    assert got[0]["t_ref"] == T_REF and got[0]["sources"] == {"joined": str(joined)}
    assert [(s.idx, s.prompt_ids, s.answer_ids) for s in got[1] + got[2]] == \
           [(s.idx, s.prompt_ids, s.answer_ids) for s in want[1] + want[2]]
    assert all(s.extra["score"] == [True] for s in got[1] + got[2]) and got[1][0].extra["question"]
    # rows without idx are numbered by line (0-based); ranges are optional
    write_jsonl(joined, [{k: v for k, v in r.items() if k != "idx"} for r in joined_rows(range(8), ranges=False)])
    assert _select(tmp_path, "by_line", ["--joined", str(joined)], capsys)[0]["idx"] == want[0]["idx"]


def test_select_joined_options(tmp_path, capsys):
    joined = tmp_path / "all_wrong.jsonl"
    write_jsonl(joined, joined_rows([9]))
    out = tmp_path / "o"
    # the file's rows are declared the --group's questions
    assert cli.main(["select", "--joined", str(joined), "--group", "both_wrong", "--out", str(out)]) == 0
    assert json.loads((out / "selection.json").read_text())["idx"] == [9]
    assert read_samples(out / "tuned.jsonl")[0][0].extra["score"] == [False]
    with pytest.raises(SystemExit):  # --joined and --base are exclusive
        cli.main(["select", "--joined", str(joined), "--base", str(joined), "--out", str(out)])
    assert "give --base and --tuned, or --joined" in capsys.readouterr().err
    assert cli.main(["select", "--joined", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
    assert "joined answers file" in capsys.readouterr().err
