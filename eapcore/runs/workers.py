"""Worker control: a run's status.json (kept current by Reporter), start a worker process, read
its status, cancel it."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from eapcore.files import PROJECT_ROOT, cache_root_problem, read_json_or_none, write_json_atomic
from eapcore.runs.cache import Cache
from eapcore.runs.errors import Cancelled, RunError
from eapcore.runs.keys import check_spec
from eapcore.specs import RunSpec, spec_key, to_dict

STAGES = ("queued", "generate", "grade", "select", "attribute", "metrics", "done", "error", "cancelled")
FINAL = ("done", "error", "cancelled")
CLOCK = "clock.json"
MUTABLE_FILES = ("status.json", "worker.log", "cancel", CLOCK)  # not sealed: they change after a run
_WORKERS: dict[str, subprocess.Popen] = {}  # workers started by this process (reaped in status())

Progress = Callable[[dict], None]


def _gpu_mem_gb() -> float | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 1e9, 3)


class Reporter:
    """Keeps status.json current (at most 2 writes a second, always at a stage change), calls the
    progress callback, and raises Cancelled when the run's cancel flag appears.

    status: done of total items of the stage, of which `cached` came from the cache (not computed
    by this run: the rate and ETA count only computed items); status["clock"]: {stage:
    {"seconds": wall time, "device": where it ran}} of the stages this execution went through (a
    cached stage takes about 0 s); the same is appended to the run's clock.json, one entry per
    execution ({"executions": [{"started", "pid", "stages": [{"stage", "seconds", "device"}]}]}),
    so a resumed run keeps the time its earlier executions spent; status["tokens_per_s"]:
    generated tokens per second during the generate stage; status["eta_s"]: seconds left in the
    stage, from the stage's own estimate when it gives one (generate:
    eapcore.answers.generation.Progress), else from the computed items per second so far."""

    def __init__(self, folder: Path, callback: Progress | None = None):
        self.folder, self.callback = folder, callback
        self.status: dict[str, Any] = {"stage": "queued", "done": 0, "total": 0, "cached": 0, "rate": None,
                                       "eta_s": None, "tokens_per_s": None, "gpu_mem_gb": None, "message": "",
                                       "error": None, "clock": {}, "pid": os.getpid()}
        self._t0, self._done0, self._cached0, self._written = time.time(), 0, 0, 0.0
        previous = read_json_or_none(folder / CLOCK)
        runs = previous.get("executions") if isinstance(previous, dict) else None
        self._executions = [e for e in runs if isinstance(e, dict)] if isinstance(runs, list) else []
        self._executions.append({"started": self._t0, "pid": os.getpid(), "stages": []})

    def _stop_clock(self) -> None:
        entry = self.status["clock"].get(self.status["stage"])
        if entry is not None and entry["seconds"] is None:
            entry["seconds"] = round(time.time() - self._t0, 3)

    def _write_clock(self) -> None:
        """clock.json with this execution's stages in the order they ran (the running one at its time
        so far: a killed worker's time is kept up to its last status write)."""
        now, stage = time.time(), self.status["stage"]
        self._executions[-1]["stages"] = [
            {"stage": name, **c, "seconds": round(now - self._t0, 3) if c["seconds"] is None and name == stage
             else c["seconds"]} for name, c in self.status["clock"].items()]
        try:
            write_json_atomic(self.folder / CLOCK, {"executions": self._executions})
        except OSError:  # a full disk: the run goes on, the clock catches up at a later write
            pass

    def stage(self, name: str, total: int, done: int = 0, message: str = "", device: str = "cpu",
              cached: int = 0) -> None:
        """A new stage of `total` items, `done` of them already (`cached` of those from the cache)."""
        self._stop_clock()
        self._t0, self._done0, self._cached0 = time.time(), done, cached
        self.status["clock"][name] = {"seconds": None, "device": device}
        self.status.update(stage=name, total=total, done=done, cached=cached, rate=None, eta_s=None,
                           tokens_per_s=None, message=message, error=None)
        self._emit(force=True)

    def from_cache(self, n: int, message: str | None = None) -> None:
        """n more items of the stage are done because the cache had them (e.g. the other model's
        identical samples, or another process's work)."""
        if n > 0:
            self.status["cached"] += n
            self.update(self.status["done"] + n, message)

    def update(self, done: int, message: str | None = None, tokens_per_s: float | None = None,
               eta_s: float | None = None, total: int | None = None) -> None:
        """done: items finished in this stage (of `total`, when the stage's total changes);
        tokens_per_s: generation speed; eta_s: the stage's own estimate of the seconds left
        (None: from the computed items per second)."""
        self.check_cancel()
        if total is not None:
            self.status["total"] = total
        elapsed = time.time() - self._t0
        computed = done - self._done0 - (self.status["cached"] - self._cached0)
        rate = computed / elapsed if computed > 0 and elapsed > 0 else None
        if eta_s is None and rate:
            eta_s = (self.status["total"] - done) / rate
        self.status.update(done=done, rate=rate, eta_s=eta_s)
        if tokens_per_s is not None:
            self.status["tokens_per_s"] = tokens_per_s
        if message is not None:
            self.status["message"] = message
        self._emit()

    def finish(self, stage: str, message: str = "", error: str | None = None) -> None:
        self._stop_clock()
        self.status.update(stage=stage, message=message, error=error, rate=None, eta_s=None, tokens_per_s=None)
        try:
            self._emit(force=True)
        except OSError:  # nothing can be written: status() reports the stopped worker as an error
            pass

    def check_cancel(self) -> None:
        if (self.folder / "cancel").exists():
            raise Cancelled("cancelled; finished samples are kept and a new run resumes from them")

    def _emit(self, force: bool = False) -> None:
        now = time.time()
        self.status.update(updated=now, gpu_mem_gb=_gpu_mem_gb())
        if force or now - self._written >= 0.5:
            path = self.folder / "status.json"
            try:
                write_json_atomic(path, self.status)
            except OSError:  # a full disk: rewrite the small file in place, reusing its own blocks
                with open(path, "w", encoding="utf-8") as fh:
                    json.dump(self.status, fh, default=str)
            self._write_clock()
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
    problem = cache_root_problem(cache.root)
    if problem:
        raise RunError(problem)
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
                                 "--quiet"], cwd=str(PROJECT_ROOT), env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _WORKERS[key] = proc
    write_json_atomic(folder / "status.json", {"stage": "queued", "done": 0, "total": 0, "rate": None, "eta_s": None,
                                               "gpu_mem_gb": None, "message": "worker starting", "error": None,
                                               "pid": proc.pid, "updated": time.time()})
    return key
