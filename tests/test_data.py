"""Datasets: the four harness files, uploads (jsonl, csv), bad input; prompt templates."""
from __future__ import annotations

import json

import pytest

from eapcore.answers.data import (BUILTIN_SOURCES, TEMPLATES, encode_prompt, format_prompt, load_problems,
                          read_problems_file, resolve_template, to_problem)
from eapcore.specs import DatasetSpec


@pytest.mark.parametrize("name, n, first_idx, first_answer, meta_keys", [
    ("math", 5000, 0, "2", {"level", "type"}),
    ("math500", 500, 0, r"\left( 3, \frac{\pi}{2} \right)", {"subject", "level", "unique_id"}),
    ("gsm8k", 1319, 0, "18", set()),
    ("college_math", 2818, 0, "10-4 n", {"data_source", "question_number", "license", "data_topic"}),
])
def test_harness_files(shared_data, name, n, first_idx, first_answer, meta_keys):
    problems, report = load_problems(DatasetSpec(name, source=str(shared_data / f"{name}_test.jsonl")))
    assert len(problems) == n and report.problems == []
    assert (problems[0].idx, problems[0].answer, set(problems[0].meta)) == (first_idx, first_answer, meta_keys)
    assert len({p.idx for p in problems}) == n
    limited, _ = load_problems(DatasetSpec(name, source=str(shared_data / f"{name}_test.jsonl"), limit=7))
    assert [p.idx for p in limited] == [p.idx for p in problems[:7]]


def test_math_reference_is_last_boxed_of_solution(shared_data):
    problems, _ = read_problems_file(shared_data / "math_test.jsonl")
    by_idx = {p.idx: p for p in problems}
    assert by_idx[2].answer == r"\dfrac{9}{7}"  # \boxed{\dfrac{9}{7}}: nested braces kept


def test_record_rules():
    p = to_problem({"problem": " Q ", "solution": r"so \boxed{1} or \boxed{\frac{1}{2}}", "level": 3}, 4)
    assert (p.idx, p.question, p.answer, p.meta) == (4, "Q", r"\frac{1}{2}", {"level": 3})
    assert to_problem({"question": "Q", "answer": "steps\n#### 1,000"}, 0).answer == "1000"
    assert to_problem({"question": "Q", "answer": "$x=2$"}, 0).answer == "x=2"
    assert to_problem({"question": "Q", "answer": r"\boxed{7}"}, 0).answer == "7"
    assert to_problem({"question": "Q", "answer": 12}, 0).answer == "12"
    assert to_problem({"question": "Q", "gt": "5", "answer": "#### 6", "idx": "17"}, 0).idx == 17
    for record, message in [({"answer": "1"}, "no question"), ({"question": "Q"}, "no reference answer"),
                            ({"question": "Q", "solution": "no box"}, "no \\\\boxed"),
                            ({"question": "Q", "answer": "1", "idx": 1.5}, "`idx`"), ([1], "not a JSON object")]:
        with pytest.raises(ValueError, match=message):
            to_problem(record, 0)


def test_bad_lines_are_reported_and_the_rest_kept(tmp_path):
    path = tmp_path / "upload.jsonl"
    lines = [json.dumps({"question": "What is 1+1?", "answer": "2"}).encode(),
             b"{not json",
             json.dumps({"question": "No answer here"}).encode(),
             b'{"question": "caf\xe9", "answer": "1"}',  # latin-1 byte: not UTF-8
             b"",
             json.dumps({"question": "What is 2+2?", "answer": "4", "idx": 0}).encode(),  # duplicate idx 0
             json.dumps({"question": "What is 3+3?", "answer": "6"}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    problems, report = read_problems_file(path)
    assert [(p.idx, p.answer) for p in problems] == [(0, "2"), (6, "6")]  # idx = 0-based line number
    assert report.n_lines == 6 and report.summary().startswith(f"{path}: 2 of 6 lines read")
    joined = "\n".join(report.problems)
    for expected in ("line 2: malformed JSON", "line 3: no reference answer", "line 4: not UTF-8",
                     "line 6: duplicate idx 0"):
        assert expected in joined
    assert len(report.problems) == 4


def test_csv_upload(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_bytes("question,answer,topic\n\"What is 1+1,\nexactly?\",2,arith\n".encode()
                     + b"Q2,\xff,x\n" + b"What is $\\frac{1}{2}$ doubled?,1,frac\nonly,two,cells,extra\n")
    problems, report = read_problems_file(path)
    assert [(p.idx, p.question, p.answer, p.meta) for p in problems] == [
        (0, "What is 1+1,\nexactly?", "2", {"topic": "arith"}),
        (2, "What is $\\frac{1}{2}$ doubled?", "1", {"topic": "frac"})]  # row 1 is bad
    assert any("not UTF-8" in m for m in report.problems)
    assert any("more cells" in m for m in report.problems)


def test_empty_missing_and_unknown(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="the file is empty"):
        read_problems_file(empty)
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match="(?s)no usable problem.*line 1: no question"):
        read_problems_file(junk)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_problems(DatasetSpec("x", source=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        load_problems(DatasetSpec("nope"))


def test_hub_source_fails_clearly_offline():
    assert set(BUILTIN_SOURCES) == {"math", "math500", "gsm8k", "college_math"}
    with pytest.raises(ValueError, match="could not load dataset 'openai/gsm8k#main'"):
        load_problems(DatasetSpec("gsm8k"))


# ------------------------------------------------------------------------------------ templates
def test_templates_are_exactly_method_md():
    q = "Find $x$ if $\\{x\\} = {1}$."
    assert format_prompt(q, "deepseek-math") == (
        "User: " + q + "\nPlease reason step by step, and put your final answer within \\boxed{}.\n\nAssistant:")
    assert format_prompt(q, "mistral") == "[INST] " + q + "[/INST]"
    assert format_prompt(q, "qwen25-math-cot") == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\n" + q + "<|im_end|>\n<|im_start|>assistant\n")
    turn = ("<|user|>\n" + q + "\nPlease reason step by step, and put your final answer within \\boxed{}.\n"
            "<|assistant|>\n")
    assert format_prompt(q, "tulu3") == format_prompt(q, "olmo2-1b") == turn
    assert format_prompt(q, "olmo2") == "<|endoftext|>" + turn
    assert set(TEMPLATES) == {"deepseek-math", "mistral", "qwen25-math-cot", "tulu3", "olmo2", "olmo2-1b"}


def test_custom_and_unknown_templates():
    assert format_prompt("2+2?", "Q: {question}\nA: \\boxed{") == "Q: 2+2?\nA: \\boxed{"
    with pytest.raises(ValueError, match="unknown prompt template 'llama'.*deepseek-math"):
        resolve_template("llama")
    with pytest.raises(ValueError, match="chat template"):
        format_prompt("q", "chat", tokenizer=None)


def test_encode_prompt_adds_bos_once():
    from tokenizers import processors

    from conftest import char_tokenizer

    tok = char_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.chat_template = "{{ bos_token }}{% for m in messages %}U:{{ m['content'] }}{% endfor %}A:"
    plain = encode_prompt(tok, format_prompt("1+1", "mistral"))
    assert plain[0] == tok.bos_token_id and plain.count(tok.bos_token_id) == 1
    chat_text = format_prompt("1+1", "chat", tok)
    assert chat_text.startswith("<s>U:1+1\nPlease reason step by step") and chat_text.endswith("A:")
    chat = encode_prompt(tok, chat_text)
    assert chat[0] == tok.bos_token_id and chat.count(tok.bos_token_id) == 1
