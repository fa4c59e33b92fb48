"""The demo lab: problem generator, tokenizer, training steps on a reduced budget, shipped checkpoints."""
from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path

import pytest

from eapcore.answers.grading import is_equivalent, last_boxed
from eapcore.lab.problems import TEMPLATE, build_prompt, generate, is_correct, make_splits

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _safe_eval(expr: str) -> int:
    """Evaluate + - * over integers without eval()."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"unexpected node {node!r}")
    return ev(ast.parse(expr, mode="eval"))


# ------------------------------------------------------------------ generator
def test_generator_is_deterministic_and_seeded():
    a, b = generate(60, seed=3), generate(60, seed=3)
    assert a == b
    assert [p.question for p in generate(60, seed=4)] != [p.question for p in a]
    assert {p.level for p in a} == {1, 2, 3}


def test_answers_are_exact():
    for p in generate(300, seed=11):
        assert _safe_eval(p.expression) == p.answer >= 0
        # the worked solution's equations are each right, chain, and end in the boxed answer
        eqs = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", p.solution)
        assert len(eqs) == {1: 1, 2: 2, 3: 3}[p.level]
        for x, op, y, z in eqs:
            assert _safe_eval(f"{x} {op} {y}") == int(z)
        assert int(eqs[-1][3]) == p.answer
        assert p.solution.startswith(" ") and p.solution.endswith(f"\\boxed{{{p.answer}}}.")
        assert last_boxed(p.solution) == str(p.answer)
        assert is_correct(p.solution, p.answer) and not is_correct(p.solution, p.answer + 1)
        # every number in the question is used
        assert set(re.findall(r"\d+", p.question)) <= set(re.findall(r"\d+", p.expression))


def test_splits_do_not_overlap_and_rows_have_dataset_fields():
    train, test = make_splits(500, 120, seed=0)
    assert not {p.question for p in train} & {p.question for p in test}
    row = test[0].to_row()
    assert {"idx", "question", "answer", "gt", "solution", "level"} <= set(row)
    assert row["answer"] == row["gt"] == str(test[0].answer)
    assert [p.idx for p in test] == list(range(120))


def test_teacher_confusion_only_rewrites_gives_to_solutions():
    clean, test = make_splits(400, 50, seed=0)
    noisy, test2 = make_splits(400, 50, seed=0, confusion=0.6)
    assert test == test2  # the held-out split never has teacher mistakes
    changed = 0
    for a, b in zip(clean, noisy):
        assert (a.question, a.answer, a.expression) == (b.question, b.answer, b.expression)
        if a.solution != b.solution:
            changed += 1
            assert " gives " in a.question and " to " in a.question
            assert not is_correct(b.solution, b.answer) and is_correct(a.solution, a.answer)
    with_phrase = sum(" to " in p.question and " gives " in p.question for p in clean)
    assert 0.4 * with_phrase < changed < 0.8 * with_phrase


def test_is_correct_reads_the_last_box():
    assert is_correct(" 1 + 2 = 3. \\boxed{4} then \\boxed{3}.", 3)
    assert not is_correct(" no box 3", 3)
    assert not is_correct("\\boxed{x}", 3)


def test_lab_reward_is_stricter_than_grading():
    """The same extraction as the project's grading (its last boxed answer), but only an exact
    integer earns the reward where math-verify accepts any equivalent form."""
    for text in ("\\boxed{3.0}", "\\boxed{\\frac{6}{2}}"):
        assert is_equivalent(last_boxed(text), "3")  # the project's grading accepts these
        assert not is_correct(text, 3)  # the lab's reward does not
    assert is_correct("\\fbox{3}", 3) and is_correct("\\boxed{ 3 }", 3)


# ------------------------------------------------------------------ tokenizer
@pytest.fixture(scope="module")
def small_problems():
    return make_splits(400, 40, seed=0)


@pytest.fixture(scope="module")
def tokenizer(small_problems):
    from eapcore.lab.model import build_tokenizer

    train, test = small_problems
    return build_tokenizer([build_prompt(p.question) + p.solution for p in train + test])


def test_tokenizer_round_trip(tokenizer, small_problems, tmp_path):
    from transformers import AutoTokenizer

    p = small_problems[1][0]
    text = build_prompt(p.question) + p.solution
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # the template alone is covered, and the boxed answer is a few tokens
    assert tokenizer.unk_token_id not in tokenizer(TEMPLATE.format(question=""))["input_ids"]
    assert tokenizer.convert_ids_to_tokens(tokenizer(" \\boxed{12}", add_special_tokens=False)["input_ids"]) \
        == [" \\boxed{", "1", "2", "}"]
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert again.decode(ids, skip_special_tokens=True) == text
    assert again.eos_token == "</s>" and again.eos_token_id != again.unk_token_id


# ------------------------------------------------------------------ training on a reduced budget
def _completion_nll(model, tok, prompts, completions):
    """Mean NLL per completion token (with eos) of `completions` after `prompts`."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for pr, co in zip(prompts, completions):
            a = tok(pr)["input_ids"]
            b = tok(co, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([a + b])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(a) - 1:-1].float(), -1)
            total -= logp.gather(-1, torch.tensor(b)[:, None]).sum().item()
            count += len(b)
    return total / count


@pytest.fixture(scope="module")
def sft_folder(tmp_path_factory, tokenizer, small_problems):
    """A tiny model after a short SFT run, plus its loss on a fixed batch before and after."""
    import torch

    from eapcore.lab import train as T
    from eapcore.lab.model import build_model

    torch.set_num_threads(2)
    train, _ = small_problems
    model = build_model(tokenizer, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, seed=0)
    batch = train[:16]
    prompts = [build_prompt(p.question) for p in batch]
    before = _completion_nll(model, tokenizer, prompts, [p.solution for p in batch])
    folder = tmp_path_factory.mktemp("lab") / "sft"
    T.sft(model, tokenizer, train, folder, steps=40, batch_size=16, lr=3e-3, warmup=5)
    loaded, tok = T.load(folder)
    after = _completion_nll(loaded, tok, prompts, [p.solution for p in batch])
    return folder, before, after


def test_sft_reduces_loss(sft_folder):
    folder, before, after = sft_folder
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert after < 0.8 * before, (before, after)


def test_dpo_raises_the_preference_margin(sft_folder, small_problems):
    """DPO on fixed pairs: the policy's log-ratio margin (chosen - rejected, vs the start) grows."""
    from eapcore.lab import train as T

    folder, _, _ = sft_folder
    train, _ = small_problems
    pairs = []
    for p in train[:32]:
        wrong = p.solution.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{p.answer + 1}}}")
        pairs.append({"prompt": build_prompt(p.question), "chosen": p.solution, "rejected": wrong})
    start, tok = T.load(folder)

    def margin(model):
        pr = [q["prompt"] for q in pairs]
        n_c = _completion_nll(model, tok, pr, [q["chosen"] for q in pairs])
        n_r = _completion_nll(model, tok, pr, [q["rejected"] for q in pairs])
        return n_r - n_c

    before = margin(start)
    out = folder.parent / "dpo"
    T.dpo(folder, pairs, out, steps=8, batch_size=8, lr=3e-3, beta=0.1)
    after = margin(T.load(out)[0])
    assert after > before + 0.01, (before, after)


def test_grpo_moves_toward_reward(sft_folder, small_problems):
    """GRPO with a reward for starting with the token ' 1': its probability must rise."""
    import torch

    from eapcore.lab import train as T

    folder, _, _ = sft_folder
    train, _ = small_problems
    start, tok = T.load(folder)
    target = tok.convert_tokens_to_ids(" 1")

    def reward(completions, answer, **kw):
        return [1.0 if c.startswith(" 1") else 0.0 for c in completions]

    def p_target(model):
        enc = tok([build_prompt(p.question) for p in train[:32]], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model(**enc).logits[:, -1]
        return torch.softmax(logits.float(), -1)[:, target].mean().item()

    before = p_target(start)
    out = folder.parent / "grpo"
    T.grpo(folder, train[:64], out, steps=6, prompts_per_step=4, num_generations=8, lr=1e-2,
           max_completion_length=8, reward_fn=reward)
    after = p_target(T.load(out)[0])
    assert after > before * 1.5 and after > before + 0.02, (before, after)


def test_correctness_reward():
    from eapcore.lab.train import correctness_reward

    assert correctness_reward([" 2 + 2 = 4. \\boxed{4}.", "\\boxed{5}", "none"], ["4", "4", "4"]) \
        == [1.0, 0.0, 0.0]


def test_lab_stats():
    from eapcore.lab.stats import mcnemar_exact, wilson

    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    r = mcnemar_exact([True] * 2 + [False] * 10, [True] * 12)
    assert (r["a_only"], r["b_only"]) == (0, 10)
    assert r["p_value"] == pytest.approx(2 / 2 ** 10)
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0


# ------------------------------------------------------------------ the shipped demo
def _shipped():
    need = [DEMO / n / "model.safetensors" for n in ("sft", "grpo", "dpo")]
    if not all(p.is_file() for p in need) or not (DEMO / "lab_results.json").is_file():
        pytest.skip("demo checkpoints not built (python -m eapcore lab --out demo/)")
    return json.loads((DEMO / "lab_results.json").read_text())


def test_demo_checkpoints_load_offline(monkeypatch):
    _shipped()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    total = 0
    for name in ("sft", "grpo", "dpo"):
        folder = DEMO / name
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.model_type == "llama"
        assert sum(p.numel() for p in model.parameters()) < 3_000_000
        assert tok.unk_token_id not in tok(TEMPLATE.format(question="Tom has 3 apples."))["input_ids"]
        total += sum(f.stat().st_size for f in folder.iterdir())
    assert total < 20 * 2 ** 20


def test_demo_grpo_accuracy_is_reproduced():
    """Greedy accuracy of demo/grpo on the held-out file equals the recorded number."""
    results = _shipped()
    from eapcore.harness import read_jsonl
    from eapcore.lab import train as T
    from eapcore.lab.problems import Problem

    rows, report = read_jsonl(DEMO / "problems_test.jsonl")
    assert not report.problems
    problems = [Problem(r["idx"], r["level"], r["question"], r["solution"], int(r["answer"]),
                        r["expression"]) for _, r in rows]
    recorded = results["outcomes"]["grpo"]
    assert len(recorded) == len(problems)
    n = 400  # a subset keeps the test fast; it is compared problem by problem
    model, tok = T.load(DEMO / "grpo")
    ok = T.evaluate(model, tok, problems[:n], results["max_new_tokens"])
    agree = sum((o == (c == "1")) for o, c in zip(ok, recorded[:n]))
    assert agree >= n - 2, f"{n - agree} of {n} problems differ from the recorded outcomes"
    # and the markdown report states the same full-set accuracy
    md = (ROOT / "benchmarks" / "lab_results.md").read_text()
    acc = results["eval"]["grpo"]["accuracy"]
    assert f"| grpo | {acc:.3f}" in md
