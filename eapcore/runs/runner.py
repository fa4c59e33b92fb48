"""Execute a RunSpec: generate -> grade -> select -> attribute -> metrics, cached and resumable.

Every stage is a content-addressed cache entry (eapcore.runs.keys, eapcore.runs.stages). A run is
then assembled into `runs/<spec_key(spec)>/` (DESIGN.md "A finished run in the cache"), plus
`plan.json` (the batch size chosen and the memory prediction) and `manifest.json` (checksums and
the entries it was built from, see Cache.seal_run). A done, intact run is returned at once; a
second process on the same spec waits on the run's lock.
"""
from __future__ import annotations

import sys
from pathlib import Path

from eapcore.runs import stages
from eapcore.files import read_json_or_none, write_bytes_atomic, write_json_atomic
from eapcore.runs.cache import MANIFEST, Cache
from eapcore.runs.errors import Cancelled, RunError
from eapcore.runs.keys import check_spec, stage_keys
from eapcore.runs.workers import MUTABLE_FILES, Progress, Reporter
from eapcore.specs import RunSpec, spec_key, to_dict


def is_done(cache: Cache, key: str, selection: str | None) -> bool:
    """Whether run `key` (of selection entry `selection`; None: not known yet) is done and intact."""
    st = read_json_or_none(cache.run_dir(key) / "status.json")
    if not isinstance(st, dict) or st.get("stage") != "done":
        return False
    problems = cache.verify_run(key)
    if problems:
        cache.report(f"run {key} is damaged and will be rebuilt from its cached stages: {'; '.join(problems)}")
        return False
    return selection is not None and ("selections", selection) in cache.run_entries(key)


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
        questions = stages.quick_questions(folder) if spec.quick else None  # a quick run: known once answered
        keys = stage_keys(spec, questions) if spec.quick is None or questions else {}
        if is_done(cache, key, keys.get("selection")):
            return folder
        previous = read_json_or_none(folder / "status.json")
        if not (isinstance(previous, dict) and previous.get("stage") == "queued"):
            (folder / "cancel").unlink(missing_ok=True)  # a stale request; a queued run's one stands
        (folder / MANIFEST).unlink(missing_ok=True)
        write_json_atomic(folder / "spec.json", {"key": key, "spec": to_dict(spec)})
        rep = Reporter(folder, progress)
        try:
            rep.check_cancel()
            graded, selection = stages.stage_answers(cache, spec, keys, rep, folder)
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
            message = explain(err, rep.status["stage"])
            rep.finish("error", message, f"{type(err).__name__}: {err}")
            raise RunError(message) from err
    return folder
