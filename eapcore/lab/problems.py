"""Synthetic math word problems with exact integer answers and worked solutions.

Each problem is a short story about one person's collection of objects, changed by 1 to 3
arithmetic steps:

    level 1: one addition or subtraction
    level 2: two additions / subtractions
    level 3: a multiplication ("k boxes with b in each") then an addition / subtraction

A worked solution writes one equation per step and ends in ``\\boxed{N}``. Problems are
deterministic in the seed. Rows are written in the dataset format the project reads (MATH-like):
``idx``, ``question``, ``solution`` (worked, ends in ``\\boxed{N}``), ``answer`` and ``gt`` (the
reference ``N`` as a string), ``level``, ``expression`` (a Python expression whose value is ``N``).
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Iterable

from eapcore.answers.grading import last_boxed

# The deepseek-math prompt template (docs/METHOD.md), used verbatim for the demo pairs.
TEMPLATE_NAME = "deepseek-math"
TEMPLATE = ("User: {question}\nPlease reason step by step, and put your final answer within "
            "\\boxed{{}}.\n\nAssistant:")

LEVELS = (1, 2, 3)

NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Eva", "Max", "Lily", "Leo", "Zoe", "Jack", "Emma")
OBJECTS = ("apples", "books", "coins", "cards", "pens", "eggs", "shells", "stamps", "marbles",
           "stickers")
ADD = ("{p} buys {n} more {o}.", "{p} finds {n} more {o}.", "{q} gives {p} {n} more {o}.")
SUB = ("{p} gives {n} {o} to {q}.", "{p} loses {n} {o}.", "{p} sells {n} {o}.")
MUL = "{p} buys {k} boxes of {o} with {n} {o} in each box."
QUESTION = "How many {o} does {p} have now?"


def has_confusable_step(question: str) -> bool:
    """Whether the question has a "gives N ... to Q" step (the step the confused teacher adds)."""
    return re.search(r"\b\w+ gives \d+ \w+ to \w+\.", question) is not None


def build_prompt(question: str) -> str:
    return TEMPLATE.format(question=question)


@dataclass(frozen=True)
class Problem:
    idx: int
    level: int
    question: str
    solution: str  # worked solution, starts with a space, ends in \boxed{N}.
    answer: int
    expression: str

    def to_row(self) -> dict:
        row = asdict(self)
        row["answer"] = str(self.answer)
        row["gt"] = str(self.answer)
        return row


def _story(rng: random.Random, level: int, confuse: bool = False) -> tuple[str, str, int, str]:
    """(question, solution, answer, expression) of one random problem of `level`.

    `confuse`: the worked solution reads "gives N ... to Q" as an addition (a teacher's systematic
    mistake; the answer and expression stay right). Draws the same random numbers either way."""
    p, q = rng.sample(NAMES, 2)
    o = rng.choice(OBJECTS)
    lines: list[str] = []
    eqs: list[str] = []
    if level == 3:
        start = rng.randint(2, 30)
    else:
        start = rng.randint(5, 40)
    lines.append(f"{p} has {start} {o}.")
    value, expr = start, str(start)
    shown = start  # the running value as the (possibly confused) worked solution has it
    n_addsub = {1: 1, 2: 2, 3: 1}[level]
    if level == 3:
        k, n = rng.randint(2, 5), rng.randint(2, 9)
        lines.append(MUL.format(p=p, k=k, n=n, o=o))
        prod = k * n
        eqs.append(f"{k} * {n} = {prod}.")
        eqs.append(f"{shown} + {prod} = {shown + prod}.")
        value, expr, shown = value + prod, f"({expr} + {k} * {n})", shown + prod
    for _ in range(n_addsub):
        if value > 3 and rng.random() < 0.5:
            n = rng.randint(1, min(value - 1, 25))
            phrase = rng.choice(SUB)
            lines.append(phrase.format(p=p, q=q, n=n, o=o))
            if confuse and phrase == SUB[0]:
                eqs.append(f"{shown} + {n} = {shown + n}.")
                shown += n
            else:
                eqs.append(f"{shown} - {n} = {shown - n}.")
                shown -= n
            value, expr = value - n, f"({expr} - {n})"
        else:
            n = rng.randint(1, 25)
            lines.append(rng.choice(ADD).format(p=p, q=q, n=n, o=o))
            eqs.append(f"{shown} + {n} = {shown + n}.")
            value, expr, shown = value + n, f"({expr} + {n})", shown + n
    lines.append(QUESTION.format(p=p, o=o))
    solution = " " + " ".join(eqs) + f" The answer is \\boxed{{{shown}}}."
    return " ".join(lines), solution, value, expr


def generate(n: int, seed: int, levels: Iterable[int] = LEVELS, exclude: set[str] | None = None,
             start_idx: int = 0, confusion: float = 0.0) -> list[Problem]:
    """`n` distinct problems, levels in round-robin order, none whose question is in `exclude`.

    `confusion` > 0 (train split only): that fraction of worked solutions with "gives N ... to Q"
    add instead of subtract (an imperfect teacher); `answer` stays the true answer."""
    rng = random.Random(seed)
    teacher = random.Random(seed + 12345)
    levels = tuple(levels)
    seen = set(exclude or ())
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct problems")
        level = levels[len(out) % len(levels)]
        question, solution, answer, expr = _story(rng, level, confuse=teacher.random() < confusion)
        if question in seen:
            continue
        seen.add(question)
        out.append(Problem(start_idx + len(out), level, question, solution, answer, expr))
    return out


def make_splits(n_train: int, n_test: int, seed: int = 0,
                confusion: float = 0.0) -> tuple[list[Problem], list[Problem]]:
    """Held-out test split first (its own seed), then a train split with no shared question.
    Test solutions are always right; `confusion` applies to train solutions (see `generate`)."""
    test = generate(n_test, seed=seed * 1000 + 1)
    train = generate(n_train, seed=seed * 1000 + 2, exclude={p.question for p in test},
                     confusion=confusion)
    return train, test


def is_correct(completion: str, reference: str | int) -> bool:
    """The lab's reward, stricter than the project's grading (math-verify equivalence): the last
    boxed answer (`eapcore.answers.grading.last_boxed`) is an integer equal to the reference."""
    pred = last_boxed(completion)
    if pred is None:
        return False
    try:
        return int(pred.replace(" ", "")) == int(reference)
    except ValueError:
        return False
