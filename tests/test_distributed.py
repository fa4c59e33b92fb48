"""The Ray executor on a local Ray cluster on the CPU (one cluster for the module): a sweep gives
the serial sweep's runs and metrics bit for bit, spread over the workers; a worker killed
mid-task is survived with no finished sample lost; the command line; clear errors."""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter

import pytest
import ray

from eapcore.runs import distributed, runner, stages, workers
from eapcore.runs.cache import Cache
from eapcore.specs import spec_key
from test_runner import lab, one_thread, sha, spec, wait_for  # noqa: F401  (fixtures: two tiny Llamas, a dataset)

ALPHAS = (0.5, 0.3)
VARIABLE = ("status.json", "worker.log", "manifest.json", "plan.json", "clock.json")  # times, pids, free memory
TIMED = ("seconds", "seconds_missing")  # the attribution's time in base/ and tuned/manifest.json


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPU workers for the whole module (start-up takes a few seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


def sweep(spec):
    return [dataclasses.replace(spec, selection=dataclasses.replace(spec.selection, alpha=a)) for a in ALPHAS]


def run_files(folder) -> dict[str, str]:
    """sha256 of every file of a run folder but the ones that record times, pids or free memory (of
    the models' manifests: their content but the attribution's time)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        name = p.relative_to(folder).as_posix()
        if name in ("base/manifest.json", "tuned/manifest.json"):
            out[name] = {k: v for k, v in json.loads(p.read_text()).items() if k not in TIMED}
        elif p.is_file() and name not in VARIABLE:
            out[name] = sha(p)
    return out


def score_events(cache: Cache) -> list[dict]:
    return [e for e in cache.events() if e["event"] == "computed" and e["kind"] == "scores" and e.get("stored")]


def assert_same_runs(specs, serial: Cache, distributed_cache: Cache):
    for s in specs:
        a, b = serial.run_dir(spec_key(s)), distributed_cache.run_dir(spec_key(s))
        files = run_files(a)
        assert {"base/scores.safetensors", "tuned/scores.safetensors", "metrics.json", "selection.json"} <= set(files)
        assert run_files(b) == files, spec_key(s)
        plan = lambda f: json.loads((f / "plan.json").read_text())["max_batch_tokens"]  # noqa: E731
        assert plan(a) == plan(b)
        assert workers.status(spec_key(s), distributed_cache)["stage"] == "done"
        assert not distributed_cache.verify_run(spec_key(s))


def test_ray_sweep_equals_the_serial_sweep(cluster, spec, tmp_path, monkeypatch):
    specs = sweep(spec)
    serial = Cache(tmp_path / "serial")
    for s in specs:
        runner.run(s, cache=serial)
    monkeypatch.setenv(stages.SLEEP_ENV, "0.2")  # tasks long enough that both workers take some

    cache, phases = Cache(), Counter()
    results = distributed.run_specs(specs, cache=cache, progress=lambda phase, done, total: phases.update([phase]))
    assert [(s, f, e) for s, f, e in results] == [(s, cache.run_dir(spec_key(s)), None) for s in specs]
    assert set(phases) == {"generate", "plan", "attribute"}
    assert_same_runs(specs, serial, cache)

    # the work ran in the Ray workers, spread over both, each sample computed once
    gens = [e for e in cache.events() if e["event"] == "computed" and e["kind"] == "generations"]
    scores = score_events(cache)
    assert len(gens) == 2 and all(e["pid"] != os.getpid() for e in gens + scores)
    assert len({e["pid"] for e in scores}) == 2
    assert sorted(e["key"] for e in scores) == sorted(set(e["key"] for e in score_events(serial)))
    # each sample from the batch the serial sweep computed it in (its companions change bf16 scores)
    batch_of = lambda c: {e["key"]: c.get("scores", e["key"]).meta["batch"] for e in score_events(c)}  # noqa: E731
    assert batch_of(cache) == batch_of(serial)

    # a second call finds every run done and computes nothing
    assert [f for _, f, _ in distributed.run_specs(specs, cache=cache)] == [f for _, f, _ in results]
    assert len(score_events(cache)) == len(scores)


def test_a_worker_killed_mid_task_is_survived(cluster, spec, tmp_path, monkeypatch):
    """One worker dies by SIGKILL right after its first attribution batch (stages.KILL_ENV): its
    task is retried, skips the batch it had finished, and the run equals the serial one."""
    serial = Cache(tmp_path / "serial")
    runner.run(spec, cache=serial)
    marker = tmp_path / "killed"
    monkeypatch.setenv(stages.KILL_ENV, str(marker))
    cache = Cache()
    ((_, folder, error),) = distributed.run_specs([spec], cache=cache)
    assert marker.exists()  # a worker did die mid-task
    assert error is None and folder == cache.run_dir(spec_key(spec))
    assert_same_runs([spec], serial, cache)
    computed = Counter(e["key"] for e in score_events(cache))
    assert set(computed.values()) == {1}  # no finished sample lost (or computed twice)
    assert len(computed) == len(score_events(serial))


def test_cli_and_errors(cluster, spec, capsys):
    from eapcore import cli

    opts = ["--limit", "6", "--n", "0", "--group", "both_wrong", "--device", "cpu", "--gen-dtype", "float32",
            "--max-batch-tokens", "1", "--quiet", "--executor", "ray"]
    assert cli.main(["sweep", "--pairs", "tiny", "--datasets", "tiny-set", "--alphas", "0.5", "0.3", *opts]) == 0
    assert "2 of 2 runs done" in capsys.readouterr().out
    assert cli.main(["run", "--pair", "tiny", "--dataset", "tiny-set", "--alpha", "0.5", *opts]) == 0
    assert "activation_intensity" in capsys.readouterr().out

    gpu = dataclasses.replace(spec, attribution=dataclasses.replace(spec.attribution, device="cuda"))
    ((_, folder, error),) = distributed.run_specs([gpu])
    assert folder is None and "has no GPU" in error
    assert workers.status(spec_key(gpu))["stage"] == "error"


def test_cancel_stops_the_tasks_and_keeps_finished_samples(cluster, spec, monkeypatch):
    """The run's cancel flag (the Run page's cancel, SIGTERM) mid-attribution: pending tasks are
    cancelled, the run is marked cancelled, and a second call resumes from the kept samples."""
    import threading

    from eapcore.runs.errors import Cancelled

    monkeypatch.setenv(stages.SLEEP_ENV, "1.0")
    cache, outcome = Cache(), {}

    def go():
        try:
            distributed.run_specs([spec], cache=cache)
        except Cancelled as err:
            outcome["cancelled"] = str(err)

    thread = threading.Thread(target=go)
    thread.start()
    key = spec_key(spec)
    wait_for(lambda: len(score_events(cache)) >= 1, what="a finished sample")
    (cache.run_dir(key) / "cancel").touch()
    thread.join(60)
    assert not thread.is_alive() and "cancelled" in outcome
    st = workers.status(key, cache)
    assert st["stage"] == "cancelled" and not st["running"]
    kept = {e["key"] for e in score_events(cache)}
    monkeypatch.delenv(stages.SLEEP_ENV)
    ((_, folder, error),) = distributed.run_specs([spec], cache=cache)
    assert error is None and not cache.verify_run(key)
    assert kept < {e["key"] for e in score_events(cache)}  # resumed: the kept ones not computed again
    assert len(score_events(cache)) == len({e["key"] for e in score_events(cache)})


def test_a_pair_of_other_shapes_is_refused_before_any_work(cluster, spec, tmp_path):
    """A hand-written pair (registry.json is not re-validated) of two differently shaped models
    ends in an error naming what differs, before any answer is generated."""
    from conftest import make_checkpoint
    from eapcore.specs import ModelSpec

    deeper = make_checkpoint(tmp_path / "deeper", "llama", n_layers=3)
    bad = dataclasses.replace(spec, pair=dataclasses.replace(spec.pair, tuned=ModelSpec(str(deeper))))
    cache = Cache()
    ((_, folder, error),) = distributed.run_specs([bad], cache=cache)
    assert folder is None and "base and tuned have different shapes (n_layers 2 vs 3)" in error
    assert workers.status(spec_key(bad), cache)["stage"] == "error"
    generations = cache.root / "generations"
    assert not generations.exists() or not any(generations.iterdir())
