"""A model's layers over several devices: the placement (a pure function, against brute force)
and the engine on a model spread over CPU devices of their own ("cpu:0", "cpu:1", ...: the same
memory, but every per-device store, gather and move of the multi-device path runs), whose
scores equal the single-device scores bit for bit. tests/test_gpu.py runs it on 2 GPUs."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from conftest import make_checkpoint
from eapcore.engine import placement
from eapcore.engine.attribution import EngineOptions, attribute_batch, graph_of, layer_segments, make_batch
from eapcore.engine.models import ModelLoadError, load_model
from eapcore.harness import Sample


def worst_ratio(layer_bytes, caps, first, last, devices) -> float:
    loads = [0.0] * len(caps)
    loads[devices[0]] += first
    for b, d in zip(layer_bytes, devices):
        loads[d] += b
    loads[devices[-1]] += last
    return max(load / c for load, c in zip(loads, caps))


def brute_force(layer_bytes, caps, first, last) -> float:
    """The smallest worst load/capacity over every contiguous, in-order placement."""
    n, best = len(layer_bytes), float("inf")
    for cuts in itertools.combinations_with_replacement(range(n + 1), len(caps) - 1):
        bounds = (0, *cuts, n)
        devices = [d for d in range(len(caps)) for _ in range(bounds[d + 1] - bounds[d])]
        best = min(best, worst_ratio(layer_bytes, caps, first, last, devices))
    return best


def test_place_layers_is_balanced_contiguous_and_optimal():
    assert placement.place_layers([10] * 8, [100, 100]) == [0] * 4 + [1] * 4
    assert placement.place_layers([10] * 8, [100, 100], first_bytes=20) == [0] * 3 + [1] * 5  # the embedding
    assert placement.place_layers([10] * 8, [100, 100], last_bytes=20) == [0] * 5 + [1] * 3  # the head
    assert placement.place_layers([10] * 9, [200, 100]) == [0] * 6 + [1] * 3  # by capacity
    rng = random.Random(0)
    for _ in range(200):
        layers = [rng.randint(1, 20) for _ in range(rng.randint(1, 7))]
        caps = [rng.randint(40, 120) for _ in range(rng.randint(1, 3))]
        first, last = rng.randint(0, 15), rng.randint(0, 15)
        best = brute_force(layers, caps, first, last)
        if best > 1:
            with pytest.raises(ValueError, match="does not fit"):
                placement.place_layers(layers, caps, first, last)
            continue
        devices = placement.place_layers(layers, caps, first, last)
        assert devices == sorted(devices) and len(devices) == len(layers)
        assert worst_ratio(layers, caps, first, last, devices) == pytest.approx(best, rel=1e-9)


def test_a_model_too_large_is_refused_with_the_sizes():
    with pytest.raises(ValueError, match=r"needs 0.00 GB and does not fit in 2 device\(s\)"):
        placement.place_layers([10] * 4, [15, 15], 5, 5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spread")
    return {arch: make_checkpoint(root / arch, arch, seed=3, n_layers=4) for arch in ("llama", "gpt2", "olmo2")}


def samples():
    g = torch.Generator().manual_seed(5)
    return [Sample(i, torch.randint(4, 90, (6 + 2 * i,), generator=g).tolist(),
                   torch.randint(4, 90, (9,), generator=g).tolist()) for i in range(3)]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "olmo2"])  # gpt2: tied embeddings, with the head
def test_spread_model_scores_equal_single_device(models, arch):
    one = load_model(str(models[arch]), devices=None, device="cpu")
    spread = load_model(str(models[arch]), devices=["cpu:0", "cpu:1", "cpu:2"])  # checked against its own forward
    segments = layer_segments(spread.adapter)
    assert [d.index for d, _ in segments] == [0, 1, 2] and [len(r) for _, r in segments] in ([2, 1, 1], [1, 2, 1], [1, 1, 2])
    assert spread.adapter.head_device == torch.device("cpu:2")
    assert spread.adapter.embed_device == torch.device("cpu:2" if arch == "gpt2" else "cpu:0")
    batch = make_batch(samples(), 5, one.hf.get_input_embeddings().num_embeddings)
    for granularity, ablation, steps, keep in [("layer", "zero", 0, None), ("head", "zero", 0, None),
                                               ("layer", "zero", 0, 1), ("head", "zero", 2, None)]:
        graph = graph_of(one.adapter, granularity)
        opts = EngineOptions(keep_graph_layers=keep, position_chunk=4 if granularity == "head" else 0)
        ref, ref_loss = attribute_batch(one, batch, graph, ig_steps=steps, opts=opts)
        out, loss = attribute_batch(spread, batch, graph, ig_steps=steps, opts=opts)
        assert torch.equal(out, ref) and torch.equal(loss, ref_loss), (granularity, steps, keep)
        assert ref.abs().sum() > 0


def test_spread_corrupted_eap_equals_single_device(models):
    one = load_model(str(models["llama"]), device="cpu")
    spread = load_model(str(models["llama"]), devices=["cpu:0", "cpu:1"])
    clean, corrupt = samples(), [Sample(s.idx, s.prompt_ids[::-1], s.answer_ids) for s in samples()]
    batch = make_batch(clean, 5, one.hf.get_input_embeddings().num_embeddings, corrupt=corrupt)
    graph = graph_of(one.adapter, "head")
    ref, _ = attribute_batch(one, batch, graph, ablation="corrupted")
    out, _ = attribute_batch(spread, batch, graph, ablation="corrupted")
    assert torch.equal(out, ref) and ref.abs().sum() > 0


def test_cuda_devices_on_a_machine_without_them_are_refused(models):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load_model(str(models["llama"]), devices=["cuda:0", "cuda:1"])


def test_the_plan_spreads_a_model_that_does_not_fit_one_gpu(models, monkeypatch):
    """predict_memory on a (pretended) host of GPUs: the fewest GPUs whose share of the weights
    plus one sample fits, and none beyond the host's."""
    import eapcore.engine.models
    from eapcore.runs import memory
    from eapcore.specs import ModelSpec, PairSpec, RunSpec, DatasetSpec

    monkeypatch.setattr(eapcore.engine.models, "resolve_device", lambda device="auto": torch.device("cuda"))
    monkeypatch.setattr(memory, "_gpu_count", lambda device: 4)
    model = ModelSpec(str(models["llama"]))
    spec = RunSpec(PairSpec("p", model, model), DatasetSpec("d"))
    monkeypatch.setattr(memory, "_available_bytes", lambda device: 10 ** 15)
    roomy = memory.predict_memory(spec, sample_tokens=40)
    assert roomy["devices"] == 1 and roomy["fits"]
    weights, activations = roomy["model_bytes"], roomy["bytes_needed"] - roomy["model_bytes"]
    monkeypatch.setattr(memory, "_available_bytes", lambda device: int((activations + 0.6 * weights) / 0.9))
    spread = memory.predict_memory(spec, sample_tokens=40)
    assert spread["fits"] and spread["devices"] == 2 and "2 GPUs (layers spread)" in spread["message"]
    assert spread["bytes_needed"] <= 0.9 * spread["bytes_available"] < activations + weights
    assert not memory.predict_memory(spec, sample_tokens=40, max_devices=1)["fits"]


def test_score_batches_on_a_spread_model_writes_the_same_entries(models, tmp_path, monkeypatch):
    """stages.score_batches with a plan of 2 devices (on a CPU: cpu:0 and cpu:1) writes the
    entries a 1-device plan writes, byte for byte."""
    import eapcore.engine.models
    from eapcore.runs import stages
    from eapcore.runs.cache import Cache
    from eapcore.specs import AttributionSettings, ModelSpec

    loaded = []
    load = eapcore.engine.models.load_model
    monkeypatch.setattr(eapcore.engine.models, "load_model",
                        lambda *a, **kw: loaded.append(load(*a, **kw)) or loaded[-1])

    att = AttributionSettings(device="cpu", granularity="head")
    model = ModelSpec(str(models["olmo2"]))
    batch = dict(samples=tuple(samples()), keys=("s0", "s1", "s2"), cut_len=5, settings=att)
    one, two = Cache(tmp_path / "one"), Cache(tmp_path / "two")
    assert stages.score_batches(one, model, [stages.ScoreBatch(**batch)]) == 3
    assert stages.score_batches(two, model, [stages.ScoreBatch(**batch, devices=2)]) == 3
    assert [m.adapter.device_map for m in loaded] == [None, [torch.device("cpu:0")] * 2 + [torch.device("cpu:1")] * 2]
    for key in batch["keys"]:
        a, b = one.get("scores", key), two.get("scores", key)
        assert a.file("scores.safetensors").read_bytes() == b.file("scores.safetensors").read_bytes()
        assert b.meta["device"] == "cpu"
