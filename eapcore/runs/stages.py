"""The stages of a run, each a cache entry (eapcore.runs.keys says what keys it):
generate -> grade -> select -> attribute -> metrics.

Attribution is resumable and bit-exact: batches are packed over all selected samples with the
batch size recorded in plan.json, a batch is computed only if one of its samples has no entry yet,
and each sample's entry is written as soon as its batch is done. Killing the process loses at
most the batches in flight.

Test knob: EAP_TEST_SLEEP_PER_BATCH=<seconds> sleeps after each attribution batch (used by the
tests to kill or cancel a run mid-way; harmless otherwise).
"""
from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from eapcore.runs import registry
from eapcore.files import read_json_or_none, replace_dir, write_json_atomic
from eapcore.runs.cache import Cache
from eapcore.runs.errors import RunError
from eapcore.runs.keys import digest, max_new_tokens, model_identity, score_key
from eapcore.runs.memory import predict_memory
from eapcore.runs.workers import Reporter
from eapcore.specs import AttributionSettings, ModelSpec, RunSpec

SLEEP_ENV = "EAP_TEST_SLEEP_PER_BATCH"


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


def stage_generate(cache: Cache, spec: RunSpec, keys: dict, rep: Reporter) -> dict[str, Path]:
    """Generation entries of base and tuned (answers.jsonl); resumable through work files.
    Imported answers (spec.answers) come from stage_import instead."""
    from eapcore.answers.data import load_problems
    from eapcore.answers.generation import generate_answers, make_backend
    from eapcore.engine.models import resolve_device

    if spec.answers is not None:
        return stage_import(cache, spec, keys, rep)

    models = {"base": spec.pair.base, "tuned": spec.pair.tuned}
    todo = {w: keys["generations"][w] for w in models if cache.get("generations", keys["generations"][w]) is None}
    problems = load_problems(dataclasses.replace(spec.dataset, source=registry.resolve_path(spec.dataset.source))
                             if spec.dataset.source else spec.dataset)[0] if todo else []
    work = {w: cache.work_dir("generations", k) / "answers.jsonl" for w, k in todo.items()}
    started = {w: _count_lines(p) for w, p in work.items()}  # answers written per model (resume)
    if len(set(work.values())) < len(work):  # base and tuned are one model: its answers are made once
        started["tuned"] = 0
    # problems per model: the dataset's, or (nothing to generate) the cached answers' count
    n = len(problems) if todo else _count_lines(cache.entry_path("generations", keys["generations"]["base"])
                                                / "answers.jsonl")
    cached = (2 - len(todo)) * n
    device = resolve_device("auto").type if todo else "cpu"
    rep.stage("generate", total=2 * n, done=cached + sum(started.values()), cached=cached, device=device,
              message=f"{spec.dataset.name}: {n} problems" if todo else "both models' answers from the cache")
    gen = dataclasses.replace(spec.generation, max_new_tokens=max_new_tokens(spec))
    tokens_before = 0  # generated by the models finished earlier in this stage
    for which, key in todo.items():
        def write(folder: Path, which=which, key=key) -> None:
            nonlocal tokens_before
            backend, tokenizer = make_backend(_local(models[which]), gen)
            start = rep.status["done"]

            def on_progress(answers: int, tokens: int) -> None:
                rep.update(start + answers, f"generating {which} answers", tokens=tokens_before + tokens)

            report = generate_answers(problems, work[which], backend, tokenizer, spec.pair.template,
                                      gen.max_new_tokens, gen.batch_size, progress=False, on_progress=on_progress)
            tokens_before += report.n_tokens
            del backend
            _free_memory()
            shutil.copyfile(work[which], folder / "answers.jsonl")

        meta = {"model": models[which].name_or_path, "dataset": spec.dataset.name, "template": spec.pair.template,
                "max_new_tokens": gen.max_new_tokens}
        _, computed = cache.get_or_compute("generations", key, write, meta)
        if not computed:  # the same model as the other side, or another process generated them
            rep.from_cache(n - started[which], f"{which} answers from the cache")
        cache.drop_work("generations", key)
    return {w: cache.entry_path("generations", k) / "answers.jsonl" for w, k in keys["generations"].items()}


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
        if not selection.idx:
            raise RunError(none_kept(selection))
        write_selection(folder, base, tuned, selection, {"base": keys["grades"]["base"], "tuned": keys["grades"]["tuned"]})

    entry, _ = cache.get_or_compute("selections", keys["selection"], write,
                                    {"pair": spec.pair.name, "dataset": spec.dataset.name,
                                     "alpha": spec.selection.alpha, "group": spec.selection.group})
    rep.update(1)
    return entry.path


def _plan(folder: Path, spec: RunSpec, job: str, sample_tokens: int) -> int:
    """max_batch_tokens of this run: recorded in plan.json at the first attempt and reused on
    resume, so resumed batches equal the uninterrupted ones (bit-exact scores)."""
    plan = read_json_or_none(folder / "plan.json")
    if isinstance(plan, dict) and plan.get("job") == job:
        return int(plan["max_batch_tokens"])
    memory = predict_memory(spec, sample_tokens=sample_tokens)
    if not memory["fits"]:
        raise RunError(memory["message"])
    write_json_atomic(folder / "plan.json", {"job": job, "max_batch_tokens": memory["batch_tokens"], "memory": memory})
    return memory["batch_tokens"]


def _score_missing(cache: Cache, model_spec: ModelSpec, samples: list, keys: list[str], lengths: list[int],
                   cut_len: int, att: AttributionSettings, batch_tokens: int, on_batch: Callable[[int], None]) -> None:
    """Compute the score entries of `samples` that are not cached, one batch at a time.

    Batches are packed over all samples (so they are the same on every attempt) and a batch runs
    if any of its samples lacks an entry (checked again before each batch: another run sharing
    samples may have put them meanwhile; Cache.put locks each entry, so two writers never race);
    on_batch(n new entries) follows each batch."""
    from safetensors.torch import save_file

    from eapcore.engine.attribution import attribute, pack_batches
    from eapcore.engine.models import load_model

    present = [cache.get("scores", k) is not None for k in keys]
    batches = [b for b in pack_batches(lengths, batch_tokens) if not all(present[i] for i in b)]
    if not batches:
        return
    model = load_model(registry.resolve_path(model_spec.name_or_path), att.dtype, att.device,
                       model_spec.revision, model_spec.trust_remote_code)
    meta = {"model": model_spec.name_or_path, "cut_len": cut_len, "dtype": att.dtype, "device": str(model.device),
            "graph": {"n_layers": model.adapter.n_layers, "n_heads": model.adapter.n_heads,
                      "n_kv_heads": model.adapter.n_kv_heads, "granularity": att.granularity}}
    sleep = float(os.environ.get(SLEEP_ENV) or 0)
    one_batch = dataclasses.replace(att, max_batch_tokens=sys.maxsize)  # the batch as packed above
    for batch in batches:
        found = [i for i in batch if not present[i] and cache.get("scores", keys[i]) is not None]
        for i in found:
            present[i] = True
        new = [(j, i) for j, i in enumerate(batch) if not present[i]]
        if new:
            part = attribute(model, [samples[i] for i in batch], cut_len, one_batch)
            for j, i in new:
                tensors = {"scores": part.scores[j].contiguous(), "loss": part.loss[j: j + 1].contiguous()}
                cache.put("scores", keys[i], lambda dest, t=tensors: save_file(t, str(dest / "scores.safetensors")),
                          {**meta, "idx": samples[i].idx})
            del part
        on_batch(len(found) + len(new))
        if sleep and new:
            time.sleep(sleep)
    del model
    _free_memory()


def _assemble(cache: Cache, model_spec: ModelSpec, samples: list, keys: list[str], cut_len: int,
              att: AttributionSettings, batch_tokens: int):
    """The `attribute` result [N, F, B] of the samples from their score entries."""
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
    manifest = result_manifest(model_spec.name_or_path, samples, cut_len, att, dtype=att.dtype, score_keys=keys,
                               max_batch_tokens=batch_tokens)
    return AttributionResult(scores, loss, Graph(**json.loads(graphs.pop())), manifest)


def stage_attribute(cache: Cache, spec: RunSpec, folder: Path, selection: Path, rep: Reporter) -> list[tuple[str, str]]:
    """Score entries of every selected sample of both models, then base/ and tuned/ in the run
    folder. Returns the (kind, key) entries used."""
    from eapcore.engine.attribution import sample_tokens
    from eapcore.harness import read_samples
    from eapcore.engine.models import resolve_device

    att = spec.attribution
    cut_len = int(json.loads((selection / "selection.json").read_text())["t_cut"])
    models = {"base": spec.pair.base, "tuned": spec.pair.tuned}
    samples = {w: read_samples(selection / f"{w}.jsonl")[0] for w in models}
    keys = {w: [score_key(digest(model_identity(m)), s.prompt_ids, s.answer_ids, cut_len, att) for s in samples[w]]
            for w, m in models.items()}
    lengths = {w: [len(sample_tokens(s, cut_len)[0]) for s in samples[w]] for w in models}
    job = digest({"scores": keys, "device": att.device, "max_batch_tokens": att.max_batch_tokens})
    batch_tokens = _plan(folder, spec, job, max(itertools.chain(*lengths.values())))
    total = sum(map(len, keys.values()))
    cached = {w: sum(cache.get("scores", k) is not None for k in keys[w]) for w in models}
    done = sum(cached.values())
    rep.stage("attribute", total=total, done=done, cached=done, device=resolve_device(att.device).type,
              message=f"{total // 2} samples per model, T_cut {cut_len}"
                      + "".join(f"; {w}: {c} from the cache" for w, c in cached.items() if c))
    for which, model_spec in models.items():
        computed = 0

        def on_batch(n: int, which=which) -> None:
            nonlocal done, computed
            done, computed = done + n, computed + n
            rep.update(done, f"attributing {which}")

        with cache.lock(f"attribute-{digest(keys[which])}"):  # one process computes a model's samples
            _score_missing(cache, model_spec, samples[which], keys[which], lengths[which], cut_len, att,
                           batch_tokens, on_batch)
        meanwhile = len(keys[which]) - cached[which] - computed  # e.g. the same model and answers as base
        done += max(meanwhile, 0)
        rep.from_cache(meanwhile, f"{which}: {cached[which] + meanwhile} of {len(keys[which])} samples from the cache")
        result = _assemble(cache, model_spec, samples[which], keys[which], cut_len, att, batch_tokens)
        tmp = folder / f".tmp-{which}"
        shutil.rmtree(tmp, ignore_errors=True)
        result.save(tmp)
        replace_dir(tmp, folder / which)
    return [("scores", k) for k in itertools.chain(*keys.values())]


def stage_metrics(folder: Path, rep: Reporter) -> None:
    from eapcore.stats import report

    rep.stage("metrics", total=1)
    try:
        result = report.metrics_result(report.load_scores(folder / "base"), report.load_scores(folder / "tuned"))
    except ValueError as err:
        raise RunError(f"metrics failed: {err}") from None
    write_json_atomic(folder / "metrics.json", result)
    rep.update(1)
