"""Write realistic finished runs into a cache folder (DESIGN.md "A finished run in the cache").

Used by the dashboard tests and benchmarks until real runs exist. Everything a page reads is
there: spec.json, status.json, graded answers of the whole dataset, selection.json, the two
`attribute` output directories (random scores on the real Graph mask), metrics.json computed
with eapcore.stats.analysis.paired_comparison (the same function the `metrics` stage uses) and
the manifest.json of checksums that seals a finished run.

    python tests/fake_runs.py DIR [--paper]     # then EAP_CACHE_DIR=DIR streamlit run app.py
"""
from __future__ import annotations

import argparse
import json
import string
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from eapcore.runs.cache import Cache  # noqa: E402
from eapcore.specs import (AttributionSettings, DatasetSpec, ModelSpec, PairSpec, RunSpec,  # noqa: E402
                           SelectionSettings, spec_key, to_dict)

CHARS = list(string.printable)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}


def write_char_tokenizer(folder: Path) -> Path:
    """A char-level tokenizer.json (the `tokenizers` format) so pages can decode token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "note": "fake test model"}))
    return folder


def encode(text: str) -> list[int]:
    return [VOCAB.get(c, VOCAB["<unk>"]) for c in text]


def _questions(n: int, rng: np.random.Generator) -> list[dict]:
    out = []
    for i in range(n):
        a, b, c = (int(x) for x in rng.integers(2, 60, size=3))
        out.append({"idx": i, "question": f"Tom has {a} apples, buys {b} more and gives away {c}. "
                                          f"How many apples does Tom have now?", "gt": str(a + b - c),
                    "parts": (a, b, c)})
    return out


def _answer(q: dict, correct: bool, verbose: int, rng: np.random.Generator) -> tuple[str, str]:
    """(answer text, prediction): steps separated by blank lines, as models write them; a wrong
    answer ends without a boxed value one time in three (prediction "")."""
    a, b, c = q["parts"]
    result = a + b - c if correct else a + b - c + int(rng.choice([-3, -1, 1, 2, 10]))
    steps = [f"Tom starts with {a} apples.", f"After buying {b} more he has {a} + {b} = {a + b}.",
             f"Giving away {c} leaves {a + b} - {c} = {result}."]
    text = "\n\n".join(steps) + " Let me double-check each step carefully." * verbose
    if not correct and rng.random() < 1 / 3:
        return f"{text} So Tom has {result} apples, I think.", ""
    return f"{text} The answer is \\boxed{{{result}}}.", str(result)


def _scores(graph, n: int, rng: np.random.Generator, tuned: bool, effect: float,
            per_sample: np.ndarray) -> np.ndarray:
    """[n, F, B] float32 on the real-edge mask: heavy-tailed |s| with structure by layer and type,
    times per_sample [n] (each question's scale, the same for both models of a run).

    The tuned model gets larger and more evenly spread scores in later layers (the paper's pattern:
    intensity up, entropy up, kurtosis down) scaled by `effect` (0: no change, <0: reversed)."""
    mask = graph.real_edge_mask.numpy()
    F, B = mask.shape
    L = graph.n_layers
    # per-edge scale: sources near the destination and MLP destinations matter more
    src_pos = np.linspace(0, 1, F)[:, None]
    dst_pos = np.linspace(0, 1, B)[None, :]
    scale = 1e-3 * np.exp(-2.5 * np.clip(dst_pos - src_pos, 0, None)) * (1 + 2 * (dst_pos > 1 - 1 / (2 * L)))
    mlp_dst = np.array([name.startswith("m") for name in graph.backward])[None, :]
    scale = scale * np.where(mlp_dst, 1.8, 1.0)
    if tuned:
        scale = scale * (1 + effect * (0.15 + 0.5 * dst_pos))
    df = 3.0 if not tuned else 3.0 + 2.0 * max(effect, 0)  # tuned: lighter tails -> lower kurtosis
    mag = np.abs(rng.standard_t(df, size=(n, F, B)))
    sign = np.where(rng.random((n, F, B)) < 0.55, 1.0, -1.0)
    s = (sign * mag * scale[None] * per_sample[:, None, None]).astype(np.float32)
    s[:, ~mask] = 0.0
    return s


def make_run(root: Path, *, pair: str = "Demo-Tiny", dataset: str = "gsm8k", alpha: float = 0.5,
             group: str = "both_correct", granularity: str = "layer", n_layers: int = 4,
             n_heads: int = 4, n_kv_heads: int = 2, n: int = 12, n_questions: int = 40,
             acc_base: float = 0.55, acc_tuned: float = 0.75, effect: float = 1.0, seed: int = 0,
             algorithm: str = "GRPO", n_bootstrap: int = 200, n_permutations: int = 999,
             models_dir: Path | None = None, family: str = "", models: tuple[str, str] | None = None) -> str:
    """Write one finished run under root/runs/<key>/ and return its key. `models`: the base and
    tuned model folders' names (default: from the pair's name), so pairs of a `family` share models."""
    import torch  # noqa: F401  (Graph's mask is a torch tensor)
    from safetensors.numpy import save_file

    from eapcore.stats.analysis import paired_comparison
    from eapcore.graph import Graph
    from eapcore.stats.metrics import real_edge_scores
    from eapcore.stats.report import _jsonable

    root = Path(root)
    models_dir = models_dir or root / "models"
    rng = np.random.default_rng([seed, sum(map(ord, pair + dataset + group + granularity))])
    base_dir, tuned_dir = (write_char_tokenizer(models_dir / name)
                           for name in models or (f"{pair.lower()}-base", f"{pair.lower()}-tuned"))
    spec = RunSpec(
        pair=PairSpec(pair, ModelSpec(str(base_dir)), ModelSpec(str(tuned_dir)), algorithm=algorithm, family=family),
        dataset=DatasetSpec(dataset),
        selection=SelectionSettings(alpha=alpha, n=n, group=group),
        attribution=AttributionSettings(granularity=granularity),
    )
    key = spec_key(spec)
    run = root / "runs" / key
    run.mkdir(parents=True, exist_ok=True)
    (run / "spec.json").write_text(json.dumps({"key": key, "spec": to_dict(spec)}, indent=1))

    # answers of the whole dataset (same questions each run of this pair/dataset)
    qrng = np.random.default_rng(sum(map(ord, pair + dataset)))
    questions = _questions(n_questions, qrng)
    correct_b = qrng.random(n_questions) < acc_base
    correct_t = qrng.random(n_questions) < acc_tuned
    lengths = {}
    for which, correct in (("base", correct_b), ("tuned", correct_t)):
        rows = []
        for q, ok in zip(questions, correct):
            text, pred = _answer(q, bool(ok), int(qrng.integers(0, 3 if which == "base" else 4)), qrng)
            prompt = f"User: {q['question']}\nPlease reason step by step, and put your final answer " \
                     f"within \\boxed{{}}.\n\nAssistant:"
            ids = encode(text) + [VOCAB["</s>"]]
            lengths.setdefault(which, {})[q["idx"]] = len(ids)
            rows.append({"idx": q["idx"], "prompt_token_ids": encode(prompt), "generate_token_ids": [ids],
                         "question": q["question"], "gt": q["gt"], "pred": [pred], "score": [bool(ok)],
                         "code": [text]})
        with open(run / f"answers_{which}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)

    groups = {"both_correct": correct_b & correct_t, "both_wrong": ~correct_b & ~correct_t,
              "base_only": correct_b & ~correct_t, "tuned_only": ~correct_b & correct_t}
    members = [q["idx"] for q, keep in zip(questions, groups[group]) if keep]
    if len(members) < 2:
        raise ValueError(f"fake run {pair}/{dataset}/{group}: only {len(members)} questions in the group")
    t_ref = int(min(np.mean([lengths["base"][i] for i in members]), np.mean([lengths["tuned"][i] for i in members])))
    t_cut = max(int(alpha * t_ref), 1)
    kept = sorted(rng.choice(members, size=min(n, len(members)), replace=False).tolist())
    (run / "selection.json").write_text(json.dumps({
        "t_ref": t_ref, "t_cut": t_cut, "idx": kept,
        "counts": {"group": len(members), "prompt_len": len(members), "length_window": len(members),
                   "length_ratio": len(members), "drawn": len(kept)},
        "settings": to_dict(spec.selection)}, indent=1))

    graph = Graph(n_layers, n_heads, n_kv_heads, granularity)
    mats = {}
    question_scale = rng.lognormal(0, 0.25, size=len(kept))
    for which, model_dir in (("base", base_dir), ("tuned", tuned_dir)):
        out = run / which
        out.mkdir(exist_ok=True)
        s = _scores(graph, len(kept), rng, which == "tuned", effect, question_scale)
        mats[which] = s
        save_file({"scores": s, "real_edge_mask": graph.real_edge_mask.numpy(),
                   "loss": rng.uniform(0.2, 1.5, len(kept)).astype(np.float32)}, str(out / "scores.safetensors"))
        graph.save(out / "graph.json")
        (out / "manifest.json").write_text(json.dumps({
            "model": str(model_dir), "sample_ids": kept, "cut_len": t_cut,
            "settings": to_dict(spec.attribution), "scoring_version": spec.scoring_version,
            "versions": {"fake": "tests/fake_runs.py"}}, indent=1))

    mask = graph.real_edge_mask.numpy()
    result = paired_comparison(real_edge_scores(mats["base"], mask), real_edge_scores(mats["tuned"], mask),
                               n_bootstrap=n_bootstrap, n_permutations=n_permutations, seed=0)
    metrics = {"base_dir": str(run / "base"), "tuned_dir": str(run / "tuned"),
               "base_model": str(base_dir), "tuned_model": str(tuned_dir), "granularity": granularity,
               "n_real_edges": int(mask.sum()), "sample_ids": kept,
               "settings": {"entropy": "pooled", "kurtosis": "fisher", "kurtosis_of": "signed",
                            "histogram_bins": 100},
               "bootstrap": n_bootstrap, "permutations": n_permutations, "confidence": 0.95, "seed": 0,
               **result}
    (run / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2))
    (run / "status.json").write_text(json.dumps({
        "stage": "done", "done": len(kept), "total": len(kept), "rate": 0.0, "eta_s": 0.0,
        "gpu_mem_gb": 0.0, "message": "fake run (tests/fake_runs.py)", "error": None,
        "updated": time.time()}))
    Cache(root).seal_run(key, [], skip=("status.json",))  # checksums, as the runner seals a finished run
    return key


def make_small_cache(root: Path) -> dict[str, str]:
    """The test cache: 2 pairs x 2 datasets x 2 alphas (both_correct, layer), the other three
    answer groups of one pair/dataset/alpha, and one head-granularity run. Returns {name: key}."""
    keys = {}
    for pair, effect, algo in (("Demo-Tiny", 1.0, "GRPO"), ("Toy-DPO", -0.2, "DPO")):
        for dataset in ("gsm8k", "math500"):
            for alpha in (0.1, 0.5):
                keys[f"{pair}/{dataset}/{alpha}"] = make_run(
                    root, pair=pair, dataset=dataset, alpha=alpha, effect=effect, algorithm=algo,
                    acc_base=0.55, acc_tuned=0.8 if effect > 0 else 0.6, seed=int(alpha * 10))
    for group in ("both_wrong", "base_only", "tuned_only"):
        keys[f"Demo-Tiny/gsm8k/0.5/{group}"] = make_run(root, pair="Demo-Tiny", dataset="gsm8k", alpha=0.5,
                                                         group=group, acc_base=0.55, acc_tuned=0.8, seed=5)
    keys["Demo-Tiny/gsm8k/0.5/head"] = make_run(root, pair="Demo-Tiny", dataset="gsm8k", alpha=0.5,
                                                granularity="head", acc_base=0.55, acc_tuned=0.8, seed=5)
    return keys


def make_paper_run(root: Path, alpha: float = 0.5) -> str:
    """A paper-sized run: 100 samples, 28 layers (Qwen2-7B-like: 28 / 4 heads), layer granularity:
    scores [100, 57, 113]. Runs of several alphas score the same questions."""
    return make_run(root, pair="Paper-Sized", dataset="math500", alpha=alpha, n_layers=28, n_heads=28,
                    n_kv_heads=4, n=100, n_questions=200, acc_base=0.8, acc_tuned=0.9, n_bootstrap=1000,
                    n_permutations=9999, algorithm="GRPO")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", help="cache folder to fill (use it as EAP_CACHE_DIR)")
    p.add_argument("--paper", action="store_true", help="also write the paper-sized run")
    args = p.parse_args(argv)
    keys = make_small_cache(Path(args.root))
    if args.paper:
        keys["paper"] = make_paper_run(Path(args.root))
    for name, key in keys.items():
        print(f"{key}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
