"""Is bf16 attribution on a GPU the same bits when run twice? The Qwen2-7B shape (random bf16
weights, benchmarks/gpu_spread.py's `built_on`), one sample of 2,048 (and 8,192) tokens, in one
process. Two measurements, each one command (results: benchmarks/results_gpu_determinism.txt):

    python benchmarks/gpu_determinism.py kept          # the engine's default call, then the same
        # with every layer's graph kept explicitly (what the default chose, printed): equal?
    CUBLAS_WORKSPACE_CONFIG=:4096:8 python benchmarks/gpu_determinism.py twice
        # the same call twice with PyTorch's default attention kernel, with it pinned to the math
        # kernel, to cuDNN's, and with torch.use_deterministic_algorithms(True): equal?

Prints one line per case: whether the two score tensors are equal, and their largest difference
relative to the largest score. (--tiny: a 4-layer model on the CPU, to check the script.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_spread as G  # noqa: E402

from eapcore.engine import attribution as A  # noqa: E402
from eapcore.specs import AttributionSettings  # noqa: E402


def differ(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"equal {torch.equal(a, b)}, max |diff| / max |s| {((a - b).abs().max() / b.abs().max()).item():.3g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("kept", "twice"))
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    shape, device, dtype = ("tiny", "cpu", "float32") if args.tiny else ("qwen2-7b", "cuda", "bfloat16")
    model = G.built_on(shape, "cpu" if args.tiny else "cuda:0", getattr(torch, dtype))
    lengths = (300,) if args.tiny else (2048, 8192)
    if args.what == "kept":
        chosen = []
        choose = A.layers_to_keep
        A.layers_to_keep = lambda *a, **k: (lambda r: chosen.append(len(r)) or r)(choose(*a, **k))
        for length in lengths:
            for gran in ("layer", "head"):
                s, cut = G.sample(length, model.hf.config.vocab_size)
                st = AttributionSettings(granularity=gran, dtype=dtype, device=device, max_batch_tokens=10 ** 9)
                default = A.attribute(model, [s], cut, st).scores
                n = chosen[-1]
                explicit = A.attribute(model, [s], cut, st, opts=A.EngineOptions(keep_graph_layers=n)).scores
                print(f"kept {length} {gran}: default keeps {n} of {model.adapter.n_layers}; the same call with "
                      f"them kept explicitly: {differ(default, explicit)}", flush=True)
        return 0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s, cut = G.sample(lengths[0], model.hf.config.vocab_size)
    st = AttributionSettings(granularity="layer", dtype=dtype, device=device, max_batch_tokens=10 ** 9)

    def twice(backends) -> str:
        outs = []
        for _ in range(2):
            if backends:
                with sdpa_kernel(backends):
                    outs.append(A.attribute(model, [s], cut, st).scores)
            else:
                outs.append(A.attribute(model, [s], cut, st).scores)
        return differ(*outs)

    cases = [("default attention kernel", None), ("math kernel", [SDPBackend.MATH])]
    if not args.tiny:
        cases.append(("cuDNN kernel", [SDPBackend.CUDNN_ATTENTION]))
    for name, backends in cases:
        print(f"twice, {name}: {twice(backends)}", flush=True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    print(f"twice, default kernel, use_deterministic_algorithms: {twice(None)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
