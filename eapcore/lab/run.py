"""`python -m eapcore lab`: build the demo pairs (SFT -> GRPO, SFT -> DPO) in one command.

Stages, each reading the previous stage's saved folder:
  data   synthetic problems: a train split (in memory, regenerated from the seed) and a held-out
         test split written as <out>/problems_test.jsonl
  sft    tokenizer + tiny Llama from scratch, SFT on worked solutions -> <out>/sft
  grpo   TRL GRPOTrainer from <out>/sft, reward = boxed answer correct -> <out>/grpo
  dpo    fixed pairs from the SFT model's own samples (correct vs wrong), TRL DPOTrainer -> <out>/dpo
  eval   greedy accuracy of each model on the test split, Wilson 95% CIs, exact McNemar tests
         -> <out>/lab_results.json (and a markdown report with --report)
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .problems import (LEVELS, TEMPLATE, TEMPLATE_NAME, Problem, build_prompt, has_confusable_step,
                       make_splits)
from . import stats

MAX_NEW_TOKENS = 64  # generation budget the demo pairs need (longest reference: 34 tokens + eos)


@dataclass(frozen=True)
class LabConfig:
    seed: int = 0
    n_train: int = 40000
    n_test: int = 1200
    threads: int = 2
    # fraction of train solutions in which the teacher misreads "gives N ... to Q" as an addition
    confusion: float = 0.6
    # SFT
    sft_steps: int = 1200
    sft_batch: int = 32
    sft_lr: float = 1e-3
    sft_schedule: str = "cosine"
    # GRPO
    grpo_steps: int = 200
    grpo_prompts: int = 4
    grpo_generations: int = 16
    grpo_lr: float = 3e-5
    grpo_beta: float = 0.0
    # policy loss only on the top quantile of tokens by entropy ("Beyond the 80/20 rule"; 1.0 = all)
    grpo_entropy_quantile: float = 1.0
    grpo_levels: tuple[int, ...] = (1, 2, 3)
    # DPO
    pair_prompts: int = 2000
    pair_samples: int = 4
    dpo_steps: int = 100
    dpo_batch: int = 32
    dpo_lr: float = 1e-5
    dpo_beta: float = 0.1
    dpo_sft_weight: float = 1.0  # RPO: plain DPO (0.0) collapsed to 52.9% here
    dpo_reference_fallback: bool = False  # smoke runs only: see train.preference_pairs
    # model
    hidden: int = 128
    layers: int = 4

    @classmethod
    def quick(cls) -> "LabConfig":
        """A reduced budget that runs in about a minute (for tests and smoke runs)."""
        return cls(n_train=2000, n_test=60, sft_steps=30, sft_lr=3e-3, grpo_steps=4, grpo_prompts=2,
                   grpo_generations=4, pair_prompts=40, pair_samples=4, dpo_steps=4, dpo_batch=8,
                   dpo_reference_fallback=True, hidden=32, layers=2)


def _level_table(problems: list[Problem], outcomes: list[bool]) -> dict[str, Any]:
    table = {}
    for level in LEVELS:
        sel = [o for o, p in zip(outcomes, problems) if p.level == level]
        if sel:
            table[str(level)] = stats.summarize(sel)
    return table


def _reward_curve(logs: list[dict[str, Any]], chunks: int = 5) -> list[dict[str, float]]:
    rows = [(l["step"], l["reward"]) for l in logs if "reward" in l and "train_runtime" not in l]
    if not rows:
        return []
    size = max(1, len(rows) // chunks)
    out = []
    for i in range(0, len(rows), size):
        part = rows[i:i + size]
        out.append({"steps": f"{part[0][0]}-{part[-1][0]}",
                    "mean_reward": sum(r for _, r in part) / len(part)})
    return out


def run_lab(out: Path, cfg: LabConfig, stages: tuple[str, ...] = ("sft", "grpo", "dpo", "eval"),
            report: Path | None = None, log=print, sft_device: str = "cpu") -> dict[str, Any]:
    import torch

    from . import train as T
    from .model import build_model, build_tokenizer
    from eapcore.harness import write_jsonl

    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    results_path = out / "lab_results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["config"] = asdict(cfg)
    results.setdefault("timings_s", {})

    t = time.time()
    train, test = make_splits(cfg.n_train, cfg.n_test, seed=cfg.seed, confusion=cfg.confusion)
    write_jsonl(out / "problems_test.jsonl", (p.to_row() for p in test))
    times["data"] = time.time() - t
    log(f"data: {len(train)} train / {len(test)} test problems ({times['data']:.1f} s)")

    if "sft" in stages:
        t = time.time()
        tok = build_tokenizer([build_prompt(p.question) + p.solution for p in train + test])
        model = build_model(tok, hidden=cfg.hidden, layers=cfg.layers,
                            intermediate=4 * cfg.hidden, seed=cfg.seed).to(sft_device)
        r = T.sft(model, tok, train, out / "sft", steps=cfg.sft_steps, batch_size=cfg.sft_batch,
                  lr=cfg.sft_lr, seed=cfg.seed, schedule=cfg.sft_schedule)
        times["sft"] = time.time() - t
        results["sft_loss"] = [{"step": l["step"], "loss": l["loss"]} for l in r["logs"] if "loss" in l]
        log(f"sft: {cfg.sft_steps} steps in {times['sft']:.0f} s")

    if "grpo" in stages:
        t = time.time()
        pool = [p for p in train if p.level in cfg.grpo_levels]
        r = T.grpo(out / "sft", pool, out / "grpo", steps=cfg.grpo_steps,
                   prompts_per_step=cfg.grpo_prompts, num_generations=cfg.grpo_generations,
                   lr=cfg.grpo_lr, beta=cfg.grpo_beta, seed=cfg.seed,
                   top_entropy_quantile=cfg.grpo_entropy_quantile)
        shutil.rmtree(out / "grpo" / "_trainer", ignore_errors=True)
        times["grpo"] = time.time() - t
        results["grpo_reward_curve"] = _reward_curve(r["logs"])
        log(f"grpo: {cfg.grpo_steps} steps in {times['grpo']:.0f} s; reward {results['grpo_reward_curve']}")

    if "dpo" in stages:
        t = time.time()
        model, tok = T.load(out / "sft")
        pool = train[-cfg.pair_prompts:]  # fixed prompts, built once before training
        pairs = T.preference_pairs(model, tok, pool, cfg.pair_samples, seed=cfg.seed + 7,
                                   max_new_tokens=MAX_NEW_TOKENS,
                                   reference_fallback=cfg.dpo_reference_fallback)
        times["dpo_pairs"] = time.time() - t
        results["dpo_pairs"] = len(pairs)
        if not pairs:
            raise RuntimeError("no preference pairs: the SFT model has no problem with both a correct "
                               "and a wrong sample; train SFT longer or sample more")
        t = time.time()
        r = T.dpo(out / "sft", pairs, out / "dpo", steps=cfg.dpo_steps, batch_size=cfg.dpo_batch,
                  lr=cfg.dpo_lr, beta=cfg.dpo_beta, seed=cfg.seed, sft_weight=cfg.dpo_sft_weight)
        shutil.rmtree(out / "dpo" / "_trainer", ignore_errors=True)
        times["dpo"] = time.time() - t
        results["dpo_loss"] = [{"step": l["step"], "loss": l["loss"]} for l in r["logs"] if "loss" in l]
        log(f"dpo: {len(pairs)} pairs ({times['dpo_pairs']:.0f} s), {cfg.dpo_steps} steps in {times['dpo']:.0f} s")

    if "eval" in stages:
        t = time.time()
        outcomes: dict[str, list[bool]] = {}
        for name in ("sft", "grpo", "dpo"):
            if (out / name / "config.json").is_file():
                model, tok = T.load(out / name)
                outcomes[name] = T.evaluate(model, tok, test, MAX_NEW_TOKENS)
        evals: dict[str, Any] = {}
        for name, oc in outcomes.items():
            trap = [has_confusable_step(p.question) for p in test]
            evals[name] = {**stats.summarize(oc), "per_level": _level_table(test, oc),
                           "gives_to": stats.summarize([o for o, t in zip(oc, trap) if t]),
                           "other": stats.summarize([o for o, t in zip(oc, trap) if not t])}
            if name != "sft" and "sft" in outcomes:
                evals[name]["mcnemar_vs_sft"] = stats.mcnemar_exact(outcomes["sft"], oc)
        results["eval"] = evals
        results["outcomes"] = {k: "".join("1" if o else "0" for o in v) for k, v in outcomes.items()}
        times["eval"] = time.time() - t
        for name, e in evals.items():
            log(f"eval {name}: {e['accuracy']:.3f} [{e['ci95_low']:.3f}, {e['ci95_high']:.3f}]"
                + (f" McNemar p={e['mcnemar_vs_sft']['p_value']:.2g}" if "mcnemar_vs_sft" in e else ""))

    results["timings_s"].update({k: round(v, 1) for k, v in times.items()})
    results["template"] = {"name": TEMPLATE_NAME, "text": TEMPLATE}
    results["max_new_tokens"] = MAX_NEW_TOKENS
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(render_markdown(results))
    return results


def render_markdown(results: dict[str, Any]) -> str:
    cfg = results.get("config", {})
    lines = ["# Demo lab results", "",
             "Held-out synthetic problems (`demo/problems_test.jsonl`), greedy decoding, "
             f"max {results.get('max_new_tokens')} new tokens, correct = last `\\boxed{{}}` equals the "
             "reference. 95% intervals: Wilson. Paired test: exact McNemar vs the SFT start on the "
             "same problems.", "",
             "| model | accuracy | 95% CI | level 1 | level 2 | level 3 | vs SFT: gained / lost | McNemar p |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in results.get("eval", {}).items():
        lv = [e["per_level"].get(str(l), {}).get("accuracy") for l in LEVELS]
        lv_s = [f"{x:.3f}" if x is not None else "-" for x in lv]
        mc = e.get("mcnemar_vs_sft")
        mc_s = (f"{mc['b_only']} / {mc['a_only']}", f"{mc['p_value']:.2g}") if mc else ("-", "-")
        lines.append(f"| {name} | {e['accuracy']:.3f} ({e['correct']}/{e['n']}) | "
                     f"[{e['ci95_low']:.3f}, {e['ci95_high']:.3f}] | " + " | ".join(lv_s)
                     + f" | {mc_s[0]} | {mc_s[1]} |")
    if any("gives_to" in e for e in results.get("eval", {}).values()):
        lines += ["", "By subset: problems with a \"gives N ... to Q\" step (the step the SFT teacher got "
                  f"wrong in {cfg.get('confusion', 0):.0%} of its training solutions) and all others:", "",
                  "| model | \"gives ... to\" problems | 95% CI | other problems | 95% CI |",
                  "|---|---|---|---|---|"]
        for name, e in results["eval"].items():
            a, b = e["gives_to"], e["other"]
            lines.append(f"| {name} | {a['accuracy']:.3f} ({a['correct']}/{a['n']}) | "
                         f"[{a['ci95_low']:.3f}, {a['ci95_high']:.3f}] | {b['accuracy']:.3f} "
                         f"({b['correct']}/{b['n']}) | [{b['ci95_low']:.3f}, {b['ci95_high']:.3f}] |")
    curve = results.get("grpo_reward_curve")
    if curve:
        lines += ["", "GRPO training reward (mean fraction of correct sampled completions):", "",
                  "| steps | mean reward |", "|---|---|"]
        lines += [f"| {c['steps']} | {c['mean_reward']:.3f} |" for c in curve]
    if "dpo_pairs" in results:
        lines += ["", f"DPO preference pairs (SFT model's own samples, correct vs wrong): {results['dpo_pairs']}"]
    lines += ["", "Wall time per stage (seconds):", "", "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results.get("timings_s", {}).items()]
    lines += ["", "Settings:", "", "```", json.dumps(cfg, indent=1), "```", ""]
    return "\n".join(lines)


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m eapcore lab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default demo/)")
    p.add_argument("--quick", action="store_true", help="reduced budgets and a tiny model (smoke run)")
    p.add_argument("--stages", default="sft,grpo,dpo,eval",
                   help="comma-separated subset of sft,grpo,dpo,eval (default all)")
    p.add_argument("--report", type=Path, default=None, help="also write a markdown report here")
    p.add_argument("--sft-device", default="cpu", help="device of the SFT stage (cpu, cuda); "
                   "GRPO and DPO always run on CPU")
    base = LabConfig()
    for f in fields(LabConfig):
        if f.name == "dpo_reference_fallback":
            continue
        if f.name == "grpo_levels":
            p.add_argument("--grpo-levels", default=None, help="comma-separated levels for GRPO prompts")
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(base, f.name)), default=None)
    args = p.parse_args(argv)
    cfg = LabConfig.quick() if args.quick else LabConfig()
    overrides = {f.name: getattr(args, f.name) for f in fields(LabConfig)
                 if f.name not in ("grpo_levels", "dpo_reference_fallback") and getattr(args, f.name) is not None}
    if args.grpo_levels:
        overrides["grpo_levels"] = tuple(int(x) for x in args.grpo_levels.split(","))
    cfg = LabConfig(**{**asdict(cfg), **overrides})
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = set(stages) - {"sft", "grpo", "dpo", "eval"}
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}")
    t0 = time.time()
    run_lab(args.out, cfg, stages, report=args.report, sft_device=args.sft_device)
    print(f"lab done in {time.time() - t0:.0f} s -> {args.out}")
    return 0
