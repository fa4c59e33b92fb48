"""The real lab's every stage, end to end, on the CPU rehearsal (`--tiny`: a tiny GGUF model, a few
steps): what the GPU run writes, read back; and the shipped SmolLM2 runs, once they exist."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    import os

    from eapcore.lab import smollm2 as L

    root = tmp_path_factory.mktemp("smollm2")
    old = os.environ.get("EAP_CACHE_DIR")
    os.environ["EAP_CACHE_DIR"] = str(root / "cache")
    gsm8k = root / "gsm8k_test.jsonl"
    gsm8k.write_text("".join(json.dumps({"question": f"Tom has {n} apples and buys 2 more. How many now?",
                                         "answer": f"{n} + 2 = {n + 2}\n#### {n + 2:,}"}) + "\n"
                             for n in (3, 5, 998, 7, 1200, 4)))
    out = root / "lab"
    cfg = L.Config.tiny_config()
    try:
        results = L.run(out, cfg, L.STAGES, None, gsm8k, log=lambda m: None)
        yield out, cfg, results, root
    finally:
        if old is None:
            os.environ.pop("EAP_CACHE_DIR", None)
        else:
            os.environ["EAP_CACHE_DIR"] = old


def _adapter(folder: Path):
    from safetensors.torch import load_file

    return json.loads((folder / "adapter_config.json").read_text()), load_file(folder / "adapter_model.safetensors")


def test_adapters_are_small_bf16_and_name_their_base_relatively(lab):
    import torch

    from eapcore.lab.smollm2 import model_dir

    out, cfg, _, _ = lab
    cfg_sft, w_sft = _adapter(out / "sft")
    assert cfg_sft["base_model_name_or_path"] == "../tiny.gguf" and cfg_sft["r"] == cfg.sft_rank
    assert all(t.dtype == torch.bfloat16 for t in w_sft.values())
    for algo in ("grpo", "dpo"):
        for seed in cfg.seeds:
            folder = model_dir(out, algo, seed)
            conf, weights = _adapter(folder)
            assert conf["base_model_name_or_path"] == "../sft" and conf["r"] == cfg.rl_rank
            # LoRA on every linear layer: q k v o gate up down, A and B each
            assert len(weights) == 7 * 2 * 2  # 2 layers in the tiny model
            assert json.loads((folder / "train.json").read_text())["steps"] >= 1
    assert (out / "dpo").is_dir() and (out / "dpo-s1").is_dir() and not (out / "dpo-s0").exists()
    # DPO moved the model (its B matrices are not zero: it has a gradient even where no sample is right)
    assert any(t.abs().max() > 0 for k, t in _adapter(out / "dpo")[1].items() if "lora_B" in k)


def test_results_hold_every_model_with_consistent_statistics(lab):
    from eapcore.lab import stats
    from eapcore.lab.smollm2 import splits

    out, cfg, results, _ = lab
    on_disk = json.loads((out / "lab_results.json").read_text())
    assert on_disk["eval"] == json.loads(json.dumps(results["eval"]))
    names = {"sft"} | {f"{a}-s{s}" for a in ("grpo", "dpo") for s in cfg.seeds}
    assert set(results["eval"]) == names == set(results["outcomes"])
    _, test = splits(cfg)
    sft = [c == "1" for c in results["outcomes"]["sft"]["heldout"]]
    for name, row in results["eval"].items():
        flags = results["outcomes"][name]
        assert len(flags["heldout"]) == len(test) == row["heldout"]["n"]
        assert len(flags["gsm8k"]) == 6 == row["gsm8k"]["n"]
        mine = [c == "1" for c in flags["heldout"]]
        assert row["heldout"] == {**stats.summarize(mine), **({"mcnemar_vs_sft": row["heldout"]["mcnemar_vs_sft"]}
                                                                if name != "sft" else {})}
        if name != "sft":
            assert row["heldout"]["mcnemar_vs_sft"] == stats.mcnemar_exact(sft, mine)
            assert row["train_steps"] >= 1
        assert row["heldout_gives_to"]["n"] + row["heldout_other"]["n"] == len(test)
    assert results["dpo_pairs"] >= 1 and (out / "pairs.jsonl").is_file()
    from eapcore.store import sha256_file
    assert results["problems_test_sha256"] == sha256_file(out / "problems_test.jsonl")


def test_runs_are_swept_and_bundled(lab, tmp_path):
    from eapcore.runs.cache import Cache, import_bundle
    from eapcore.lab.smollm2 import _run_keys, _shipped_grid

    out, cfg, results, root = lab
    grids = {r["grid"] for r in results["runs"]}
    assert grids == {"shipped", "seeds"}
    tuned = {r["tuned"] for r in results["runs"]}
    assert tuned == {str((out / n).resolve()) for n in ("grpo", "dpo", "grpo-s1", "dpo-s1")}
    for r in results["runs"]:
        assert set(r["metrics"]) == {"activation_intensity", "information_complexity", "kurtosis"}
        assert r["metrics"]["kurtosis"]["n"] == cfg.sweep_n
    fresh = Cache(tmp_path / "imported")
    import_bundle(fresh, out / "runs.zip")
    import os
    os.environ["EAP_REGISTRY"] = str(out / "lab_registry.json")
    try:
        keys = _run_keys(_shipped_grid(out, cfg))
    finally:
        os.environ.pop("EAP_REGISTRY")
    assert sorted(p.name for p in (fresh.root / "runs").iterdir()) == sorted(keys)
    assert all(fresh.verify_run(k) == [] for k in keys)


def test_a_second_run_resumes_without_training_again(lab):
    from eapcore.lab import smollm2 as L

    out, cfg, _, root = lab
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/adapter_model.safetensors")}
    L.run(out, cfg, ("sft", "pairs", "rl", "eval"), None, None, log=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/adapter_model.safetensors")} == stamps


def test_a_near_deadline_skips_stages_and_says_so(tmp_path):
    import time

    from eapcore.lab import smollm2 as L

    said = []
    L.run(tmp_path, L.Config(), ("sft", "pairs"), deadline=time.time() + 5, gsm8k=None, log=said.append)
    assert any(m.startswith("sft: skipped") for m in said) and any(m.startswith("pairs: skipped") for m in said)
    assert not (tmp_path / "sft").exists()


# ------------------------------------------------------------------ the shipped SmolLM2 runs
BUNDLE = ROOT / "demo" / "smollm2" / "runs.zip"


def test_shipped_smollm2_runs_are_the_current_preset_and_reproduce(tmp_path):
    """After the GPU run (scripts/gpu_lab.sh B) ships demo/smollm2/: the bundle holds exactly the
    preset's runs under the current code, intact, with metrics that the metrics code reproduces."""
    if not BUNDLE.is_file():
        pytest.skip("demo/smollm2/runs.zip not shipped yet (scripts/gpu_lab.sh B on a GPU)")
    import numpy as np

    from eapcore.stats import metrics
    from eapcore.runs.cache import Cache, import_bundle
    from eapcore.lab.smollm2 import _run_keys

    keys = _run_keys(["--preset", "smollm2"])
    cache = Cache(tmp_path / "cache")
    import_bundle(cache, BUNDLE)
    assert sorted(p.name for p in (cache.root / "runs").iterdir()) == sorted(keys), \
        "demo/smollm2/runs.zip is stale: re-run the smollm2 sweep and export it"
    for key in keys:
        assert cache.verify_run(key) == []
        folder = cache.run_dir(key)
        stored = json.loads((folder / "metrics.json").read_text())
        tuned = metrics.load_scores(folder / "tuned")
        fresh = metrics.compute_metrics(metrics.real_edge_scores(tuned.scores, tuned.mask), metrics.MetricSettings())
        for m in metrics.METRICS:
            np.testing.assert_allclose(stored[m]["tuned"], fresh[m], rtol=1e-9)
