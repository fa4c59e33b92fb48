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
    assert (out / "sft" / "tokenizer.json").is_file()  # the dashboard decodes answers with it
    assert not (out / "grpo" / "tokenizer.json").exists()  # ... also the RL models' (through ../sft)
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
# What `scripts/gpu_lab.sh` made on an H200 and the repository ships (demo/smollm2/): the adapters,
# runs.zip (the smollm2 preset's runs) and lab_results.json. "The shipped runs match the current
# code": same keys, nothing to compute, metrics reproduced, and a few samples recomputed on the CPU.
SHIPPED = ROOT / "demo" / "smollm2"
REFRESH = ("refresh it: python -m eapcore import demo/smollm2/runs.zip && python -m eapcore sweep --preset smollm2 "
           "&& python -m eapcore export --preset smollm2 --out demo/smollm2/runs.zip (stale scores need a GPU: "
           "scripts/gpu_lab.sh)")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A cache holding the imported bundle, and the preset's run keys under the current code."""
    from eapcore.runs.cache import Cache, import_bundle
    from eapcore.lab.smollm2 import _run_keys

    cache = Cache(tmp_path_factory.mktemp("shipped") / "cache")
    import_bundle(cache, SHIPPED / "runs.zip")
    return cache, _run_keys(["--preset", "smollm2"])


def _files(root: Path) -> dict[str, int]:
    """Every file of the cache with its mtime, but its locks and the file-hash memo (store.HASHES:
    reading model identities fills it, nothing is computed)."""
    from eapcore.store import HASHES

    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and "locks" not in p.relative_to(root).parts and p.name != HASHES}


def test_shipped_runs_are_the_current_preset_and_a_sweep_computes_nothing(shipped, monkeypatch):
    """If the specs, the models, the grading or the scoring change, the keys or the stage entries
    change and the sweep would compute: the bundle must then be refreshed."""
    from eapcore.runs import commands

    cache, keys = shipped
    assert len(keys) == 6
    assert sorted(p.name for p in (cache.root / "runs").iterdir()) == sorted(keys), f"runs.zip is stale: {REFRESH}"
    assert all(cache.verify_run(k) == [] for k in keys)
    before = _files(cache.root)
    monkeypatch.setenv("EAP_CACHE_DIR", str(cache.root))
    assert commands.command_sweep(["--preset", "smollm2", "--quiet"]) == 0
    assert _files(cache.root) == before, f"the sweep recomputed parts of the shipped runs: {REFRESH}"


def test_shipped_metrics_reproduce_and_are_the_lab_results(shipped):
    """metrics.json of every shipped run is what the metrics code computes from its stored scores,
    and lab_results.json reports those same runs and numbers."""
    import numpy as np

    from eapcore.stats import report

    cache, keys = shipped
    for key in keys:
        folder = cache.run_dir(key)
        stored = json.loads((folder / "metrics.json").read_text())
        fresh = report.metrics_result(report.load_scores(folder / "base"), report.load_scores(folder / "tuned"))
        for m in ("activation_intensity", "information_complexity", "kurtosis"):
            for field in ("base", "tuned", "relative_change", "p_value", "n"):
                np.testing.assert_allclose(stored[m][field], fresh[m][field], rtol=1e-9, err_msg=f"{key} {m} {field}")
    results = json.loads((SHIPPED / "lab_results.json").read_text())
    runs = {r["key"]: r for r in results["runs"] if r["grid"] == "shipped"}
    assert sorted(runs) == sorted(keys)
    for key, row in runs.items():
        stored = json.loads((cache.run_dir(key) / "metrics.json").read_text())
        for m, values in row["metrics"].items():
            assert values == {k: stored[m][k] for k in values}, (key, m)
    assert {r["grid"] for r in results["runs"]} == {"shipped", "seeds"}
    assert sum(r["grid"] == "seeds" for r in results["runs"]) == 2 * (len(results["config"]["seeds"]) - 1)


def test_shipped_adapters_decode_the_stored_answers(shipped):
    """The dashboard's Samples page finds a tokenizer for every shipped model (sft/tokenizer.json,
    for grpo/ and dpo/ through their base "../sft"): it turns the stored answer tokens back into
    the stored answer text."""
    from eapcore.harness import first, read_samples
    from eapcore.views import query

    cache, keys = shipped
    for key in keys:
        spec = json.loads((cache.run_dir(key) / "spec.json").read_text())["spec"]
        for which in ("base", "tuned"):
            tok = query.load_tokenizer(spec["pair"][which]["name_or_path"])
            assert tok is not None, spec["pair"][which]["name_or_path"]
            sample = read_samples(cache.run_dir(key) / f"answers_{which}.jsonl")[0][0]
            assert tok.decode(sample.answer_ids, skip_special_tokens=True) == first(sample.extra["code"])


def test_a_few_shipped_samples_recompute_on_the_cpu(shipped, tmp_path, monkeypatch):
    """The GRPO pair's run at alpha 0.5 (both correct), first two questions, each model: the current
    template code gives the stored prompt, the stored answer is the model's greedy answer (the
    argmax after every prefix is the next stored token: what greedy generation produces), and the
    current engine gives the stored scores. They were made on an H200 in float32; on the CPU they
    agree to float32 rounding, which the tiny losses of these confident answers (about 1e-4 nats;
    gradients of 1 - p) amplify to about 1e-3 relative."""
    import dataclasses

    import numpy as np
    import torch

    from eapcore.answers.data import encode_prompt, format_prompt
    from eapcore.engine.attribution import attribute
    from eapcore.engine.models import load_model
    from eapcore.harness import read_samples
    from eapcore.runs import registry
    from eapcore.specs import RunSpec, from_dict
    from eapcore.stats import report

    cache, keys = shipped
    monkeypatch.setenv("EAP_CACHE_DIR", str(tmp_path / "models"))  # GGUF and adapters materialised here
    specs = {k: from_dict(RunSpec, json.loads((cache.run_dir(k) / "spec.json").read_text())["spec"]) for k in keys}
    key = next(k for k, s in specs.items() if s.pair.algorithm == "GRPO" and s.selection.alpha == 0.5
               and s.selection.group == "both_correct")
    spec, folder = specs[key], cache.run_dir(key)
    ids = json.loads((folder / "selection.json").read_text())["idx"][:2]
    for which, model_spec in (("base", spec.pair.base), ("tuned", spec.pair.tuned)):
        model = load_model(registry.resolve_path(model_spec.name_or_path), "float32", "cpu")
        rows = {s.idx: s for s in read_samples(folder / f"answers_{which}.jsonl")[0]}
        samples = [rows[i] for i in ids]
        for s in samples:
            assert encode_prompt(model.tokenizer, format_prompt(s.extra["question"], spec.pair.template,
                                                                model.tokenizer)) == s.prompt_ids, (which, s.idx)
            with torch.no_grad():
                logits = model.hf(torch.tensor([s.prompt_ids + s.answer_ids])).logits[0]
            greedy = logits[len(s.prompt_ids) - 1: -1].argmax(-1).tolist()
            assert greedy == s.answer_ids, (which, s.idx)

        stored = report.load_scores(folder / which)
        assert stored.manifest["sample_ids"][:2] == ids
        result = attribute(model, samples, stored.manifest["cut_len"], spec.attribution)
        mine, theirs = result.scores.numpy()[:, stored.mask], stored.scores[:2][:, stored.mask]
        np.testing.assert_allclose(mine, theirs, rtol=2e-2, atol=1e-2 * np.abs(theirs).max(), err_msg=which)
        np.testing.assert_allclose(result.loss.numpy(), stored.loss[:2], rtol=1e-2, err_msg=which)


# ------------------------------------------------------------------ the README's numbers
# The README's SmolLM2 tables are these rows, made from demo/smollm2/lab_results.json and the
# shipped runs (print them with `python tests/test_lab_smollm2.py`).
METRIC_LABELS = {"activation_intensity": "activation intensity", "information_complexity": "information complexity",
                 "kurtosis": "kurtosis"}


def _acc(row: dict) -> str:
    return f"{100 * row['accuracy']:.1f}% [{100 * row['ci95_low']:.1f}, {100 * row['ci95_high']:.1f}]"


def _p(p: float) -> str:
    return f"{p:.2g}"


def _seed(run: dict) -> int:
    return int(run["pair"].rsplit("seed ", 1)[1].rstrip(")")) if "lab seed" in run["pair"] else 0


def accuracy_rows(results: dict) -> list[str]:
    """model | held-out [CI] | gained / lost vs SFT | McNemar p | "gives" subset | others | GSM8K [CI] | p."""
    names = ["sft"] + [f"{a}-s{s}" for a in ("grpo", "dpo") for s in results["config"]["seeds"]]
    rows = []
    for name in names:
        e = results["eval"][name]
        held, gsm = e["heldout"], e["gsm8k"]
        label = "SFT" if name == "sft" else f"{name[:-3].upper()} seed {name[-1]}"
        mc, gmc = held.get("mcnemar_vs_sft"), gsm.get("mcnemar_vs_sft")
        vs = f"+{mc['b_only']} / -{mc['a_only']} | {_p(mc['p_value'])}" if mc else "- | -"
        rows.append(f"| {label} | {_acc(held)} | {vs} | {_acc(e['heldout_gives_to'])} | {_acc(e['heldout_other'])} "
                    f"| {_acc(gsm)} | {_p(gmc['p_value']) if gmc else '-'} |")
    return rows


def seed_rows(results: dict) -> list[str]:
    """algorithm | metric | each seed's relative change (Wilcoxon p) | mean ± sd | t-test p across seeds,
    at the seed grid's alpha and group."""
    import numpy as np
    from scipy import stats

    alpha, group = results["config"]["sweep_alphas"][-1], results["config"]["sweep_groups"][0]
    rows = []
    for algo in ("GRPO", "DPO"):
        runs = sorted((r for r in results["runs"] if r["alpha"] == alpha and r["group"] == group
                       and f"vs {algo}" in r["pair"]), key=_seed)
        assert [_seed(r) for r in runs] == list(results["config"]["seeds"])
        for m, label in METRIC_LABELS.items():
            values = np.array([r["metrics"][m]["relative_change"] for r in runs])
            cells = " | ".join(f"{r['metrics'][m]['relative_change']:+.1f}% (p={_p(r['metrics'][m]['p_value'])})"
                               for r in runs)
            rows.append(f"| {algo} | {label} | {cells} | {values.mean():+.1f} ± {values.std(ddof=1):.1f}% "
                        f"| {_p(stats.ttest_1samp(values, 0.0).pvalue)} |")
    return rows


def shipped_rows(results: dict, cache) -> list[str]:
    """pair | alpha | group | n | T_cut | the three metrics' relative change (Wilcoxon p) | median
    per-question clean loss ratio tuned / base | Spearman rho of the per-question log ratios of
    intensity and loss, for the shipped runs."""
    import numpy as np
    from scipy import stats

    from eapcore.specs import GROUP_LABELS
    from eapcore.stats import metrics, report

    rows = []
    for r in (r for r in results["runs"] if r["grid"] == "shipped"):
        folder = cache.run_dir(r["key"])
        scores = {w: report.load_scores(folder / w) for w in ("base", "tuned")}
        intensity = {w: metrics.per_sample_metrics(metrics.real_edge_scores(s.scores, s.mask))["activation_intensity"]
                     for w, s in scores.items()}
        loss = scores["tuned"].loss / scores["base"].loss
        rho = stats.spearmanr(np.log(intensity["tuned"] / intensity["base"]), np.log(loss)).statistic
        cells = " | ".join(f"{r['metrics'][m]['relative_change']:+.1f}% (p={_p(r['metrics'][m]['p_value'])})"
                           for m in METRIC_LABELS)
        t_cut = json.loads((folder / "selection.json").read_text())["t_cut"]
        rows.append(f"| {r['pair'].removeprefix('SmolLM2: ')} | {r['alpha']:g} | {GROUP_LABELS[r['group']]} "
                    f"| {r['metrics']['kurtosis']['n']} | {t_cut} | {cells} | {np.median(loss):.2f} | {rho:.2f} |")
    return rows


def test_readme_numbers_are_the_lab_results(shipped):
    readme = (ROOT / "README.md").read_text()
    results = json.loads((SHIPPED / "lab_results.json").read_text())
    for row in accuracy_rows(results) + seed_rows(results) + shipped_rows(results, shipped[0]):
        assert row in readme, row


if __name__ == "__main__":  # print the README's rows
    import tempfile

    from eapcore.runs.cache import Cache, import_bundle

    results = json.loads((SHIPPED / "lab_results.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        cache = Cache(Path(tmp))
        import_bundle(cache, SHIPPED / "runs.zip")
        print("\n".join(accuracy_rows(results) + [""] + seed_rows(results) + [""] + shipped_rows(results, cache)))
