"""Execute a RunSpec: generate -> grade -> select -> attribute -> metrics, cached and resumable.

Every stage is a content-addressed cache entry (eapcore.cache) keyed by exactly what it depends on:

    generations/<k>  answers.jsonl   k = (model identity, dataset identity, template,
                                          max_new_tokens, generation settings)
    grades/<k>       answers.jsonl   k = (generation key, grading code identity)
    selections/<k>   base.jsonl, tuned.jsonl, selection.json   k = (both grade keys, selection settings)
    scores/<k>       scores.safetensors (one sample: scores [F, B], loss [1])
                                     k = (model identity, the sample's prompt + first T_cut answer
                                          tokens, T_cut, scoring settings, SCORING_VERSION)

Model identity is the hub id and revision, or for a local folder a fingerprint of its files;
dataset identity likewise (a local file's sha256). The scoring settings are granularity, ablation,
ig_steps, loss and dtype: `device` and `max_batch_tokens` change scores by rounding only and are
not part of a score key (they are part of the run key).

A run is then assembled into `runs/<spec_key(spec)>/` (DESIGN.md "A finished run in the cache"),
plus `plan.json` (the batch size chosen and the memory prediction) and `manifest.json` (checksums
and the entries it was built from, see Cache.seal_run). A done, intact run is returned at once.

Attribution is resumable and bit-exact: batches are packed over all selected samples with the
batch size recorded in plan.json, a batch is computed only if one of its samples has no entry yet,
and each sample's entry is written as soon as its batch is done. Killing the process loses at
most the batches in flight; a second process on the same spec waits on the run's lock.

Test knob: EAP_TEST_SLEEP_PER_BATCH=<seconds> sleeps after each attribution batch (used by the
tests to kill or cancel a run mid-way; harmless otherwise).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from eapcore import registry
from eapcore.cache import (MANIFEST, Cache, CacheError, read_json_or_none, replace_dir, sha256_file, write_bytes_atomic,
                           write_json_atomic)
from eapcore.specs import (BACKENDS, GROUPS, SCORING_VERSION, AttributionSettings, DatasetSpec,
                           GenerationSettings, ModelSpec, PairSpec, RunSpec, SelectionSettings, from_dict, spec_key,
                           to_dict)

STAGES = ("queued", "generate", "grade", "select", "attribute", "metrics", "done", "error", "cancelled")
FINAL = ("done", "error", "cancelled")
MUTABLE_FILES = ("status.json", "worker.log", "cancel")  # not sealed: they change after a run
SCORE_SETTINGS = ("granularity", "ablation", "ig_steps", "loss", "dtype")
SLEEP_ENV = "EAP_TEST_SLEEP_PER_BATCH"
MAX_BATCH_TOKENS = {"cpu": 2048, "cuda": 32768}  # cpu: the engine's default; cuda: a kill loses <= 1 batch
PRESETS: dict[str, dict[str, list]] = {
    "table1": {"pairs": [p.name for p in registry.PAPER_PAIRS], "datasets": ["math", "gsm8k", "college_math"],
               "alphas": [0.03, 0.1, 0.3, 0.5]},
    "demo": {"pairs": [p.name for p in registry.DEMO_PAIRS], "datasets": ["demo"], "alphas": [0.03, 0.1, 0.3, 0.5],
             "groups": list(GROUPS),  # the correct-vs-incorrect view, at alpha 0.5
             "defaults": {"gen_dtype": "float32", "gen_batch_size": 128}},  # as the lab evaluates its models
}
_WORKERS: dict[str, subprocess.Popen] = {}  # workers started by this process (reaped in status())

Progress = Callable[[dict], None]


class RunError(RuntimeError):
    """A run could not finish; the message says why and what to do. Finished work is kept."""


class Cancelled(RunError):
    """The run was cancelled (cancel(key), SIGTERM or Ctrl-C); finished work is kept."""


# ---------------------------------------------------------------------------------------------
# Identities and stage keys (pure apart from reading the files they fingerprint)
# ---------------------------------------------------------------------------------------------

def digest(obj: Any) -> str:
    """32-hex sha256 of the canonical JSON of obj."""
    return spec_key(obj, length=32)


@functools.lru_cache(maxsize=256)
def _file_fingerprint(path: str, size: int, mtime_ns: int, whole_below: int = 256 << 20, part: int = 16 << 20) -> str:
    """sha256 of a file; above `whole_below` bytes, of its first and last `part` bytes and size."""
    if size <= whole_below:
        return sha256_file(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(part))
        fh.seek(size - part)
        h.update(fh.read(part))
    return "partial:" + h.hexdigest()


def path_fingerprint(path: str | os.PathLike) -> dict[str, str]:
    """{name: fingerprint} of a file, or of the files directly in a folder (a HF checkpoint)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    out = {}
    for f in files:
        st = f.stat()
        out[f.name] = _file_fingerprint(str(f), st.st_size, st.st_mtime_ns)
    return out


def model_identity(model: ModelSpec) -> dict[str, Any]:
    """What a model's outputs depend on: a local folder's file fingerprints (wherever it lies), or
    the hub id and revision."""
    local = registry.resolve_path(model.name_or_path)
    if Path(local).is_dir():
        return {"files": path_fingerprint(local), "trust_remote_code": model.trust_remote_code}
    return {"hub": model.name_or_path, "revision": model.revision, "trust_remote_code": model.trust_remote_code}


def dataset_identity(ds: DatasetSpec) -> dict[str, Any]:
    local = registry.resolve_path(ds.source) if ds.source else ""
    if local and Path(local).is_file():
        return {"file": path_fingerprint(local), "limit": ds.limit}
    return {"name": ds.name, "source": ds.source, "split": ds.split, "limit": ds.limit}


def grading_identity() -> dict[str, Any]:
    """The grading code (eapcore/grading.py source) and math-verify version: grades depend on them."""
    import importlib.metadata as md

    from eapcore import grading

    try:
        mv = md.version("math-verify")
    except md.PackageNotFoundError:
        mv = None
    return {"source": sha256_file(grading.__file__), "math_verify": mv}


def max_new_tokens(spec: RunSpec) -> int:
    return spec.generation.max_new_tokens or spec.pair.max_new_tokens


def generation_key(model: ModelSpec, spec: RunSpec) -> str:
    gen = dataclasses.replace(spec.generation, max_new_tokens=max_new_tokens(spec))
    return digest({"stage": "generations", "model": model_identity(model), "dataset": dataset_identity(spec.dataset),
                   "template": spec.pair.template, "settings": to_dict(gen)})


def grades_key(generation: str) -> str:
    return digest({"stage": "grades", "generation": generation, "grading": grading_identity()})


def selection_key(base_grades: str, tuned_grades: str, settings: SelectionSettings) -> str:
    return digest({"stage": "selections", "base": base_grades, "tuned": tuned_grades, "settings": to_dict(settings)})


def score_key(model_id: str, prompt_ids: Sequence[int], answer_ids: Sequence[int], cut_len: int,
              settings: AttributionSettings) -> str:
    """Key of one sample's scores; model_id = digest(model_identity(model))."""
    return digest({"stage": "scores", "model": model_id, "prompt": list(prompt_ids),
                   "answer": list(answer_ids[:cut_len]), "cut_len": cut_len,
                   "settings": {k: getattr(settings, k) for k in SCORE_SETTINGS},
                   "scoring_version": SCORING_VERSION})


def stage_keys(spec: RunSpec) -> dict[str, Any]:
    """Keys of the generation, grade and selection entries of a spec (no data is read)."""
    gen = {w: generation_key(m, spec) for w, m in (("base", spec.pair.base), ("tuned", spec.pair.tuned))}
    grades = {w: grades_key(k) for w, k in gen.items()}
    return {"generations": gen, "grades": grades,
            "selection": selection_key(grades["base"], grades["tuned"], spec.selection)}


def check_spec(spec: RunSpec) -> None:
    """RunError for settings a run cannot honour (before anything is computed)."""
    a, s = spec.attribution, spec.selection
    problems = []
    if spec.scoring_version != SCORING_VERSION:
        problems.append(f"the spec is for scoring version {spec.scoring_version!r} but this code computes "
                        f"{SCORING_VERSION!r}; build the spec again")
    if a.ablation != "zero":
        problems.append("runs use zero ablation (the paper's); clean/corrupted EAP needs corrupted prompts, "
                        "available from Python via eapcore.attribution.attribute(corrupt=...)")
    if a.ig_steps < 0 or a.max_batch_tokens < 0:
        problems.append("ig_steps and max_batch_tokens must be >= 0")
    if not s.alpha > 0:
        problems.append(f"alpha must be > 0, got {s.alpha}")
    if s.group not in GROUPS:
        problems.append(f"group must be one of {', '.join(GROUPS)}, not {s.group!r}")
    if max_new_tokens(spec) < 1 or spec.generation.batch_size < 0:
        problems.append("max_new_tokens must be >= 1 and the generation batch size >= 0 (0: from free memory)")
    if problems:
        raise RunError("invalid run spec: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _param_count(name_or_path: str, revision: str | None, trust_remote_code: bool) -> tuple[int, Any]:
    """(parameter count, config) from the config alone (weights built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    from eapcore.models import check_architecture, load_config

    config = load_config(name_or_path, revision, trust_remote_code)
    check_architecture(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters()), config


def _dims(config) -> dict[str, int]:
    get = lambda *names: next(getattr(config, n) for n in names if getattr(config, n, None) is not None)  # noqa: E731
    heads = get("num_attention_heads", "n_head")
    return {"n_layers": get("num_hidden_layers", "n_layer"), "d_model": get("hidden_size", "n_embd"),
            "n_heads": heads, "n_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "vocab": get("vocab_size")}


def _available_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def predict_memory(spec: RunSpec, sample_tokens: int | None = None, prompt_tokens: int = 256) -> dict[str, Any]:
    """Memory to attribute `spec` on its device, and the batch size (tokens) that fits.

    Model bytes = parameter count (from the config) x dtype size, the larger of the two models
    (they are loaded one at a time); activations from attribution.memory_per_token: one sample
    needs its stored activations, the working set and one layer's graph (the engine recomputes
    the layers whose graphs do not fit), plus the loss's logits chunk (attribution.fixed_bytes).
    sample_tokens: the longest truncated input (known after selection); before it, estimated as
    prompt_tokens + alpha x max_new_tokens (an upper bound for the answer part). Returns
    bytes_needed (model + one sample; fits if within 90% of what is free), bytes_available (free
    GPU memory, or free RAM on CPU), fits, batch_tokens (the spec's max_batch_tokens if set; else
    attribution.fit_batch_tokens of the memory the model leaves, capped by MAX_BATCH_TOKENS) and
    a message."""
    from types import SimpleNamespace

    from eapcore.attribution import fit_batch_tokens, fixed_bytes, memory_per_token
    from eapcore.graph import Graph
    from eapcore.models import resolve_device

    att = spec.attribution
    device = resolve_device(att.device)
    dtype_bytes = 4 if att.dtype == "float32" else 2
    counts = [_param_count(registry.resolve_path(m.name_or_path), m.revision, m.trust_remote_code)
              for m in (spec.pair.base, spec.pair.tuned)]
    n_params, config = max(counts, key=lambda c: c[0])
    dims = _dims(config)
    graph = Graph(dims["n_layers"], dims["n_heads"], dims["n_kv_heads"], att.granularity)
    d_head = getattr(config, "head_dim", None) or dims["d_model"] // dims["n_heads"]
    adapter = SimpleNamespace(config=config, d_head=d_head,
                              **{k: dims[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads")})
    mem = memory_per_token(adapter, graph, dtype_bytes)
    per_token = mem["stored"] + mem["working"] + mem["graph"]
    estimated = sample_tokens is None
    if estimated:
        sample_tokens = prompt_tokens + max(1, math.floor(spec.selection.alpha * max_new_tokens(spec)))
    model_bytes = n_params * dtype_bytes
    fixed = model_bytes + fixed_bytes(adapter, graph, device)
    available = _available_bytes(device)
    usable = int(0.9 * available)
    needed = fixed + per_token * sample_tokens
    fits = needed <= usable
    fit_tokens = fit_batch_tokens(adapter, graph, dtype_bytes, max(0, available - model_bytes), device)
    batch = att.max_batch_tokens or min(MAX_BATCH_TOKENS.get(device.type, 2048), fit_tokens)
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    what = "up to " if estimated else ""
    if fits:
        message = (f"fits on {device.type}: model {gb(model_bytes)} + {what}{sample_tokens} tokens x "
                   f"{per_token / 1e3:.0f} KB per sample; {gb(available)} free; batches of {batch} tokens")
    else:
        message = (f"does not fit on {device.type}: one sample of {what}{sample_tokens} tokens needs {gb(needed)} "
                   f"(model {gb(model_bytes)}), {gb(available)} free. Use dtype bfloat16, layer granularity, "
                   "a smaller alpha or max_new_tokens, or a larger GPU")
    return {"device": str(device), "n_params": n_params, "model_bytes": model_bytes, "bytes_per_token": per_token,
            "sample_tokens": sample_tokens, "estimated": estimated, "bytes_needed": needed,
            "bytes_available": available, "fits": fits, "batch_tokens": int(batch), "message": message}


# ---------------------------------------------------------------------------------------------
# Status of a run: status.json, progress callback, cancellation
# ---------------------------------------------------------------------------------------------

def _gpu_mem_gb() -> float | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 1e9, 3)


class Reporter:
    """Keeps status.json current (at most 2 writes a second, always at a stage change), calls the
    progress callback, and raises Cancelled when the run's cancel flag appears.

    status["clock"]: {stage: {"seconds": wall time, "device": where it ran}} of the stages this
    execution went through (a cached stage takes about 0 s); status["tokens_per_s"]: generated
    tokens per second during the generate stage."""

    def __init__(self, folder: Path, callback: Progress | None = None):
        self.folder, self.callback = folder, callback
        self.status: dict[str, Any] = {"stage": "queued", "done": 0, "total": 0, "rate": None, "eta_s": None,
                                       "tokens_per_s": None, "gpu_mem_gb": None, "message": "", "error": None,
                                       "clock": {}, "pid": os.getpid()}
        self._t0, self._done0, self._written = time.time(), 0, 0.0

    def _stop_clock(self) -> None:
        entry = self.status["clock"].get(self.status["stage"])
        if entry is not None and entry["seconds"] is None:
            entry["seconds"] = round(time.time() - self._t0, 3)

    def stage(self, name: str, total: int, done: int = 0, message: str = "", device: str = "cpu") -> None:
        self._stop_clock()
        self._t0, self._done0 = time.time(), done
        self.status["clock"][name] = {"seconds": None, "device": device}
        self.status.update(stage=name, total=total, done=done, rate=None, eta_s=None, tokens_per_s=None,
                           message=message, error=None)
        self._emit(force=True)

    def update(self, done: int, message: str | None = None, tokens: int | None = None) -> None:
        """done: items finished in this stage; tokens: tokens generated so far in this stage."""
        self.check_cancel()
        elapsed, computed = time.time() - self._t0, done - self._done0
        rate = computed / elapsed if computed > 0 and elapsed > 0 else None
        self.status.update(done=done, rate=rate, eta_s=(self.status["total"] - done) / rate if rate else None)
        if tokens is not None and elapsed > 0:
            self.status["tokens_per_s"] = tokens / elapsed
        if message is not None:
            self.status["message"] = message
        self._emit()

    def finish(self, stage: str, message: str = "", error: str | None = None) -> None:
        self._stop_clock()
        self.status.update(stage=stage, message=message, error=error, rate=None, eta_s=None, tokens_per_s=None)
        self._emit(force=True)

    def check_cancel(self) -> None:
        if (self.folder / "cancel").exists():
            raise Cancelled("cancelled; finished samples are kept and a new run resumes from them")

    def _emit(self, force: bool = False) -> None:
        now = time.time()
        self.status.update(updated=now, gpu_mem_gb=_gpu_mem_gb())
        if force or now - self._written >= 0.5:
            write_json_atomic(self.folder / "status.json", self.status)
            self._written = now
        if self.callback is not None:
            self.callback(dict(self.status))


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status(key: str, cache: Cache | None = None) -> dict[str, Any]:
    """status.json of run `key` ({} if there is none) plus `running` (a worker is on it). A run
    whose worker died mid-way (killed, crashed) is reported as stage "error" (or "cancelled" if a
    cancel was asked); running it again resumes from its finished samples."""
    cache = cache or Cache()
    folder = cache.run_dir(key)
    st = read_json_or_none(folder / "status.json")
    if not isinstance(st, dict):
        return {}
    proc = _WORKERS.get(key)
    if proc is not None and proc.poll() is not None:
        _WORKERS.pop(key, None)  # reaped; a zombie would look alive
    running = cache.is_locked(f"run-{key}") or (st.get("stage") == "queued" and _alive(st.get("pid")))
    if st.get("stage") not in FINAL and not running:
        cancelled = (folder / "cancel").exists()
        st.update(stage="cancelled" if cancelled else "error",
                  message=("cancelled before it finished" if cancelled else
                           "the worker stopped without finishing (killed or crashed; see worker.log); "
                           "run the spec again to resume from its finished samples"))
    return {**st, "running": running}


def cancel(key: str, cache: Cache | None = None) -> bool:
    """Ask run `key` to stop: its worker finishes the batch in hand, keeps every finished sample
    and marks the run cancelled. Returns whether a worker was running or queued."""
    cache = cache or Cache()
    folder = cache.run_dir(key)
    st = status(key, cache)
    if not st.get("running"):
        return False
    (folder / "cancel").touch()
    pid = st.get("pid")
    if _alive(pid) and pid != os.getpid():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)  # a worker turns it into the cancel flag (see command_run)
    return True


def start(spec: RunSpec, cache: Cache | None = None) -> str:
    """Launch `python -m eapcore run --spec-json runs/<key>/spec.json` in a new session and return
    the key at once; its output goes to runs/<key>/worker.log. Returns the key without a second
    worker if one is running."""
    check_spec(spec)
    cache = cache or Cache()
    key = spec_key(spec)
    if status(key, cache).get("running"):
        return key
    folder = cache.run_dir(key)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "spec.json", {"key": key, "spec": to_dict(spec)})
    (folder / "cancel").unlink(missing_ok=True)
    env = {**os.environ, "EAP_CACHE_DIR": str(cache.root.resolve())}
    with open(folder / "worker.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "eapcore", "run", "--spec-json", str(folder / "spec.json"),
                                 "--quiet"], cwd=str(registry.PROJECT_ROOT), env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _WORKERS[key] = proc
    write_json_atomic(folder / "status.json", {"stage": "queued", "done": 0, "total": 0, "rate": None, "eta_s": None,
                                               "gpu_mem_gb": None, "message": "worker starting", "error": None,
                                               "pid": proc.pid, "updated": time.time()})
    return key


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

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


def _generate(cache: Cache, spec: RunSpec, keys: dict, rep: Reporter) -> dict[str, Path]:
    """Generation entries of base and tuned (answers.jsonl); resumable through work files."""
    from eapcore.data import load_problems
    from eapcore.generation import generate_answers, make_backend
    from eapcore.models import resolve_device

    models = {"base": spec.pair.base, "tuned": spec.pair.tuned}
    todo = {w: keys["generations"][w] for w in models if cache.get("generations", keys["generations"][w]) is None}
    problems = load_problems(dataclasses.replace(spec.dataset, source=registry.resolve_path(spec.dataset.source))
                             if spec.dataset.source else spec.dataset)[0] if todo else []
    work = {w: cache.work_dir("generations", k) / "answers.jsonl" for w, k in todo.items()}
    n = len(problems)
    device = resolve_device("auto").type if todo else "cpu"
    rep.stage("generate", total=2 * n, done=(2 - len(todo)) * n + sum(_count_lines(p) for p in work.values()),
              message=f"{spec.dataset.name}: {n} problems" if todo else "cached", device=device)
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
        cache.get_or_compute("generations", key, write, meta)
        cache.drop_work("generations", key)
    return {w: cache.entry_path("generations", k) / "answers.jsonl" for w, k in keys["generations"].items()}


def _grade(cache: Cache, keys: dict, answers: dict[str, Path], rep: Reporter) -> dict[str, Path]:
    """Grade entries: the answers regraded with the current grading code."""
    from eapcore.grading import accuracy, regrade, scores_of
    from eapcore.harness import read_samples, write_samples

    rep.stage("grade", total=2)
    for i, (which, key) in enumerate(keys["grades"].items()):
        def write(folder: Path, which=which) -> None:
            samples, report = read_samples(answers[which])
            problems = report.problems + regrade(samples)
            write_samples(folder / "answers.jsonl", samples)
            write_json_atomic(folder / "report.json", {"accuracy": accuracy(scores_of(samples)[0]),
                                                       "problems": problems})

        cache.get_or_compute("grades", key, write, {"model": which, "generation": keys["generations"][which]})
        rep.update(i + 1)
    return {w: cache.entry_path("grades", k) / "answers.jsonl" for w, k in keys["grades"].items()}


def _select(cache: Cache, spec: RunSpec, keys: dict, graded: dict[str, Path], rep: Reporter) -> Path:
    from eapcore.harness import read_samples
    from eapcore.selection import group_lengths, select, write_selection

    rep.stage("select", total=1)

    def write(folder: Path) -> None:
        base, tuned = read_samples(graded["base"])[0], read_samples(graded["tuned"])[0]
        lengths, _ = group_lengths(base, tuned, spec.selection.group)
        try:
            selection = select(lengths, spec.selection)
        except ValueError as err:
            raise RunError(f"{err}; choose another group (--group) or a larger dataset") from None
        if not selection.idx:
            raise RunError(f"no question of group {spec.selection.group!r} passes the selection rules "
                           f"(T_ref {selection.t_ref:.1f}, T_cut {selection.t_cut}, counts {selection.counts}); "
                           "relax beta/low/high or use a larger dataset")
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
    if any of its samples lacks an entry; on_batch(n new entries) follows each batch."""
    from safetensors.torch import save_file

    from eapcore.attribution import attribute, pack_batches
    from eapcore.models import load_model

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
        part = attribute(model, [samples[i] for i in batch], cut_len, one_batch)
        new = [(j, i) for j, i in enumerate(batch) if not present[i]]
        for j, i in new:
            tensors = {"scores": part.scores[j].contiguous(), "loss": part.loss[j: j + 1].contiguous()}
            cache.put("scores", keys[i], lambda dest, t=tensors: save_file(t, str(dest / "scores.safetensors")),
                      {**meta, "idx": samples[i].idx})
        on_batch(len(new))
        if sleep:
            time.sleep(sleep)
    del model, part
    _free_memory()


def _assemble(cache: Cache, model_spec: ModelSpec, samples: list, keys: list[str], cut_len: int,
              att: AttributionSettings, batch_tokens: int):
    """The `attribute` result [N, F, B] of the samples from their score entries."""
    import torch
    from safetensors.torch import load_file

    from eapcore.attribution import AttributionResult, result_manifest
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
    manifest = result_manifest(model_spec.name_or_path, samples, cut_len, att, dtype=att.dtype, score_keys=keys,
                               max_batch_tokens=batch_tokens)
    return AttributionResult(torch.stack([t["scores"] for t in tensors]), torch.cat([t["loss"] for t in tensors]),
                             Graph(**json.loads(graphs.pop())), manifest)


def _attribute(cache: Cache, spec: RunSpec, folder: Path, selection: Path, rep: Reporter) -> list[tuple[str, str]]:
    """Score entries of every selected sample of both models, then base/ and tuned/ in the run
    folder. Returns the (kind, key) entries used."""
    from eapcore.attribution import sample_tokens
    from eapcore.harness import read_samples
    from eapcore.models import resolve_device

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
    done = sum(cache.get("scores", k) is not None for k in itertools.chain(*keys.values()))
    rep.stage("attribute", total=total, done=done, message=f"{total // 2} samples per model, T_cut {cut_len}",
              device=resolve_device(att.device).type)
    for which, model_spec in models.items():
        def on_batch(n: int, which=which) -> None:
            nonlocal done
            done += n
            rep.update(done, f"attributing {which}")

        with cache.lock(f"attribute-{digest(keys[which])}"):  # one process computes a model's samples
            _score_missing(cache, model_spec, samples[which], keys[which], lengths[which], cut_len, att,
                           batch_tokens, on_batch)
        result = _assemble(cache, model_spec, samples[which], keys[which], cut_len, att, batch_tokens)
        tmp = folder / f".tmp-{which}"
        shutil.rmtree(tmp, ignore_errors=True)
        result.save(tmp)
        replace_dir(tmp, folder / which)
    return [("scores", k) for k in itertools.chain(*keys.values())]


def _metrics(folder: Path, rep: Reporter) -> None:
    from eapcore import metrics

    rep.stage("metrics", total=1)
    try:
        result = metrics.metrics_result(metrics.load_scores(folder / "base"), metrics.load_scores(folder / "tuned"))
    except ValueError as err:
        raise RunError(f"metrics failed: {err}") from None
    write_json_atomic(folder / "metrics.json", result)
    rep.update(1)


def _is_done(cache: Cache, key: str, selection: str) -> bool:
    st = read_json_or_none(cache.run_dir(key) / "status.json")
    if not isinstance(st, dict) or st.get("stage") != "done":
        return False
    problems = cache.verify_run(key)
    if problems:
        cache.report(f"run {key} is damaged and will be rebuilt from its cached stages: {'; '.join(problems)}")
        return False
    return ("selections", selection) in cache.run_entries(key)


def explain(err: BaseException, stage: str) -> str:
    """A one-paragraph message for an exception raised during `stage`."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, torch.cuda.OutOfMemoryError) and stage == "generate":
        return ("out of GPU memory during generate: set a smaller generation batch size (--gen-batch-size; "
                "0 sizes it from free memory) or max_new_tokens; finished answers are kept")
    if torch is not None and isinstance(err, torch.cuda.OutOfMemoryError):
        return (f"out of GPU memory during {stage}: set a smaller max_batch_tokens (--max-batch-tokens), "
                "use dtype bfloat16 or layer granularity, or a smaller alpha; finished samples are kept")
    if isinstance(err, RunError):
        return str(err)
    return f"{stage} failed: {type(err).__name__}: {err}"


def run(spec: RunSpec, progress: Progress | None = None, cache: Cache | None = None) -> Path:
    """Execute `spec` in this process and return its run folder (runs/<key>/). A done, intact run
    returns at once; otherwise every cached stage is reused. progress(status_dict) is called at
    each status change. Raises Cancelled, or RunError with the message also in status.json."""
    check_spec(spec)
    cache = cache or Cache()
    key = spec_key(spec)
    folder = cache.run_dir(key)
    folder.mkdir(parents=True, exist_ok=True)
    with cache.lock(f"run-{key}"):
        keys = stage_keys(spec)
        if _is_done(cache, key, keys["selection"]):
            return folder
        previous = read_json_or_none(folder / "status.json")
        if not (isinstance(previous, dict) and previous.get("stage") == "queued"):
            (folder / "cancel").unlink(missing_ok=True)  # a stale request; a queued run's one stands
        (folder / MANIFEST).unlink(missing_ok=True)
        write_json_atomic(folder / "spec.json", {"key": key, "spec": to_dict(spec)})
        rep = Reporter(folder, progress)
        try:
            rep.check_cancel()
            answers = _generate(cache, spec, keys, rep)
            graded = _grade(cache, keys, answers, rep)
            selection = _select(cache, spec, keys, graded, rep)
            scores = _attribute(cache, spec, folder, selection, rep)
            for which in ("base", "tuned"):
                write_bytes_atomic(folder / f"answers_{which}.jsonl", Path(graded[which]).read_bytes())
            write_bytes_atomic(folder / "selection.json", (selection / "selection.json").read_bytes())
            _metrics(folder, rep)
            entries = [("generations", k) for k in keys["generations"].values()] + \
                      [("grades", k) for k in keys["grades"].values()] + [("selections", keys["selection"])] + scores
            cache.seal_run(key, entries, skip=MUTABLE_FILES)
            rep.finish("done", f"finished: {folder}")
        except (Cancelled, KeyboardInterrupt):
            rep.finish("cancelled", "cancelled; finished samples are kept, running the spec again resumes")
            raise Cancelled(f"run {key} cancelled; finished samples are kept") from None
        except Exception as err:  # every failure ends the run with a message in status.json
            message = explain(err, rep.status["stage"])
            rep.finish("error", message, f"{type(err).__name__}: {err}")
            raise RunError(message) from err
    return folder



# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------

def label(spec: RunSpec) -> str:
    """One line naming a run: pair | dataset | alpha | group."""
    return f"{spec.pair.name} | {spec.dataset.name} | alpha {spec.selection.alpha} | {spec.selection.group}"


def sweep_specs(pairs: Sequence[str], datasets: Sequence[str], alphas: Sequence[float],
                template: RunSpec | None = None, groups: Sequence[str] = ()) -> list[RunSpec]:
    """One spec per (pair, dataset, alpha), plus one per (pair, dataset, group) at the last alpha
    for each extra answer group in `groups`; other settings from `template`. Ordered so that
    consecutive specs share generations."""
    specs = []
    for pair_name, ds_name in itertools.product(pairs, datasets):
        pair, ds = registry.get_pair(pair_name), registry.get_dataset(ds_name)
        base = template or RunSpec(pair, ds)
        ds_here = dataclasses.replace(ds, limit=base.dataset.limit) if template else ds
        for alpha in alphas:
            specs.append(dataclasses.replace(base, pair=pair, dataset=ds_here,
                                             selection=dataclasses.replace(base.selection, alpha=alpha)))
        for group in groups:
            if group != specs[-1].selection.group:
                specs.append(dataclasses.replace(specs[-1], selection=dataclasses.replace(
                    specs[-1].selection, group=group)))
    return specs


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _add_settings(p: argparse.ArgumentParser) -> None:
    g, s, a = GenerationSettings(), SelectionSettings(), AttributionSettings()
    p.add_argument("--limit", type=int, help="first N problems of the dataset only")
    p.add_argument("--max-new-tokens", type=int, help="answer length cap (default: the pair's)")
    p.add_argument("--gen-batch-size", type=int, default=g.batch_size,
                   help="sequences decoded together (0: from free memory)")
    p.add_argument("--backend", choices=BACKENDS, default=g.backend)
    p.add_argument("--gen-dtype", choices=("float32", "bfloat16", "float16"), default=g.dtype)
    p.add_argument("--beta", type=float, default=s.beta)
    p.add_argument("--low", type=float, default=s.low)
    p.add_argument("--high", type=float, default=s.high)
    p.add_argument("--n", type=int, default=s.n, help="questions drawn (<= 0: all that pass)")
    p.add_argument("--seed", type=int, default=s.seed)
    p.add_argument("--group", choices=GROUPS, default=s.group)
    p.add_argument("--granularity", choices=("layer", "head"), default=a.granularity)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=a.dtype, help="attribution dtype")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=a.device)
    p.add_argument("--ig-steps", type=int, default=a.ig_steps)
    p.add_argument("--max-batch-tokens", type=int, default=a.max_batch_tokens, help="0: fit to free memory")


def _spec_from_args(args, pair: PairSpec, ds: DatasetSpec, alpha: float) -> RunSpec:
    return RunSpec(
        pair, dataclasses.replace(ds, limit=args.limit) if args.limit else ds,
        GenerationSettings(args.max_new_tokens, args.gen_batch_size, args.backend, args.gen_dtype),
        SelectionSettings(alpha, args.beta, args.low, args.high, args.n, args.seed, args.group),
        AttributionSettings(granularity=args.granularity, dtype=args.dtype, device=args.device,
                            ig_steps=args.ig_steps, max_batch_tokens=args.max_batch_tokens))


def load_spec_json(text_or_path: str) -> RunSpec:
    """A RunSpec from JSON text or a file: either to_dict(spec) or spec.json's {"key", "spec"}."""
    path = Path(text_or_path)
    text = path.read_text() if not text_or_path.lstrip().startswith("{") and path.is_file() else text_or_path
    try:
        data = json.loads(text)
        return from_dict(RunSpec, data["spec"] if "spec" in data and "pair" not in data else data)
    except (ValueError, KeyError, TypeError) as err:
        raise RunError(f"--spec-json: not a run spec ({type(err).__name__}: {err})") from None


class _Bars:
    """tqdm bars for progress callbacks: one bar per stage."""

    def __init__(self, enabled: bool, position: int = 0):
        self.enabled, self.position, self.bar, self.stage = enabled, position, None, None

    def __call__(self, st: dict) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if st["stage"] != self.stage:
            self.close()
            self.stage = st["stage"]
            if st["stage"] in FINAL:
                return
            self.bar = tqdm(total=st["total"], initial=st["done"], desc=st["stage"], unit="item",
                            position=self.position, leave=False, file=sys.stderr)
        if self.bar is not None:
            self.bar.total = st["total"]
            self.bar.n = st["done"]
            speed = f"{st['tokens_per_s']:,.0f} tokens/s" if st.get("tokens_per_s") else ""
            self.bar.set_postfix_str(", ".join(filter(None, (st.get("message"), speed))), refresh=False)
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _on_sigterm(folder: Path):
    def handler(signum, frame):  # cooperative: the run stops at its next check, cleanly
        (folder / "cancel").touch()
    return handler


def _print_metrics(folder: Path) -> None:
    m = read_json_or_none(folder / "metrics.json") or {}
    for name in ("activation_intensity", "information_complexity", "kurtosis"):
        if isinstance(m.get(name), dict):
            r = m[name]
            print(f"  {name:<24} base {r['base']:.6g}  tuned {r['tuned']:.6g}  change {r['relative_change']:+.2f}%")


def command_run(argv: list[str]) -> int:
    """`python -m eapcore run --pair NAME --dataset NAME --alpha A [...]` or `--spec-json JSON|FILE`."""
    p = argparse.ArgumentParser(prog="python -m eapcore run", description="Run one spec (cached, resumable).")
    p.add_argument("--pair", help=f"a registered pair ({', '.join(registry.pairs())})")
    p.add_argument("--dataset", help=f"a registered dataset ({', '.join(registry.datasets())})")
    p.add_argument("--alpha", type=float, help="T_cut = max(floor(alpha * T_ref), 1)")
    p.add_argument("--spec-json", help="a whole spec as JSON text or file (replaces the options)")
    _add_settings(p)
    p.add_argument("--predict", action="store_true", help="only print the memory prediction")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        if args.spec_json:
            spec = load_spec_json(args.spec_json)
        else:
            if not (args.pair and args.dataset and args.alpha is not None):
                p.error("give --pair, --dataset and --alpha (or --spec-json)")
            spec = _spec_from_args(args, registry.get_pair(args.pair), registry.get_dataset(args.dataset), args.alpha)
        check_spec(spec)
        key = spec_key(spec)
        if args.predict:
            print(json.dumps(predict_memory(spec), indent=1))
            return 0
        cache = Cache()
        cache.run_dir(key).mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGTERM, _on_sigterm(cache.run_dir(key)))
        bars = _Bars(not args.quiet)
        print(f"run {key}: {label(spec)}", file=sys.stderr)
        folder = run(spec, bars, cache)
        bars.close()
    except Cancelled as err:
        print(f"cancelled: {err}", file=sys.stderr)
        return 130
    except (RunError, registry.RegistryError, CacheError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"done: {folder}")
    _print_metrics(folder)
    return 0


def _grid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named grid (its parts can be overridden)")
    p.add_argument("--pairs", nargs="+", help="pair names")
    p.add_argument("--datasets", nargs="+", help="dataset names")
    p.add_argument("--alphas", nargs="+", type=float, help="alpha values")


def _parse_with_preset(p: argparse.ArgumentParser, argv: list[str]):
    """Parse argv with the chosen preset's defaults (options given explicitly still win)."""
    known, _ = p.parse_known_args(argv)
    p.set_defaults(**PRESETS.get(known.preset, {}).get("defaults", {}))
    return p.parse_args(argv)


def _grid(p: argparse.ArgumentParser, args) -> list[RunSpec]:
    preset = PRESETS.get(args.preset, {})
    pairs, datasets, alphas = (args.pairs or preset.get("pairs"), args.datasets or preset.get("datasets"),
                               args.alphas or preset.get("alphas"))
    if not (pairs and datasets and alphas):
        p.error("give --preset, or --pairs, --datasets and --alphas")
    template = _spec_from_args(args, registry.get_pair(pairs[0]), registry.get_dataset(datasets[0]), alphas[0])
    return sweep_specs(pairs, datasets, alphas, template, preset.get("groups", ()))


def command_sweep(argv: list[str]) -> int:
    """`python -m eapcore sweep [--preset table1|demo] [--pairs ...] [--datasets ...] [--alphas ...]`."""
    from tqdm.auto import tqdm

    p = argparse.ArgumentParser(prog="python -m eapcore sweep",
                                description="Run a grid of specs (pairs x datasets x alphas), one after the other.")
    _grid_args(p)
    _add_settings(p)
    p.add_argument("--dry-run", action="store_true", help="list the specs and their keys only")
    p.add_argument("--quiet", action="store_true")
    args = _parse_with_preset(p, argv)
    try:
        specs = _grid(p, args)
    except (registry.RegistryError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.dry_run:
        for s in specs:
            print(f"{spec_key(s)}  {label(s)}")
        return 0
    cache, failed = Cache(), []
    outer = tqdm(specs, desc="sweep", unit="run", disable=args.quiet, file=sys.stderr)
    for s in outer:
        outer.set_postfix_str(label(s))
        bars = _Bars(not args.quiet, position=1)
        cache.run_dir(spec_key(s)).mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGTERM, _on_sigterm(cache.run_dir(spec_key(s))))
        try:
            run(s, bars, cache)
        except Cancelled:
            bars.close()
            print("sweep cancelled", file=sys.stderr)
            return 130
        except RunError as err:
            failed.append((s, str(err)))
            tqdm.write(f"error in {spec_key(s)} ({s.pair.name} | {s.dataset.name} | alpha "
                       f"{s.selection.alpha}): {err}", file=sys.stderr)
        bars.close()
    outer.close()
    print(f"{len(specs) - len(failed)} of {len(specs)} runs done in {cache.root / 'runs'}")
    return 1 if failed else 0


def _run_keys(cache: Cache, wanted: Sequence[str]) -> list[str]:
    """Full run keys for keys or unique prefixes; RunError if unknown or ambiguous."""
    runs = sorted(p.name for p in (cache.root / "runs").iterdir() if p.is_dir()) if (cache.root / "runs").is_dir() else []
    out = []
    for w in wanted:
        hits = [k for k in runs if k.startswith(w)]
        if len(hits) != 1:
            raise RunError(f"run key {w!r} matches {len(hits)} runs ({hits[:3]}); see `python -m eapcore cache list`")
        out.append(hits[0])
    return out


def command_export(argv: list[str]) -> int:
    """`python -m eapcore export [KEY ...] [--all] [--preset/--pairs/--datasets/--alphas] --out FILE.zip`."""
    from eapcore.cache import export_bundle

    p = argparse.ArgumentParser(prog="python -m eapcore export",
                                description="Bundle finished runs and the cache entries they use into one zip.")
    p.add_argument("keys", nargs="*", help="run keys (or unique prefixes)")
    p.add_argument("--all", action="store_true", help="every finished run")
    _grid_args(p)
    _add_settings(p)
    p.add_argument("--out", required=True, help="bundle file to write (.zip)")
    args = _parse_with_preset(p, argv)
    cache = Cache()
    try:
        keys = _run_keys(cache, args.keys)
        if args.preset or args.pairs:
            keys += [spec_key(s) for s in _grid(p, args)]
        if args.all:
            keys += [q.name for q in sorted((cache.root / "runs").glob("*")) if not cache.verify_run(q.name)]
        if not keys:
            p.error("give run keys, --all, or a grid (--preset / --pairs ...)")
        bundle = export_bundle(cache, keys, args.out)
    except (RunError, CacheError, registry.RegistryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(bundle['runs'])} run(s), {len(bundle['entries'])} cache entries, "
          f"{len(bundle['files'])} files")
    return 0


def command_import(argv: list[str]) -> int:
    """`python -m eapcore import FILE.zip [--overwrite]`."""
    from eapcore.cache import import_bundle

    p = argparse.ArgumentParser(prog="python -m eapcore import",
                                description="Check a bundle's checksums and install its runs and entries in the cache.")
    p.add_argument("bundle")
    p.add_argument("--overwrite", action="store_true", help="replace runs that exist here already")
    args = p.parse_args(argv)
    cache = Cache()
    try:
        result = import_bundle(cache, args.bundle, overwrite=args.overwrite)
    except CacheError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"installed {len(result['installed'])}, kept {len(result['kept'])} existing, in {cache.root}")
    return 0
