"""The stages of a run, each a cache entry (eapcore.runs.keys says what keys it):
generate -> grade -> select -> attribute -> metrics.

Attribution is resumable and bit-exact: batches are packed over all selected samples with the
batch size recorded in plan.json, a batch is computed only if one of its samples has no entry yet,
and each sample's entry is written as soon as its batch is done. Killing the process loses at
most the batches in flight.

Test knobs (harmless otherwise): EAP_TEST_SLEEP_PER_BATCH=<seconds> sleeps after each attribution
batch (the tests kill or cancel a run mid-way); EAP_TEST_KILL_ONCE=<file>: the first process to
finish an attribution batch creates the file and kills itself with SIGKILL (a worker's death, for
the distributed executor's tests).
"""
from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from eapcore.runs import registry
from eapcore.files import read_json_or_none, replace_dir, write_json_atomic
from eapcore.runs.cache import Cache
from eapcore.runs.errors import RunError
from eapcore.runs.keys import MIN_QUESTIONS, digest, max_new_tokens, model_identity, score_key, stage_keys
from eapcore.runs.memory import predict_memory
from eapcore.runs.workers import Reporter
from eapcore.specs import AttributionSettings, ModelSpec, RunSpec

SLEEP_ENV = "EAP_TEST_SLEEP_PER_BATCH"
KILL_ENV = "EAP_TEST_KILL_ONCE"


def _local(model: ModelSpec) -> ModelSpec:
    return dataclasses.replace(model, name_or_path=registry.resolve_path(model.name_or_path))


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def stage_import(cache: Cache, spec: RunSpec, keys: dict, rep: Reporter) -> dict[str, Path]:
    """Generation entries of base and tuned from the spec's joined file, instead of generating:
    answers.jsonl (each row's correctness = the run's answer group, which the file's rows are) and
    import.json (source, format, group, rows, skipped lines)."""
    from eapcore.harness import read_joined, write_samples

    path = registry.resolve_path(spec.answers.joined)
    rep.stage("generate", total=2, message=f"importing both models' answers from {path}")
    read: dict = {}
    for i, (which, key) in enumerate(keys["generations"].items()):
        def write(folder: Path, which=which) -> None:
            if not read:
                base, tuned, report = read_joined(path, spec.selection.group)
                if not base:
                    raise RunError(f"no usable row in the joined answers file: {report.summary()}")
                limit = spec.dataset.limit or len(base)
                read.update(base=base[:limit], tuned=tuned[:limit], problems=report.problems)
            write_samples(folder / "answers.jsonl", read[which])
            write_json_atomic(folder / "import.json", {"source": path, "format": "joined", "model": which,
                                                       "group": spec.selection.group, "rows": len(read[which]),
                                                       "skipped": read["problems"]})

        cache.get_or_compute("generations", key, write, {"imported": path, "format": "joined", "model": which,
                                                         "group": spec.selection.group})
        rep.update(i + 1)
    return {w: cache.entry_path("generations", k) / "answers.jsonl" for w, k in keys["generations"].items()}


def _problems(spec: RunSpec) -> list:
    from eapcore.answers.data import load_problems

    ds = spec.dataset
    return load_problems(dataclasses.replace(ds, source=registry.resolve_path(ds.source)) if ds.source else ds)[0]


def _work_file(cache: Cache, key: str) -> Path:
    return cache.work_dir("generations", key) / "answers.jsonl"


def _answer(spec: RunSpec, which: str, problems: list, out: Path,
            on_progress: Callable[[Any], None] | None = None) -> int:
    """Answers of the `which` ("base" or "tuned") model of `spec` to `problems`, appended to `out`
    (resumable); on_progress(generation.Progress) follows each group written. Returns the tokens
    generated."""
    from eapcore.answers.generation import generate_answers, make_backend

    gen = dataclasses.replace(spec.generation, max_new_tokens=max_new_tokens(spec))
    backend, tokenizer = make_backend(_local(getattr(spec.pair, which)), gen, spec.pair.template)
    report = generate_answers(problems, out, backend, tokenizer, spec.pair.template, gen.max_new_tokens,
                              gen.batch_size, progress=False, on_progress=on_progress)
    del backend
    _free_memory()
    return report.n_tokens


def _reporting(rep: Reporter, which: str, more: int, spec: RunSpec) -> Callable[[Any], None]:
    """on_progress for `_answer`: the stage's items, tokens/s and ETA (`more`: answers the stage
    still has to generate after this model's, counted in the ETA)."""
    done, cap = rep.status["done"], max_new_tokens(spec)

    def on_progress(p) -> None:
        rep.update(done + p.answers, f"generating {which} answers", tokens_per_s=p.tokens_per_s,
                   eta_s=p.eta_s(cap, more))
    return on_progress


def generate_entry(cache: Cache, spec: RunSpec, which: str, key: str, problems: list | None = None,
                   on_progress: Callable[[Any], None] | None = None) -> tuple[bool, int]:
    """Generation entry `key` of the `which` ("base" or "tuned") model of `spec` (answers.jsonl),
    resumable through its work file; problems: the dataset's (loaded if None). on_progress: as
    `_answer`'s. Returns (computed here?, tokens generated here)."""
    work = _work_file(cache, key)
    tokens = 0

    def write(folder: Path) -> None:
        nonlocal tokens
        tokens = _answer(spec, which, _problems(spec) if problems is None else problems, work, on_progress)
        shutil.copyfile(work, folder / "answers.jsonl")

    meta = {"model": getattr(spec.pair, which).name_or_path, "dataset": spec.dataset.name,
            "template": spec.pair.template, "max_new_tokens": max_new_tokens(spec)}
    _, computed = cache.get_or_compute("generations", key, write, meta)
    cache.drop_work("generations", key)
    return computed, tokens


def stage_generate(cache: Cache, spec: RunSpec, keys: dict, rep: Reporter) -> dict[str, Path]:
    """Generation entries of base and tuned (answers.jsonl); resumable through work files.
    Imported answers (spec.answers) come from stage_import instead."""
    from eapcore.engine.models import resolve_device

    if spec.answers is not None:
        return stage_import(cache, spec, keys, rep)

    todo = {w: k for w, k in keys["generations"].items() if cache.get("generations", k) is None}
    problems = _problems(spec) if todo else []
    started = {w: _count_lines(_work_file(cache, k)) for w, k in todo.items()}  # answers written per model (resume)
    if len(set(todo.values())) < len(todo):  # base and tuned are one model: its answers are made once
        started["tuned"] = 0
    # problems per model: the dataset's, or (nothing to generate) the cached answers' count
    n = len(problems) if todo else _count_lines(cache.entry_path("generations", keys["generations"]["base"])
                                                / "answers.jsonl")
    cached = (2 - len(todo)) * n
    device = resolve_device("auto").type if todo else "cpu"
    rep.stage("generate", total=2 * n, done=cached + sum(started.values()), cached=cached, device=device,
              message=f"{spec.dataset.name}: {n} problems" if todo else "both models' answers from the cache")
    for i, (which, key) in enumerate(todo.items()):
        more = sum(n - started[w] for w in list(todo)[i + 1:] if todo[w] != key)  # answers still to come
        computed, _ = generate_entry(cache, spec, which, key, problems, _reporting(rep, which, more, spec))
        if not computed:  # the same model as the other side, or another process generated them
            rep.from_cache(n - started[which], f"{which} answers from the cache")
    return {w: cache.entry_path("generations", k) / "answers.jsonl" for w, k in keys["generations"].items()}


QUICK = "quick.json"


def quick_questions(folder: Path) -> int | None:
    """The questions a quick run answered, from its run folder's quick.json (None before)."""
    record = read_json_or_none(folder / QUICK)
    questions = record.get("questions") if isinstance(record, dict) else None
    return questions if isinstance(questions, int) and questions > 0 else None


def next_round(answered: int, kept: int, n: int, total: int, chunk: int) -> int:
    """Questions of a quick run after its next round: `answered` so far, `kept` of them passing the
    selection rules, `n` wanted. chunk > 0: that many more; else 2n first, then the pass rate so
    far times what is missing, plus 20% (twice as many while none passes). At most `total`."""
    if chunk:
        target = answered + chunk
    elif not answered:
        target = 2 * n
    elif not kept:
        target = 2 * answered
    else:
        target = answered + math.ceil(1.2 * (n - kept) * answered / kept)
    return min(total, max(target, answered + 1))


def _kept(samples: dict[str, list], settings) -> int:
    """Questions of the group that pass the selection rules (T_ref from these samples)."""
    from eapcore.answers.selection import group_lengths, select

    try:
        return select(group_lengths(samples["base"], samples["tuned"], settings.group)[0], settings).counts["kept"]
    except ValueError:  # the group is empty so far
        return 0


def stage_quick(cache: Cache, spec: RunSpec, folder: Path, rep: Reporter) -> tuple[dict[str, Path], int]:
    """A quick run's generation (README "Quick runs"): both models answer the questions in a seeded
    random order, round by round (next_round), until n of them pass the selection rules (T_ref from
    the answers so far) or the dataset ends. Answers go to the whole dataset's generation work file
    (or come from its entry when it exists), so a full run on the same data later resumes from them
    and nothing is answered twice. Rounds are a function of the answers, so a killed run resumes to
    the same questions. Writes generation entries keyed by the questions answered (keys.quick_key)
    and quick.json (rounds, answer tokens, the tokens the whole dataset would have taken, an
    estimate from the mean answer length so far). Returns ({model: answers.jsonl}, questions)."""
    import numpy as np

    from eapcore.engine.models import resolve_device
    from eapcore.harness import read_samples, write_samples
    from eapcore.runs.keys import generation_key, quick_key

    models = ("base", "tuned")
    full = {w: generation_key(getattr(spec.pair, w), spec) for w in models}
    problems = _problems(spec)
    order = [problems[i] for i in np.random.default_rng(spec.quick.seed).permutation(len(problems))]
    n, total = spec.selection.n, len(problems)

    def source(which: str) -> Path:  # where the model's answers are: the full entry, or the work file
        entry = cache.get("generations", full[which])
        return entry.file("answers.jsonl") if entry else cache.work_dir("generations", full[which]) / "answers.jsonl"

    def answered(which: str) -> dict:
        path = source(which)
        return {s.idx: s for s in read_samples(path)[0]} if path.is_file() else {}

    rep.stage("generate", total=0, message=f"quick run on {spec.dataset.name}: {total} problems in seeded order",
              device=resolve_device("auto").type)
    size, kept, rounds, generated = 0, 0, [], 0
    while size < total and (not rounds or kept < n):
        size = next_round(size, kept, n, total, spec.quick.chunk)
        wanted = {p.idx for p in order[:size]}
        subset = [p for p in problems if p.idx in wanted]  # dataset order, as the work file keeps it
        have = {w: answered(w) for w in models}
        missing = {w: sum(i not in have[w] for i in wanted) for w in models}
        message = f"quick round {len(rounds) + 1}: {size} of {total} questions, {kept} of {n} pass so far"
        rep.update(rep.status["done"], message, total=2 * size)
        rep.from_cache(2 * size - sum(missing.values()) - rep.status["done"], message)  # answered before
        for i, which in enumerate(models):
            if wanted <= answered(which).keys():  # (base and tuned may be one model: one work file)
                continue
            later = sum(missing[w] for w in models[i + 1:] if full[w] != full[which])
            with cache.lock(f"generations-{full[which]}"):  # the work file a full run would append to
                if cache.get("generations", full[which]) is None:
                    generated += _answer(spec, which, subset, source(which), _reporting(rep, which, later, spec))
        have = {w: answered(w) for w in models}
        samples = {w: [have[w][p.idx] for p in subset] for w in models}
        kept = _kept(samples, spec.selection)
        rounds.append({"questions": size, "kept": kept})
    keys = {w: quick_key(full[w], spec, size) for w in models}
    for which in models:
        rows = samples[which]
        cache.get_or_compute("generations", keys[which],
                             lambda out, rows=rows: write_samples(out / "answers.jsonl", rows),
                             {"model": getattr(spec.pair, which).name_or_path, "dataset": spec.dataset.name,
                              "quick": {"seed": spec.quick.seed, "questions": size}})
    tokens = {w: sum(len(s.answer_ids) for s in samples[w]) for w in models}
    whole = round(sum(tokens.values()) * total / size)
    write_json_atomic(folder / QUICK, {
        "seed": spec.quick.seed, "chunk": spec.quick.chunk, "n": n, "questions": size, "of": total,
        "kept": kept, "rounds": rounds, "answer_tokens": tokens, "generated_now": generated,
        "whole_dataset_tokens_estimate": whole, "tokens_saved_estimate": whole - sum(tokens.values())})
    rep.update(2 * size, f"quick: {size} of {total} questions answered, {kept} pass (N = {n})")
    return {w: cache.entry_path("generations", k) / "answers.jsonl" for w, k in keys.items()}, size


def stage_grade(cache: Cache, keys: dict, answers: dict[str, Path], rep: Reporter,
                imported: bool = False) -> dict[str, Path]:
    """Grade entries: the answers regraded with the current grading code (imported answers keep
    the correctness their file declares)."""
    from eapcore.answers.grading import accuracy, regrade, scores_of
    from eapcore.harness import read_samples, write_samples

    rep.stage("grade", total=2)
    for i, (which, key) in enumerate(keys["grades"].items()):
        def write(folder: Path, which=which) -> None:
            samples, report = read_samples(answers[which])
            problems = report.problems + ([] if imported else regrade(samples))
            write_samples(folder / "answers.jsonl", samples)
            write_json_atomic(folder / "report.json", {"accuracy": accuracy(scores_of(samples)[0]),
                                                       "problems": problems})

        cache.get_or_compute("grades", key, write, {"model": which, "generation": keys["generations"][which]})
        rep.update(i + 1)
    return {w: cache.entry_path("grades", k) / "answers.jsonl" for w, k in keys["grades"].items()}


def stage_select(cache: Cache, spec: RunSpec, keys: dict, graded: dict[str, Path], rep: Reporter) -> Path:
    from eapcore.harness import read_samples
    from eapcore.answers.selection import group_lengths, none_kept, select, write_selection

    rep.stage("select", total=1)

    def write(folder: Path) -> None:
        base, tuned = read_samples(graded["base"])[0], read_samples(graded["tuned"])[0]
        try:
            selection = select(group_lengths(base, tuned, spec.selection.group)[0], spec.selection)
        except ValueError as err:
            raise RunError(f"{err}; choose another group (--group) or a larger dataset") from None
        if len(selection.idx) < MIN_QUESTIONS:  # before any attribution: the metrics' tests need two
            raise RunError(none_kept(selection, MIN_QUESTIONS))
        write_selection(folder, base, tuned, selection, {"base": keys["grades"]["base"], "tuned": keys["grades"]["tuned"]})

    entry, _ = cache.get_or_compute("selections", keys["selection"], write,
                                    {"pair": spec.pair.name, "dataset": spec.dataset.name,
                                     "alpha": spec.selection.alpha, "group": spec.selection.group})
    rep.update(1)
    return entry.path


def stage_answers(cache: Cache, spec: RunSpec, keys: dict, rep: Reporter,
                  folder: Path | None = None) -> tuple[dict[str, Path], Path]:
    """The stages before attribution: (graded answers of base and tuned, selection entry folder).
    A quick run answers in rounds first (stage_quick, writing quick.json in its run `folder`); its
    keys depend on the questions it answered and are put into `keys` then."""
    if spec.quick is not None:
        answers, questions = stage_quick(cache, spec, folder, rep)
        keys.update(stage_keys(spec, questions))
    else:
        answers = stage_generate(cache, spec, keys, rep)
    graded = stage_grade(cache, keys, answers, rep, imported=spec.answers is not None)
    return graded, stage_select(cache, spec, keys, graded, rep)


def _plan(folder: Path, spec: RunSpec, job: str, sample_tokens: int, max_devices: int | None = None) -> tuple[int, int]:
    """(max_batch_tokens, GPUs per model) of this run: recorded in plan.json at the first attempt
    and reused on resume, so resumed batches equal the uninterrupted ones (bit-exact scores)."""
    plan = read_json_or_none(folder / "plan.json")
    if isinstance(plan, dict) and plan.get("job") == job:
        return int(plan["max_batch_tokens"]), int(plan.get("devices", 1))
    memory = predict_memory(spec, sample_tokens=sample_tokens, max_devices=max_devices)
    if not memory["fits"]:
        raise RunError(memory["message"])
    write_json_atomic(folder / "plan.json", {"job": job, "max_batch_tokens": memory["batch_tokens"],
                                             "devices": memory["devices"], "memory": memory})
    return memory["batch_tokens"], memory["devices"]


@dataclasses.dataclass(frozen=True)
class ScoreBatch:
    """One attribution batch of a run's plan: samples scored together (the same batch on every
    attempt and on every worker, so the scores are bit-exact), their score keys, T_cut and the
    settings. The unit of work of the serial runner and of the distributed executor."""

    samples: tuple
    keys: tuple[str, ...]
    cut_len: int
    settings: AttributionSettings
    devices: int = 1  # GPUs the model's layers are spread over (plan.json; memory.predict_memory)
    writes: tuple[bool, ...] | None = None  # which keys this batch writes (None: all); `first_writers`


def first_writers(batches: Iterable[ScoreBatch]) -> list[ScoreBatch]:
    """The batches (in the order given: a serial sweep's, spec after spec) with `writes` set so each
    score key is written by the first batch that holds it, as a serial sweep writes it (a later
    batch finds it cached). Scores depend on a batch's companions in the last bits (bf16 on a GPU),
    so an executor that runs the batches of several specs at once needs this to equal the serial
    scores bit for bit. A batch whose keys all come first elsewhere gets all False."""
    batches = list(batches)
    owner: dict[str, tuple[str, ...]] = {}
    for b in batches:
        for k in b.keys:
            owner.setdefault(k, b.keys)
    return [dataclasses.replace(b, writes=tuple(owner[k] == b.keys for k in b.keys)) for b in batches]


@dataclasses.dataclass(frozen=True)
class ModelWork:
    """One model's share of a run's attribution: its selected samples and their score keys (in
    selection order) and the plan's batches."""

    model: ModelSpec
    samples: list
    keys: list[str]
    batches: list[ScoreBatch]


def attribution_work(cache: Cache, spec: RunSpec, folder: Path, selection: Path,
                     max_devices: int | None = None) -> tuple[dict[str, ModelWork], int, int]:
    """({"base", "tuned"}: ModelWork, T_cut, max_batch_tokens) of a run whose selection entry is
    `selection`; the batch size and GPUs per model come from plan.json (written at the first
    attempt: `_plan`; max_devices: GPUs of a host, default the visible ones)."""
    from eapcore.engine.attribution import pack_batches, sample_tokens
    from eapcore.harness import read_samples

    att = spec.attribution
    cut_len = int(json.loads((selection / "selection.json").read_text())["t_cut"])
    models = {"base": spec.pair.base, "tuned": spec.pair.tuned}
    samples = {w: read_samples(selection / f"{w}.jsonl")[0] for w in models}
    keys = {w: [score_key(digest(model_identity(m)), s.prompt_ids, s.answer_ids, cut_len, att) for s in samples[w]]
            for w, m in models.items()}
    lengths = {w: [len(sample_tokens(s, cut_len)[0]) for s in samples[w]] for w in models}
    job = digest({"scores": keys, "device": att.device, "max_batch_tokens": att.max_batch_tokens})
    batch_tokens, devices = _plan(folder, spec, job, max(itertools.chain(*lengths.values())), max_devices)
    work = {w: ModelWork(m, samples[w], keys[w],
                         [ScoreBatch(tuple(samples[w][i] for i in b), tuple(keys[w][i] for i in b), cut_len, att,
                                     devices) for b in pack_batches(lengths[w], batch_tokens)])
            for w, m in models.items()}
    return work, cut_len, batch_tokens


def _kill_once() -> None:
    """The KILL_ENV test knob: the first caller creates the file and dies by SIGKILL."""
    marker = os.environ.get(KILL_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def score_batches(cache: Cache, model_spec: ModelSpec, batches: Sequence[ScoreBatch],
                  on_batch: Callable[[int], None] = lambda n: None) -> int:
    """Compute the batches of which a sample has no score entry yet, one at a time, each sample's
    entry written as soon as its batch is done; the model is loaded once (the batches share
    dtype, device and devices: with devices > 1 its layers are spread over the first GPUs, or
    over CPU devices "cpu:0".. on a CPU), and only if a batch is missing. Which samples are missing is
    checked again before each batch: another run sharing samples may have put them meanwhile
    (Cache.put locks each entry, so two writers never race). on_batch(n new entries) follows each
    batch. Returns the number of entries written."""
    from safetensors.torch import save_file

    from eapcore.engine.attribution import attribute
    from eapcore.engine.models import load_model

    todo = [(b, [not w or cache.get("scores", k) is not None for k, w in zip(b.keys, b.writes or [True] * len(b.keys))])
            for b in batches]
    todo = [(b, present) for b, present in todo if not all(present)]
    if not todo:
        return 0
    att, devices = todo[0][0].settings, todo[0][0].devices
    spread = [f"{_auto_device() if att.device == 'auto' else att.device}:{i}" for i in range(devices)]
    model = load_model(registry.resolve_path(model_spec.name_or_path), att.dtype, att.device,
                       model_spec.revision, model_spec.trust_remote_code, devices=spread if devices > 1 else None)
    sleep = float(os.environ.get(SLEEP_ENV) or 0)
    written = 0
    for batch, present in todo:
        present = [done or cache.get("scores", k) is not None for done, k in zip(present, batch.keys)]
        new = [j for j, done in enumerate(present) if not done]
        if new:
            meta = {"model": model_spec.name_or_path, "cut_len": batch.cut_len, "dtype": att.dtype,
                    "device": str(model.device),
                    "graph": {"n_layers": model.adapter.n_layers, "n_heads": model.adapter.n_heads,
                              "n_kv_heads": model.adapter.n_kv_heads, "granularity": batch.settings.granularity}}
            one_batch = dataclasses.replace(batch.settings, max_batch_tokens=sys.maxsize)  # the batch as planned
            start = time.perf_counter()
            part = attribute(model, list(batch.samples), batch.cut_len, one_batch)
            seconds = round((time.perf_counter() - start) / len(batch.samples), 4)  # each sample's share
            for j in new:
                tensors = {"scores": part.scores[j].contiguous(), "loss": part.loss[j: j + 1].contiguous()}
                cache.put("scores", batch.keys[j], lambda dest, t=tensors: save_file(t, str(dest / "scores.safetensors")),
                          {**meta, "idx": batch.samples[j].idx, "seconds": seconds, "batch": digest(batch.keys)[:16]})
            del part
        written += len(new)
        on_batch(len(new))
        _kill_once()
        if sleep and new:
            time.sleep(sleep)
    del model
    _free_memory()
    return written


def _assemble(cache: Cache, model_spec: ModelSpec, samples: list, keys: list[str], cut_len: int,
              att: AttributionSettings, batch_tokens: int):
    """The `attribute` result [N, F, B] of the samples from their score entries; its manifest's
    `seconds` is the attribution time of these samples (each entry's share of its batch, wherever
    and whenever it was computed; entries cached before it was recorded are not counted, see
    `seconds_missing`) and `device` where they were computed."""
    import torch
    from safetensors.torch import load_file

    from eapcore.engine.attribution import AttributionResult, check_finite, result_manifest
    from eapcore.graph import Graph

    entries = [cache.get("scores", k) for k in keys]
    missing = [samples[i].idx for i, e in enumerate(entries) if e is None]
    if missing:
        raise RunError(f"scores of samples {missing[:5]} of {model_spec.name_or_path} vanished from the cache "
                       "during the run (removed by another process?); run the spec again")
    graphs = {json.dumps(e.meta["graph"], sort_keys=True) for e in entries}
    if len(graphs) != 1:
        raise RunError(f"cached scores of {model_spec.name_or_path} disagree on the graph shape ({graphs}); "
                       "remove them with `python -m eapcore cache rm KEY` and run again")
    tensors = [load_file(str(e.file("scores.safetensors"))) for e in entries]
    scores, loss = torch.stack([t["scores"] for t in tensors]), torch.cat([t["loss"] for t in tensors])
    check_finite(model_spec.name_or_path, samples, scores, loss,  # entries cached before the engine checked
                 "it is not pooled; remove its score entry (`python -m eapcore cache list` shows it, "
                 "`cache rm KEY` removes it) and run again")
    timed = [e.meta["seconds"] for e in entries if isinstance(e.meta.get("seconds"), (int, float))]
    manifest = result_manifest(model_spec.name_or_path, samples, cut_len, att, dtype=att.dtype, score_keys=keys,
                               max_batch_tokens=batch_tokens, seconds=round(sum(timed), 3),
                               seconds_missing=len(entries) - len(timed),
                               device=", ".join(sorted({str(e.meta.get("device", "?")) for e in entries})))
    return AttributionResult(scores, loss, Graph(**json.loads(graphs.pop())), manifest)


def stage_attribute(cache: Cache, spec: RunSpec, folder: Path, selection: Path, rep: Reporter) -> list[tuple[str, str]]:
    """Score entries of every selected sample of both models, then base/ and tuned/ in the run
    folder. Returns the (kind, key) entries used."""
    work, cut_len, batch_tokens = attribution_work(cache, spec, folder, selection)
    all_keys = [k for w in work.values() for k in w.keys]
    cached = {which: sum(cache.get("scores", k) is not None for k in w.keys) for which, w in work.items()}
    done = sum(cached.values())
    device = spec.attribution.device
    rep.stage("attribute", total=len(all_keys), done=done, cached=done,
              device=device if device != "auto" else _auto_device(),
              message=f"{len(all_keys) // 2} samples per model, T_cut {cut_len}"
                      + "".join(f"; {w}: {c} from the cache" for w, c in cached.items() if c))
    for which, w in work.items():
        computed = 0

        def on_batch(n: int, which=which) -> None:
            nonlocal done, computed
            done, computed = done + n, computed + n
            rep.update(done, f"attributing {which}")

        with cache.lock(f"attribute-{digest(w.keys)}"):  # one process computes a model's samples
            score_batches(cache, w.model, w.batches, on_batch)
        meanwhile = len(w.keys) - cached[which] - computed  # e.g. the same model and answers as base
        done += max(meanwhile, 0)
        rep.from_cache(meanwhile, f"{which}: {cached[which] + meanwhile} of {len(w.keys)} samples from the cache")
        result = _assemble(cache, w.model, w.samples, w.keys, cut_len, spec.attribution, batch_tokens)
        tmp = folder / f".tmp-{which}"
        shutil.rmtree(tmp, ignore_errors=True)
        result.save(tmp)
        replace_dir(tmp, folder / which)
    return [("scores", k) for k in all_keys]


def _auto_device() -> str:
    from eapcore.engine.models import resolve_device

    return resolve_device("auto").type


def stage_metrics(folder: Path, rep: Reporter) -> None:
    from eapcore.stats import report

    rep.stage("metrics", total=1)
    try:
        result = report.metrics_result(report.load_scores(folder / "base"), report.load_scores(folder / "tuned"))
    except ValueError as err:
        raise RunError(f"metrics failed: {err}") from None
    write_json_atomic(folder / "metrics.json", result)
    rep.update(1)
