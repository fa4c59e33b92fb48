"""Runner: cached stages, resume after SIGKILL, corruption, concurrency, cancel, bundles, keys, CLI.

Uses two tiny random Llama checkpoints registered as a user pair and a tiny dataset of short
questions. Random models answer wrongly, so runs use the both_wrong group; max_new_tokens 8.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import typing
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import make_checkpoint
from eapcore.runs import keys as run_keys
from eapcore.runs import memory, registry, runner, stages, workers
from eapcore.runs.errors import RunError
from eapcore.runs.cache import Cache
from eapcore.specs import (AttributionSettings, DatasetSpec, GenerationSettings, ModelSpec, PairSpec, RunSpec,
                           SelectionSettings, from_dict, spec_key, to_dict)

PROJECT = Path(__file__).resolve().parents[1]
QUESTIONS = [("What is 3 + 4?", "7"), ("What is 9 - 5?", "4"), ("What is 2 * 6?", "12"), ("What is 8 + 8?", "16"),
             ("What is 7 - 2?", "5"), ("What is 3 * 3?", "9"), ("What is 1 + 5?", "6"), ("What is 6 - 6?", "0")]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner-lab")
    ds = root / "problems.jsonl"
    ds.write_text("".join(json.dumps({"idx": i, "question": q, "answer": a}) + "\n" for i, (q, a) in enumerate(QUESTIONS)))
    return SimpleNamespace(base=make_checkpoint(root / "base", "llama", seed=0),
                           tuned=make_checkpoint(root / "tuned", "llama", seed=1), dataset=ds)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here and in workers: fast on a busy machine, and the same float rounding
    in every process (the resume test compares scores bit for bit across processes)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def spec(lab, tmp_path, monkeypatch) -> RunSpec:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("EAP_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.setenv("EAP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(stages.SLEEP_ENV, raising=False)
    pair = registry.add_pair(PairSpec("tiny", ModelSpec(str(lab.base)), ModelSpec(str(lab.tuned)),
                                      "deepseek-math", 8, "GRPO"))
    ds = registry.add_dataset(DatasetSpec("tiny-set", str(lab.dataset)))
    return RunSpec(pair, ds, GenerationSettings(batch_size=4, dtype="float32"),
                   SelectionSettings(alpha=0.5, n=0, group="both_wrong"),
                   AttributionSettings(device="cpu", max_batch_tokens=1))  # one sample per batch


@pytest.fixture
def counters(monkeypatch) -> Counter:
    """Counts calls of the expensive stage functions (generation batches, attribution batches)."""
    import eapcore.engine.attribution
    import eapcore.answers.generation

    calls: Counter = Counter()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(eapcore.answers.generation, "generate_answers", counted("generate", eapcore.answers.generation.generate_answers))
    monkeypatch.setattr(eapcore.engine.attribution, "attribute", counted("attribute", eapcore.engine.attribution.attribute))
    return calls


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(folder: Path, skip=("status.json", "worker.log", "clock.json")) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


def wait_for(condition, timeout: float = 120, what: str = "condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def n_score_entries(cache: Cache) -> int:
    """Score entries in place (not the `.tmp-*` folder of one a killed worker was renaming)."""
    return sum(not p.parent.name.startswith(".") for p in (cache.root / "scores").glob("*/manifest.json"))


# ---------------------------------------------------------------------------------------------

def test_run_layout_and_second_call_served_from_cache(spec, counters):
    cache, seen = Cache(), []
    folder = runner.run(spec, seen.append, cache=cache)
    assert folder == cache.root / "runs" / spec_key(spec)
    for name in ("spec.json", "status.json", "answers_base.jsonl", "answers_tuned.jsonl", "selection.json",
                 "metrics.json", "plan.json", "manifest.json", "base/scores.safetensors", "base/graph.json",
                 "base/manifest.json", "tuned/scores.safetensors"):
        assert (folder / name).is_file(), name
    st = workers.status(spec_key(spec), cache)
    assert st["stage"] == "done" and not st["running"]
    assert set(st["clock"]) == {"generate", "grade", "select", "attribute", "metrics"}  # the run's clock
    assert all(c["seconds"] >= 0 and c["device"] == "cpu" for c in st["clock"].values())
    assert any(s["stage"] == "generate" and (s["tokens_per_s"] or 0) > 0 and s["eta_s"] is not None for s in seen)
    assert json.loads((folder / "spec.json").read_text()) == {"key": spec_key(spec), "spec": to_dict(spec)}
    n = len(json.loads((folder / "selection.json").read_text())["idx"])
    assert n >= 2 and counters["attribute"] == 2 * n and counters["generate"] == 2
    assert json.loads((folder / "metrics.json").read_text())["activation_intensity"]["n"] == n

    before = dict(counters)
    assert runner.run(spec, cache=cache) == folder
    assert dict(counters) == before  # nothing computed again

    # a new alpha reuses the generations but attributes again
    runner.run(dataclasses.replace(spec, selection=dataclasses.replace(spec.selection, alpha=0.25)), cache=cache)
    assert counters["generate"] == before["generate"] and counters["attribute"] > before["attribute"]
    # another batch size / device changes the run key but reuses every score entry
    other = dataclasses.replace(spec, attribution=dataclasses.replace(spec.attribution, max_batch_tokens=0))
    calls = counters["attribute"]
    runner.run(other, cache=cache)
    assert counters["attribute"] == calls and spec_key(other) != spec_key(spec)


def test_progress_counts_work_from_the_cache_as_done_and_says_so(spec, counters):
    """One model on both sides (the float32-vs-itself kind of pair): the tuned side's answers and
    scores are the base side's cache entries. Every stage's progress still ends at its total
    (no bar stopping half way, as if a model had been skipped) and says how much came from the cache."""
    same = dataclasses.replace(spec, pair=dataclasses.replace(spec.pair, name="tiny-same", tuned=spec.pair.base))
    seen: list[dict] = []
    folder = runner.run(same, progress=seen.append, cache=Cache())
    n = len(json.loads((folder / "selection.json").read_text())["idx"])
    last = {s["stage"]: s for s in seen}
    for stage in ("generate", "grade", "select", "attribute", "metrics"):
        assert last[stage]["done"] == last[stage]["total"], last[stage]
    assert last["generate"]["total"] == 2 * len(QUESTIONS) and last["generate"]["cached"] == len(QUESTIONS)
    assert last["attribute"]["total"] == 2 * n and last["attribute"]["cached"] == n
    assert "tuned: " + f"{n} of {n} samples from the cache" in last["attribute"]["message"]
    assert counters["generate"] == 1 and counters["attribute"] == n  # computed once, for the base side
    # a second run with another alpha: the generations come from the cache from the start
    seen.clear()
    runner.run(dataclasses.replace(same, selection=dataclasses.replace(same.selection, alpha=0.25)),
               progress=seen.append, cache=Cache())
    first = next(s for s in seen if s["stage"] == "generate")
    assert first["done"] == first["total"] == first["cached"] == 2 * len(QUESTIONS)
    assert first["message"] == "both models' answers from the cache"


def test_killed_run_resumes_bit_exact(spec, counters, tmp_path, monkeypatch):
    reference = runner.run(spec, cache=Cache(tmp_path / "reference"))
    counters.clear()

    cache = Cache()
    monkeypatch.setenv(stages.SLEEP_ENV, "0.4")
    key = workers.start(spec, cache)
    pid = json.loads((cache.run_dir(key) / "status.json").read_text())["pid"]
    wait_for(lambda: n_score_entries(cache) >= 2, what="two finished samples")
    os.kill(pid, signal.SIGKILL)  # a real kill, mid-attribution
    wait_for(lambda: not workers.status(key, cache)["running"], what="the killed worker to be gone")
    st = workers.status(key, cache)
    assert st["stage"] == "error" and "resume" in st["message"]
    finished = n_score_entries(cache)
    total = 2 * len(json.loads((reference / "selection.json").read_text())["idx"])
    assert 2 <= finished < total

    monkeypatch.delenv(stages.SLEEP_ENV)
    folder = runner.run(spec, cache=cache)
    assert counters["generate"] == 0 and counters["attribute"] == total - finished  # only the missing ones
    for part in ("base/scores.safetensors", "tuned/scores.safetensors", "selection.json", "answers_base.jsonl"):
        assert sha(folder / part) == sha(reference / part), part


def test_cancel_stops_cleanly_and_keeps_samples(spec, tmp_path, monkeypatch):
    cache = Cache()
    monkeypatch.setenv(stages.SLEEP_ENV, "0.5")
    key = workers.start(spec, cache)
    assert workers.start(spec, cache) == key  # no second worker while one runs
    wait_for(lambda: n_score_entries(cache) >= 1, what="a finished sample")
    assert workers.status(key, cache)["stage"] == "attribute"
    assert workers.cancel(key, cache)
    wait_for(lambda: workers.status(key, cache)["stage"] == "cancelled" and not workers.status(key, cache)["running"],
             timeout=60, what="cancellation")
    assert n_score_entries(cache) >= 1
    assert cache.verify_run(key)  # not sealed: a cancelled run is not a finished one
    assert not workers.cancel(key, cache)  # nothing running any more


def test_corrupted_entries_detected_and_recomputed(spec, counters):
    cache = Cache()
    folder = runner.run(spec, cache=cache)
    good = tree_hashes(folder)
    keys = run_keys.stage_keys(spec)
    score_file = next((cache.root / "scores").glob("*/scores.safetensors"))
    data = bytearray(score_file.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside a tensor
    score_file.write_bytes(bytes(data))
    answers = cache.entry_path("generations", keys["generations"]["tuned"]) / "answers.jsonl"
    answers.write_bytes(answers.read_bytes()[:-40])  # truncate
    (folder / "metrics.json").write_text("{}")  # and damage the run folder itself
    counters.clear()

    timing = ("manifest.json", "base/manifest.json", "tuned/manifest.json")  # the recomputed sample's time
    manifests = {w: json.loads((folder / w / "manifest.json").read_text()) for w in ("base", "tuned")}
    assert runner.run(spec, cache=cache) == folder
    assert tree_hashes(folder).keys() == good.keys()
    assert {k: v for k, v in tree_hashes(folder).items() if k not in timing} == \
        {k: v for k, v in good.items() if k not in timing}
    untimed = ("seconds", "seconds_missing")
    for w, before in manifests.items():
        after = json.loads((folder / w / "manifest.json").read_text())
        assert {k: v for k, v in after.items() if k not in untimed} == {k: v for k, v in before.items() if k not in untimed}
    assert counters["attribute"] == 1 and counters["generate"] >= 1  # just the damaged parts
    text = "\n".join(cache.problems)
    assert f"scores/{score_file.parent.name}" in text and f"generations/{keys['generations']['tuned']}" in text
    assert f"run {spec_key(spec)} is damaged" in text
    assert {e["event"] for e in cache.events()} >= {"corrupted", "computed"}


def test_two_processes_on_one_spec_compute_once(spec, tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(to_dict(spec)))
    cmd = [sys.executable, "-m", "eapcore", "run", "--spec-json", str(spec_file), "--quiet"]
    procs = [subprocess.Popen(cmd, cwd=PROJECT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    outs = [p.communicate(timeout=180)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    cache = Cache()
    computed = Counter((e["kind"], e["key"]) for e in cache.events() if e["event"] == "computed")
    assert computed and max(computed.values()) == 1, computed
    n = len(json.loads((cache.run_dir(spec_key(spec)) / "selection.json").read_text())["idx"])
    assert Counter(kind for kind, _ in computed) == {"generations": 2, "grades": 2, "selections": 1, "scores": 2 * n}
    assert not cache.verify_run(spec_key(spec))


def test_two_runs_sharing_samples_in_two_processes(spec, tmp_path):
    """Two specs whose selections overlap (all questions; the first three) attribute the shared
    samples at the same time in two processes: both finish, each shared entry is stored once,
    and both runs hold the same scores for it."""
    from safetensors.numpy import load_file

    specs = [spec, _replace(spec, ("selection", "n"), 3)]
    paths = []
    for i, s in enumerate(specs):
        paths.append(tmp_path / f"spec{i}.json")
        paths[-1].write_text(json.dumps(to_dict(s)))
    env = {**os.environ, stages.SLEEP_ENV: "0.2"}
    procs = [subprocess.Popen([sys.executable, "-m", "eapcore", "run", "--spec-json", str(p), "--quiet"], cwd=PROJECT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for p in paths]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    cache = Cache()
    stored = Counter(e["key"] for e in cache.events() if e["event"] == "computed" and e["kind"] == "scores"
                     and e["stored"])
    assert stored and max(stored.values()) == 1
    folders = [cache.run_dir(spec_key(s)) for s in specs]
    ids = [json.loads((f / "base" / "manifest.json").read_text())["sample_ids"] for f in folders]
    shared = set(ids[0]) & set(ids[1])
    assert len(shared) == 3
    for which in ("base", "tuned"):
        scores = [load_file(str(f / which / "scores.safetensors"))["scores"] for f in folders]
        for idx in shared:
            assert (scores[0][ids[0].index(idx)] == scores[1][ids[1].index(idx)]).all()
    assert all(not cache.verify_run(spec_key(s)) for s in specs)


def test_an_out_of_memory_error_keeps_finished_samples(spec, counters, monkeypatch):
    """CUDA running out of memory in the third attribution batch: one line saying what to change,
    status error, the two finished samples kept, and the next run computes only the others."""
    import torch

    import eapcore.engine.attribution

    real, calls = eapcore.engine.attribution.attribute_batch, []

    def oom_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(eapcore.engine.attribution, "attribute_batch", oom_third)
    cache = Cache()
    with pytest.raises(RunError, match=r"^out of GPU memory during attribute: set a smaller max_batch_tokens "
                                       r"\(--max-batch-tokens\), use dtype bfloat16 or layer granularity, or a "
                                       "smaller alpha; finished samples are kept$"):
        runner.run(spec, cache=cache)
    st = workers.status(spec_key(spec), cache)
    assert st["stage"] == "error" and st["message"].startswith("out of GPU memory") and n_score_entries(cache) == 2
    counters.clear()
    folder = runner.run(spec, cache=cache)
    n = len(json.loads((folder / "selection.json").read_text())["idx"])
    assert counters["attribute"] == 2 * n - 2 and counters["generate"] == 0


def test_path_like_names_stay_labels(spec, tmp_path):
    """A pair and a dataset named like paths are labels: the run lives under runs/<key>, nothing is
    written where the names point, and the dashboard lists them as given."""
    from eapcore.views import query

    named = _replace(_replace(spec, ("pair", "name"), "../../escape"), ("dataset", "name"), "/tmp/x/../evil")
    folder = runner.run(named, cache=Cache())
    assert folder == Cache().root / "runs" / spec_key(named)
    assert not (Cache().root.parent / "escape").exists() and not Path("/tmp/evil").exists()
    info = query.get_run(spec_key(named))
    assert (info.pair, info.dataset, info.stage) == ("../../escape", "/tmp/x/../evil", "done")


def test_a_hand_written_pair_of_other_models_is_refused_when_the_run_starts(spec, lab, tmp_path):
    """registry.json edited by hand: a pair of two architectures is re-checked when a run starts,
    and the run ends with the message in its status (nothing generated)."""
    from conftest import make_checkpoint

    gpt2 = make_checkpoint(tmp_path / "gpt2", "gpt2")
    Path(os.environ["EAP_REGISTRY"]).write_text(json.dumps({"pairs": [
        {"name": "mixed", "base": str(lab.base), "tuned": str(gpt2), "template": "deepseek-math", "max_new_tokens": 8}]}))
    mixed = dataclasses.replace(spec, pair=registry.get_pair("mixed"))
    cache = Cache()
    said = "pair 'mixed': base and tuned have different architectures ('llama' and 'gpt2')"
    with pytest.raises(RunError, match=re.escape(said)):
        runner.run(mixed, cache=cache)
    st = workers.status(spec_key(mixed), cache)
    assert st["stage"] == "error" and st["message"].startswith(said)
    assert not (cache.root / "generations").exists()


FULL_DISK = """
import json, os, subprocess, sys, time
from pathlib import Path
cache, spec_file, key = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
run = subprocess.Popen([sys.executable, "-m", "eapcore", "run", "--spec-json", spec_file, "--quiet"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
end = time.time() + 240
while not list(cache.glob("scores/[!.]*/manifest.json")) and time.time() < end and run.poll() is None:
    time.sleep(0.05)
with open(cache / "filler", "wb") as fh:  # the disk fills up mid-attribution
    try:
        while True:
            fh.write(b"x" * 65536)
            fh.flush()
    except OSError:
        pass
out, err = run.communicate(timeout=240)
print(json.dumps({"rc": run.returncode, "err": err, "status": json.loads((cache / "runs" / key / "status.json").read_text()),
                  "entries": len(list(cache.glob("scores/[!.]*/manifest.json")))}))
"""


def test_a_full_disk_ends_the_run_with_one_line_and_an_error_status(spec, tmp_path):
    """A real full disk (a 16 MB tmpfs in a user namespace, filled while the run attributes): the
    command prints one line, the run's status says error with the same message (no status left at
    "attribute" by a dead process), and the samples finished before are kept."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("user namespaces are not available here (unshare -rm), so no small disk can be mounted")
    cache = tmp_path / "small"
    cache.mkdir()
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(to_dict(spec)))
    env = {**os.environ, "EAP_CACHE_DIR": str(cache), stages.SLEEP_ENV: "0.3"}
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=16m tmpfs {cache} && '
                        f'exec "{sys.executable}" -c "$0" "$@"', FULL_DISK, str(cache), str(spec_file), spec_key(spec)],
                       cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    said = (rf"the disk of the cache \({cache}\) is full \(\w+ during attribute\): free space \(`python -m eapcore "
            r"cache size`, `cache rm KEY`\) or set EAP_CACHE_DIR to a larger disk, then run the spec again; finished "
            "samples are kept")  # the error's type: where the disk filled (safetensors, a manifest, ...)
    errors = [line for line in out["err"].splitlines() if line.startswith("error:")]
    assert out["rc"] == 1 and "Traceback" not in out["err"] and len(errors) == 1, out["err"]
    assert re.fullmatch("error: " + said, errors[0]), errors[0]
    assert out["status"]["stage"] == "error" and errors[0] == "error: " + out["status"]["message"]
    assert out["entries"] >= 1


def test_export_import_round_trip(spec, counters, tmp_path):
    from eapcore import cli

    cache = Cache()
    folder = runner.run(spec, cache=cache)
    bundle = tmp_path / "bundle.zip"
    assert cli.main(["export", spec_key(spec)[:8], "--out", str(bundle)]) == 0
    other = Cache(tmp_path / "elsewhere")
    os.environ["EAP_CACHE_DIR"] = str(other.root)  # restored by the fixture's monkeypatch
    assert cli.main(["import", str(bundle)]) == 0
    assert tree_hashes(other.run_dir(spec_key(spec))) == tree_hashes(folder)
    for kind, key in cache.run_entries(spec_key(spec)):
        assert tree_hashes(other.entry_path(kind, key)) == tree_hashes(cache.entry_path(kind, key))
    counters.clear()
    assert runner.run(spec, cache=other) == other.run_dir(spec_key(spec))
    assert not counters  # served from the imported cache


def _changed(value, hint):
    """A different valid value for a field of type `hint`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return next((a for a in args if a != value), f"{value}-x")  # one-value Literal: a future option
    if value is None:
        return {int: 7, str: "v2"}[next(a for a in args if a in (int, str))]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return value + "-x"


def _leaves(obj, path=()):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, path + (f.name,))
        else:
            yield path + (f.name,), typing.get_type_hints(type(obj))[f.name]


def _replace(obj, path, new):
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: new})
    return dataclasses.replace(obj, **{path[0]: _replace(getattr(obj, path[0]), path[1:], new)})


def _get(obj, path):
    for name in path:
        obj = getattr(obj, name)
    return obj


def _changes_generations(path) -> bool:
    """Settings the answers depend on (a local model folder's revision, a local file's name or
    split do not: their content is fingerprinted instead)."""
    return (path[0] == "generation" or path in (("pair", "template"), ("pair", "max_new_tokens"),
                                                 ("dataset", "source"), ("dataset", "limit"))
            or path[:2] in (("pair", "base"), ("pair", "tuned")) and path[2] != "revision")


def test_keys_change_with_every_setting_and_only_then(spec, monkeypatch):
    key = spec_key(spec)
    assert spec_key(from_dict(RunSpec, json.loads(json.dumps(to_dict(spec))))) == key
    assert spec_key(_replace(spec, ("selection", "alpha"), 0.5)) == key  # same value, new object
    assert spec_key(_replace(spec, ("selection", "alpha"), 1)) == spec_key(_replace(spec, ("selection", "alpha"), 1.0))
    assert run_keys.stage_keys(from_dict(RunSpec, to_dict(spec))) == run_keys.stage_keys(spec)
    base_keys = run_keys.stage_keys(spec)
    leaves = [leaf for leaf in _leaves(spec) if leaf[0] not in (("answers",), ("quick",))]  # unset: tested apart
    assert len(leaves) >= 30
    for path, hint in leaves:
        changed = _replace(spec, path, _changed(_get(spec, path), hint))
        assert spec_key(changed) != key, path
        changed_keys = run_keys.stage_keys(changed)
        gen_changed = changed_keys["generations"] != base_keys["generations"]
        assert gen_changed == _changes_generations(path), path
        assert (changed_keys["selection"] != base_keys["selection"]) == (gen_changed or path[0] == "selection"), path

    args = ("model-id", [1, 2, 3], [4, 5, 6, 7], 2)
    score = run_keys.score_key(*args, spec.attribution)
    assert run_keys.score_key("model-id", [1, 2, 3], [4, 5, 9, 9], 2, spec.attribution) == score  # past T_cut
    for name, hint in typing.get_type_hints(AttributionSettings).items():
        changed = dataclasses.replace(spec.attribution, **{name: _changed(getattr(spec.attribution, name), hint)})
        assert (run_keys.score_key(*args, changed) != score) == (name in run_keys.SCORE_SETTINGS), name
    monkeypatch.setattr(run_keys, "SCORING_VERSION", "next")
    assert run_keys.score_key(*args, spec.attribution) != score


def test_memory_prediction_and_clear_errors(spec, monkeypatch):
    m = memory.predict_memory(spec)
    assert m["fits"] and m["device"] == "cpu" and m["batch_tokens"] == 1 and m["n_params"] > 0
    assert m["model_bytes"] == 4 * m["n_params"]
    auto = memory.predict_memory(dataclasses.replace(spec, attribution=dataclasses.replace(spec.attribution,
                                                                                           max_batch_tokens=0)))
    assert auto["batch_tokens"] == 2048
    monkeypatch.setattr(memory, "_available_bytes", lambda device: 10_000)
    small = memory.predict_memory(spec, sample_tokens=50)
    assert not small["fits"] and "does not fit" in small["message"] and "bfloat16" in small["message"]
    cache = Cache()
    with pytest.raises(RunError, match="does not fit"):
        runner.run(spec, cache=cache)
    st = workers.status(spec_key(spec), cache)
    assert st["stage"] == "error" and "does not fit" in st["message"]
    assert list((cache.root / "generations").iterdir())  # earlier stages are kept

    missing = dataclasses.replace(spec, pair=dataclasses.replace(spec.pair, tuned=ModelSpec("/nowhere/model")))
    with pytest.raises(RunError, match="/nowhere/model"):
        runner.run(missing, cache=cache)
    with pytest.raises(RunError, match="zero ablation"):
        runner.run(_replace(spec, ("attribution", "ablation"), "corrupted"), cache=cache)


def test_a_non_finite_sample_stops_the_run_and_is_never_cached(spec, monkeypatch):
    """Scores of the second attributed sample made NaN: the run stops with an error naming the
    sample and the model, the first sample's scores are cached, the bad one's are not, and no
    metrics are pooled; a NaN entry cached without the check (as by older code) stops pooling."""
    import eapcore.engine.attribution

    real, calls = eapcore.engine.attribution.attribute_batch, []

    def nan_on_second(*args, **kwargs):  # the second sample attributed, whenever it is
        scores, loss = real(*args, **kwargs)
        calls.append(args[1].ids.tolist())
        if len(calls) > 1 and calls[-1] == calls[1]:
            scores[0, 0, -1] = float("nan")
        return scores, loss

    monkeypatch.setattr(eapcore.engine.attribution, "attribute_batch", nan_on_second)
    cache = Cache()
    with pytest.raises(runner.RunError, match=rf"NonFiniteError: model {spec.pair.base.name_or_path}, sample idx \d+: "
                                              "its scores are not finite"):
        runner.run(spec, cache=cache)
    assert len(calls) == 2 and n_score_entries(cache) == 1
    folder = cache.run_dir(spec_key(spec))
    assert workers.status(spec_key(spec), cache)["stage"] == "error" and not (folder / "metrics.json").exists()

    # an entry cached by an engine that did not check (as before): found when the scores are pooled
    with monkeypatch.context() as unchecked:
        unchecked.setattr(eapcore.engine.attribution, "check_finite", lambda *args, **kwargs: None)
        runner.run(spec, cache=cache)
    other = dataclasses.replace(spec, attribution=dataclasses.replace(spec.attribution, max_batch_tokens=0))
    with pytest.raises(runner.RunError, match="its scores are not finite .* it is not pooled; remove its score entry"):
        runner.run(other, cache=cache)


@pytest.mark.parametrize("command, option", [("run", "--alpha"), ("select", "--alpha"), ("sweep", "--alphas")])
def test_alpha_help_states_its_default(command, option, capsys):
    """`--help` of run and select says --alpha defaults to 0.5; sweep's --alphas has none and says so."""
    from eapcore import cli

    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    help_ = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert stop.value.code == 0 and SelectionSettings().alpha == 0.5
    said = {"--alpha": "--alpha ALPHA T_cut = max(floor(alpha * T_ref), 1); default 0.5",
            "--alphas": "no default here: give them or --preset (`eapcore run --alpha` defaults to 0.5)"}[option]
    assert said in help_


def test_cli_run_sweep_and_cache_commands(spec, capsys):
    from eapcore import cli

    opts = ["--limit", "6", "--n", "0", "--group", "both_wrong", "--device", "cpu", "--gen-dtype", "float32", "--quiet"]
    assert cli.main(["run", "--pair", "tiny", "--dataset", "tiny-set", "--alpha", "0.5", *opts]) == 0
    out = capsys.readouterr().out
    assert "activation_intensity" in out
    assert cli.main(["sweep", "--pairs", "tiny", "--datasets", "tiny-set", "--alphas", "0.5", "0.3", *opts]) == 0
    assert "2 of 2 runs done" in capsys.readouterr().out
    assert cli.main(["sweep", "--preset", "table1", "--dry-run"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4 * 3 * 4
    assert cli.main(["sweep", "--preset", "demo", "--dry-run"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2 * 1 * 4 + 2 * 3  # + 3 more groups per pair
    assert cli.main(["run", "--pair", "nope", "--dataset", "tiny-set", "--alpha", "0.5"]) == 1
    assert "unknown pair 'nope'" in (err := capsys.readouterr().err) and "`eapcore pairs add NAME --base" in err

    assert cli.main(["cache", "list"]) == 0
    listing = capsys.readouterr().out
    assert "runs" in listing and "tiny | tiny-set | alpha 0.3 | done" in listing and "scores" in listing
    assert cli.main(["cache", "size"]) == 0
    assert "total" in capsys.readouterr().out
    run_key = next(line.split()[1] for line in listing.splitlines() if "alpha 0.3" in line)
    assert cli.main(["cache", "rm", run_key]) == 0
    assert f"removed runs/{run_key}" in capsys.readouterr().out
    assert cli.main(["cache", "rm", "zzzzzz"]) == 1
    assert cli.main(["cache", "clear", "--yes"]) == 0
    assert not Cache().list_entries()


def _joined_file(folder: Path, out: Path, group_idx: list) -> None:
    """The authors' joined format built from a finished run's graded answers, for the given idx."""
    answers = {w: {r["idx"]: r for r in map(json.loads, (folder / f"answers_{w}.jsonl").read_text().splitlines())}
               for w in ("base", "tuned")}
    rows = []
    for i in group_idx:
        row = {"idx": i}
        for prefix, w in (("base", "base"), ("rl", "tuned")):
            prompt, answer = answers[w][i]["prompt_token_ids"], answers[w][i]["generate_token_ids"][0]
            row |= {f"{prefix}_prompt_tokens": prompt, f"{prefix}_answer_tokens": answer,
                    f"{prefix}_answer_tokens_range": [len(prompt), len(prompt) + len(answer)]}
        rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_joined_answers_imported_into_a_run(spec, counters, tmp_path, capsys):
    """`eapcore run --joined FILE`: the answers come from the joined file (nothing is generated),
    the spec and the generation entries say so, and the same answers give the same selection and
    the same scores as the run that generated them (score entries are shared)."""
    from eapcore import cli

    cache = Cache()
    generated = runner.run(spec, cache=cache)
    selected = json.loads((generated / "selection.json").read_text())
    joined = tmp_path / "tiny-series" / "tiny-set" / "all_wrong.jsonl"
    members = sorted(r["idx"] for r in map(json.loads, (generated / "answers_base.jsonl").read_text().splitlines()))
    _joined_file(generated, joined, members)  # every question: both models are wrong on all of them
    calls = dict(counters)
    opts = ["--n", "0", "--group", "both_wrong", "--device", "cpu", "--max-batch-tokens", "1", "--quiet"]
    assert cli.main(["run", "--pair", "tiny", "--joined", str(joined), *opts]) == 0, capsys.readouterr().err
    assert counters["generate"] == calls["generate"] and counters["attribute"] == calls["attribute"]
    imported = next(r for r in (cache.root / "runs").iterdir() if r != generated)
    stored = json.loads((imported / "spec.json").read_text())["spec"]
    assert stored["answers"] == {"joined": str(joined)} and stored["dataset"]["name"] == "tiny-set/all_wrong"
    assert json.loads((imported / "selection.json").read_text())["idx"] == selected["idx"]
    for w in ("base", "tuned"):
        assert sha(imported / w / "scores.safetensors") == sha(generated / w / "scores.safetensors")
    entries = [cache.get("generations", k) for k in run_keys.stage_keys(from_dict(RunSpec, stored))["generations"].values()]
    assert [(e.meta["imported"], e.meta["model"]) for e in entries] == [(str(joined), "base"), (str(joined), "tuned")]
    report = json.loads((entries[0].path / "import.json").read_text())
    assert report["source"] == str(joined) and report["rows"] == len(members) and report["skipped"] == []

    # an edited file is another import: its entries are keyed by the file's content
    spec_imported = from_dict(RunSpec, stored)
    before = run_keys.stage_keys(spec_imported)
    _joined_file(generated, joined, members[:-1])
    assert run_keys.stage_keys(spec_imported)["generations"] != before["generations"]
    assert spec_key(dataclasses.replace(spec_imported, answers=None)) != spec_key(spec_imported)
    assert cli.main(["run", "--pair", "tiny", "--joined", str(tmp_path / "nope.jsonl"), *opts]) == 1
    assert "joined answers file" in capsys.readouterr().err


def test_run_command_source_file_default_alpha_and_empty_group(spec, lab, capsys):
    """--source FILE runs on an unregistered dataset file (with the registered one's name: the same
    key), --alpha defaults to 0.5, and an empty group names the groups that have questions."""
    from eapcore import cli

    opts = ["--n", "0", "--group", "both_wrong", "--device", "cpu", "--gen-dtype", "float32", "--gen-batch-size", "4",
            "--max-batch-tokens", "1", "--quiet"]
    assert cli.main(["run", "--pair", "tiny", "--dataset", "tiny-set", "--alpha", "0.5", *opts]) == 0
    capsys.readouterr()
    assert cli.main(["run", "--pair", "tiny", "--dataset", "tiny-set", "--source", str(lab.dataset), *opts]) == 0
    assert (Cache().root / "runs" / spec_key(spec)).is_dir() and len(list((Cache().root / "runs").iterdir())) == 1
    assert cli.main(["run", "--pair", "tiny", "--source", str(lab.dataset), *opts[:-1], "--predict"]) == 0
    assert cli.main(["run", "--pair", "tiny", "--source", str(lab.dataset.parent / "nope.jsonl"), *opts]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["run", "--pair", "tiny", "--dataset", "tiny-set", *opts[:2], "--group", "both_correct",
                     *opts[4:]]) == 1
    err = capsys.readouterr().err
    assert "group 'both_correct' (both correct) is empty; groups with questions: both wrong (both_wrong): 8" in err
    # one question is not a run: refused as a setting (--n 1), or when only one passes, before attribution
    assert cli.main(["run", "--pair", "tiny", "--dataset", "tiny-set", "--n", "1", *opts[2:]]) == 1
    assert "n must be 0 (every question that passes) or at least 2" in capsys.readouterr().err
    scores = len(list((Cache().root / "scores").iterdir()))
    assert cli.main(["run", "--pair", "tiny", "--dataset", "tiny-set", "--limit", "1", *opts]) == 1
    assert "only 1 question of group 'both_wrong' passes the selection rules" in capsys.readouterr().err
    assert len(list((Cache().root / "scores").iterdir())) == scores  # nothing attributed


def test_run_command_says_when_it_first_hashes_model_files(spec, lab, tmp_path, capsys, monkeypatch):
    """Before a run's first status, local model files are read whole for their sha256 (the cache
    keys): the command says so when that is more than HASH_NOTE_BYTES, and not once they are known."""
    import shutil

    from eapcore import cli
    from eapcore.runs import commands

    base, tuned = shutil.copytree(lab.base, tmp_path / "b"), shutil.copytree(lab.tuned, tmp_path / "t")  # new files
    registry.add_pair(PairSpec("copied", ModelSpec(str(base)), ModelSpec(str(tuned)), "deepseek-math", 8, "GRPO"))
    size = sum(f.stat().st_size for folder in (base, tuned) for f in folder.iterdir() if f.is_file())
    assert Cache().unhashed_bytes(base) + Cache().unhashed_bytes(tuned) == size
    monkeypatch.setattr(commands, "HASH_NOTE_BYTES", 0)
    opts = ["--pair", "copied", "--dataset", "tiny-set", "--n", "0", "--group", "both_wrong", "--device", "cpu",
            "--gen-dtype", "float32", "--max-batch-tokens", "1", "--quiet"]
    assert cli.main(["run", *opts]) == 0
    assert f"note: reading {size / 1e9:.1f} GB of local model files once for their sha256" in capsys.readouterr().err
    assert Cache().unhashed_bytes(base) == 0
    assert cli.main(["run", *opts, "--alpha", "0.3"]) == 0
    assert "note: reading" not in capsys.readouterr().err


# ---- quick runs ------------------------------------------------------------------------------------

def _by_hand(answers: dict[str, dict], idx: list, settings: SelectionSettings) -> tuple[float, set]:
    """T_ref and the questions of `idx` passing the selection rules, computed here from the answer
    rows (docs/METHOD.md, Eq. 10-12), not by eapcore.answers.selection."""
    import math

    wrong = [i for i in idx if not answers["base"][i]["score"][0] and not answers["tuned"][i]["score"][0]]
    length = {w: {i: len(answers[w][i]["generate_token_ids"][0]) for i in wrong} for w in answers}
    t_ref = min(sum(length[w].values()) / len(wrong) for w in answers)
    t_cut = max(math.floor(settings.alpha * t_ref), 1)
    kept = set()
    for i in wrong:
        b, t = length["base"][i], length["tuned"][i]
        mean = (b + t) / 2
        if (len(answers["base"][i]["prompt_token_ids"]) == len(answers["tuned"][i]["prompt_token_ids"])
                and min(b, t) >= t_cut and math.floor(settings.low * t_ref) <= mean <= math.floor(settings.high * t_ref)
                and abs(b - t) / mean <= settings.beta):
            kept.add(i)
    return t_ref, kept


def _rows(folder: Path, which: str) -> dict:
    return {r["idx"]: r for r in map(json.loads, (folder / f"answers_{which}.jsonl").read_text().splitlines())}


def test_quick_run_stops_once_n_pass_resumes_and_leaves_the_full_run_alone(spec, tmp_path, monkeypatch):
    """A quick run answers the seeded order's first questions round by round until N pass the
    rules (checked here by hand, T_ref from those answers), is killed in its second round and
    resumes to the same questions, records its rounds, clock and tokens; a full run on the same data
    afterwards answers only the rest and equals a full run in a fresh cache, and a quick run there
    takes its answers from the full run's entries."""
    import numpy as np

    import eapcore.answers.generation
    from eapcore.runs.results import get_run
    from eapcore.specs import QuickSettings

    data = tmp_path / "thirty.jsonl"
    data.write_text("".join(json.dumps({"idx": i, "question": f"What is {i} + {i % 7}?", "answer": str(i + i % 7)})
                            + "\n" for i in range(30)))
    full = dataclasses.replace(spec, dataset=registry.add_dataset(DatasetSpec("thirty", str(data))),
                               selection=dataclasses.replace(spec.selection, n=4))
    quick = dataclasses.replace(full, quick=QuickSettings(seed=5, chunk=3))
    assert spec_key(quick) != spec_key(full)
    unset = {k: v for k, v in to_dict(full).items() if k not in ("answers", "quick")}
    unset["pair"] = {k: v for k, v in unset["pair"].items() if k != "family"}  # keyed only when set too
    assert spec_key(full) == spec_key({"__type__": "RunSpec", **unset})  # runs cached before quick runs keep their keys

    real, generated, calls = eapcore.answers.generation.generate_answers, Counter(), []

    def counted(problems, out, *args, **kwargs):
        calls.append(len(problems))
        if os.environ.get("EAP_TEST_KILL_AT") == str(len(calls)):
            raise KeyboardInterrupt  # as a kill between two models' answers
        report = real(problems, out, *args, **kwargs)
        generated[os.environ["EAP_CACHE_DIR"]] += report.n_generated  # per cache
        return report

    monkeypatch.setattr(eapcore.answers.generation, "generate_answers", counted)
    monkeypatch.setenv("EAP_TEST_KILL_AT", "4")  # round 2, the tuned model
    a, root_a = Cache(), os.environ["EAP_CACHE_DIR"]
    with pytest.raises(runner.Cancelled):
        runner.run(quick, cache=a)
    monkeypatch.delenv("EAP_TEST_KILL_AT")
    folder = runner.run(quick, cache=a)
    record = json.loads((folder / "quick.json").read_text())
    order = list(np.random.default_rng(5).permutation(30))
    size = record["questions"]
    answers = {w: _rows(folder, w) for w in ("base", "tuned")}
    assert 0 < size < 30 and sorted(answers["base"]) == sorted(answers["tuned"]) == sorted(order[:size])
    assert [r["questions"] for r in record["rounds"]] == list(range(3, size + 1, 3))  # chunk 3
    for r in record["rounds"]:  # each round's count, by hand; it stopped at the first with N passing
        assert r["kept"] == len(_by_hand(answers, order[:r["questions"]], full.selection)[1])
    assert [r["kept"] >= 4 for r in record["rounds"]] == [False] * (len(record["rounds"]) - 1) + [True]
    assert generated[root_a] == 2 * size  # the kill lost nothing and nothing was answered twice
    selection = json.loads((folder / "selection.json").read_text())
    t_ref, kept = _by_hand(answers, order[:size], full.selection)
    assert selection["t_ref"] == t_ref and len(selection["idx"]) == 4 and set(selection["idx"]) <= kept
    tokens = {w: sum(len(r["generate_token_ids"][0]) for r in answers[w].values()) for w in answers}
    assert record["answer_tokens"] == tokens and record["of"] == 30 and record["kept"] == record["rounds"][-1]["kept"]
    assert record["whole_dataset_tokens_estimate"] == round(sum(tokens.values()) * 30 / size)
    assert record["tokens_saved_estimate"] == record["whole_dataset_tokens_estimate"] - sum(tokens.values())
    info = get_run(spec_key(quick), a.root)
    assert info.finished and info.quick == record
    executions = json.loads((folder / "clock.json").read_text())["executions"]
    assert len(executions) == 2 and info.clock["generate"]["executions"] == 2
    assert info.clock["generate"]["seconds"] == pytest.approx(sum(s["seconds"] for e in executions
                                                                  for s in e["stages"] if s["stage"] == "generate"))
    assert list(info.clock) == ["generate", "grade", "select", "attribute", "metrics"]
    manifest = json.loads((folder / "base" / "manifest.json").read_text())
    assert manifest["device"] == "cpu" and manifest["seconds"] > 0 and manifest["seconds_missing"] == 0
    n_calls = len(calls)
    assert runner.run(quick, cache=a) == folder and len(calls) == n_calls  # done: nothing runs again

    full_a = runner.run(full, cache=a)  # after the quick run, in the same cache
    assert generated[root_a] == 2 * 30  # only the questions the quick run had not answered
    monkeypatch.setenv("EAP_CACHE_DIR", str(tmp_path / "fresh"))
    b = Cache()
    full_b, quick_b = runner.run(full, cache=b), runner.run(quick, cache=b)
    assert generated[str(tmp_path / "fresh")] == 2 * 30  # the quick run there generated nothing
    for name in ("answers_base.jsonl", "answers_tuned.jsonl", "selection.json", "metrics.json"):
        assert sha(full_a / name) == sha(full_b / name), name
        assert sha(folder / name) == sha(quick_b / name), name
    again = json.loads((quick_b / "quick.json").read_text())
    assert again["generated_now"] == 0 and {**again, "generated_now": None} == {**record, "generated_now": None}


def test_quick_run_settings_checked_and_offered_on_the_command_line(spec, capsys):
    from eapcore import cli
    from eapcore.runs.stages import next_round
    from eapcore.specs import QuickSettings

    for bad in (dataclasses.replace(spec, quick=QuickSettings()),  # n = 0: nothing to stop at
                dataclasses.replace(spec, quick=QuickSettings(chunk=-1),
                                    selection=dataclasses.replace(spec.selection, n=3))):
        with pytest.raises(RunError, match="a quick run generates answers until n questions pass"):
            run_keys.check_spec(bad)
    # 2N first; none passing: twice as many; else the pass rate so far x what is missing, +20%, at most all
    assert [next_round(0, 0, 10, 1000, 0), next_round(20, 0, 10, 1000, 0), next_round(40, 4, 10, 1000, 0),
            next_round(40, 4, 10, 60, 0), next_round(6, 1, 10, 1000, 4)] == [20, 40, 40 + 72, 60, 10]
    opts = ["--n", "2", "--group", "both_wrong", "--device", "cpu", "--gen-dtype", "float32", "--max-batch-tokens",
            "1", "--quiet"]
    assert cli.main(["run", "--pair", "tiny", "--dataset", "tiny-set", "--quick", "--quick-chunk", "3", *opts]) == 0
    out = capsys.readouterr().out
    assert "quick run: 3 of 8 questions answered in 1 round(s)" in out and "fewer than the whole dataset" in out
    assert cli.main(["run", "--pair", "tiny", "--dataset", "tiny-set", "--quick", "--executor", "ray", *opts]) == 1
    assert "quick runs (--quick) run on the serial executor" in capsys.readouterr().err
    grid = ["sweep", "--pairs", "tiny", "--datasets", "tiny-set", "--alphas", "0.5", "0.3", "--dry-run", *opts]
    dry = {}
    for extra in ([], ["--quick"]):
        assert cli.main(grid + extra) == 0
        dry[bool(extra)] = [line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines()]
    assert [label for _, label in dry[True]] == [label for _, label in dry[False]]  # the same grid, other runs
    assert not {k for k, _ in dry[True]} & {k for k, _ in dry[False]}
