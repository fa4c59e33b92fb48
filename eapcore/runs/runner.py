"""Execute a RunSpec: generate -> grade -> select -> attribute -> metrics, cached and resumable.

Every stage is a content-addressed cache entry (eapcore.runs.keys, eapcore.runs.stages). A run is
then assembled into `runs/<spec_key(spec)>/` (DESIGN.md "A finished run in the cache"), plus
`plan.json` (the batch size chosen and the memory prediction) and `manifest.json` (checksums and
the entries it was built from, see Cache.seal_run). A done, intact run is returned at once; a
second process on the same spec waits on the run's lock. Every failure (a full disk included)
ends the run with one line in status.json (stage "error") and in the RunError raised; a read-only
cache still serves its finished runs.
"""
from __future__ import annotations

import errno
import shutil
import sys
from pathlib import Path

from eapcore.files import cache_root_problem, read_json_or_none, shorten, write_bytes_atomic, write_json_atomic
from eapcore.modelfiles import CheckpointError
from eapcore.runs import registry, stages
from eapcore.runs.cache import Cache
from eapcore.runs.errors import Cancelled, RunError
from eapcore.runs.registry import RegistryError
from eapcore.runs.keys import check_spec, stage_keys
from eapcore.runs.workers import MUTABLE_FILES, Progress, Reporter
from eapcore.specs import RunSpec, spec_key, to_dict
from eapcore.store import MANIFEST, CacheError


def is_done(cache: Cache, key: str, selection: str) -> bool:
    """Whether run `key` (of selection entry `selection`) is done and intact."""
    st = read_json_or_none(cache.run_dir(key) / "status.json")
    if not isinstance(st, dict) or st.get("stage") != "done":
        return False
    problems = cache.verify_run(key)
    if problems:
        cache.report(f"run {key} is damaged and will be rebuilt from its cached stages: {'; '.join(problems)}")
        return False
    return ("selections", selection) in cache.run_entries(key)


def _disk_full(err: BaseException, cache: Cache) -> bool:
    """Whether `err` comes from a full disk: its errno says so, or (libraries such as safetensors
    wrap the OS error in their own type) the cache's disk has less than 1 MB free."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(cache.root).free < 1 << 20
    except OSError:
        return False


def explain(err: BaseException, stage: str, cache: Cache | None = None) -> str:
    """A one-line message for an exception raised during `stage` (cache: the run's, default the
    cache root's)."""
    cache = cache or Cache()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, torch.cuda.OutOfMemoryError) and stage == "generate":
        return ("out of GPU memory during generate: set a smaller generation batch size (--gen-batch-size; "
                "0 sizes it from free memory) or max_new_tokens; finished answers are kept")
    if torch is not None and isinstance(err, torch.cuda.OutOfMemoryError):
        return (f"out of GPU memory during {stage}: set a smaller max_batch_tokens (--max-batch-tokens), "
                "use dtype bfloat16 or layer granularity, or a smaller alpha; finished samples are kept")
    if _disk_full(err, cache):
        return (f"the disk of the cache ({cache.root}) is full ({type(err).__name__} during {stage}): free space "
                "(`python -m eapcore cache size`, `cache rm KEY`) or set EAP_CACHE_DIR to a larger disk, then run the "
                "spec again; finished samples are kept")
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return cache_root_problem(cache.root) or f"{stage} failed: cannot write {shorten(err.filename, 120)} ({err.strerror})"
    if isinstance(err, (RunError, RegistryError, CheckpointError, CacheError)):
        return str(err)
    return f"{stage} failed: {type(err).__name__}: {shorten(err, 500)}"


def run(spec: RunSpec, progress: Progress | None = None, cache: Cache | None = None) -> Path:
    """Execute `spec` in this process and return its run folder (runs/<key>/). A done, intact run
    returns at once; otherwise every cached stage is reused. progress(status_dict) is called at
    each status change. Raises Cancelled, or RunError with the message also in status.json."""
    check_spec(spec)
    cache = cache or Cache()
    key = spec_key(spec)
    folder = cache.run_dir(key)
    keys = stage_keys(spec)
    problem = cache_root_problem(cache.root)
    if problem:
        if is_done(cache, key, keys["selection"]):  # a finished run is served from a read-only cache
            return folder
        raise RunError(problem)
    folder.mkdir(parents=True, exist_ok=True)
    with cache.lock(f"run-{key}"):
        if is_done(cache, key, keys["selection"]):
            return folder
        previous = read_json_or_none(folder / "status.json")
        if not (isinstance(previous, dict) and previous.get("stage") == "queued"):
            (folder / "cancel").unlink(missing_ok=True)  # a stale request; a queued run's one stands
        (folder / MANIFEST).unlink(missing_ok=True)
        rep = Reporter(folder, progress)
        try:
            write_json_atomic(folder / "spec.json", {"key": key, "spec": to_dict(spec)})
            rep.check_cancel()
            registry.check_pair(spec.pair, download=True)  # registry.json may hold a hand-written pair
            graded, selection = stages.stage_answers(cache, spec, keys, rep)
            scores = stages.stage_attribute(cache, spec, folder, selection, rep)
            for which in ("base", "tuned"):
                write_bytes_atomic(folder / f"answers_{which}.jsonl", Path(graded[which]).read_bytes())
            write_bytes_atomic(folder / "selection.json", (selection / "selection.json").read_bytes())
            stages.stage_metrics(folder, rep)
            entries = [("generations", k) for k in keys["generations"].values()] + \
                      [("grades", k) for k in keys["grades"].values()] + [("selections", keys["selection"])] + scores
            cache.seal_run(key, entries, skip=MUTABLE_FILES)
            rep.finish("done", f"finished: {folder}")
        except (Cancelled, KeyboardInterrupt):
            rep.finish("cancelled", "cancelled; finished samples are kept, running the spec again resumes")
            raise Cancelled(f"run {key} cancelled; finished samples are kept") from None
        except Exception as err:  # every failure ends the run with a message in status.json
            message = explain(err, rep.status["stage"], cache)
            rep.finish("error", message, f"{type(err).__name__}: {shorten(err, 500)}")
            raise RunError(message) from err
    return folder
