"""The math-evaluation-harness answers format (jsonl), which is also the project's sample format,
and the paper authors' joined file of both models' answers.

Harness answers file, one JSON object per line:
    idx               int, the question's id in its dataset
    prompt_token_ids  list[int] | list[list[int]], the prompt as the model saw it
    generate_token_ids list[int] | list[list[int]], the answer
                      (the harness stores both as one list per sampled answer; the first is used)
    question, gt, pred, score, code   optional text fields, kept as they are

Joined file (the authors' `all_correct.jsonl`, as their released EAP script reads it), one JSON
object per question, both models' answers side by side:
    base_prompt_tokens, base_answer_tokens, rl_prompt_tokens, rl_answer_tokens   list[int]
    base_answer_tokens_range, rl_answer_tokens_range   optional [start, end): where the answer sits
                      in prompt + answer (start = prompt length, end = start + answer length)
    idx               optional (else the 0-based line number); every other field is kept
The file holds the questions of one answer group (`all_correct`: both models right); `read_joined`
gives each model's samples with that group's correctness as `score`.

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
from eapcore.specs import GROUP_SCORES

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
    """A token id list, flat or one list per sampled answer (`[[...], ...]`: the first)."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        value = value[0]
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ValueError(f"`{name}` must be a list of integers (or one such list per sampled answer)")
    return value


def _idx(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("`idx` must be an integer or a string")
    return value


def parse_sample(obj: Any) -> Sample:
    """One decoded jsonl object -> Sample; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in ("idx", "prompt_token_ids", "generate_token_ids") if k not in obj]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    idx = _idx(obj["idx"])
    prompt = _int_list(obj["prompt_token_ids"], "prompt_token_ids")
    answer = _int_list(obj["generate_token_ids"], "generate_token_ids")
    if not prompt:
        raise ValueError("`prompt_token_ids` is empty")
    extra = {k: v for k, v in obj.items() if k not in ("idx", "prompt_token_ids", "generate_token_ids")}
    return Sample(idx=idx, prompt_ids=prompt, answer_ids=answer, extra=extra)


JOINED_MODELS = {"base": "base", "tuned": "rl"}  # the joined file's field prefix of each model
JOINED_FIELDS = tuple(f"{p}_{f}" for p in JOINED_MODELS.values()
                      for f in ("prompt_tokens", "answer_tokens", "answer_tokens_range"))


def parse_joined(obj: Any, position: int, group: str) -> dict[str, Sample]:
    """One decoded joined-file object -> {"base": Sample, "tuned": Sample} with `score` = [correct]
    of `group` (GROUP_SCORES); ValueError says what is wrong. `position`: the idx when the row has none."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    missing = [f for f in JOINED_FIELDS if not f.endswith("_range") and f not in obj]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)} (a joined file has both models' "
                         "prompt and answer tokens)")
    idx = _idx(obj.get("idx", position))
    extra = {k: v for k, v in obj.items() if k not in (*JOINED_FIELDS, "idx")}
    out = {}
    for (which, prefix), correct in zip(JOINED_MODELS.items(), GROUP_SCORES[group]):
        prompt = _int_list(obj[f"{prefix}_prompt_tokens"], f"{prefix}_prompt_tokens")
        answer = _int_list(obj[f"{prefix}_answer_tokens"], f"{prefix}_answer_tokens")
        if not prompt:
            raise ValueError(f"`{prefix}_prompt_tokens` is empty")
        span = obj.get(f"{prefix}_answer_tokens_range")
        if span is not None and list(span) != [len(prompt), len(prompt) + len(answer)]:
            raise ValueError(f"`{prefix}_answer_tokens_range` is {span} but the answer sits at "
                             f"[{len(prompt)}, {len(prompt) + len(answer)}) of prompt + answer")
        out[which] = Sample(idx=idx, prompt_ids=prompt, answer_ids=answer, extra={**extra, "score": [correct]})
    return out


def read_joined(path: str | os.PathLike, group: str = "both_correct") -> tuple[list[Sample], list[Sample], ReadReport]:
    """A joined file -> (base samples, tuned samples, report), same idx order; every row is a
    question of `group` (default: both correct, as in the authors' all_correct.jsonl). Bad and
    duplicate rows are reported by line number and skipped."""
    if group not in GROUP_SCORES:
        raise ValueError(f"unknown group {group!r}; one of {', '.join(GROUP_SCORES)}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"joined answers file {path} does not exist")
    rows, report = read_jsonl(path)
    base: list[Sample] = []
    tuned: list[Sample] = []
    seen: set = set()
    for line_no, obj in rows:
        try:
            pair = parse_joined(obj, line_no - 1, group)
        except ValueError as err:
            report.problems.append(f"line {line_no}: {err}")
            continue
        if pair["base"].idx in seen:
            report.problems.append(f"line {line_no}: duplicate idx {pair['base'].idx!r} (first one kept)")
            continue
        seen.add(pair["base"].idx)
        base.append(pair["base"])
        tuned.append(pair["tuned"])
    return base, tuned, report


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
