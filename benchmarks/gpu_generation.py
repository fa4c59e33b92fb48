"""GPU benchmark: greedy answers to a dataset-like job, the default path against the alternatives.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_generation.py          # one H200: ends in < 7 minutes
    python benchmarks/gpu_generation.py --tiny                       # CPU smoke test (a tiny Qwen2)

Model: the Qwen2-7B shape from its real config (QWEN2_7B), random bf16 weights built directly on
the GPU (speed does not depend on the weights; nothing is downloaded). Job: 1,024 prompts of
128-512 random tokens; each answer ends at its own length, drawn once from a fixed-seed
log-uniform distribution on [64, 2048] and enforced as that request's max_new_tokens (the model
has no EOS here: a benchmark-only stopping rule standing in for real answers' varied lengths).

Candidates, each under a wall-clock cap (a failure or an out-of-memory is recorded, not fatal):
- default: eapcore.answers.decoding.SlotDecoder as runs use it (slots from free memory, CUDA graphs),
  on the whole job after a short warm-up call; rate = generated tokens / wall time, graph
  captures included (and reported apart);
- eager: the same without CUDA graphs, capped (its rate covers the job's first part only: the
  full-slot phase; the default's rate over the same first seconds is reported next to it);
- plain `generate` at batch 8, 32 and 256 (dynamic cache, left padding, as the transformers
  backend runs it) on a slice: the job's first prompts, 128 new tokens each; the job's time is
  extrapolated from the measured step time (every batch runs to its longest answer, in job
  order; attention's growth with length is not counted, so the extrapolation flatters it);
- transformers' continuous batching (`init_continuous_batching`, per-request max_new_tokens)
  configured for throughput (CUDA graphs, memory 50%, 256 requests per batch), then at its
  defaults if that fails; its rate counts finished answers only.
Also: the decode floor (weights bytes / the card's measured copy bandwidth, per step, and the
tokens/s it allows at the default's slot count), peak memory per candidate, and the share of
answers identical to plain `generate` (one batch of 32 prompts of the job, 128 new tokens, bf16)
with the first differing position and the reference's logit gaps there.
Writes $OUT/gpu_generation.json (OUT defaults to benchmarks/out) and prints a table last.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eapcore.answers.decoding import SlotDecoder  # noqa: E402

QWEN2_7B = {  # Qwen/Qwen2-7B config.json (the fields that shape compute and memory)
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 131072, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06, "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False,
    "sliding_window": 131072, "max_window_layers": 28, "attention_dropout": 0.0,
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 4096, "tie_word_embeddings": False}
JOBS = {  # prompts, prompt lengths, answer lengths (log-uniform), plain-generate slice tokens, agreement sample
    "gpu": dict(n=1024, prompt=(128, 512), answer=(64, 2048), slice_new=128, sample=32),
    "tiny": dict(n=48, prompt=(4, 24), answer=(2, 40), slice_new=12, sample=8),
}
CAPS = {  # seconds per candidate (each also stops at the overall budget)
    "gpu": dict(default=120, eager=35, plain=18, cb=60, agreement=40),
    "tiny": dict(default=60, eager=20, plain=10, cb=20, agreement=30),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(tiny: bool, device) -> torch.nn.Module:
    import transformers as tf

    cfg = tf.Qwen2Config(**(TINY if tiny else QWEN2_7B), bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if tiny else torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    return model.eval().requires_grad_(False)


def make_job(kind: str, vocab: int) -> tuple[list[list[int]], list[int]]:
    spec, rng = JOBS[kind], random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(*spec["prompt"]))] for _ in range(spec["n"])]
    lo, hi = map(math.log, spec["answer"])
    return prompts, [int(math.exp(rng.uniform(lo, hi))) for _ in prompts]


def copy_bandwidth(device, gib: float) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    t = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    sync(device)
    rate = 5 * 2 * a.numel() * 2 / (time.perf_counter() - t)
    del a, b
    return rate


def peak_reset(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def guarded(name: str, fn, device) -> dict:
    """fn() -> dict, or the error it raised (the benchmark goes on)."""
    log(f"{name}: start")
    peak_reset(device)
    t = time.perf_counter()
    try:
        row = fn()
    except Exception as err:  # out of memory included: recorded, not fatal
        row = {"error": f"{type(err).__name__}: {str(err)[:500]}", "trace": traceback.format_exc()[-2000:]}
    row = {"candidate": name, **row, "wall_s": round(time.perf_counter() - t, 2), "peak_gib": peak_gib(device)}
    log(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'trace'})}")
    return row


def run_slots(model, prompts, limits, cap_s, device, graphs: bool | None) -> dict:
    """SlotDecoder on the job until it ends or cap_s passes; timeline of generated tokens."""
    warm = SlotDecoder(model, set(), cuda_graphs=graphs)
    warm([p[:64] for p in prompts[:64]], 8)  # kernels, cuBLAS, allocator: outside the timing
    decoder = SlotDecoder(model, set(), cuda_graphs=graphs)
    timeline, answers = [], {}
    sync(device)
    t0 = time.perf_counter()

    def stop() -> bool:
        elapsed = time.perf_counter() - t0
        timeline.append((round(elapsed, 3), decoder.stats["tokens"]))
        if len(timeline) == 1 or elapsed - timeline[-2][0] >= 15 or int(elapsed) // 15 != int(timeline[-2][0]) // 15:
            log(f"  {elapsed:.0f} s: {decoder.stats['tokens']} tokens, {len(answers)} answers, "
                f"{decoder.stats['tokens'] / elapsed:,.0f} tokens/s, graphs {decoder.stats['graphs']}")
        return elapsed > cap_s

    for i, answer in decoder.stream(prompts, limits, stop=stop):
        answers[i] = answer
    sync(device)
    seconds = time.perf_counter() - t0
    st = decoder.stats
    capture = st.get("capture_s", 0.0)
    return {"completed": len(answers) == len(prompts), "answers": len(answers), "tokens": st["tokens"],
            "seconds": round(seconds, 2), "tokens_per_s": round(st["tokens"] / seconds),
            "tokens_per_s_without_capture": round(st["tokens"] / max(seconds - capture, 1e-9)),
            "capture_s": round(capture, 2), "graphs": st["graphs"], "slots": st["slots"], "length": st["length"],
            "steps": st["steps"], "row_steps": st["row_steps"],
            "slot_use": round(st["tokens"] / max(st["row_steps"], 1), 3),  # share of computed rows that were answers
            "prefill_tokens": st["prefill_tokens"], "timeline": timeline[:: max(1, len(timeline) // 200)]}


def rate_at(timeline: list, seconds: float) -> float | None:
    """Tokens/s over the first `seconds` of a timeline [(t, tokens)]."""
    before = [(t, n) for t, n in timeline if t <= seconds]
    return round(before[-1][1] / before[-1][0]) if before and before[-1][0] > 0 else None


def plain_generate(model, prompts, new_tokens, device, max_time=None, scores=False):
    """Greedy `generate` of one left-padded batch: (new token ids [n, steps], logits per step or None, seconds)."""
    from transformers import GenerationConfig

    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None,
                              max_time=max_time, return_dict_in_generate=True, output_logits=scores)
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    sync(device)
    logits = torch.stack(out.logits, 1).float().cpu() if scores else None
    return out.sequences[:, width:].cpu(), logits, time.perf_counter() - t


def run_plain(model, prompts, limits, batch, new_tokens, cap_s, device) -> dict:
    rows, steps, seconds = None, 0, 0.0
    new, _, seconds = plain_generate(model, prompts[:batch], new_tokens, device, max_time=cap_s)
    rows, steps = new.shape
    step_s = seconds / steps
    job_s = sum(max(limits[i: i + batch]) * step_s for i in range(0, len(limits), batch))
    return {"batch": rows, "new_tokens": steps, "seconds": round(seconds, 2),
            "tokens_per_s_slice": round(rows * steps / seconds), "step_ms": round(1e3 * step_s, 1),
            "job_s_extrapolated": round(job_s), "tokens_per_s": round(sum(limits) / job_s),
            "note": "extrapolated from the slice's step time: batches in job order, each to its longest answer"}


def run_cb(model, prompts, limits, cap_s, device) -> dict:
    """transformers' continuous batching manager, configured for throughput, then at defaults."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    attempts = [("throughput", dict(use_cuda_graph=True, max_memory_percent=0.5, max_requests_per_batch=256,
                                    allow_block_sharing=False)), ("defaults", {})]
    errors, deadline = {}, time.perf_counter() + cap_s
    attention = model.config._attn_implementation  # the manager switches it to its paged variant
    for name, kw in attempts:
        left = deadline - time.perf_counter()
        if left < 10:
            break
        manager = None
        try:
            config = GenerationConfig(do_sample=False, max_new_tokens=max(limits), eos_token_id=None, pad_token_id=0)
            manager = model.init_continuous_batching(generation_config=config,
                                                     continuous_batching_config=ContinuousBatchingConfig(**kw))
            t_warm = time.perf_counter()
            manager.warmup()
            warm = time.perf_counter() - t_warm
            manager.start()
            sync(device)
            t0 = time.perf_counter()
            for i, (p, m) in enumerate(zip(prompts, limits)):
                manager.add_request(p, request_id=str(i), max_new_tokens=m)
            tokens, done, failed = 0, 0, 0
            end = t0 + max(5.0, deadline - time.perf_counter())
            while done + failed < len(prompts) and time.perf_counter() < end:
                result = manager.get_result(timeout=1)
                if result is None:
                    continue
                if result.error:
                    failed += 1
                else:
                    done += 1
                    tokens += len(result.generated_tokens)
            seconds = time.perf_counter() - t0
            manager.stop(block=True, timeout=20)
            if failed:
                raise RuntimeError(f"{failed} requests failed")
            return {"config": name, "settings": kw, "completed": done == len(prompts), "answers": done,
                    "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds),
                    "warmup_s": round(warm, 1), "errors_before": errors}
        except Exception as err:
            errors[name] = f"{type(err).__name__}: {str(err)[:300]}"
            log(f"continuous batching ({name}) failed: {errors[name]}")
            if manager is not None:
                try:
                    manager.stop(block=True, timeout=20)
                except Exception:  # the manager is already broken: nothing more to stop
                    pass
            model.config._attn_implementation = attention
            peak_reset(device)
    return {"error": "; ".join(f"{k}: {v}" for k, v in errors.items()) or "no time left"}


def run_agreement(model, prompts, new_tokens, cap_s, device) -> dict:
    """Our answers against plain `generate` (one left-padded batch), token by token, with the
    reference's logit gaps at the first difference."""
    reference, logits, _ = plain_generate(model, prompts, new_tokens, device, max_time=cap_s, scores=True)
    new_tokens = reference.shape[1]  # fewer if generate ran out of time
    ours = SlotDecoder(model, set(), len(prompts))(prompts, new_tokens)
    rows = []
    for i, answer in enumerate(ours):
        ref = reference[i].tolist()
        first = next((k for k, (a, b) in enumerate(zip(answer, ref)) if a != b), None)
        if first is None:
            continue
        step = logits[i, first]
        top2 = step.topk(2).values
        rows.append({"prompt": i, "first_difference": first,
                     "reference_top1_minus_top2": round(float(top2[0] - top2[1]), 4),
                     "reference_logit_gap_to_ours": round(float(step[ref[first]] - step[answer[first]]), 4)})
    gaps = sorted(r["reference_top1_minus_top2"] for r in rows)
    return {"sample": len(prompts), "new_tokens": new_tokens, "identical": len(prompts) - len(rows),
            "share_identical": round(1 - len(rows) / len(prompts), 3), "differences": rows,
            "median_gap_at_difference": gaps[len(gaps) // 2] if gaps else None,
            "note": "greedy choices that differ where the reference's top two logits are within bf16 rounding "
                    "are ties broken by rounding (batch shapes change the kernels' summation order)"}


def run_exact(device, n: int = 12) -> dict:
    """float32, tiny Qwen2 on this device: the default path (CUDA graphs on a GPU) against
    `generate` one prompt at a time; every answer should be identical."""
    model = build(True, device)
    prompts, limits = make_job("tiny", model.config.vocab_size)
    prompts, limits = prompts[:n], limits[:n]
    decoder = SlotDecoder(model, set(), 8, sync_every=4)
    ours = decoder(prompts, limits)
    same = sum(plain_generate(model, [p], m, device)[0][0].tolist() == a for p, m, a in zip(prompts, limits, ours))
    return {"sample": n, "identical": same, "graphs": decoder.stats["graphs"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: a tiny Qwen2 and a small job")
    ap.add_argument("--budget", type=float, default=0, help="overall seconds (default 370 on GPU, 150 tiny)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: exact,default,eager,plain,cb,agreement")
    args = ap.parse_args()
    kind = "tiny" if args.tiny else "gpu"
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here; use --tiny for the CPU smoke test", file=sys.stderr)
        return 2
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    budget_end = time.perf_counter() + (args.budget or (150 if args.tiny else 370))
    caps, spec, skip = CAPS[kind], JOBS[kind], set(filter(None, args.skip.split(",")))

    def cap(name: str) -> float:
        return max(1.0, min(caps[name], budget_end - time.perf_counter()))

    import transformers

    result = {"card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "job": spec, "rows": []}
    log(f"{result['card']}, torch {torch.__version__}, transformers {transformers.__version__}")
    t = time.perf_counter()
    model = build(args.tiny, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    result["build_s"] = round(time.perf_counter() - t, 1)
    prompts, limits = make_job(kind, model.config.vocab_size)
    result["job"].update(tokens=sum(limits), prompt_tokens=sum(map(len, prompts)))
    bandwidth = copy_bandwidth(device, 0.25 if args.tiny else 4)
    result["floor"] = {"weights_gib": round(weights / 2**30, 2), "copy_tb_s": round(bandwidth / 1e12, 3),
                       "step_ms": round(1e3 * weights / bandwidth, 3),
                       "tokens_per_s_at_batch": {b: round(b * bandwidth / weights) for b in (8, 32, 256)}}
    log(f"model built in {result['build_s']} s; job {len(prompts)} prompts, {sum(limits)} answer tokens; "
        f"floor {result['floor']}")

    def save() -> None:
        (out_dir / "gpu_generation.json").write_text(json.dumps(result, indent=1))

    rows = result["rows"]
    if "exact" not in skip:
        result["exact_float32"] = guarded("exact", lambda: run_exact(device), device)
        save()
    default = None
    if "default" not in skip:
        default = guarded("default", lambda: run_slots(model, prompts, limits, cap("default"), device, None), device)
        rows.append(default)
        if "slots" in default:
            result["floor"]["tokens_per_s_at_slots"] = round(default["slots"] / (weights / bandwidth))
        save()
    if "eager" not in skip and device.type == "cuda":
        eager = guarded("eager", lambda: run_slots(model, prompts, limits, cap("eager"), device, False), device)
        if default and "timeline" in default and "seconds" in eager:
            eager["default_tokens_per_s_same_seconds"] = rate_at(default["timeline"], eager["seconds"])
        rows.append(eager)
        save()
    if "plain" not in skip:
        plain_generate(model, prompts[:2], 2, device)  # generate's one-time setup: outside the timing
        for batch in (8, 32, 256):
            if batch <= len(prompts):
                rows.append(guarded(f"generate-b{batch}", lambda b=batch: run_plain(
                    model, prompts, limits, b, spec["slice_new"], cap("plain"), device), device))
                save()
    if "agreement" not in skip:
        sample = prompts[:: len(prompts) // spec["sample"]][: spec["sample"]]
        result["agreement"] = guarded("agreement", lambda: run_agreement(
            model, sample, spec["slice_new"], cap("agreement"), device), device)
        save()
    if "cb" not in skip:  # last: its background thread is the likeliest to misbehave
        rows.append(guarded("generate_batch", lambda: run_cb(model, prompts, limits, cap("cb"), device), device))
        save()

    print("\n| candidate | tokens/s | completed | seconds | peak GiB | notes |\n|---|---|---|---|---|---|")
    for row in rows:
        note = row.get("error") or row.get("graphs") or row.get("note") or row.get("config") or ""
        extra = f" (slots {row['slots']})" if "slots" in row else ""
        print(f"| {row['candidate']}{extra} | {row.get('tokens_per_s', '-')} | {row.get('completed', '-')} | "
              f"{row.get('seconds', row['wall_s'])} | {row['peak_gib']} | {str(note)[:80]} |")
    floor = result["floor"]
    print(f"| decode floor | {floor.get('tokens_per_s_at_slots', '-')} | - | {floor['step_ms']} ms/step | - | "
          f"{floor['weights_gib']} GiB weights / {floor['copy_tb_s']} TB/s |")
    exact = result.get("exact_float32", {})
    if "identical" in exact:
        print(f"\nfloat32 tiny Qwen2, {exact['graphs']}: {exact['identical']}/{exact['sample']} answers identical "
              "to generate one prompt at a time")
    agreement = result.get("agreement", {})
    if "share_identical" in agreement:
        print(f"\nidentical to plain generate: {agreement['identical']}/{agreement['sample']} answers "
              f"({agreement['new_tokens']} tokens); median reference top1-top2 gap at the first difference: "
              f"{agreement['median_gap_at_difference']}")
    print(f"\nwrote {out_dir / 'gpu_generation.json'}")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # a continuous-batching thread that did not stop must not keep the process alive
