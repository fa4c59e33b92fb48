"""Attribution with a model's layers spread over the GPUs of one host (eapcore.engine.placement).

1. "7b": the Qwen2-7B shape on one GPU, then the same weights moved to the CPU and spread over
   two GPUs as `load_model(..., devices=[...])` does (placement.balanced_map on free memory, then
   placement.dispatch): seconds per sample at each length and granularity, peak memory per GPU,
   and whether the scores and loss are equal bit for bit.
2. "70b": the Llama-3-70B shape (70.6e9 parameters, 141 GB in bf16: more than one H200 holds)
   spread over two GPUs: seconds per sample and peak memory per GPU. Its weights are made in
   place on each layer's device (a meta-device model, then each placed module materialised and
   filled there), since a 141 GB checkpoint fits neither this machine's disk nor one GPU; the
   placement map, dispatch and the adapter's conformance check are the engine's own.
Random bf16 weights (normal, std min(0.02, fan_in^-1/2); norms 1, biases 0): speed and memory do not depend on
them. One sample per call (prompt 256 tokens, the rest answer, T_cut = the answer), a warm-up call
first, best of --reps. The JSON is rewritten after each row, so a call cut short keeps its rows.

    python benchmarks/gpu_spread.py --out $OUT/gpu_spread.json           # 2 GPUs, about 5 minutes
    python benchmarks/gpu_spread.py --tiny --out /tmp/gpu_spread.json    # CPU: cpu:0 and cpu:1, tiny shapes
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eapcore.engine import placement  # noqa: E402
from eapcore.engine.attribution import EngineOptions, attribute  # noqa: E402
from eapcore.engine.models import LoadedModel, check_conformance, make_adapter  # noqa: E402
from eapcore.harness import Sample  # noqa: E402
from eapcore.specs import AttributionSettings  # noqa: E402

SHAPES = {  # the config.json fields that shape compute and memory
    "qwen2-7b": ("qwen2", {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                           "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                           "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
                           "tie_word_embeddings": False}),
    "llama3-70b": ("llama", {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                             "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                             "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-05,
                             "tie_word_embeddings": False}),
    "tiny": ("qwen2", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 4096,
                       "tie_word_embeddings": False}),
}
PROMPT = 256


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def config(shape: str):
    import transformers as tf

    arch, fields = SHAPES[shape]
    return arch, tf.AutoConfig.for_model(arch, **fields, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def fill_(module: torch.nn.Module) -> None:
    """Random weights in place: matrices [out, in] normal(0, min(0.02, in^-1/2)) (so a deep stack
    neither blows up nor vanishes in bf16), vectors named weight 1 (norms), biases 0."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.normal_(0, min(0.02, p.shape[1] ** -0.5))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def built_on(shape: str, device: str, dtype: torch.dtype) -> LoadedModel:
    """The whole model made on one device (random weights, seed 0)."""
    import transformers as tf

    arch, cfg = config(shape)
    torch.manual_seed(0)
    with torch.device(device):
        hf = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    fill_(hf)
    hf.eval().requires_grad_(False)
    return LoadedModel(shape, hf, None, make_adapter(hf, arch), arch)


def built_spread(shape: str, devices: list[str], dtype: torch.dtype) -> LoadedModel:
    """The model made on the meta device, each placed module materialised and filled on its device
    (placement.balanced_map), the rest (rotary tables) remade on the first device; then dispatched."""
    import transformers as tf

    arch, cfg = config(shape)
    with torch.device("meta"):
        hf = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    adapter = make_adapter(hf, arch)
    layer_map = placement.balanced_map(adapter, devices)
    placed = [(m, layer_map[-1] if adapter.tied else layer_map[0]) for m in adapter.embed_modules()]
    placed += [(adapter.layer_module(i), d) for i, d in enumerate(layer_map)]
    placed += [(m, layer_map[-1]) for m in adapter.head_modules()]
    torch.manual_seed(0)
    for module, device in placed:
        module.to_empty(device=device)
        fill_(module)
    for parent in list(hf.modules()):  # modules left on meta hold only computed buffers (rotary)
        for name, child in parent.named_children():
            if any(t.is_meta for t in child.buffers(recurse=False)) and "Rotary" in type(child).__name__:
                with torch.device(layer_map[0]):
                    setattr(parent, name, type(child)(config=hf.config))
    hf.eval().requires_grad_(False)
    placement.dispatch(adapter, layer_map)
    return LoadedModel(shape, hf, None, adapter, arch)


def sample(length: int, vocab: int) -> tuple[Sample, int]:
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(3, vocab, (length,), generator=g).tolist()
    return Sample(0, ids[:PROMPT], ids[PROMPT:]), length - PROMPT


def sync_all() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def fixed_work(model: LoadedModel, length: int, granularity: str, dtype: str, device: str):
    """(scores [F, B], loss) of one sample with the engine's memory-dependent choices fixed (every
    layer's graph kept, contraction blocks of 512 positions): the same kernels on the same shapes
    on one device or several, so the bits can be compared."""
    s, cut = sample(length, model.hf.config.vocab_size)
    settings = AttributionSettings(granularity=granularity, dtype=dtype, device=device, max_batch_tokens=sys.maxsize)
    out = attribute(model, [s], cut, settings, opts=EngineOptions(position_chunk=512,
                                                                 keep_graph_layers=model.adapter.n_layers))
    return out.scores[0].cpu(), out.loss.cpu()


def timed(model: LoadedModel, length: int, granularity: str, dtype: str, device: str, reps: int):
    """(best seconds, scores [F, B] float32, loss) of one sample with the engine's defaults (what
    fits free memory), after a warm-up call."""
    s, cut = sample(length, model.hf.config.vocab_size)
    settings = AttributionSettings(granularity=granularity, dtype=dtype, device=device, max_batch_tokens=sys.maxsize)
    attribute(model, [s], cut, settings)
    best = float("inf")
    for _ in range(reps):
        if torch.cuda.is_available():
            sync_all()
        start = time.perf_counter()
        out = attribute(model, [s], cut, settings)
        if torch.cuda.is_available():
            sync_all()
        best = min(best, time.perf_counter() - start)
    return best, out.scores[0].cpu(), out.loss.cpu()


def peaks() -> list[float]:
    return [round(torch.cuda.max_memory_allocated(i) / 2**30, 1) for i in range(torch.cuda.device_count())]


def reset_peaks() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--parts", default="7b,70b")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    gpu = not args.tiny
    if gpu and torch.cuda.device_count() < 2:
        print("error: needs 2 CUDA GPUs (or --tiny)", file=sys.stderr)
        return 2
    one, two = (["cuda:0"], ["cuda:0", "cuda:1"]) if gpu else (["cpu"], ["cpu:0", "cpu:1"])
    dtype, tdtype = ("bfloat16", torch.bfloat16) if gpu else ("float32", torch.float32)
    device = "cuda" if gpu else "cpu"
    small, big = ("qwen2-7b", "llama3-70b") if gpu else ("tiny", "tiny")
    runs7 = [(2048, "layer"), (8192, "layer"), (2048, "head")] if gpu else [(300, "layer"), (300, "head")]
    runs70 = [(2048, "layer"), (8192, "layer")] if gpu else [(300, "layer")]
    result = {"card": torch.cuda.get_device_name(0) if gpu else "cpu", "torch": torch.__version__, "rows": []}
    save = lambda: Path(args.out).write_text(json.dumps(result, indent=1))  # noqa: E731
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    if "7b" in args.parts:
        t = time.perf_counter()
        model = built_on(small, one[0], tdtype)
        log(f"{small} built on {one[0]} in {time.perf_counter() - t:.1f} s")
        single = {}
        for length, gran in runs7:
            reset_peaks() if gpu else None
            seconds, scores, loss = timed(model, length, gran, dtype, device, args.reps)
            single[(length, gran)] = (scores, loss, fixed_work(model, length, gran, dtype, device))
            result["rows"].append({"model": small, "devices": one, "tokens": length, "granularity": gran,
                                   "seconds": round(seconds, 3), "peak_gib": peaks() if gpu else None})
            log(result["rows"][-1])
            save()
        model.hf.to("cpu")  # as load_model: on the CPU first, then placed on the devices' free memory
        if gpu:
            torch.cuda.empty_cache()
        placement.dispatch(model.adapter, placement.balanced_map(model.adapter, two) if gpu else
                           [two[i * 2 // model.adapter.n_layers] for i in range(model.adapter.n_layers)])
        check_conformance(model)
        layers = [str(d) for d in model.adapter.device_map]
        for length, gran in runs7:
            reset_peaks() if gpu else None
            seconds, scores, loss = timed(model, length, gran, dtype, device, args.reps)
            ref_scores, ref_loss, ref_fixed = single[(length, gran)]
            same_work = fixed_work(model, length, gran, dtype, device)
            result["rows"].append({"model": small, "devices": two, "layers_per_device": {d: layers.count(d) for d in two},
                                   "tokens": length, "granularity": gran, "seconds": round(seconds, 3),
                                   "peak_gib": peaks() if gpu else None,
                                   "equal_to_one_device": bool(torch.equal(scores, ref_scores) and torch.equal(loss, ref_loss)),
                                   "scores_max_rel_diff": ((scores - ref_scores).abs().max() / ref_scores.abs().max()).item(),
                                   "loss_diff": (loss - ref_loss).abs().max().item(),
                                   "equal_with_the_same_work": all(map(torch.equal, same_work, ref_fixed))})
            log(result["rows"][-1])
            save()
        del model, single
        if gpu:
            torch.cuda.empty_cache()

    if "70b" in args.parts:
        t = time.perf_counter()
        model = built_spread(big, two, tdtype)
        try:
            conformance = check_conformance(model)
        except Exception as err:  # noqa: BLE001  (recorded: the timing does not depend on it)
            conformance = f"{type(err).__name__}: {err}"
        params = sum(p.numel() for p in model.hf.parameters())
        layers = [str(d) for d in model.adapter.device_map]
        result["big"] = {"model": big, "params": params, "gib": round(params * 2 / 2**30, 1),
                         "build_s": round(time.perf_counter() - t, 1), "layers_per_device": {d: layers.count(d) for d in two},
                         "conformance": conformance}
        log(result["big"])
        save()
        for length, gran in runs70:
            reset_peaks() if gpu else None
            seconds, _, _ = timed(model, length, gran, dtype, device, args.reps)
            result["rows"].append({"model": big, "devices": two, "tokens": length, "granularity": gran,
                                   "seconds": round(seconds, 3), "peak_gib": peaks() if gpu else None})
            log(result["rows"][-1])
            save()
    print(json.dumps(result["rows"], indent=0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
