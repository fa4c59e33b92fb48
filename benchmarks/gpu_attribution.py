"""GPU benchmark: EAP of 7B-shaped models on long sequences, against the paper's approach and the floor.

    python benchmarks/gpu_attribution.py --out results.json            # the paper's shapes (one H100)
    python benchmarks/gpu_attribution.py --shapes qwen2-7b --lengths 2048,8192 --granularity layer
    python benchmarks/gpu_attribution.py --runs "qwen3-8b:layer,head:512,32768;mistral-7b-window:layer:8192"
    python benchmarks/gpu_attribution.py --tiny --out /tmp/tiny.json   # CPU check of the script itself
    python benchmarks/gpu_attribution.py --predict benchmarks/results_issue19_20.json   # memory model, CPU

`--runs` lists runs as shape:granularities:lengths separated by ";" (in place of --shapes,
--granularity and --lengths, which apply to every shape). A shape whose layers have an attention
window is timed with each kernel of --window-kernels. `--warmup first` warms up once per shape
(at its first row) instead of before every row, but for the flex kernel, which compiles for new
lengths. `--tiny` builds
each shape scaled down (same architecture and window pattern, 2 layers, width 64, window 16) in
float32 on the CPU, at 32 and 64 tokens unless lengths are given, with no baseline and no memory
check: it tests the script, its numbers mean nothing.

Models are built from the real models' configs (SHAPES) with random bf16 weights on the GPU (speed
and memory do not depend on the weights; nothing is downloaded). Each sample has a prompt of T/2 tokens
and T_cut = T - T/2 + 1 answer tokens, so the model sees exactly T tokens and the loss covers the
answer half. Short sequences are batched as the runner batches them (by default the engine's own
choice, `default_batch_tokens`: as many tokens as fit with every layer's autograd graph kept), and
the time is reported per sample; the baseline runs one sample at a time, as the authors did. The
engine's memory model (`memory_per_token`) is checked against the memory one layer's graph
really takes on the card (rows with method "memory-model"), and each row records `all_kept_gib`,
what the memory model gives for its batch with every layer's graph kept (`all_kept_gib`; the
engine keeps fewer and recomputes the others when that exceeds the card). `--predict FILE` adds it
to the rows of an earlier results file on the CPU (models built on the meta device, no weights).

Reported per (shape, T, granularity): seconds per sample (median of `--reps` after one warm-up),
tokens per second, peak GPU memory, and time / floor, where the floor is the floating-point work
of one forward and one activation-only backward pass (matmuls, attention counted by the (query,
key) pairs its causal mask or window allows with its backward at 2.5x its forward, the
unembedding on the loss positions) divided by the bf16 matmul rate measured on the same card in
the same run. The baseline reproduces the paper's
approach (TransformerLens HookedTransformer, split q/k/v inputs, grouped-query attention
ungrouped, weights requiring gradients, all bf16, an einsum per destination).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eapcore.engine.attribution import (EngineOptions, _layer, attribute_batch, default_batch_tokens,  # noqa: E402
                                        fixed_bytes, graph_of, make_batch, memory_per_token)
from eapcore.engine.windowed_attention import KERNELS  # noqa: E402
from eapcore.harness import Sample  # noqa: E402
from eapcore.engine.models import LoadedModel, make_adapter  # noqa: E402

SHAPES = {  # the paper's pairs (docs/METHOD.md), today's RL families (issue 19) and the numbers
    "qwen2-7b": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                               intermediate_size=18944, vocab_size=152064, rope_theta=1e6)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=14336, vocab_size=32000,
                                   sliding_window=None)),
    # Mistral-7B-v0.1 as released (the registered Mistral pair's base): its 4096-token window on
    "mistral-7b-window": ("mistral", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                          num_key_value_heads=8, intermediate_size=14336, vocab_size=32000,
                                          sliding_window=4096)),
    "deepseek-math-7b": ("llama", dict(hidden_size=4096, num_hidden_layers=30, num_attention_heads=32,
                                       num_key_value_heads=32, intermediate_size=11008, vocab_size=102400)),
    # Qwen/Qwen3-8B's config.json: per-head q/k RMSNorm, head_dim 128, no window (use_sliding_window false)
    "qwen3-8b": ("qwen3", dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                               head_dim=128, intermediate_size=12288, vocab_size=151936, rope_theta=1e6,
                               rms_norm_eps=1e-6)),
    # allenai/OLMo-2-1124-7B's config.json: output norms, q/k norms over the whole projection, 32 kv heads
    "olmo2-7b": ("olmo2", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                               intermediate_size=11008, vocab_size=100352, rope_theta=5e5, rms_norm_eps=1e-6)),
}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)


def config_of(shape: str, tiny: bool = False):
    """The transformers config of a shape (tiny: scaled down, same architecture and window pattern)."""
    import transformers as tf

    arch, kw = SHAPES[shape]
    kw = dict(kw)
    rope_theta = kw.pop("rope_theta", 10000.0)
    if tiny:
        kw.update(TINY, num_key_value_heads=min(kw["num_key_value_heads"], 2), head_dim=16)
        if kw.get("sliding_window"):
            kw["sliding_window"] = 16
    cls = {"qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig, "llama": tf.LlamaConfig, "qwen3": tf.Qwen3Config,
           "olmo2": tf.Olmo2Config}[arch]
    return cls(max_position_embeddings=32768 + 8, tie_word_embeddings=False,
               rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, **kw)


def build(shape: str, tiny: bool = False, meta: bool = False) -> LoadedModel:
    """A model of the shape with random weights: bf16 on the GPU, or (tiny) float32 on the CPU, or
    (meta) bf16 with no storage (for the memory model)."""
    import transformers as tf

    device, dtype = ("cpu", torch.float32) if tiny else ("meta" if meta else "cuda", torch.bfloat16)
    torch.manual_seed(0)
    with torch.device(device):
        hf = tf.AutoModelForCausalLM.from_config(config_of(shape, tiny), dtype=dtype)
    with torch.no_grad():
        for p in hf.parameters() if not meta else ():  # keep activations in a sane range
            if p.dim() > 1:
                p.normal_(0, 0.02)
    hf.eval().requires_grad_(False)
    arch = SHAPES[shape][0]
    return LoadedModel(shape, hf, None, make_adapter(hf, arch), arch)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: str = "cuda", n: int = 8192, reps: int = 20) -> float:
    """Measured dense matmul rate, FLOP/s (bf16 on the GPU, float32 on the CPU)."""
    if device == "cpu":
        n, reps = 512, 5
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def floor_flops(model: LoadedModel, T: int, n_loss: int) -> float:
    """FLOPs of one forward + one activation-only backward (no weight gradients); attention counts
    the (query, key) pairs that each layer's causal mask or window allows, its backward at 2.5x
    its forward."""
    ad, c = model.adapter, model.hf.config
    d, dh = ad.d_model, ad.d_head
    per_tok_layer = 2 * (d * ad.n_heads * dh * 2 + d * ad.n_kv_heads * dh * 2 + 3 * d * c.intermediate_size)
    flops = 2 * (2 * d * c.vocab_size * n_loss)  # the unembedding at the loss positions, forward and backward
    for w in ad.windows:
        w = min(w or T, T)
        pairs = w * (w + 1) / 2 + (T - w) * w  # keys per query: min(t + 1, w)
        flops += 2 * T * per_tok_layer + 3.5 * (4 * pairs * ad.n_heads * dh)
    return flops


def all_kept_gib(model: LoadedModel, graph, batch: int, T: int) -> float:
    """GiB the memory model gives for `batch` samples of T tokens with every layer's graph kept: the
    weights, batch x T x (stored + working + L x graph) bytes (memory_per_token) and the fixed
    allowances (fixed_bytes on CUDA)."""
    mem = memory_per_token(model.adapter, graph, torch.finfo(model.dtype).bits // 8)
    weights = sum(p.numel() * p.element_size() for p in model.hf.parameters())
    per_token = mem["stored"] + mem["working"] + model.adapter.n_layers * mem["graph"]
    return (weights + batch * T * per_token + fixed_bytes(model.adapter, graph, "cuda")) / 2 ** 30


def predict(path: str) -> list[dict]:
    """The engine rows of a results file with `all_kept_gib` (models on the meta device, CPU only)."""
    rows, models = json.loads(Path(path).read_text())["rows"], {}
    out = []
    for row in rows:
        if row["method"] == "eapcore":
            model = models.get(row["shape"]) or models.setdefault(row["shape"], build(row["shape"], meta=True))
            out.append(dict(row, all_kept_gib=all_kept_gib(model, graph_of(model.adapter, row["granularity"]),
                                                            row["batch"], row["tokens"])))
    return out


def samples_of(T: int, vocab: int, n: int = 1) -> tuple[list[Sample], int]:
    """n random samples of exactly T input tokens, and their T_cut."""
    g = torch.Generator().manual_seed(T)
    P = T // 2
    cut = T - P + 1
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (T + 1,), generator=g).tolist()
        out.append(Sample(i, ids[:P], ids[P:]))
    return out, cut


def timed(fn, reps: int, device: str = "cuda", warmup: bool = True):
    """(median seconds, peak GiB; None on the CPU) of fn() after a warm-up call if `warmup`;
    ('OOM', None) if it runs out of memory."""
    cuda = device == "cuda"
    try:
        if warmup:
            fn()
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t)
        return statistics.median(times), torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    except torch.cuda.OutOfMemoryError:
        return "OOM", None
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def baseline_scores(tl, ids: torch.Tensor, targets: torch.Tensor, graph) -> torch.Tensor:
    """The paper's approach, layer granularity: hooks on a HookedTransformer, bf16 throughout."""
    B, T = ids.shape
    L, d = graph.n_layers, tl.cfg.d_model
    acts = torch.zeros(B, graph.n_forward, T, d, dtype=torch.bfloat16, device=ids.device)
    scores = torch.zeros(B, graph.n_forward, graph.n_backward, dtype=torch.bfloat16, device=ids.device)

    def store(i):
        def hook(act, hook):
            acts[:, i] = act.detach()
        return hook

    def score(col, n):
        def hook(grad, hook):
            g = grad if grad.dim() == 3 else grad.sum(2)  # per-head q/k/v inputs -> the layer's
            scores[:, :n, col] = -torch.einsum("bfpd,bpd->bf", acts[:, :n], g)
        return hook

    fwd = [("hook_embed", store(0))]
    bwd = [(f"blocks.{L - 1}.hook_resid_post", score(graph.n_backward - 1, graph.n_forward))]
    for l in range(L):
        fwd += [(f"blocks.{l}.hook_attn_out", store(1 + 2 * l)), (f"blocks.{l}.hook_mlp_out", store(2 + 2 * l))]
        cols = graph.layer_destinations(l)
        for i, port in enumerate("qkv"):
            bwd.append((f"blocks.{l}.hook_{port}_input", score(cols.start + i, 1 + 2 * l)))
        bwd.append((f"blocks.{l}.hook_mlp_in", score(cols.stop - 1, 2 + 2 * l)))
    with tl.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
        logits = tl(ids)
        mask = targets != -100
        loss = torch.nn.functional.cross_entropy(logits[mask].float(), targets[mask])
        loss.backward()
    tl.zero_grad(set_to_none=True)
    return scores


def parse_runs(args) -> list[tuple[str, list[str], list[int]]]:
    """[(shape, granularities, lengths)] from --runs, or every --shapes entry with --granularity and --lengths."""
    if args.runs:
        runs = []
        for part in filter(None, args.runs.split(";")):
            shape, grans, lengths = part.split(":")
            runs.append((shape, grans.split(","), [int(t) for t in lengths.split(",")]))
    else:
        lengths = args.lengths or ("32,64" if args.tiny else "512,2048,8192,32768")
        runs = [(shape, args.granularity.split(","), [int(t) for t in lengths.split(",")])
                for shape in args.shapes.split(",")]
    unknown = sorted({shape for shape, _, _ in runs} - set(SHAPES))
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    return runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="qwen2-7b,mistral-7b,deepseek-math-7b")
    p.add_argument("--lengths", default="", help="default 512,2048,8192,32768 (--tiny: 32,64)")
    p.add_argument("--granularity", default="layer,head")
    p.add_argument("--runs", default="", help="shape:granularities:lengths;... (overrides the three above)")
    p.add_argument("--head-max-len", type=int, default=32768)
    p.add_argument("--window-kernels", default="flex,blocks", help=f"windowed attention kernels to time ({KERNELS})")
    p.add_argument("--baseline-lengths", default="512,1024")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--warmup", choices=["each", "first"], default="each", help="warm-up call before each row, or "
                   "only before a shape's first row (and each flex row)")
    p.add_argument("--batch-tokens", type=int, default=0,
                   help="batch shorter sequences up to this many tokens (0: the engine's default; seconds are per sample)")
    p.add_argument("--generation", action="store_true", help="also time batched generation")
    p.add_argument("--tiny", action="store_true", help="scaled-down shapes on the CPU (tests the script)")
    p.add_argument("--out", default="gpu_attribution.json")
    p.add_argument("--predict", metavar="FILE", help="print FILE's engine rows with all_kept_gib (CPU) and exit")
    args = p.parse_args()
    if args.predict:
        for row in predict(args.predict):
            print(json.dumps(row))
        return 0
    runs = parse_runs(args)
    device = "cpu" if args.tiny else "cuda"
    rate = matmul_rate(device)
    card = "cpu (tiny shapes)" if args.tiny else torch.cuda.get_device_name()
    print(f"{card}: matmul {rate / 1e12:.2f} TFLOP/s", flush=True)
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps({"card": card, "matmul_tflops": rate / 1e12, "rows": rows}, indent=1))

    for shape, grans, lengths in runs:
        model = build(shape, args.tiny)
        vocab = model.hf.config.vocab_size
        windowed = any(model.adapter.windows)
        warm = True
        for gran in grans:
            graph = graph_of(model.adapter, gran)
            if not args.tiny:
                emit(memory_check(model, graph))
            batch_tokens = args.batch_tokens or default_batch_tokens(model, graph)
            for kernel in args.window_kernels.split(",") if windowed else [None]:
                model.adapter.attention_kernel = kernel
                for T in lengths:
                    if gran == "head" and T > args.head_max_len:
                        continue
                    n = max(1, batch_tokens // T)
                    samples, cut = samples_of(T, vocab, n)
                    batch = make_batch(samples, cut, vocab)
                    try:  # flex compiles for each new length: always warmed up
                        sec, mem = timed(lambda: attribute_batch(model, batch, graph, opts=EngineOptions()), args.reps,
                                         device, warm or kernel == "flex")
                    except Exception as err:  # a kernel that fails here (e.g. flex without a compiler): record it
                        sec, mem = f"error: {type(err).__name__}: {str(err).splitlines()[0][:300]}", None
                    warm = args.warmup == "each"
                    sec = sec / n if isinstance(sec, float) else sec
                    emit(dict(shape=shape, method="eapcore", granularity=gran, tokens=T, batch=n, seconds=sec,
                              peak_gib=mem, floor_s=floor_flops(model, T, cut) / rate,
                              all_kept_gib=all_kept_gib(model, graph, n, T),
                              **({"window": max(w or 0 for w in model.adapter.windows), "kernel": kernel}
                                 if windowed else {})))
        if args.generation:
            emit(generation_rate(model))
        if args.baseline_lengths and not args.tiny:
            from eapcore.engine.models import to_hooked_transformer

            graph = graph_of(model.adapter, "layer")
            tl = to_hooked_transformer(model, use_split_qkv_input=True, use_hook_mlp_in=True,
                                       ungroup_grouped_query_attention=True, n_ctx=32768)
            model = None  # the adapter holds the transformers model too: drop both
            gc.collect()
            torch.cuda.empty_cache()
            tl.requires_grad_(True)  # as the authors ran it
            for T in map(int, args.baseline_lengths.split(",")):
                samples, cut = samples_of(T, vocab)
                batch = make_batch(samples, cut, vocab).to("cuda")
                sec, mem = timed(lambda: baseline_scores(tl, batch.ids, batch.targets, graph), args.reps)
                emit(dict(shape=shape, method="baseline", granularity="layer", tokens=T, seconds=sec, peak_gib=mem))
            del tl
        model = None
        gc.collect()
        if not args.tiny:
            torch.cuda.empty_cache()
    return 0


def memory_check(model: LoadedModel, graph, T: int = 4096) -> dict:
    """GPU memory one layer's kept autograd state takes, against the engine's memory model."""
    x = torch.randn(1, T, model.adapter.d_model, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    state = _layer(model.adapter, 0, x, True, graph.granularity == "layer")
    torch.cuda.synchronize()
    measured = (torch.cuda.memory_allocated() - before) / T
    del state
    return dict(shape=model.name, method="memory-model", granularity=graph.granularity, tokens=T,
                graph_bytes_per_token=measured,
                model_bytes_per_token=memory_per_token(model.adapter, graph, 2)["graph"])


def generation_rate(model: LoadedModel, batch: int = 32, prompt: int = 256, new: int = 256) -> dict:
    """Greedy batched generation with transformers: generated tokens per second."""
    ids = torch.randint(0, model.hf.config.vocab_size, (batch, prompt), device="cuda")
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.hf.generate(ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.hf.generate(ids, **kw)
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    return dict(shape=model.name, method="generate", batch=batch, prompt=prompt, new_tokens=new,
                seconds=sec, tokens_per_s=batch * new / sec)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
