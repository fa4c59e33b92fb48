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


def _sort_lines(path: Path, order: Sequence[Any]) -> None:
    """Rewrite `path` with its lines in the idx order `order` (lines of other idx first, as they were)."""
    rank = {idx: i for i, idx in enumerate(order)}
    lines = [line for line in path.read_bytes().splitlines(keepends=True) if line.strip()]
    keys = [rank.get(json.loads(line).get("idx"), -1) for line in lines]
    if keys != sorted(keys):
        write_bytes_atomic(path, b"".join(lines[i] for i in sorted(range(len(lines)), key=keys.__getitem__)))


def generate_answers(problems: Sequence[Problem], out_path: str | os.PathLike, backend: Backend,
                     tokenizer: Any, template: str, max_new_tokens: int, batch_size: int = 0,
                     progress: bool = True, on_progress: Callable[[int, int], None] | None = None
                     ) -> GenerationReport:
    """Answer every problem not yet in `out_path` (greedy), appending answers as they finish.

    batch_size: prompts per call of a batch backend (0: DEFAULT_BATCH); a streaming backend sizes
    its own batch. on_progress(answers, tokens) gets the counts written so far by this call.
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
    written, tokens, t0 = 0, 0, time.perf_counter()
    with open(out_path, "a", encoding="utf-8") as fh, \
            tqdm(total=len(todo), desc=f"generate {out_path.name}", unit="answer", disable=not progress) as bar:
        for batch, answers in _finished(backend, todo, prompts, max_new_tokens, batch_size or DEFAULT_BATCH):
            for row in answer_rows(batch, [prompts[p.idx] for p in batch], answers, tokenizer):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            written, tokens = written + len(batch), tokens + sum(map(len, answers))
            bar.update(len(batch))
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s", refresh=False)
            if on_progress is not None:
                on_progress(written, tokens)
    if todo:
        _sort_lines(out_path, [p.idx for p in problems])
    samples, _ = read_samples(out_path)
    wanted = set(prompts)
    scores, _ = scores_of(s for s in samples if s.idx in wanted)
    return GenerationReport(str(out_path), len(problems), len(set(done) & wanted), len(todo),
                            accuracy(scores), tokens, report.problems if report else [])


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
