"""GPU benchmark: EAP of 7B-shaped models on long sequences, against the paper's approach and the floor.

    python benchmarks/gpu_attribution.py --out results.json            # everything (one H100)
    python benchmarks/gpu_attribution.py --shapes qwen2-7b --lengths 2048,8192 --granularity layer

Models are built from the paper's exact configs with random bf16 weights on the GPU (speed and
memory do not depend on the weights; nothing is downloaded). Each sample has a prompt of T/2 tokens
and T_cut = T - T/2 + 1 answer tokens, so the model sees exactly T tokens and the loss covers the
answer half. Short sequences are batched as the runner batches them (by default the engine's own
choice, `default_batch_tokens`: as many tokens as fit with every layer's autograd graph kept), and
the time is reported per sample; the baseline runs one sample at a time, as the authors did. The
engine's memory model (`memory_per_token`) is checked against the memory one layer's graph
really takes on the card (rows with method "memory-model").

Reported per (shape, T, granularity): seconds per sample (median of `--reps` after one warm-up),
tokens per second, peak GPU memory, and time / floor, where the floor is the floating-point work
of one forward and one activation-only backward pass (matmuls, causal attention at 2x / 2.5x of
its forward for forward / backward, the unembedding on the loss positions) divided by the bf16
matmul rate measured on the same card in the same run. The baseline reproduces the paper's
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
                                 graph_of, make_batch, memory_per_token)
from eapcore.harness import Sample  # noqa: E402
from eapcore.engine.models import LoadedModel, make_adapter  # noqa: E402

SHAPES = {  # the paper's pairs (METHOD.md) and the numbers
    "qwen2-7b": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                               intermediate_size=18944, vocab_size=152064, rope_theta=1e6)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=14336, vocab_size=32000,
                                   sliding_window=None)),
    "deepseek-math-7b": ("llama", dict(hidden_size=4096, num_hidden_layers=30, num_attention_heads=32,
                                       num_key_value_heads=32, intermediate_size=11008, vocab_size=102400)),
}


def build(shape: str) -> LoadedModel:
    import transformers as tf

    arch, kw = SHAPES[shape]
    cls = {"qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig, "llama": tf.LlamaConfig}[arch]
    cfg = cls(max_position_embeddings=32768 + 8, tie_word_embeddings=False, **kw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in hf.parameters():  # keep activations in a sane range
            if p.dim() > 1:
                p.normal_(0, 0.02)
    hf.eval().requires_grad_(False)
    return LoadedModel(shape, hf, None, make_adapter(hf, arch), arch)


def matmul_rate(n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 dense matmul rate, FLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (start.elapsed_time(end) / 1e3)


def floor_flops(model: LoadedModel, T: int, n_loss: int) -> float:
    """FLOPs of one forward + one activation-only backward (no weight gradients)."""
    ad, c = model.adapter, model.hf.config
    d, L, dh = ad.d_model, ad.n_layers, ad.d_head
    per_tok_layer = 2 * (d * ad.n_heads * dh * 2 + d * ad.n_kv_heads * dh * 2 + 3 * d * c.intermediate_size)
    attn_fwd = 2 * T * T * ad.n_heads * dh  # causal: half of 4 T^2 H dh
    unembed = 2 * d * c.vocab_size * n_loss
    fwd = L * (T * per_tok_layer + attn_fwd) + unembed
    bwd = L * (T * per_tok_layer + 2.5 * attn_fwd) + unembed
    return fwd + bwd


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


def timed(fn, reps: int):
    """(median seconds, peak GiB) of fn() after one warm-up; ('OOM', None) if it runs out."""
    try:
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times), torch.cuda.max_memory_allocated() / 2 ** 30
    except torch.cuda.OutOfMemoryError:
        return "OOM", None
    finally:
        gc.collect()
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--lengths", default="512,2048,8192,32768")
    p.add_argument("--granularity", default="layer,head")
    p.add_argument("--head-max-len", type=int, default=32768)
    p.add_argument("--baseline-lengths", default="512,1024")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=0,
                   help="batch shorter sequences up to this many tokens (0: the engine's default; seconds are per sample)")
    p.add_argument("--generation", action="store_true", help="also time batched generation")
    p.add_argument("--out", default="gpu_attribution.json")
    args = p.parse_args()
    rate = matmul_rate()
    card = torch.cuda.get_device_name()
    print(f"{card}: bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        model = build(shape)
        vocab = model.hf.config.vocab_size
        for gran in args.granularity.split(","):
            graph = graph_of(model.adapter, gran)
            rows.append(memory_check(model, graph))
            print(json.dumps(rows[-1]), flush=True)
            batch_tokens = args.batch_tokens or default_batch_tokens(model, graph)
            for T in map(int, args.lengths.split(",")):
                if gran == "head" and T > args.head_max_len:
                    continue
                n = max(1, batch_tokens // T)
                samples, cut = samples_of(T, vocab, n)
                batch = make_batch(samples, cut, vocab)
                sec, mem = timed(lambda: attribute_batch(model, batch, graph, opts=EngineOptions()), args.reps)
                sec = sec / n if isinstance(sec, float) else sec
                row = dict(shape=shape, method="eapcore", granularity=gran, tokens=T, batch=n, seconds=sec,
                           peak_gib=mem, floor_s=floor_flops(model, T, cut) / rate)
                rows.append(row)
                print(json.dumps(row), flush=True)
        if args.generation:
            rows.append(generation_rate(model))
            print(json.dumps(rows[-1]), flush=True)
        if args.baseline_lengths:
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
                row = dict(shape=shape, method="baseline", granularity="layer", tokens=T, seconds=sec, peak_gib=mem)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del tl
        model = None
        gc.collect()
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps({"card": card, "matmul_tflops": rate / 1e12, "rows": rows}, indent=1))
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
