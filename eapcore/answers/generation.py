"""Greedy, batched, resumable answer generation into the harness answers format.

Output: one jsonl line per question (eapcore.harness), fields
    idx, question, gt, <dataset metadata>, prompt_token_ids, generate_token_ids ([ids]),
    code ([answer text]), pred ([extracted final answer]), score ([correct]).
Token conventions: `prompt_token_ids` is the prompt as the model saw it (special tokens such as
BOS included, no padding). `generate_token_ids` holds the generated tokens up to and including
the first end-of-sequence token when the model emitted one (as vLLM returns them); padding is never
stored. An answer cut by `max_new_tokens` has no EOS. `code` is the decoded answer text with
special tokens skipped.
Resuming: questions whose idx is already in the output file are never regenerated; answers are
appended and flushed (fsync) as they finish (at least every second), so a kill loses at most the
answers in flight. Lines are in the problems' order once a call completes.
Backends ("auto" picks the first that applies): vLLM when installed and a GPU is present;
"continuous" (eapcore.answers.decoding.SlotDecoder: continuous batching, equal to `generate` token for
token, on the GPU and the CPU) for the architectures it supports; else "transformers" (plain
`generate`, greedy, left padding, batches of `batch_size`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eapcore import modelfiles
from eapcore.answers.data import TEMPLATES, Problem, encode_prompt, format_prompt, load_problems, stop_ids
from eapcore.answers.grading import accuracy, extract_answer, grade_pairs, scores_of
from eapcore.files import write_bytes_atomic
from eapcore.harness import ReadReport, parse_sample, read_jsonl, read_samples, write_jsonl
from eapcore.specs import BACKENDS, DatasetSpec, GenerationSettings, ModelSpec

# prompts (token ids, no padding), max_new_tokens -> answers (token ids, see module docstring)
Backend = Callable[[list[list[int]], int], list[list[int]]]

DEFAULT_BATCH = 8  # prompts per call of a batch backend (plain generate) when batch_size is 0
_RESERVED = ("idx", "question", "gt", "prompt_token_ids", "generate_token_ids", "code", "pred", "score")


def cut_at_eos(tokens: Sequence[int], eos_ids: set[int]) -> list[int]:
    """Tokens up to and including the first EOS (everything after it is padding); all if none."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return list(tokens[: i + 1])
    return list(tokens)


# ------------------------------------------------------------------------------------ loading
def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def load_tokenizer(model: ModelSpec) -> Any:
    """The model's tokenizer (hub id or folder); a one-line ValueError (modelfiles.CheckpointError)
    if it cannot be loaded."""
    return modelfiles.load_tokenizer(model.name_or_path, model.revision, model.trust_remote_code)


def load_causal_lm(model: ModelSpec, dtype: str = "float32", device: str | None = None) -> Any:
    """AutoModelForCausalLM in eval mode on `device` (default: cuda if available, else cpu); a
    one-line ValueError (modelfiles.CheckpointError) if it cannot be loaded."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = modelfiles.load_causal_lm(model.name_or_path, model.revision, model.trust_remote_code,
                                   dtype=getattr(torch, dtype))
    return lm.to(device).eval()


@dataclass
class TransformersBackend:
    """Greedy `generate` with left padding; answers cut after the first EOS (the model's, or one of
    `stops`: the template's, data.stop_ids)."""

    model: Any
    tokenizer: Any
    stops: set[int] = field(default_factory=set)
    eos_ids: set[int] = field(init=False)
    pad_id: int = field(init=False)

    def __post_init__(self) -> None:
        self.eos_ids = _eos_ids(self.model, self.tokenizer) | self.stops
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)

    def __call__(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        import torch
        from transformers import GenerationConfig

        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                                  pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids) or None)
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      generation_config=config)
        return [cut_at_eos(row, self.eos_ids) for row in out[:, width:].tolist()]


@dataclass
class VLLMBackend:
    """vLLM offline engine, temperature 0 (needs a GPU)."""

    model: ModelSpec
    dtype: str
    eos_ids: set[int]

    def __post_init__(self) -> None:
        from vllm import LLM

        self.llm = LLM(model=self.model.name_or_path, revision=self.model.revision, dtype=self.dtype,
                       trust_remote_code=self.model.trust_remote_code, seed=0)

    def __call__(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=sorted(self.eos_ids))
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [cut_at_eos(o.outputs[0].token_ids, self.eos_ids) for o in outs]


def make_backend(model: ModelSpec, settings: GenerationSettings, template: str = "") -> tuple[Backend, Any]:
    """(backend, tokenizer) for `model` (module docstring: which backend "auto" picks); answers also
    stop at the prompt template's stop tokens (data.TEMPLATE_STOPS)."""
    import dataclasses
    import importlib.util

    import torch

    from eapcore.answers.decoding import SlotDecoder, unsupported_reason
    from eapcore.engine.checkpoints import local_folder

    # a GGUF file or a LoRA adapter becomes a plain folder (cached)
    model = dataclasses.replace(model, name_or_path=local_folder(model.name_or_path, model.revision))
    tokenizer = load_tokenizer(model)
    stops = stop_ids(tokenizer, template)
    use_vllm = settings.backend == "vllm" or (
        settings.backend == "auto" and importlib.util.find_spec("vllm") is not None and torch.cuda.is_available())
    if use_vllm:
        if importlib.util.find_spec("vllm") is None:
            raise ValueError("backend 'vllm' requested but vllm is not installed; use 'continuous' or 'transformers'")
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        return VLLMBackend(model, settings.dtype, eos | stops), tokenizer
    lm = load_causal_lm(model, settings.dtype)
    plain = TransformersBackend(lm, tokenizer, stops)
    if settings.backend in ("auto", "continuous"):
        reason = unsupported_reason(lm)
        if reason is None:
            return SlotDecoder(lm, plain.eos_ids, settings.batch_size, pad_id=plain.pad_id), tokenizer
        if settings.backend == "continuous":
            raise ValueError(f"backend 'continuous': {reason}; use 'transformers'")
        print(f"note: {reason}; answers come from plain transformers generate", file=sys.stderr)
    return plain, tokenizer


# --------------------------------------------------------------------------------- generation
@dataclass
class GenerationReport:
    out_path: str
    n_problems: int
    n_existing: int  # already in the output file, kept as they were
    n_generated: int
    accuracy: dict[str, float | int]  # over the problems, from the file's scores
    n_tokens: int = 0  # answer tokens generated by this call
    read_problems: list[str] = field(default_factory=list)  # unreadable lines dropped from the file


def answer_rows(problems: Sequence[Problem], prompts: Sequence[list[int]], answers: Sequence[list[int]],
                tokenizer: Any) -> list[dict[str, Any]]:
    """Harness rows (module docstring) for one batch, graded against each problem's reference."""
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]
    preds = [extract_answer(t) for t in texts]
    scores = grade_pairs(zip(preds, (p.answer for p in problems)))
    rows = []
    for prob, prompt, ids, text, pred, ok in zip(problems, prompts, answers, texts, preds, scores):
        meta = {k: v for k, v in prob.meta.items() if k not in _RESERVED}
        rows.append({"idx": prob.idx, "question": prob.question, "gt": prob.answer, **meta,
                     "prompt_token_ids": list(prompt), "generate_token_ids": [list(ids)],
                     "code": [text], "pred": [pred], "score": [ok]})
    return rows


def _existing(out_path: Path) -> tuple[dict[Any, Any], ReadReport | None]:
    """Samples already in the output file. A file with unreadable lines or duplicate idx (e.g. a kill
    in the middle of a write) is rewritten without them; the other lines keep their exact content."""
    if not out_path.exists():
        return {}, None
    rows, report = read_jsonl(out_path)
    done: dict[Any, Any] = {}
    keep = []
    for line_no, obj in rows:
        try:
            sample = parse_sample(obj)
        except ValueError as err:
            report.problems.append(f"line {line_no}: {err}")
            continue
        if sample.idx in done:
            report.problems.append(f"line {line_no}: duplicate idx {sample.idx!r} (dropped)")
            continue
        done[sample.idx] = sample
        keep.append(obj)
    if report.problems:
        write_jsonl(out_path, keep)
    return done, report


def _finished(backend: Backend, todo: Sequence[Problem], prompts: dict[Any, list[int]], max_new_tokens: int,
              batch_size: int, every_s: float = 1.0) -> Iterator[tuple[list[Problem], list[list[int]]]]:
    """(problems, answers) groups as they finish: one per batch of a batch backend; for a streaming
    backend (one with `stream`, which gets every prompt at once) what finished within `every_s`."""
    stream = getattr(backend, "stream", None)
    if stream is None:
        for start in range(0, len(todo), batch_size):
            batch = list(todo[start: start + batch_size])
            yield batch, backend([prompts[p.idx] for p in batch], max_new_tokens)
        return
    group: list[Problem] = []
    answers: list[list[int]] = []
    last = time.monotonic()
    for i, answer in stream([prompts[p.idx] for p in todo], max_new_tokens):
        group.append(todo[i])
        answers.append(answer)
        if time.monotonic() - last >= every_s:
            yield group, answers
            group, answers, last = [], [], time.monotonic()
    if group:
        yield group, answers


def expected_remaining(finished: Sequence[int], in_flight: Sequence[int], queued: int, cap: int) -> tuple[float, float]:
    """(expected tokens still to generate, expected remaining tokens of the longest-running answer).

    Answer lengths are estimated by Kaplan-Meier: `finished` lengths are complete, `in_flight`
    ones (tokens so far) are censored, so the long answers still running are not forgotten (the
    finished ones alone are the short ones early in a job). An answer in flight at p tokens is
    expected to add E[L - p | L > p] tokens, a queued one E[L]; past the longest length seen the
    survival stays flat up to `cap` (max_new_tokens), which errs long. No data: every answer `cap`."""
    import numpy as np

    done, running = np.sort(np.asarray(finished, dtype=float)), np.sort(np.asarray(in_flight, dtype=float))
    points = np.unique(np.concatenate([done, running, [0.0]]))
    points = points[points < cap]  # S(x) = P(L > x) is constant from one point to the next
    ends = np.searchsorted(done, points, side="right") - np.searchsorted(done, points, side="left")
    at_risk = len(done) + len(running) - np.searchsorted(done, points) - np.searchsorted(running, points)
    survival = np.cumprod(np.where(at_risk > 0, 1 - ends / np.maximum(at_risk, 1), 1.0))
    widths = np.diff(np.append(points, cap))
    tail = np.append(np.cumsum((survival * widths)[::-1])[::-1], 0.0)  # sum of S(x) for x from points[k] to cap - 1

    def ahead(p: float) -> float:  # E[L - p | L > p] = sum of S(x) / S(p) for x = p .. cap - 1
        k = int(np.searchsorted(points, p, side="right")) - 1
        nxt = points[k + 1] if k + 1 < len(points) else cap
        return float(cap - p) if survival[k] <= 0 else max(0.0, float(nxt - p + tail[k + 1] / survival[k]))

    per_answer = [ahead(p) for p in running]
    fresh = ahead(0.0) if queued else 0.0
    return sum(per_answer) + queued * fresh, max(per_answer + [fresh], default=0.0)


@dataclass
class Progress:
    """What `generate_answers` reports after each group of answers it writes."""

    answers: int  # answers written by this call
    remaining: int  # answers of this call not written yet
    tokens: int  # tokens generated by this call: in written answers and in flight
    seconds: float  # since this call started generating
    lengths: list[int]  # token lengths of every answer in the file (earlier calls' included)
    in_flight: list[int] = field(default_factory=list)  # tokens so far of unfinished answers (streaming backends)
    steps: int = 0  # decode steps so far (streaming backends)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.tokens and self.seconds > 0 else None

    def eta_s(self, cap: int, more: int = 0) -> float | None:
        """Seconds until this call's answers and `more` answers of the same kind are done: expected
        remaining tokens (expected_remaining) / tokens per second so far, and at least the longest
        answer's expected remaining tokens at the decode steps per second so far (at the end of a
        job few long answers run at a lower rate)."""
        rate = self.tokens_per_s
        if rate is None:
            return None
        queued = self.remaining - len(self.in_flight) + more
        total, longest = expected_remaining(self.lengths, self.in_flight, max(queued, 0), cap)
        steps_per_s = self.steps / self.seconds if self.steps else None
        return max(total / rate, longest / steps_per_s if steps_per_s else 0.0)


def _sort_lines(path: Path, order: Sequence[Any]) -> None:
    """Rewrite `path` with its lines in the idx order `order` (lines of other idx first, as they were)."""
    rank = {idx: i for i, idx in enumerate(order)}
    lines = [line for line in path.read_bytes().splitlines(keepends=True) if line.strip()]
    keys = [rank.get(json.loads(line).get("idx"), -1) for line in lines]
    if keys != sorted(keys):
        write_bytes_atomic(path, b"".join(lines[i] for i in sorted(range(len(lines)), key=keys.__getitem__)))


def generate_answers(problems: Sequence[Problem], out_path: str | os.PathLike, backend: Backend,
                     tokenizer: Any, template: str, max_new_tokens: int, batch_size: int = 0,
                     progress: bool = True, on_progress: Callable[[Progress], None] | None = None
                     ) -> GenerationReport:
    """Answer every problem not yet in `out_path` (greedy), appending answers as they finish.

    batch_size: prompts per call of a batch backend (0: DEFAULT_BATCH); a streaming backend sizes
    its own batch. on_progress(Progress) follows each group of answers written; the bar shows
    generated tokens/s and the ETA of Progress.eta_s.
    Raises ValueError if an existing answer's prompt differs from this template's prompt (the file
    belongs to another model or template: use another output file).
    """
    from tqdm import tqdm

    if batch_size < 0 or max_new_tokens < 1:
        raise ValueError("batch_size must be >= 0 (0: automatic) and max_new_tokens >= 1")
    out_path = Path(out_path)
    done, report = _existing(out_path)
    prompts = {p.idx: encode_prompt(tokenizer, format_prompt(p.question, template, tokenizer)) for p in problems}
    clash = [idx for idx, s in done.items() if idx in prompts and s.prompt_ids != prompts[idx]]
    if clash:
        raise ValueError(f"{out_path}: {len(clash)} stored answer(s) (e.g. idx {clash[0]!r}) have a different "
                         "prompt than this model/template gives; write to another output file")
    todo = [p for p in problems if p.idx not in done]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    state = Progress(0, len(todo), 0, 0.0, [len(s.answer_ids) for s in done.values()])
    tokens, t0, streaming = 0, time.perf_counter(), hasattr(backend, "stream")
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
    with open(out_path, "a", encoding="utf-8") as fh, \
            tqdm(total=len(todo), desc=f"generate {out_path.name}", unit="answer", disable=not progress,
                 bar_format=bar_format) as bar:
        for batch, answers in _finished(backend, todo, prompts, max_new_tokens, batch_size or DEFAULT_BATCH):
            for row in answer_rows(batch, [prompts[p.idx] for p in batch], answers, tokenizer):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            tokens += sum(map(len, answers))
            state.lengths += map(len, answers)
            stats = getattr(backend, "stats", {}) if streaming else {}  # the decoder's counters of this stream
            in_flight = list(stats.get("in_flight", ()))
            state.answers, state.remaining = state.answers + len(batch), state.remaining - len(batch)
            state.in_flight, state.steps = in_flight, stats.get("steps", 0)
            state.tokens, state.seconds = tokens + sum(in_flight), time.perf_counter() - t0
            bar.update(len(batch))
            bar.set_postfix_str(progress_text(state.tokens_per_s, state.eta_s(max_new_tokens)), refresh=False)
            if on_progress is not None:
                on_progress(state)
    if todo:
        _sort_lines(out_path, [p.idx for p in problems])
    samples, _ = read_samples(out_path)
    wanted = set(prompts)
    scores, _ = scores_of(s for s in samples if s.idx in wanted)
    return GenerationReport(str(out_path), len(problems), len(set(done) & wanted), len(todo),
                            accuracy(scores), tokens, report.problems if report else [])


def format_duration(seconds: float) -> str:
    """'42 s', '7 min 05 s', '3 h 20 min', '2 d 04 h'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def progress_text(tokens_per_s: float | None, eta_s: float | None) -> str:
    """'1,234 tokens/s, ETA 7 min 05 s' (parts that are unknown left out)."""
    return ", ".join(filter(None, (f"{tokens_per_s:,.0f} tokens/s" if tokens_per_s else "",
                                   f"ETA {format_duration(eta_s)}" if eta_s is not None else "")))


# ------------------------------------------------------------------------------------- import
def import_answers(src: str | os.PathLike, out: str | os.PathLike) -> ReadReport:
    """Validate and normalise an existing harness answers file into the project's answers format.

    Kept per line: idx, prompt_token_ids, the first generated answer, and every other field;
    `code`/`pred`/`score` become one-element lists; `pred`/`score` are computed from `code` and
    `gt` when missing. Bad lines and duplicate idx are reported and skipped; the rest is written.
    """
    samples, report = read_samples(src)
    kept: dict[Any, Any] = {}
    for s in samples:
        if s.idx in kept:
            report.problems.append(f"idx {s.idx!r}: duplicate (first one kept)")
            continue
        for key in ("code", "pred", "score"):
            value = s.extra.get(key)
            if value is not None and not isinstance(value, list):
                s.extra[key] = [value]
        kept[s.idx] = s
    if not kept:
        raise ValueError(f"no usable answer in {src}: {report.summary() if report.n_lines else 'the file is empty'}")
    todo, preds = [], []
    for s in kept.values():
        pred, code = (s.extra.get("pred") or [None])[0], (s.extra.get("code") or [None])[0]
        if isinstance(code, str) and not isinstance(pred, str):
            pred = extract_answer(code)
        if "score" not in s.extra and isinstance(pred, str) and s.extra.get("gt") is not None:
            todo.append(s)
            preds.append(pred)
    for s, pred, ok in zip(todo, preds, grade_pairs(zip(preds, (str(s.extra["gt"]) for s in todo)))):
        s.extra["pred"], s.extra["score"] = [pred], [ok]
    ungraded = [s.idx for s in kept.values() if "score" not in s.extra]
    if ungraded:
        report.problems.append(f"{len(ungraded)} answer(s) have no score and no `code`+`gt` to grade "
                               f"(e.g. idx {ungraded[0]!r}); selection will skip them")
    write_jsonl(out, (s.to_json() for s in kept.values()))
    return report


# ---------------------------------------------------------------------------------------- CLI
def command(argv: list[str]) -> int:
    """`python -m eapcore generate ...` (see --help)."""
    ap = argparse.ArgumentParser(prog="python -m eapcore generate",
                                 description="Greedy answers of one model to a dataset (resumable), "
                                             "or import of an existing harness answers file.")
    ap.add_argument("--out", required=True, help="answers jsonl (extended if it exists)")
    ap.add_argument("--import-answers", metavar="FILE", help="normalise this harness answers file into --out")
    ap.add_argument("--model", help="hub id or local folder")
    ap.add_argument("--revision")
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.add_argument("--dataset", help="math, math500, gsm8k, college_math, or a name for --source")
    ap.add_argument("--source", default="", help="local .jsonl/.csv file, jsonl URL, or hub id[#config]")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, help="first N problems only")
    ap.add_argument("--template", default="deepseek-math",
                    help=f"{', '.join(TEMPLATES)}, chat, or a custom string with {{question}}")
    ap.add_argument("--max-new-tokens", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=GenerationSettings.batch_size,
                    help="sequences decoded together (0: from free memory)")
    ap.add_argument("--backend", choices=BACKENDS, default="auto")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=GenerationSettings.dtype)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.import_answers:
            report = import_answers(args.import_answers, args.out)
            print(report.summary(), file=sys.stderr)
            return 0
        if not args.model or not (args.dataset or args.source):
            ap.error("--model and --dataset (or --source) are required unless --import-answers is given")
        problems, read = load_problems(DatasetSpec(args.dataset or Path(args.source).stem, args.source,
                                                   args.split, args.limit))
        if read.problems:
            print(read.summary(), file=sys.stderr)
        settings = GenerationSettings(args.max_new_tokens, args.batch_size, args.backend, args.dtype)
        backend, tokenizer = make_backend(ModelSpec(args.model, args.revision, args.trust_remote_code), settings,
                                          args.template)
        result = generate_answers(problems, args.out, backend, tokenizer, args.template,
                                  args.max_new_tokens, args.batch_size, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.__dict__, indent=2, default=str))
    return 0
