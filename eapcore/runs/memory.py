"""Memory a run needs on its device, and the batch size (tokens) that fits, from the model's
config alone (weights built on the meta device) and the engine's memory model."""
from __future__ import annotations

import functools
import math
import os
from typing import Any

from eapcore.runs import registry
from eapcore.runs.keys import max_new_tokens
from eapcore.specs import RunSpec

MAX_BATCH_TOKENS = {"cuda": 32768}  # a kill loses <= 1 batch; other devices: the engine's CPU_BATCH_TOKENS


@functools.lru_cache(maxsize=32)
def _param_count(name_or_path: str, revision: str | None, trust_remote_code: bool) -> tuple[int, Any]:
    """(parameter count, config) from the config alone (weights built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    from eapcore.engine.models import check_architecture, load_config

    config = load_config(name_or_path, revision, trust_remote_code)
    check_architecture(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters()), config


def _available_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _gpu_count(device) -> int:
    import torch

    return torch.cuda.device_count() if device.type == "cuda" else 1


def predict_memory(spec: RunSpec, sample_tokens: int | None = None, prompt_tokens: int = 256,
                   max_devices: int | None = None) -> dict[str, Any]:
    """Memory to attribute `spec` on its device, and the batch size (tokens) that fits.

    Model bytes = parameter count (from the config) x dtype size, the larger of the two models
    (they are loaded one at a time); activations from attribution.memory_per_token: one sample
    needs its stored activations, the working set and one layer's graph (the engine recomputes
    the layers whose graphs do not fit), plus the loss's logits chunk (attribution.fixed_bytes).
    sample_tokens: the longest truncated input (known after selection); before it, estimated as
    prompt_tokens + alpha x max_new_tokens (an upper bound for the answer part). Returns
    bytes_needed (model + one sample; fits if within 90% of what is free), bytes_available (free
    GPU memory, or free RAM on CPU), fits, batch_tokens (the spec's max_batch_tokens if set; else
    attribution.fit_batch_tokens of the memory the model leaves, capped by MAX_BATCH_TOKENS) and
    a message. When the model and one sample do not fit on one GPU, `devices` is the fewest GPUs
    of the host (at most max_devices; default: the visible ones, each assumed to have this one's
    free memory) over which the engine spreads the layers so that they fit (each holds its share
    of the weights and of the layers' state; the last also every stored source, gathered), and
    batch_tokens what fits on that last one; otherwise devices is 1."""
    from types import SimpleNamespace

    from eapcore.engine.attribution import CPU_BATCH_TOKENS, fit_batch_tokens, fixed_bytes, memory_per_token
    from eapcore.graph import Graph
    from eapcore.engine.models import config_dims, resolve_device

    att = spec.attribution
    device = resolve_device(att.device)
    dtype_bytes = 4 if att.dtype == "float32" else 2
    counts = [_param_count(registry.resolve_path(m.name_or_path), m.revision, m.trust_remote_code)
              for m in (spec.pair.base, spec.pair.tuned)]
    n_params, config = max(counts, key=lambda c: c[0])
    dims = config_dims(config)
    graph = Graph(dims["n_layers"], dims["n_heads"], dims["n_kv_heads"], att.granularity)
    d_head = getattr(config, "head_dim", None) or dims["d_model"] // dims["n_heads"]
    adapter = SimpleNamespace(config=config, d_head=d_head,
                              **{k: dims[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads")})
    mem = memory_per_token(adapter, graph, dtype_bytes)
    per_token = mem["stored"] + mem["working"] + mem["graph"]
    estimated = sample_tokens is None
    if estimated:
        sample_tokens = prompt_tokens + max(1, math.floor(spec.selection.alpha * max_new_tokens(spec)))
    model_bytes = n_params * dtype_bytes
    fixed = model_bytes + fixed_bytes(adapter, graph, device)
    available = _available_bytes(device)
    usable = int(0.9 * available)
    needed = fixed + per_token * sample_tokens
    fits = needed <= usable
    devices = 1
    if not fits:
        devices = next((k for k in range(2, (max_devices or _gpu_count(device)) + 1)
                        if model_bytes / k + needed - model_bytes <= usable), 1)
        fits = devices > 1
    if devices == 1:
        fit_tokens = fit_batch_tokens(adapter, graph, dtype_bytes, max(0, available - model_bytes), device)
    else:  # the last GPU: its share of the weights and layer graphs, every stored source, the working set
        spread = mem["stored"] + mem["working"] + -(-dims["n_layers"] // devices) * mem["graph"]
        free = available - model_bytes / devices - fixed_bytes(adapter, graph, device)
        fit_tokens = max(1, int(0.85 * free) // spread)
        needed = int(model_bytes / devices + needed - model_bytes)
    batch = att.max_batch_tokens or min(MAX_BATCH_TOKENS.get(device.type, CPU_BATCH_TOKENS), fit_tokens)
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    what = "up to " if estimated else ""
    on = f"{devices} GPUs (layers spread)" if devices > 1 else device.type
    if fits:
        message = (f"fits on {on}: model {gb(model_bytes)} + {what}{sample_tokens} tokens x "
                   f"{per_token / 1e3:.0f} KB per sample; {gb(available)} free{' per GPU' if devices > 1 else ''}; "
                   f"batches of {batch} tokens")
    else:
        message = (f"does not fit on {device.type}: one sample of {what}{sample_tokens} tokens needs {gb(needed)} "
                   f"(model {gb(model_bytes)}), {gb(available)} free. Use dtype bfloat16, layer granularity, "
                   "a smaller alpha or max_new_tokens, or a larger GPU")
    return {"device": str(device), "n_params": n_params, "model_bytes": model_bytes, "bytes_per_token": per_token,
            "sample_tokens": sample_tokens, "estimated": estimated, "bytes_needed": needed,
            "bytes_available": available, "fits": fits, "batch_tokens": int(batch), "devices": devices,
            "message": message}
