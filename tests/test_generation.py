"""Generation on CPU with tiny checkpoints: end to end through grade and select, resuming, import."""
from __future__ import annotations

import json

import pytest

from eapcore import cli
from eapcore.answers.data import encode_prompt, format_prompt, read_problems_file
from eapcore.answers.generation import (TransformersBackend, cut_at_eos, generate_answers, import_answers,
                                load_causal_lm, load_tokenizer)
from eapcore.harness import read_samples
from eapcore.specs import ModelSpec


@pytest.fixture(scope="module")
def gsm8k_small(shared_data, tmp_path_factory):
    """The 5 shortest GSM8K test questions, as a harness-format jsonl file."""
    rows = [json.loads(line) for line in (shared_data / "gsm8k_test.jsonl").read_text().splitlines()]
    rows = sorted(rows, key=lambda r: len(r["question"]))[:5]
    path = tmp_path_factory.mktemp("data") / "gsm8k_small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def llama(checkpoints):
    """(model, tokenizer) of the tiny llama checkpoint, float32 on CPU."""
    spec = ModelSpec(str(checkpoints["llama"]))
    return load_causal_lm(spec, "float32", "cpu"), load_tokenizer(spec)


class CountingBackend:
    """Wraps a backend: records the prompts it is asked for; optionally fails after `fail_after` calls."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner, self.fail_after, self.calls, self.prompts = inner, fail_after, 0, []

    def __call__(self, prompts, max_new_tokens):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.prompts += prompts
        return self.inner(prompts, max_new_tokens)


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 0, 0], {2}) == [5, 6, 2]
    assert cut_at_eos([5, 6, 7], {2}) == [5, 6, 7]
    assert cut_at_eos([2, 2], {2, 9}) == [2]


def test_end_to_end_generate_grade_select(checkpoints, gsm8k_small, tmp_path, capsys):
    """Two tiny models answer GSM8K questions; the answers are graded, selected and read back."""
    files = {}
    for side, arch in (("base", "llama"), ("tuned", "mistral")):
        files[side] = tmp_path / f"{side}.jsonl"
        rc = cli.main(["generate", "--model", str(checkpoints[arch]), "--source", str(gsm8k_small),
                       "--out", str(files[side]), "--max-new-tokens", "8", "--batch-size", "3",
                       "--dtype", "float32", "--backend", "transformers", "--no-progress"])
        assert rc == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["n_generated"], report["n_existing"], report["accuracy"]["n"]) == (5, 0, 5)
    tok = load_tokenizer(ModelSpec(str(checkpoints["llama"])))
    problems, _ = read_problems_file(gsm8k_small)
    rows = [json.loads(line) for line in files["base"].read_text().splitlines()]
    assert [r["idx"] for r in rows] == [p.idx for p in problems]
    for row, prob in zip(rows, problems):
        assert row["gt"] == prob.answer and row["question"] == prob.question
        assert row["prompt_token_ids"] == encode_prompt(tok, format_prompt(prob.question, "deepseek-math"))
        (answer,) = row["generate_token_ids"]
        assert 1 <= len(answer) <= 8 and tok.pad_token_id not in answer[:-1]
        assert tok.eos_token_id not in answer[:-1]  # EOS, if generated, is the last token kept
        assert row["code"] == [tok.decode(answer, skip_special_tokens=True)]
        assert row["score"] == [False] and row["pred"] == [""]  # random models: no boxed answer

    assert cli.main(["grade", str(files["base"]), str(files["tuned"]), "--groups"]) == 0
    graded = json.loads(capsys.readouterr().out)
    assert graded[str(files["base"])]["accuracy"] == 0.0
    assert graded["groups"]["both_wrong"]["n"] == 5

    out = tmp_path / "selected"
    assert cli.main(["select", "--base", str(files["base"]), "--tuned", str(files["tuned"]),
                     "--alpha", "0.01", "--beta", "100", "--low", "0", "--high", "100", "--n", "3",
                     "--group", "both_wrong", "--out", str(out)]) == 0
    meta = json.loads((out / "selection.json").read_text())
    assert meta["t_cut"] == 1 and meta["counts"]["group"] == 5 and len(meta["idx"]) == 3
    for side in ("base", "tuned"):
        selected, report = read_samples(out / f"{side}.jsonl")
        assert report.problems == [] and [s.idx for s in selected] == meta["idx"]
        original = {s.idx: s for s in read_samples(files[side])[0]}
        assert all(s.answer_ids == original[s.idx].answer_ids for s in selected)


def test_batched_equals_one_by_one(llama, gsm8k_small, tmp_path):
    """Left padding does not change greedy answers."""
    model, tok = llama
    problems, _ = read_problems_file(gsm8k_small)
    answers = {}
    for batch in (1, 5):
        out = tmp_path / f"b{batch}.jsonl"
        generate_answers(problems, out, TransformersBackend(model, tok), tok, "deepseek-math", 8, batch,
                         progress=False)
        answers[batch] = [s.answer_ids for s in read_samples(out)[0]]
    assert answers[1] == answers[5]


def test_resume_generates_only_missing(llama, gsm8k_small, tmp_path):
    model, tok = llama
    problems, _ = read_problems_file(gsm8k_small)
    out = tmp_path / "answers.jsonl"
    killed = CountingBackend(TransformersBackend(model, tok), fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        generate_answers(problems, out, killed, tok, "deepseek-math", 8, 2, progress=False)
    first_batch = out.read_text().splitlines()
    assert len(first_batch) == 2  # the batch before the kill was written and flushed
    with open(out, "a") as fh:  # a kill in the middle of writing a line
        fh.write('{"idx": %d, "prompt_token_ids": [1, 2' % problems[2].idx)

    resumed = CountingBackend(TransformersBackend(model, tok))
    report = generate_answers(problems, out, resumed, tok, "deepseek-math", 8, 2, progress=False)
    assert resumed.prompts == [encode_prompt(tok, format_prompt(p.question, "deepseek-math"))
                               for p in problems[2:]]
    assert (report.n_existing, report.n_generated, report.accuracy["n"]) == (2, 3, 5)
    assert len(report.read_problems) == 1 and "malformed JSON" in report.read_problems[0]
    lines = out.read_text().splitlines()
    assert lines[:2] == first_batch  # stored answers untouched
    assert [json.loads(line)["idx"] for line in lines] == [p.idx for p in problems]

    again = CountingBackend(TransformersBackend(model, tok))
    report = generate_answers(problems, out, again, tok, "deepseek-math", 8, 2, progress=False)
    assert again.calls == 0 and report.n_generated == 0
    with pytest.raises(ValueError, match="different prompt"):
        generate_answers(problems, out, again, tok, "mistral", 8, 2, progress=False)


def test_model_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_causal_lm(ModelSpec(str(tmp_path / "no-such-model")))
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_tokenizer(ModelSpec(str(tmp_path / "empty-folder")))
    with pytest.raises(ValueError, match=r"model 'not-a-real/model-id' is not a folder here .* nor in the local "
                                         r"Hugging Face cache, and the hub is switched off here \(HF_HUB_OFFLINE=1\)"):
        load_tokenizer(ModelSpec("not-a-real/model-id"))
    assert cli.main(["generate", "--model", str(tmp_path / "nope"), "--dataset", "gsm8k",
                     "--source", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2


def test_import_harness_answers(tmp_path):
    src, out = tmp_path / "harness.jsonl", tmp_path / "answers.jsonl"
    rows = [{"idx": 0, "gt": "18", "prompt_token_ids": [1, 2], "generate_token_ids": [[3, 4, 2]],
             "code": "so \\boxed{18}", "level": "Level 1"},
            {"idx": 1, "gt": "5", "prompt_token_ids": [1], "generate_token_ids": [[3], [4]],
             "code": ["\\boxed{6}"], "pred": ["6"], "score": [False]},
            {"idx": 0, "gt": "1", "prompt_token_ids": [1], "generate_token_ids": [5]},  # duplicate
            {"idx": 2, "prompt_token_ids": [1], "generate_token_ids": [5]}]  # nothing to grade
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n"
                   + json.dumps({"idx": 3, "prompt_token_ids": [], "generate_token_ids": [1]}) + "\n")
    report = import_answers(src, out)
    text = "\n".join(report.problems)
    assert "line 5: malformed JSON" in text and "line 6: `prompt_token_ids` is empty" in text
    assert "idx 0: duplicate" in text and "1 answer(s) have no score" in text
    samples, _ = read_samples(out)
    assert [s.idx for s in samples] == [0, 1, 2]
    assert samples[0].answer_ids == [3, 4, 2] and samples[1].answer_ids == [3]
    assert samples[0].extra["code"] == ["so \\boxed{18}"] and samples[0].extra["level"] == "Level 1"
    assert samples[0].extra["pred"] == ["18"] and samples[0].extra["score"] == [True]
    assert samples[1].extra["score"] == [False]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="the file is empty"):
        import_answers(empty, out)
