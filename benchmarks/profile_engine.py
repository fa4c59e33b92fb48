"""Profile one attribution call on a 7B-shaped model (developer tool; needs CUDA).

    python benchmarks/profile_engine.py --shape qwen2-7b --tokens 512 --granularity layer
Prints the top operators by GPU and by CPU time (torch.profiler).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_attribution as bench  # noqa: E402

from eapcore.engine.attribution import EngineOptions, attribute_batch, default_batch_tokens, graph_of, make_batch  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--shape", default="qwen2-7b")
p.add_argument("--tokens", default="512")
p.add_argument("--granularity", default="layer")
p.add_argument("--keep", type=int, default=None, help="layers whose graph is kept (default: the engine's choice)")
args = p.parse_args()
opts = EngineOptions(keep_graph_layers=args.keep)
model = bench.build(args.shape)
graph = graph_of(model.adapter, args.granularity)
for T in map(int, args.tokens.split(",")):
    n = max(1, default_batch_tokens(model, graph) // T)
    samples, cut = bench.samples_of(T, model.hf.config.vocab_size, n)
    batch = make_batch(samples, cut, model.hf.config.vocab_size)
    attribute_batch(model, batch, graph, opts=opts)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        attribute_batch(model, batch, graph, opts=opts)
        torch.cuda.synchronize()
    print(f"==== T={T}, batch {n}, peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
