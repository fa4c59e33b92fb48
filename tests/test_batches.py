"""Attribution batches shared by the specs of a sweep: each score key is written by the first
batch that holds it (stages.first_writers), and score_batches writes only those keys."""
from __future__ import annotations

from eapcore.runs import stages
from eapcore.runs.cache import Cache
from eapcore.specs import AttributionSettings, ModelSpec
from test_placement import models, samples  # noqa: F401  (fixture: tiny checkpoints of each family)


def batch(*keys: str, settings=AttributionSettings(device="cpu")) -> stages.ScoreBatch:
    return stages.ScoreBatch(samples=tuple(samples())[:len(keys)], keys=keys, cut_len=5, settings=settings)


def test_first_writers_gives_each_key_to_the_first_batch_that_holds_it():
    spec1 = [batch("a", "b"), batch("c")]
    spec2 = [batch("b", "d"), batch("a", "c"), batch("a", "b")]  # the last one: spec1's first batch again
    out = stages.first_writers(spec1 + spec2)
    assert [b.keys for b in out] == [b.keys for b in spec1 + spec2]  # order and batches kept
    assert [b.writes for b in out] == [(True, True), (True,), (False, True), (False, False), (True, True)]
    written = [k for b in out for k, w in zip(b.keys, b.writes) if w]
    assert sorted(set(written)) == ["a", "b", "c", "d"]  # every key has a writer


def test_score_batches_writes_only_the_keys_its_batch_owns(models, tmp_path):  # noqa: F811
    cache = Cache(tmp_path)
    model = ModelSpec(str(models["llama"]))
    owned = stages.first_writers([batch("x0"), batch("x0", "x1", "x2")])[1]
    assert owned.writes == (False, True, True)
    assert stages.score_batches(cache, model, [owned]) == 2
    assert cache.get("scores", "x0") is None
    entries = [cache.get("scores", k) for k in ("x1", "x2")]
    assert {e.meta["batch"] for e in entries} == {stages.digest(owned.keys)[:16]}
    # a batch that owns nothing loads no model and writes nothing
    assert stages.score_batches(cache, model, [stages.first_writers([owned, batch("x1")])[1]]) == 0
