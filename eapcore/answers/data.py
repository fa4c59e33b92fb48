"""Datasets (hub, harness jsonl files, local jsonl/csv uploads) and prompt templates.

Every source is normalised to `Problem(idx, question, answer, meta)`:
- `question`: the first of the fields `question`, `problem`, `query`.
- `answer` (the reference final answer, a string): `gt` if present; else `answer` (GSM8K style
  "... #### 18" -> "18"; a boxed answer -> its content; otherwise the text with one pair of outer
  `$` removed); else the last `\\boxed{}` of `solution` (MATH).
- `idx`: the record's `idx` field if present, else its position: the 0-based line number in a
  jsonl file (so fixing a bad line does not shift the others), the 0-based data row in a csv
  file or a hub dataset.
- `meta`: every other field (level, type, subject, ...).
Bad records are reported with their line number and the rest is kept (`ReadReport`).
"""
from __future__ import annotations

import csv
import io
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eapcore.answers.grading import gsm8k_reference, last_boxed
from eapcore.harness import ReadReport, read_jsonl
from eapcore.modelfiles import hub_unavailable, unreachable
from eapcore.specs import DatasetSpec

_HARNESS = "https://raw.githubusercontent.com/QwenLM/Qwen2.5-Math/main/evaluation/data/{}/test.jsonl"

# Built-in datasets: name -> source used when DatasetSpec.source is empty.
# A source is a local file, an http(s) URL of a jsonl file, or a hub id with an optional
# "#config" suffix (loaded with datasets.load_dataset(id, config, split=spec.split)).
BUILTIN_SOURCES: dict[str, str] = {
    "math": _HARNESS.format("math"),  # 5000 problems, Qwen2.5-Math evaluation harness copy
    "math500": "HuggingFaceH4/MATH-500",  # 500-problem subset of MATH
    "gsm8k": "openai/gsm8k#main",  # 1319 test problems
    "college_math": _HARNESS.format("college_math"),  # 2818 problems
}

_QUESTION_KEYS = ("question", "problem", "query")
_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# The Tülu 3 / OLMo 2 chat format for one user turn (question + instruction) and the assistant's
# turn: what the chat templates in those models' tokenizers write (docs/METHOD.md, "Families").
_TULU = "<|user|>\n{question}\n" + _INSTRUCTION + "\n<|assistant|>\n"
# Prompt templates by family (docs/METHOD.md, "Answers"); "{question}" is replaced by the question text.
TEMPLATES: dict[str, str] = {
    "deepseek-math": "User: {question}\n" + _INSTRUCTION + "\n\nAssistant:",
    "mistral": "[INST] {question}[/INST]",
    "qwen25-math-cot": ("<|im_start|>system\n" + _INSTRUCTION + "<|im_end|>\n"
                        "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"),
    "tulu3": _TULU,  # Llama 3.1's tokenizer adds its BOS, <|begin_of_text|>, in front
    "olmo2": "<|endoftext|>" + _TULU,  # OLMo 2 1124 (7B, 13B): the template writes the BOS, <|endoftext|>
    "olmo2-1b": _TULU,  # OLMo 2 0425 1B: no BOS before the turn (its model card)
}
# The token that ends the assistant's turn under a template (the family's EOS, which its chat
# template writes after each answer): generation stops there as well as at the model's own EOS
# (generation_config and tokenizer), and refuses a tokenizer that lacks it.
TEMPLATE_STOPS: dict[str, tuple[str, ...]] = {
    "tulu3": ("<|end_of_text|>",), "olmo2": ("<|endoftext|>",), "olmo2-1b": ("<|endoftext|>",),
}
# Not a fixed string: the tokenizer's own chat template, one user turn = question + instruction.
CHAT_TEMPLATE = "chat"


@dataclass
class Problem:
    idx: int | str
    question: str
    answer: str  # reference final answer
    meta: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- normalisation
def reference_answer(record: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """(reference answer, the field names it came from) of one raw record; ValueError if none."""
    if record.get("gt") is not None and not isinstance(record["gt"], (list, dict)):
        return str(record["gt"]).strip(), ("gt", "answer", "solution")
    answer = record.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer), ("answer", "solution")
    if isinstance(answer, str) and answer.strip():
        text = answer.strip()
        if "####" in text:
            return gsm8k_reference(text), ("answer",)
        boxed = last_boxed(text)
        if boxed:
            return boxed, ("answer", "solution")
        if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
            text = text[1:-1].strip()
        return text, ("answer", "solution")
    solution = record.get("solution")
    if isinstance(solution, str):
        boxed = last_boxed(solution)
        if boxed:
            return boxed, ("solution",)
        raise ValueError("`solution` has no \\boxed{...} final answer")
    raise ValueError("no reference answer: expected a non-empty `answer`, `gt` or `solution` field")


def to_problem(record: Any, position: int) -> Problem:
    """One raw record -> Problem (rules in the module docstring); ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object / table row")
    qkey = next((k for k in _QUESTION_KEYS if isinstance(record.get(k), str) and record[k].strip()), None)
    if qkey is None:
        raise ValueError(f"no question: expected a non-empty text field, one of {', '.join(_QUESTION_KEYS)}")
    answer, used = reference_answer(record)
    if not answer:
        raise ValueError("empty reference answer")
    idx = record.get("idx", position)
    if isinstance(idx, bool) or not isinstance(idx, (int, str)) or idx == "":
        raise ValueError("`idx` must be an integer or a non-empty string")
    if isinstance(idx, str) and idx.strip().lstrip("-").isdigit():
        idx = int(idx)  # csv cells are text
    meta = {k: v for k, v in record.items() if k not in (qkey, "idx", *used)}
    return Problem(idx=idx, question=record[qkey].strip(), answer=answer, meta=meta)


def problems_from_records(records: list[tuple[int, int, Any]], report: ReadReport) -> list[Problem]:
    """[(line_no, position, record)] in source order -> problems; bad or duplicate records go to `report`."""
    out: list[Problem] = []
    seen: set = set()
    for line_no, position, record in records:
        try:
            problem = to_problem(record, position)
        except ValueError as err:
            report.problems.append(f"line {line_no}: {err}")
            continue
        if problem.idx in seen:
            report.problems.append(f"line {line_no}: duplicate idx {problem.idx!r} (first one kept)")
            continue
        seen.add(problem.idx)
        out.append(problem)
    return out


# ------------------------------------------------------------------------------------ readers
def _read_csv(path: Path) -> tuple[list[tuple[int, int, Any]], ReadReport]:
    """Rows of a csv file with a header; rows with non-UTF-8 bytes are reported and skipped."""
    report = ReadReport(str(path))
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    rows: list[tuple[int, int, Any]] = []
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    try:
        for position, row in enumerate(reader):
            report.n_lines += 1
            line_no = reader.line_num
            values = [v for v in row.values() if isinstance(v, str)]
            if any(ch >= "\udc80" and ch <= "\udcff" for v in values for ch in v):
                report.problems.append(f"line {line_no}: not UTF-8 text")
                continue
            if None in row:
                report.problems.append(f"line {line_no}: more cells than header columns")
                continue
            rows.append((line_no, position, row))
    except csv.Error as err:
        report.problems.append(f"line {reader.line_num}: malformed csv ({err}); rest of file not read")
    return rows, report


def read_problems_file(path: str | os.PathLike) -> tuple[list[Problem], ReadReport]:
    """A local .jsonl (harness format or question+answer) or .csv file -> problems, report."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist; give a .jsonl or .csv file")
    if path.suffix.lower() == ".csv":
        rows, report = _read_csv(path)
    else:
        lines, report = read_jsonl(path)
        rows = [(line_no, line_no - 1, obj) for line_no, obj in lines]
    problems = problems_from_records(rows, report)
    if not problems:
        detail = report.summary() if report.n_lines else f"{path}: the file is empty"
        raise ValueError(f"no usable problem in {detail}\n"
                         "Each record needs a question (`question` or `problem`) and a reference "
                         "answer (`answer`, `gt`, or a `solution` with \\boxed{}).")
    return problems, report


def _load_hub(source: str, split: str) -> tuple[list[Problem], ReadReport]:
    """Hub id ("owner/name" or "owner/name#config") or URL of a jsonl file, via `datasets`."""
    import datasets

    problem = None  # offline variables set: `datasets` serves its local cache or fails at once
    if not any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):
        parts = urllib.parse.urlsplit(source)
        problem = unreachable(f"{parts.scheme}://{parts.netloc}") if parts.scheme in ("http", "https") \
            else hub_unavailable(offline_vars=())
    if problem:
        raise ValueError(f"could not load dataset {source!r}: {problem}. Give a local .jsonl/.csv file (or, for a "
                         "hub dataset in the local cache, set HF_DATASETS_OFFLINE=1)")
    try:
        if source.startswith(("http://", "https://")):
            ds = datasets.load_dataset("json", data_files=source, split="train")
        else:
            repo, _, config = source.partition("#")
            ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as err:  # the hub raises many types; say which source failed and why
        raise ValueError(f"could not load dataset {source!r} (split {split!r}): {err}\n"
                         "Check the id and your network, or give a local .jsonl/.csv file.") from err
    report = ReadReport(source)
    report.n_lines = len(ds)
    return problems_from_records([(i + 1, i, row) for i, row in enumerate(ds)], report), report


def load_problems(spec: DatasetSpec) -> tuple[list[Problem], ReadReport]:
    """Problems of a DatasetSpec (first `spec.limit` if set), plus what was skipped.

    `spec.source` empty: the built-in source of `spec.name` (BUILTIN_SOURCES). Otherwise a local
    file path, a jsonl URL, or a hub id.
    """
    source = spec.source or BUILTIN_SOURCES.get(spec.name, "")
    if not source:
        raise ValueError(f"unknown dataset {spec.name!r}: built-in ones are "
                         f"{', '.join(BUILTIN_SOURCES)}; otherwise give a source (file, URL or hub id)")
    local = Path(source).expanduser()
    if not source.startswith(("http://", "https://")) and (local.exists() or
                                                          local.suffix.lower() in (".jsonl", ".json", ".csv")):
        problems, report = read_problems_file(local)
    else:
        problems, report = _load_hub(source, spec.split)
    return (problems if spec.limit is None else problems[: spec.limit]), report


# ---------------------------------------------------------------------------------- templates
def resolve_template(template: str) -> str:
    """A template name (TEMPLATES or "chat") or a custom string containing "{question}"."""
    if template in TEMPLATES or template == CHAT_TEMPLATE:
        return TEMPLATES.get(template, CHAT_TEMPLATE)
    if "{question}" not in template:
        raise ValueError(f"unknown prompt template {template!r}: use one of "
                         f"{', '.join([*TEMPLATES, CHAT_TEMPLATE])}, or a custom string containing {{question}}")
    return template


def format_prompt(question: str, template: str, tokenizer: Any = None) -> str:
    """The prompt text of `question` under `template` (name or custom string).

    Only "{question}" is substituted (other braces, such as `\\boxed{}`, are kept as they are).
    "chat" uses `tokenizer.apply_chat_template` with one user turn: question + instruction.
    """
    resolved = resolve_template(template)
    if resolved == CHAT_TEMPLATE:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer that has a chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": f"{question}\n{_INSTRUCTION}"}],
                                             tokenize=False, add_generation_prompt=True)
    return resolved.replace("{question}", question)


def stop_ids(tokenizer: Any, template: str) -> set[int]:
    """Token ids of the template's stop tokens (TEMPLATE_STOPS; none for other templates); ValueError
    when the tokenizer does not have one of them as a single token (a model of another family)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in TEMPLATE_STOPS.get(template, ()) if t not in vocab]
    if missing:
        raise ValueError(f"template {template!r} ends answers at {', '.join(missing)}, which this model's tokenizer "
                         f"does not have as a token: use the template of the model's own family")
    return {vocab[t] for t in TEMPLATE_STOPS.get(template, ())}


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt text: the tokenizer's special tokens (e.g. BOS) are added unless the
    text already starts with the BOS token (chat templates write it themselves)."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
