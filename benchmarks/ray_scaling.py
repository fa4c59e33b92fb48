"""Scaling of the Ray executor: a sweep and one long run, serial on one device against Ray tasks on
several, with the scores compared bit for bit.

    python benchmarks/ray_scaling.py --tiny --out /tmp/ray_tiny.json              # CPU: 2 Ray workers vs 1 process
    python benchmarks/ray_scaling.py --gpus 2 --out $OUT/ray_scaling.json         # GPUs: 2 vs 1 (about 7 min?)

Both phases run twice from empty caches: first serially in this process (`runner.run` spec after
spec, one device: cuda:0, or one CPU thread), then through `eapcore.runs.distributed.run_specs` on
a local Ray cluster of --gpus GPUs (or, with --tiny, 2 CPU workers of one thread each). The sweep
is --alphas over one pair and dataset (two generations, then the attributions of every alpha,
pooled); the long run is one spec over --long-problems problems. Reported: wall seconds of each,
the speed-up (serial / Ray; Ray's start-up is reported apart and not counted), when each of Ray's
phases began, and whether every run's score files and metrics.json are identical. The JSON is
rewritten after each measurement, so a call stopped by its time limit keeps what it measured.

--tiny: the demo lab's pair (1M-parameter Llamas, float32) on its problems. Otherwise: two random
Llama models of --hidden/--layers (default 5.8B parameters, a 7B's layers with the demo's small
vocabulary) over the demo's tokenizer, in bfloat16, made on the GPU (random weights answer at full
length: runs use the both_wrong group). The sizes are guesses for a 10-minute call on 2 H200s.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def random_pair(folder: Path, hidden: int, layers: int) -> tuple[str, str]:
    """Two random Llamas (seeds 0 and 1) of the given shape with the demo's tokenizer, saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(ROOT / "demo" / "sft")
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                             num_hidden_layers=layers, num_attention_heads=hidden // 128,
                             num_key_value_heads=max(1, hidden // 512), max_position_embeddings=4096,
                             tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        path = folder / f"model{seed}"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out.append(str(path))
    return out[0], out[1]


def specs_for(args, tmp: Path):
    from eapcore.specs import (AttributionSettings, DatasetSpec, GenerationSettings, ModelSpec, PairSpec, RunSpec,
                               SelectionSettings)

    if args.tiny:
        base, tuned, group, dtype = str(ROOT / "demo/sft"), str(ROOT / "demo/grpo"), "both_correct", "float32"
    else:
        base, tuned = random_pair(tmp, args.hidden, args.layers)
        group, dtype = "both_wrong", "bfloat16"
    pair = PairSpec("bench", ModelSpec(base), ModelSpec(tuned), "deepseek-math", args.max_new_tokens)
    device = "cpu" if args.tiny else "cuda"

    def spec(problems: int, alpha: float) -> RunSpec:
        return RunSpec(pair, DatasetSpec("bench", str(ROOT / "demo/problems_test.jsonl"), limit=problems),
                       GenerationSettings(batch_size=args.gen_batch_size, dtype=dtype),
                       SelectionSettings(alpha=alpha, n=0, group=group),
                       AttributionSettings(dtype=dtype, device=device, max_batch_tokens=args.batch_tokens))

    return {"sweep": [spec(args.problems, a) for a in args.alphas], "long run": [spec(args.long_problems, 0.5)]}


def run_files(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in ("base/scores.safetensors", "tuned/scores.safetensors", "metrics.json")}


def differences(serial: Path, ray: Path) -> dict:
    """What differs between two run folders of one spec: the files compared by `run_files`, the
    selection, and per model the largest |difference| of the scores and of the loss and how many
    samples differ."""
    from safetensors.torch import load_file

    a, b = run_files(serial), run_files(ray)
    out = {"files": sorted(n for n in a if a[n] != b[n]),
           "selection_equal": (serial / "selection.json").read_bytes() == (ray / "selection.json").read_bytes()}
    for which in ("base", "tuned"):
        x, y = (load_file(str(f / which / "scores.safetensors")) for f in (serial, ray))
        row = {}
        for name in sorted(set(x) | set(y)):
            if name not in x or name not in y or x[name].shape != y[name].shape:
                row[name] = "shapes differ"
                continue
            d = (x[name].double() - y[name].double()).abs()
            row[name] = {"max_abs": d.max().item(), "max_abs_ref": x[name].double().abs().max().item(),
                         "samples_differing": int((d.reshape(len(d), -1) > 0).any(1).sum()) if d.dim() else int(d > 0),
                         "samples": len(d) if d.dim() else 1}
        out[which] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU: the demo pair, 2 Ray CPU workers against one thread")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--problems", type=int, default=None, help="problems of the sweep's dataset")
    p.add_argument("--long-problems", type=int, default=None, help="problems of the long run")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--gen-batch-size", type=int, default=None)
    p.add_argument("--batch-tokens", type=int, default=None, help="attribution batch (fixed: the same batches)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    defaults = dict(problems=(120, 192), long_problems=(240, 256), max_new_tokens=(48, 384),
                    gen_batch_size=(64, 128), batch_tokens=(2048, 16384))
    for name, (tiny, gpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else gpu)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")

    import ray
    import torch

    from eapcore.runs import distributed, runner
    from eapcore.runs.cache import Cache

    tmp = Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    os.environ["EAP_REGISTRY"] = str(tmp / "registry.json")
    if args.tiny:
        torch.set_num_threads(1)
    work = specs_for(args, tmp)
    result = {"args": vars(args), "device": torch.cuda.get_device_name(0) if not args.tiny else "cpu",
              "cpu_count": os.cpu_count(), "phases": {}}
    save = lambda: Path(args.out).write_text(json.dumps(result, indent=1))  # noqa: E731
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    serial_folders = {}
    for phase, specs in work.items():
        cache = Cache(tmp / "serial" / phase.replace(" ", "-"))
        start = time.perf_counter()
        serial_folders[phase] = [runner.run(s, cache=cache) for s in specs]
        result["phases"][phase] = {"runs": len(specs), "serial_s": round(time.perf_counter() - start, 2)}
        print(f"{phase}: serial {result['phases'][phase]['serial_s']} s", flush=True)
        save()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    start = time.perf_counter()
    ray.init(include_dashboard=False, configure_logging=False,
             **({"num_cpus": 2} if args.tiny else {"num_gpus": args.gpus, "num_cpus": max(2, args.gpus * 2)}))
    result["ray_start_s"] = round(time.perf_counter() - start, 2)
    for phase, specs in work.items():
        cache = Cache(tmp / "ray" / phase.replace(" ", "-"))
        start, began = time.perf_counter(), {}
        runs = distributed.run_specs(specs, cache=cache, progress=lambda name, done, total: began.setdefault(
            name, round(time.perf_counter() - start, 2)))
        seconds = time.perf_counter() - start
        errors = [e for _, _, e in runs if e]
        row = result["phases"][phase]
        row.update(ray_s=round(seconds, 2), speedup=round(row["serial_s"] / seconds, 3), errors=errors,
                   ray_phase_first_report_s=began,
                   identical=not errors and all(run_files(a) == run_files(f)
                                                for a, (_, f, _) in zip(serial_folders[phase], runs)))
        if not row["identical"] and not errors:
            row["differences"] = [differences(a, f) for a, (_, f, _) in zip(serial_folders[phase], runs)]
        print(f"{phase}: Ray {row['ray_s']} s, speed-up {row['speedup']}x, identical {row['identical']}", flush=True)
        save()
    ray.shutdown()
    return 0 if all(r["identical"] for r in result["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
