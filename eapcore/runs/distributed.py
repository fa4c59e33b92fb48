"""Run specs on a Ray cluster (`eapcore run|sweep --executor ray [--address ADDR]`): each model's
generation and attribution as Ray tasks with GPU resources, the samples of a run spread over the
workers, every result written to the one cache (a filesystem all nodes share) with its usual
locks. Ray is an optional dependency (`pip install 'eapcore[ray]'`), imported only here.

The driver works in four phases over all the specs at once (a run is a sweep of one):
 1. generate - one task per generation entry the specs need and the cache lacks (one GPU each;
    resumable through its work file, so a retried task continues where the dead one stopped);
 2. answers  - grading and selection on the driver (CPU, cached stages), then each spec's
    attribution plan in a task placed like the ones that attribute (plan.json: the batch size
    from that device's free memory, as a serial run on it computes it);
 3. attribute - the planned batches of every spec, pooled per model and split into one chunk
    per GPU (interleaved, longest first), each chunk a task that loads its model once and writes
    each sample's score entry as soon as its batch is done; a sample in the batches of several
    specs is written by the one a serial sweep computes it in (`stages.first_writers`). A task whose worker dies is retried
    (Ray's max_retries) and skips the batches already cached: a death loses the batch in hand;
 4. assemble - `runner.run` of each spec on the driver, every stage now cached: run folders,
    metrics and the seal are the serial runner's own, and the scores equal a serial run's bit
    for bit (the same batches, computed on the same kind of device).
Why the cache and not results returned to the driver: DESIGN.md "Distributed runs".
"""
from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from eapcore.files import write_json_atomic
from eapcore.runs import registry, runner, stages
from eapcore.runs.cache import Cache
from eapcore.runs.errors import Cancelled, RunError
from eapcore.runs.registry import RegistryError
from eapcore.runs.keys import check_spec, stage_keys
from eapcore.runs.workers import Reporter
from eapcore.specs import ModelSpec, RunSpec, spec_key, to_dict
from eapcore.store import MANIFEST

RETRIES = 3  # attempts after a worker's death (an exception raised by the code is not retried)
POLL_S = 1.0  # seconds between the driver's progress and cancel checks
FORWARDED_ENV = ("EAP_", "HF_", "TRANSFORMERS_")  # variables the tasks run with, as the driver has them

PhaseProgress = Callable[[str, int, int], None]  # (phase, done, total)


def _ray():
    try:
        import ray
    except ImportError:
        raise RunError("the Ray executor needs Ray: pip install 'eapcore[ray]' (or the ray version pinned in "
                       "requirements-dev.txt)") from None
    return ray


def connect(address: str | None = None) -> Any:
    """Ray, connected: to the cluster at `address` ("auto": the one started with `ray start` on
    this machine), else to this process's cluster, else a new local one."""
    ray = _ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, configure_logging=False) if address else \
                ray.init(include_dashboard=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise RunError(f"could not connect to the Ray cluster at {address!r}: {err}") from None
    return ray


# ---------------------------------------------------------------------------------------------
# Tasks (run on the workers; every argument pickles: specs, samples and settings are dataclasses)
# ---------------------------------------------------------------------------------------------

def _task_cache(env: dict[str, str], root: str) -> Cache:
    """The driver's environment (forwarded variables only) and cache, in a reused worker process."""
    for name in [k for k in os.environ if k.startswith(FORWARDED_ENV) and k not in env]:
        del os.environ[name]
    os.environ.update(env)
    return Cache(Path(root))


def _generate_task(env: dict, root: str, spec: RunSpec, which: str, key: str) -> int:
    return stages.generate_entry(_task_cache(env, root), spec, which, key)


def _plan_task(env: dict, root: str, spec: RunSpec, selection: str, max_devices: int):
    cache = _task_cache(env, root)
    return stages.attribution_work(cache, spec, cache.run_dir(spec_key(spec)), Path(selection), max_devices)


def _score_task(env: dict, root: str, model: ModelSpec, batches: list) -> int:
    return stages.score_batches(_task_cache(env, root), model, batches)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

@dataclass
class _Run:
    """One spec on the driver: its run folder, Reporter, run lock (held until assembly) and,
    once planned, its attribution work; `error` ends it."""

    spec: RunSpec
    key: str
    rep: Reporter
    lock: Any
    keys: dict = field(default_factory=dict)
    selection: Path | None = None
    work: dict = field(default_factory=dict)
    error: str | None = None
    folder: Path | None = None

    def fail(self, message: str, error: str | None = None) -> None:
        if self.error is None:
            self.error = message
            self.rep.finish("error", message, error or message)

    @property
    def score_keys(self) -> list[str]:
        return [k for w in self.work.values() for k in w.keys]


def _cause(err: BaseException) -> BaseException:
    """The exception a task raised, out of Ray's wrapper (the wrapper when a worker died)."""
    return getattr(err, "cause", None) or err


class _Driver:
    def __init__(self, ray, cache: Cache, runs: list[_Run], progress: PhaseProgress | None):
        self.ray, self.cache, self.runs, self.progress = ray, cache, runs, progress
        self.env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        self.root = str(cache.root.resolve())
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        self.slots = self.gpus or max(1, int(resources.get("CPU", 1)))
        self.gpus_per_host = max([int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")] or [0])
        self._remote: dict = {}

    def _options(self, gpus: int) -> dict:
        return {"num_cpus": 1, "num_gpus": gpus, "max_retries": RETRIES, "retry_exceptions": False}

    def _attribution_gpus(self, spec: RunSpec, devices: int = 1) -> int:
        """GPUs of an attribution task: the plan's GPUs per model, none on a CPU cluster or device."""
        device = spec.attribution.device
        if device == "cuda" and not self.gpus:
            raise RunError("the spec attributes on device cuda but the Ray cluster has no GPU; use --device auto or cpu")
        return 0 if device == "cpu" or not self.gpus else devices

    def submit(self, fn, gpus: int, *args):
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(fn)
        return self._remote[fn].options(**self._options(gpus)).remote(self.env, self.root, *args)

    def wait(self, tasks: dict, phase: str, done_of: Callable[[], tuple[int, int]] | None = None) -> dict:
        """Wait for tasks {ref: [runs]}; returns {ref: result or the exception}. Each poll reports
        progress (done_of(), else finished tasks) and honours a cancel flag of any run (pending
        tasks are then cancelled)."""
        results: dict = {}
        pending = list(tasks)
        done_of = done_of or (lambda: (len(results), len(tasks)))
        while pending:
            ready, pending = self.ray.wait(pending, num_returns=1, timeout=POLL_S)
            for ref in ready:
                try:
                    results[ref] = self.ray.get(ref)
                except Exception as err:  # a task's error fails the runs that needed it
                    results[ref] = _cause(err)
            if self.progress is not None:
                self.progress(phase, *done_of())
            if any((self.cache.run_dir(r.key) / "cancel").exists() for r in self.runs):
                for ref in pending:
                    self.ray.cancel(ref, force=True)
                raise Cancelled("cancelled; finished samples are kept, running the specs again resumes")
        return results

    def live(self) -> list[_Run]:
        return [r for r in self.runs if r.error is None]

    # ---- phases ------------------------------------------------------------------------------
    def generate(self) -> None:
        needed: dict[str, list[_Run]] = {}
        tasks: dict = {}
        for r in self.live():
            r.keys = stage_keys(r.spec)
            try:  # registry.json may hold a hand-written pair: refused before any GPU work, as runner.run does
                registry.check_pair(r.spec.pair, download=True)
            except RegistryError as err:
                r.fail(str(err))
                continue
            if r.spec.answers is not None:
                continue  # imported answers: read on the driver in the next phase
            todo = [(w, k) for w, k in r.keys["generations"].items() if self.cache.get("generations", k) is None]
            r.rep.stage("generate", total=2, done=2 - len(todo), message=f"{len(todo)} model(s) to generate on Ray")
            for which, key in todo:
                if key not in needed:
                    needed[key] = []
                    tasks[self.submit(_generate_task, min(1, self.gpus), r.spec, which, key)] = needed[key]
                needed[key].append(r)
        done = lambda: (sum(self.cache.get("generations", k) is not None for k in needed), len(needed))  # noqa: E731
        for ref, result in self.wait(tasks, "generate", done).items():
            if isinstance(result, BaseException):
                for r in tasks[ref]:
                    r.fail(runner.explain(result, "generate"), f"{type(result).__name__}: {result}")

    def plan(self) -> None:
        tasks = {}
        for r in self.live():
            try:
                _, r.selection = stages.stage_answers(self.cache, r.spec, r.keys, r.rep)
                tasks[self.submit(_plan_task, self._attribution_gpus(r.spec), r.spec, str(r.selection),
                                  self.gpus_per_host)] = [r]
            except Cancelled:
                raise
            except Exception as err:  # as the serial runner: the run ends with its message
                r.fail(runner.explain(err, r.rep.status["stage"]), f"{type(err).__name__}: {err}")
        for ref, result in self.wait(tasks, "plan").items():
            (r,) = tasks[ref]
            if isinstance(result, BaseException):
                r.fail(runner.explain(result, "attribute"), f"{type(result).__name__}: {result}")
            else:
                r.work = result[0]

    def _present(self, key: str) -> bool:
        return (self.cache.entry_path("scores", key) / MANIFEST).is_file()

    def attribute(self) -> None:
        groups: dict[tuple, dict[tuple, tuple]] = {}  # (model, dtype, device, GPUs) -> {batch keys: (batch, runs)}
        for r in self.live():
            r.rep.stage("attribute", total=len(r.score_keys), done=sum(map(self._present, r.score_keys)),
                        message=f"on Ray, {self.slots} {'GPU' if self.gpus else 'CPU'} slot(s)")
        owned = [(r, w.model, b) for r in self.live() for w in r.work.values() for b in w.batches]
        # each sample from the batch a serial sweep computes it in (specs in order), whatever runs first
        for (r, model, _), b in zip(owned, stages.first_writers(b for _, _, b in owned)):
            if all(self._present(k) or not w for k, w in zip(b.keys, b.writes)):
                continue
            group = groups.setdefault((model, b.settings.dtype, b.settings.device, b.devices), {})
            batch, runs = group.setdefault(b.keys, (b, []))
            runs.append(r)
        tasks = {}
        for (model, _, _, devices), group in groups.items():
            pooled = sorted(group.values(), key=lambda br: -len(br[0].samples) * _tokens(br[0]))  # longest first
            n = min(len(pooled), max(1, self.slots // devices))
            for chunk in (pooled[i::n] for i in range(n)):
                runs = list({id(r): r for _, rs in chunk for r in rs}.values())
                tasks[self.submit(_score_task, self._attribution_gpus(runs[0].spec, devices), model,
                                  [b for b, _ in chunk])] = runs
        live = self.live()

        def done() -> tuple[int, int]:
            counts = [(sum(map(self._present, r.score_keys)), len(r.score_keys)) for r in live]
            for r, (n_done, _) in zip(live, counts):
                if n_done != r.rep.status["done"]:
                    r.rep.update(n_done, "attributing on Ray")
            return sum(c[0] for c in counts), sum(c[1] for c in counts)

        for ref, result in self.wait(tasks, "attribute", done).items():
            if isinstance(result, BaseException):
                for r in tasks[ref]:
                    r.fail(runner.explain(result, "attribute"), f"{type(result).__name__}: {result}")

    def assemble(self, progress: runner.Progress | None) -> None:
        for r in self.live():
            missing = [k for k in r.score_keys if not self._present(k)]
            r.lock.release()
            if missing:
                r.fail(f"{len(missing)} score entries are missing after the Ray tasks (removed meanwhile?); "
                       "run the spec again")
                continue
            try:
                r.folder = runner.run(r.spec, progress, self.cache)
            except Cancelled:
                raise
            except RunError as err:
                r.error = str(err)


def _tokens(batch: stages.ScoreBatch) -> int:
    return len(batch.samples[0].prompt_ids) + batch.cut_len - 1  # the packed batch's longest input


def run_specs(specs: Sequence[RunSpec], address: str | None = None, cache: Cache | None = None,
              progress: PhaseProgress | None = None,
              run_progress: runner.Progress | None = None) -> list[tuple[RunSpec, Path | None, str | None]]:
    """Run `specs` on the Ray cluster at `address` (None: this process's, or a new local one).
    Returns (spec, run folder or None, error message or None) per distinct spec, in order; a
    failed spec's message is also in its status.json. progress(phase, done, total) follows the
    phases; run_progress is runner.run's callback during assembly. Raises Cancelled when a run's
    cancel flag appears (SIGTERM sets every run's), with every finished sample kept."""
    for spec in specs:
        check_spec(spec)
        if spec.quick is not None:
            raise RunError("quick runs (--quick) run on the serial executor: each round of answers depends on "
                           "both models' answers so far; leave out --executor ray")
    cache = cache or Cache()
    distinct = list({spec_key(s): s for s in specs}.items())
    done = {key for key, spec in distinct if runner.is_done(cache, key, stage_keys(spec)["selection"])}
    if len(done) == len(distinct):
        return [(spec, cache.run_dir(key), None) for key, spec in distinct]
    ray = connect(address)
    runs = []
    try:
        for key, spec in sorted(distinct):  # locks in key order: two drivers cannot deadlock
            if key in done:
                continue
            folder = cache.run_dir(key)
            folder.mkdir(parents=True, exist_ok=True)
            lock = cache.lock(f"run-{key}")
            lock.acquire()
            (folder / "cancel").unlink(missing_ok=True)
            (folder / MANIFEST).unlink(missing_ok=True)
            write_json_atomic(folder / "spec.json", {"key": key, "spec": to_dict(spec)})
            runs.append(_Run(spec, key, Reporter(folder), lock))
        driver = _Driver(ray, cache, runs, progress)
        previous = signal.signal(signal.SIGTERM, lambda *_: [(cache.run_dir(r.key) / "cancel").touch() for r in runs]) \
            if threading.current_thread() is threading.main_thread() else None
        try:
            driver.generate()
            driver.plan()
            driver.attribute()
            driver.assemble(run_progress)
        except (Cancelled, KeyboardInterrupt):
            for r in driver.live():
                if r.rep.status["stage"] not in ("done", "error", "cancelled"):
                    r.rep.finish("cancelled", "cancelled; finished samples are kept, running the spec again resumes")
            raise Cancelled("Ray run cancelled; finished samples are kept") from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    finally:
        for r in runs:
            if r.lock.is_locked:
                r.lock.release()
    finished = {r.key: (r.spec, r.folder, r.error) for r in runs}
    return [finished.get(key) or (spec, cache.run_dir(key), None) for key, spec in distinct]

