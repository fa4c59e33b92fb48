"""The math-evaluation-harness answers format (jsonl), which is also the project's sample format.

One JSON object per line:
    idx               int, the question's id in its dataset
    prompt_token_ids  list[int], the prompt as the model saw it
    generate_token_ids list[int] | list[list[int]], the answer (the harness stores one list per
                      sampled answer; `Sample.answer_ids` is the first)
    question, gt, pred, score, code   optional text fields, kept as they are

Reading never stops at a bad line: each problem is reported with its line number and the rest of
the file is kept.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from eapcore.files import shorten, write_bytes_atomic

OPTIONAL_FIELDS = ("question", "gt", "pred", "score", "code")


def first(value: Any) -> Any:
    """A per-answer field's value: the harness stores pred / score / code as lists, one element per
    sampled answer, of which the first is used; other values are returned as they are."""
    return value[0] if isinstance(value, list) and value else value


@dataclass
class Sample:
    idx: int
    prompt_ids: list[int]
    answer_ids: list[int]
    extra: dict[str, Any] = field(default_factory=dict)  # every other field of the line

    def to_json(self) -> dict[str, Any]:
        return {"idx": self.idx, "prompt_token_ids": self.prompt_ids,
                "generate_token_ids": [self.answer_ids], **self.extra}


@dataclass
class ReadReport:
    path: str
    n_lines: int = 0
    problems: list[str] = field(default_factory=list)  # "line 7: ..." messages

    def summary(self, shown: int = 5) -> str:
        """How many lines were read and the first `shown` problems (a count of the others)."""
        head = f"{self.path}: {self.n_lines - len(self.problems)} of {self.n_lines} lines read"
        if not self.problems:
            return head
        more = len(self.problems) - shown
        return (head + "; skipped:\n  " + "\n  ".join(shorten(p, 200) for p in self.problems[:shown])
                + (f"\n  ... and {more} more" if more > 0 else ""))


def _int_list(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ValueError(f"`{name}` must be a list of integers")
    return value


def parse_sample(obj: Any) -> Sample:
    """One decoded jsonl object -> Sample; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in ("idx", "prompt_token_ids", "generate_token_ids") if k not in obj]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    idx = obj["idx"]
    if isinstance(idx, bool) or not isinstance(idx, (int, str)):
        raise ValueError("`idx` must be an integer or a string")
    gen = obj["generate_token_ids"]
    if isinstance(gen, list) and gen and isinstance(gen[0], list):
        gen = gen[0]
    prompt = _int_list(obj["prompt_token_ids"], "prompt_token_ids")
    answer = _int_list(gen, "generate_token_ids")
    if not prompt:
        raise ValueError("`prompt_token_ids` is empty")
    extra = {k: v for k, v in obj.items() if k not in ("idx", "prompt_token_ids", "generate_token_ids")}
    return Sample(idx=idx, prompt_ids=prompt, answer_ids=answer, extra=extra)


def read_jsonl(path: str | os.PathLike) -> tuple[list[tuple[int, Any]], ReadReport]:
    """Decode a jsonl file line by line: ([(line_no, obj)], report). Bad bytes/JSON are reported."""
    report = ReadReport(str(path))
    rows: list[tuple[int, Any]] = []
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            report.n_lines += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                report.problems.append(f"line {line_no}: not UTF-8 text ({err.reason} at byte {err.start})")
                continue
            try:
                rows.append((line_no, json.loads(text)))
            except json.JSONDecodeError as err:
                report.problems.append(f"line {line_no}: malformed JSON ({err.msg})")
    return rows, report


def read_samples(path: str | os.PathLike) -> tuple[list[Sample], ReadReport]:
    """Read a samples file. Raises FileNotFoundError with a clear message if it does not exist."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"samples file {path} does not exist")
    rows, report = read_jsonl(path)
    samples: list[Sample] = []
    for line_no, obj in rows:
        try:
            samples.append(parse_sample(obj))
        except ValueError as err:
            report.problems.append(f"line {line_no}: {err}")
    return samples, report


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Write atomically (a temp file in the same folder, then rename: files.write_bytes_atomic)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_bytes_atomic(path, text.encode("utf-8"))


def write_samples(path: str | os.PathLike, samples: Iterable[Sample]) -> None:
    write_jsonl(path, (s.to_json() for s in samples))
