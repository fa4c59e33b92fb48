"""The Edge Attribution Patching engine: one forward/backward loop for every method.

Score of edge u -> v (all modes), accumulated in float32:

    s(u->v) = sum over positions t and width d of  delta_a_u[t] * gbar_v[t]

    delta_a_u = a_u(ablated) - a_u(clean): -a_u(clean) for zero ablation (the paper's setting), or
                a_u(corrupted prompt) - a_u(clean) for classic clean/corrupted EAP;
    gbar_v    = dL/d(input of v) at the clean input (plain EAP), or its mean over the m points
                e_base + k/m (e_clean - e_base), k = 0..m-1, of EAP-IG over input embeddings
                (e_base = the corrupted prompt's embeddings, or zeros for zero ablation); the
                left Riemann sum, as EAP-IG's own code computes it (`ig_points`).

So s is the first-order change of the loss L when the edge is ablated: positive means ablating
(removing) the edge raises L. The loss is per sample; the built-in one is the truncated
self-cross-entropy of docs/METHOD.md: input = prompt + first T_cut - 1 answer tokens, L = mean CE of the
first T_cut answer tokens. A user metric (logits -> per-sample value) can replace it.

The loop, per batch of right-padded samples:
  1. forward layer by layer, keeping the residual stream before each layer, the sources (input
     embedding, attention outputs or per-head attention values z, MLP outputs) and the autograd
     state (activations only: weights are frozen) of as many layers as fit in memory;
  2. the loss gradient at the final residual stream, in chunks of positions;
  3. backward layer by layer, recomputing the layers whose state was not kept: the q, k and v
     inputs are separate autograd leaves, so their gradients are the q/k/v-path gradients without
     per-head copies of the residual stream; each layer's destination gradients are contracted at
     once with the stored sources that precede them (matmuls per sample, float32 accumulation)
     and then freed.
Memory is the model, the stored residual streams and sources (about (3L+1) x T x d values per
sample), the kept layers' state and one layer's working set (`memory_per_token`); nothing grows
with T^2 (fused attention). A model whose layers are spread over devices (Adapter.device_map,
eapcore.engine.placement) runs each layer on its device, with the same scores (`_Stores`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Callable, Container, Sequence

import torch

from eapcore.graph import Graph
from eapcore.harness import Sample
from eapcore.engine.models import POST_NORM, SUPPORTED, Adapter, LoadedModel, layer_windows, per_head
from eapcore.specs import SCORING_VERSION, AttributionSettings
from eapcore.engine.windowed_attention import BLOCK_SCORE_ELEMENTS

IGNORE = -100

# Tuning constants (measured in BENCHMARKS.md). None changes the scores beyond float rounding; the
# memory model (memory_per_token, fixed_bytes) counts with the same values.
CPU_BATCH_TOKENS = 2048  # padded tokens per batch on the CPU
LOSS_CHUNK = 1024  # positions per chunk of the loss's [positions, vocab] logits
CONTRACT_BLOCK_BYTES = 2 ** 29  # float32 block of positions per contraction (CPU / float32)
CPU_REDUCTION_PIECES = 32  # pieces one CPU reduction is split into, over the batch
GPU_SOURCE_PIECE = 600  # sources per transposed half-precision matmul on a GPU
GPU_DIRECT_MAX_DESTINATIONS = 16  # up to this many destinations: one direct matmul
HEAD_BLOCK_BYTES = {"cuda": 4 * 2 ** 30, "cpu": 2 ** 28}  # head granularity: one block of sources + destinations
SLACK_BYTES = 2 ** 30  # unaccounted activation memory
KEEP_GRAPH_FRACTION = 0.9  # of the free GPU memory, for kept layer graphs
CPU_KEEP_GRAPH_BYTES = 2 * 2 ** 30  # kept layer graphs on the CPU
BATCH_MEMORY_FRACTION = 0.85  # of the memory left by the model, for one batch


@dataclass
class Batch:
    """Right-padded token batch. ids/targets/corrupt_ids: [B, T]; lengths: [B].

    targets[b, t] is the token that position t must predict for the loss, IGNORE elsewhere.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor
    corrupt_ids: torch.Tensor | None = None

    @property
    def position_mask(self) -> torch.Tensor:  # bool [B, T], real (non-pad) positions
        return torch.arange(self.ids.shape[1], device=self.ids.device)[None] < self.lengths[:, None]

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.ids), move(self.lengths), move(self.targets), move(self.corrupt_ids))


class AttributionError(ValueError):
    """Bad input to the engine; the message says what is wrong and what to do."""


class NonFiniteError(AttributionError):
    """A sample's loss or scores are not finite (inf or nan): the sample is stopped, its scores
    are neither returned nor cached."""


# ---------------------------------------------------------------------------------------------
# Batches from samples
# ---------------------------------------------------------------------------------------------

def sample_tokens(sample: Sample, cut_len: int) -> tuple[list[int], list[int]]:
    """(input ids, target ids) of one sample: prompt + first cut_len-1 answer tokens, and the
    first cut_len answer tokens, which positions P-1 .. P+cut_len-2 predict."""
    if cut_len < 1:
        raise AttributionError(f"T_cut must be at least 1, got {cut_len}")
    if len(sample.answer_ids) < cut_len:
        raise AttributionError(f"sample idx {sample.idx}: its answer has {len(sample.answer_ids)} tokens, "
                               f"fewer than T_cut={cut_len}; lower --cut-len or drop the sample")
    return sample.prompt_ids + sample.answer_ids[: cut_len - 1], sample.answer_ids[:cut_len]


def make_batch(samples: Sequence[Sample], cut_len: int, vocab_size: int, pad_id: int = 0,
               corrupt: Sequence[Sample] | None = None) -> Batch:
    rows, targets, corr = [], [], []
    for i, s in enumerate(samples):
        ids, tgt = sample_tokens(s, cut_len)
        bad = [t for t in ids + tgt if not 0 <= t < vocab_size]
        if bad:
            raise AttributionError(f"sample idx {s.idx}: token id {bad[0]} is outside the model's vocabulary "
                                   f"(size {vocab_size}); were the samples tokenised for another model?")
        rows.append(ids)
        targets.append(tgt)
        if corrupt is not None:
            c_ids, _ = sample_tokens(corrupt[i], cut_len)
            if len(c_ids) != len(ids):
                raise AttributionError(f"sample idx {s.idx}: the corrupted input has {len(c_ids)} tokens, the clean "
                                       f"one {len(ids)}; clean/corrupted EAP needs token-aligned pairs")
            corr.append(c_ids)
    T = max(map(len, rows))
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    tgt = torch.full((B, T), IGNORE, dtype=torch.long)
    cids = torch.full((B, T), pad_id, dtype=torch.long) if corrupt is not None else None
    for b, (r, t) in enumerate(zip(rows, targets)):
        ids[b, : len(r)] = torch.tensor(r)
        P = len(r) - (cut_len - 1)
        tgt[b, P - 1: P - 1 + cut_len] = torch.tensor(t)
        if cids is not None:
            cids[b, : len(r)] = torch.tensor(corr[b])
    return Batch(ids, torch.tensor([len(r) for r in rows]), tgt, cids)


# ---------------------------------------------------------------------------------------------
# Losses: (adapter, final residual [B,T,d], batch) -> (loss [B] float32, dL/dresid [B,T,d])
# ---------------------------------------------------------------------------------------------

LossFn = Callable[[Adapter, torch.Tensor, Batch], tuple[torch.Tensor, torch.Tensor]]


def self_ce_loss(adapter: Adapter, x: torch.Tensor, batch: Batch, chunk: int = LOSS_CHUNK):
    """Mean cross-entropy of each sample's target tokens, computed on target positions only and in
    chunks of `chunk` positions, so the [positions, vocab] logits never exist all at once. Each
    position's term is put in its own cell and summed per sample at the end (no atomic adds), so
    the loss has the same bits on every run."""
    B = x.shape[0]
    pos = (batch.targets != IGNORE).nonzero(as_tuple=False)  # [n, 2] (b, t)
    counts = torch.bincount(pos[:, 0], minlength=B).clamp(min=1).to(torch.float32)
    terms = torch.zeros(batch.targets.shape, dtype=torch.float32, device=x.device)  # [B, T]
    grad = torch.zeros_like(x)
    norm = adapter.ln_final()
    for i in range(0, len(pos), chunk):
        b, t = pos[i: i + chunk].unbind(1)
        xs = x[b, t].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = adapter.unembed(norm(xs)).float()
            ce = torch.nn.functional.cross_entropy(logits, batch.targets[b, t], reduction="none") / counts[b]
            (g,) = torch.autograd.grad(ce.sum(), xs)
        terms[b, t] = ce.detach()
        grad[b, t] = g
    return terms.sum(1), grad


def metric_loss(metric: Callable[[torch.Tensor, Batch], torch.Tensor]) -> LossFn:
    """Wrap a user metric `metric(logits [B,T,V], batch) -> [B]` as a loss (full logits: small models)."""

    def loss_fn(adapter: Adapter, x: torch.Tensor, batch: Batch):
        xs = x.detach().requires_grad_(True)
        with torch.enable_grad():
            value = metric(adapter.unembed(adapter.ln_final()(xs)), batch)
            (g,) = torch.autograd.grad(value.sum(), xs)
        return value.detach().float(), g

    return loss_fn


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------

def contract(src: torch.Tensor, dst: torch.Tensor, block_bytes: int = CONTRACT_BLOCK_BYTES) -> torch.Tensor:
    """[U,B,T,d] x [V,B,T,d] -> [B,U,V] float32: sums over positions and width, per sample.

    Inputs may be strided along U and B (views into the stored sources); each sample's [T, d] must
    be contiguous. Half precision on a GPU: matmuls per sample whose products accumulate and are
    written in float32 (`out_dtype`). Elsewhere, blocks of positions are upcast to float32 and
    reduced with matmuls; U and V are small and T*d large, so each reduction is also split into
    pieces (strided views, no copies) that one batched call computes in parallel."""
    U, B, T, d = src.shape
    V = dst.shape[0]
    out = torch.zeros(B, U, V, dtype=torch.float32, device=src.device)
    if src.is_cuda and src.dtype in (torch.bfloat16, torch.float16):
        # With many destinations (head granularity) cuBLAS reads [U, K] x [K, V] at 0.8-1 TB/s on an
        # H100 but computes the transposed product in pieces of <= 600 sources at 2-2.8 TB/s
        # (BENCHMARKS.md); with a few destinations (layer granularity) the direct product is faster.
        step = -(-U // -(-U // GPU_SOURCE_PIECE))  # equal pieces of at most GPU_SOURCE_PIECE sources
        for b in range(B):
            a, c = src[:, b].reshape(U, -1), dst[:, b].reshape(V, -1)
            if V < GPU_DIRECT_MAX_DESTINATIONS:
                out[b] = torch.mm(a, c.T, out_dtype=torch.float32)
                continue
            for u0 in range(0, U, step):
                out[b, u0:u0 + step] = torch.mm(c, a[u0:u0 + step].T, out_dtype=torch.float32).T
        return out
    tb = max(1, min(T, block_bytes // (4 * B * (U + V) * d)))
    for t0 in range(0, T, tb):
        a = src[:, :, t0:t0 + tb].float()
        c = dst[:, :, t0:t0 + tb].float()
        K = a.shape[2] * d
        n = math.gcd(max(1, CPU_REDUCTION_PIECES // B), K)
        for b in range(B):
            out[b] += torch.bmm(a[:, b].reshape(U, n, K // n).transpose(0, 1),
                                c[:, b].reshape(V, n, K // n).permute(1, 2, 0)).sum(0)
    return out


class _Sources:
    """What each source node wrote into the residual stream, per sample and position, source-major
    (so a block of sources is one strided view and head outputs are written into place), for the
    source nodes of the first `n_layers` layers (all by default).

    Layer granularity: `resid` [2L+1, B, T, d] in forward-node order.
    Head granularity:  `resid` [L+1, B, T, d] (input, m0 .. m{L-1}) and `z` [L, B, T, H*dh], the
    per-head attention values; head h of layer l writes z_h @ W_O[h] (formed on demand)."""

    def __init__(self, graph: Graph, adapter: Adapter, B: int, T: int, dtype, device, n_layers: int | None = None):
        self.graph, self.adapter, self.device = graph, adapter, torch.device(device)
        L, d = graph.n_layers if n_layers is None else n_layers, adapter.d_model
        n_resid = graph.mlp_source(L - 1) + 1 if graph.granularity == "layer" else L + 1
        self.resid = torch.zeros(n_resid, B, T, d, dtype=dtype, device=device)
        self.z = None if graph.granularity == "layer" else \
            torch.zeros(L, B, T, adapter.n_heads * adapter.d_head, dtype=dtype, device=device)
        self._w_o: dict[int, torch.Tensor] = {}

    def copy_layers(self, other: "_Sources", layers: range) -> None:
        """Copy the sources of `layers` (and the input with layer 0) from `other`, another device's store."""
        g = self.graph
        if g.granularity == "layer":
            rows = slice(0 if layers.start == 0 else g.attn_sources(layers.start).start, g.mlp_source(layers[-1]) + 1)
        else:
            rows = slice(0 if layers.start == 0 else 1 + layers.start, 1 + layers.stop)
            self.z[layers.start: layers.stop] = other.z[layers.start: layers.stop].to(self.device)
        self.resid[rows] = other.resid[rows].to(self.device)

    def put(self, node: str, layer: int | None, value: torch.Tensor):
        g = self.graph
        if node == "input":
            self.resid[0] = value
        elif g.granularity == "layer":
            self.resid[g.mlp_source(layer) if node == "mlp" else g.attn_sources(layer).start] = value
        elif node == "mlp":
            self.resid[1 + layer] = value
        else:
            self.z[layer] = self.adapter.head_values(layer, value)

    def block(self, n: int, t0: int, t1: int) -> torch.Tensor:
        """The first `n` forward nodes' contributions at positions [t0, t1): [n, B, c, d]."""
        if self.graph.granularity == "layer":
            return self.resid[:n, :, t0:t1]
        g, ad = self.graph, self.adapter
        out = self.resid.new_empty(n, self.resid.shape[1], t1 - t0, ad.d_model)
        out[0] = self.resid[0, :, t0:t1]
        for l in range(g.n_layers):
            heads = g.attn_sources(l)
            if heads.start >= n:
                break
            if l not in self._w_o:
                self._w_o[l] = ad.head_out_weight(l).to(self.device)
            h = min(heads.stop, n) - heads.start
            z = self.z[l, :, t0:t1].unflatten(-1, (ad.n_heads, ad.d_head))[:, :, :h]
            per_head(z, self._w_o[l][:h], out[heads.start: heads.start + h])
            if g.mlp_source(l) < n:
                out[g.mlp_source(l)] = self.resid[1 + l, :, t0:t1]
        return out

    def scale_(self, factor: float, mask: torch.Tensor):
        """Multiply by `factor` and zero padded positions (mask [B, T])."""
        m = mask[None, :, :, None].to(self.device, self.resid.dtype) * factor
        self.resid.mul_(m)
        if self.z is not None:
            self.z.mul_(m)

    def sub_(self, other: "_Sources"):
        self.resid.sub_(other.resid)
        if self.z is not None:
            self.z.sub_(other.z)


class _Stores:
    """The sources of a model whose layers are spread over devices (Adapter.device_map): one
    `_Sources` per run of consecutive layers on one device, on that device, holding the sources
    of every layer up to its last. The forward writes each layer's sources on its own device;
    `gather` then copies the earlier devices' sources into each later store once per batch, so
    every contraction is the single-device one (the same sources, shapes and order) on the
    destination's device, and only destination gradients stay where they are. With one device
    this is one `_Sources`."""

    def __init__(self, graph: Graph, adapter: Adapter, B: int, T: int, dtype):
        self.graph = graph
        self.segments = layer_segments(adapter)
        self.stores = [_Sources(graph, adapter, B, T, dtype, dev, layers.stop) for dev, layers in self.segments]
        self._of_layer = {l: i for i, (_, layers) in enumerate(self.segments) for l in layers}

    def put(self, node: str, layer: int | None, value: torch.Tensor):
        store = self.stores[0 if layer is None else self._of_layer[layer]]
        store.put(node, layer, value.to(store.device))

    def of_layer(self, layer: int) -> _Sources:
        """The store on `layer`'s device (every source before the layer, once gathered)."""
        return self.stores[self._of_layer[layer]]

    @property
    def last(self) -> _Sources:
        return self.stores[-1]

    def gather(self):
        for i, store in enumerate(self.stores):
            for earlier, (_, layers) in zip(self.stores[:i], self.segments):
                store.copy_layers(earlier, layers)

    def scale_(self, factor: float, mask: torch.Tensor):
        for store in self.stores:
            store.scale_(factor, mask)

    def sub_(self, other: "_Stores"):
        for store, theirs in zip(self.stores, other.stores):
            store.sub_(theirs)


def layer_segments(adapter: Adapter) -> list[tuple[torch.device, range]]:
    """Runs of consecutive layers on one device, in order: [(device, layers)]."""
    out: list[tuple[torch.device, range]] = []
    for l in range(adapter.n_layers):
        dev = adapter.layer_device(l)
        if out and out[-1][0] == dev:
            out[-1] = (dev, range(out[-1][1].start, l + 1))
        else:
            out.append((dev, range(l, l + 1)))
    return out


@dataclass
class EngineOptions:
    """Engine knobs that do not change the scores (beyond float rounding)."""

    position_chunk: int = 0  # positions per contraction block at head granularity (0: auto)
    keep_graph_layers: int | None = None  # layers whose autograd graph the forward keeps (None: fit memory)


@dataclass
class _Layer:
    """One layer's computation from its residual input, with the handles the backward needs."""

    leaves: tuple[torch.Tensor, ...]  # (x,) or (x_q, x_k, x_v): the attention's residual input(s)
    qkv: tuple[torch.Tensor, ...]  # head granularity: projections before RoPE [B,T,heads*dh]; else ()
    z: torch.Tensor  # attention values [B,T,H*dh]
    attn: torch.Tensor  # attention output [B,T,d]
    xm: torch.Tensor  # MLP residual input [B,T,d]
    mlp: torch.Tensor  # MLP output [B,T,d]


def _layer(adapter: Adapter, l: int, x: torch.Tensor, grad: bool, split_qkv: bool) -> _Layer:
    """Run layer l on residual x. With grad, inputs are fresh autograd leaves (weights stay
    frozen); split_qkv gives q, k and v separate leaves so their gradients come apart."""
    with torch.set_grad_enabled(grad):
        leaves = tuple(x.detach().requires_grad_(grad) for _ in range(3 if grad and split_qkv else 1))
        norm = adapter.ln1(l)
        hs = [norm(leaf) for leaf in leaves]
        q, k, v = adapter.qkv(l, hs[0], hs[-2 if len(hs) == 3 else 0], hs[-1])
        z = adapter.attend(l, q, k, v)
        a = adapter.attn_out(l, z)
        xm = (x + a.detach()).requires_grad_(grad)
        m = adapter.mlp(l, adapter.ln2(l)(xm))
    return _Layer(leaves, () if split_qkv else (q, k, v), z, a, xm, m)


def _forward(adapter: Adapter, graph: Graph, e: torch.Tensor, sources: _Stores | None,
             keep: Container[int] = ()) -> tuple[list[torch.Tensor], dict[int, _Layer]]:
    """Run the layers from embeddings e [B,T,d], each on its device (the residual stream moves
    at device boundaries).

    Returns the residual stream before each layer and after the last ([L+1] x [B,T,d], each on
    its layer's device) and the autograd state of the layers in `keep` (the backward recomputes
    the others); fills `sources` if given."""
    resid, kept = [], {}
    x = e
    if sources is not None:
        sources.put("input", None, e)
    for l in range(graph.n_layers):
        x = x.to(adapter.layer_device(l))
        resid.append(x)
        grad = l in keep
        st = _layer(adapter, l, x, grad, graph.granularity == "layer")
        x = st.xm.detach() + st.mlp.detach()
        if grad:
            kept[l] = st
        if sources is not None:
            sources.put("attn", l, st.attn.detach() if graph.granularity == "layer" else st.z.detach())
            sources.put("mlp", l, st.mlp.detach())
    return resid + [x], kept


def _head_destinations(adapter: Adapter, layer: int, x: torch.Tensor, dq, dk, dv, g_m, t0: int, t1: int) -> torch.Tensor:
    """Destination gradients of layer `layer` at head granularity, positions [t0, t1):
    [H+2G+1, B, c, d]: for each head's q, k and v input the layer norm's vector-Jacobian product
    of the head's cotangent (adapter.head_cotangents: dq_h @ W_q[h], likewise k and v, or through
    the q/k norm where it spans all heads), then the MLP input's gradient g_m."""
    B, c = x.shape[0], t1 - t0
    V = adapter.n_heads + 2 * adapter.n_kv_heads
    cot = x.new_empty(V, B, c, adapter.d_model)
    xb = x[:, t0:t1]
    i = 0
    for which, dproj in (("q", dq), ("k", dk), ("v", dv)):
        n = dproj.shape[-1] // adapter.d_head
        adapter.head_cotangents(layer, which, xb, dproj[:, t0:t1], cot[i: i + n])
        i += n
    out = x.new_empty(V + 1, B, c, adapter.d_model)
    adapter.ln1_vjp(layer, xb, cot, out[:V])
    out[V] = g_m[:, t0:t1]
    return out


def _backward(adapter: Adapter, graph: Graph, resid: list[torch.Tensor], kept: dict[int, _Layer],
              g_final: torch.Tensor, sources: _Stores, scores: torch.Tensor, weight: float, opts: EngineOptions):
    """Walk the layers from last to first, adding weight * <sources, destination grads> to
    scores [B, F, Bk] (float32). Layers not in `kept` are recomputed. Each layer's gradients stay
    on its device and are contracted there with the gathered sources (_Stores)."""
    dtype = resid[0].dtype
    B, T, d = g_final.shape
    head = graph.granularity == "head"
    # positions per block at head granularity: the sources, and the destinations with their float32
    # temporaries (about 6x)
    per_position = B * d * g_final.element_size() * (graph.n_forward + 6 * graph.dst_per_layer)
    chunk = opts.position_chunk or max(1, min(T, head_block_bytes(g_final.device) // per_position))

    def add(store: _Sources, n_src: int, dst_cols: slice, dst: torch.Tensor | Callable[[int, int], torch.Tensor]):
        """scores[:, :n_src, dst_cols] += weight * <first n_src sources, dst [V,B,T,d]> on the
        store's device; at head granularity one block of positions at a time (sources and
        callable dst are formed per block)."""
        step = chunk if head else T
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            d_blk = dst(t0, t1) if callable(dst) else dst[:, :, t0:t1].to(store.device)  # [V, B, c, d]
            scores[:, :n_src, dst_cols] += (weight * contract(store.block(n_src, t0, t1), d_blk)).to(scores.device)

    add(sources.last, graph.n_forward, slice(graph.n_backward - 1, graph.n_backward), g_final[None])
    g = g_final.float()  # dL/d(residual stream), float32, updated in place layer by layer
    for l in reversed(range(graph.n_layers)):
        g = g.to(resid[l].device)
        st = kept.pop(l, None) or _layer(adapter, l, resid[l], True, not head)
        (g_m,) = torch.autograd.grad(st.mlp, st.xm, g.to(dtype))
        g.add_(g_m)  # now at the MLP's residual input
        grads = torch.autograd.grad(st.attn, st.leaves + (st.qkv if head else ()), g.to(dtype))
        del st
        cols = graph.layer_destinations(l)
        n_mlp = graph.n_sources_before_mlp(l)
        # q, k, v and MLP input in one pass over the sources (at head granularity: one forming of
        # the head outputs); the non-edges among them (this attention's outputs into its own q, k,
        # v) are zeroed by the real-edge mask
        if head:
            dq, dk, dv = grads[1:]
            x = resid[l]
            add(sources.of_layer(l), n_mlp, cols, lambda t0, t1: _head_destinations(adapter, l, x, dq, dk, dv, g_m, t0, t1))
            g.add_(grads[0])
        else:
            add(sources.of_layer(l), n_mlp, cols, torch.stack(grads + (g_m,)))
            for gi in grads:
                g.add_(gi)


def memory_per_token(adapter: Adapter, graph: Graph, dtype_bytes: int) -> dict[str, int]:
    """Activation bytes per token of one sample, by what holds them:
    stored  - the residual stream before each layer and the sources, kept from forward to backward;
    graph   - one layer's autograd state (weights frozen, fused or windowed attention: nothing
              T x T): rotated q and k, v, attention values and output, MLP input and output, the
              gated MLP's gate and up (GPT-2's GELU keeps about five d_ff-wide tensors), float32
              norm statistics and attention log-sum-exps; at head granularity also q and k before
              rotation; Qwen3's per-head q/k norms keep their inputs (which are those q and k);
              OLMo's q/k norms and output norms keep their inputs;
    working - the backward's transients at one layer (float32 residual gradients, the stacked
              destination gradients, the MLP's and attention's input gradients).
    Reads only the config and dimensions (the runner sizes runs before loading a model)."""
    c = adapter.config
    arch = getattr(c, "model_type", None)
    H, d, dh = adapter.n_heads, adapter.d_model, adapter.d_head
    q, kv = H * dh, adapter.n_kv_heads * dh
    d_ff = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d
    mlp = 2 * d_ff if getattr(c, "hidden_act", None) == "silu" else 5 * d_ff
    head = graph.granularity == "head"
    n_stored = adapter.n_layers + 1 + (graph.n_forward if not head else adapter.n_layers + 1)
    stored = dtype_bytes * n_stored * d + (dtype_bytes * adapter.n_layers * q if head else 0)
    saved = 3 * d + 2 * q + 2 * kv + mlp + (q + kv if head or arch == "qwen3" else 0)
    saved += q + kv + 2 * d if arch in POST_NORM else 0
    small = 4 * (H + 4) + (4 * (H + adapter.n_kv_heads) if arch == "qwen3" else 0)
    return {"stored": stored, "graph": dtype_bytes * saved + small,
            "working": dtype_bytes * (8 * d + 3 * d_ff + 2 * (q + 2 * kv)) + 4 * (4 * d + q)}


def fixed_bytes(adapter: Adapter, graph: Graph, device) -> int:
    """Activation bytes that do not grow with the batch: the loss's logits chunk (float32 logits,
    softmax and gradient over LOSS_CHUNK positions), the head-granularity contraction block, one block
    of the windowed attention's "blocks" kernel if a layer has a window, slack."""
    c = adapter.config
    vocab = getattr(c, "vocab_size", 50257)
    windowed = any(layer_windows(c, c.model_type)) if getattr(c, "model_type", None) in SUPPORTED else False
    return LOSS_CHUNK * vocab * 16 + (head_block_bytes(device) if graph.granularity == "head" else 0) + \
        (3 * 4 * BLOCK_SCORE_ELEMENTS if windowed else 0) + SLACK_BYTES


def head_block_bytes(device) -> int:
    """Memory for one block of sources and destinations at head granularity."""
    return HEAD_BLOCK_BYTES["cuda" if torch.device(device).type == "cuda" else "cpu"]


def free_cuda_bytes(device) -> int:
    """Memory this process can still use: free on the card plus what PyTorch's caching
    allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def layers_to_keep(adapter: Adapter, graph: Graph, B: int, T: int, opts: EngineOptions, dtype) -> set[int]:
    """The layers whose graphs the forward keeps: the last opts.keep_graph_layers, or on each
    device the last of its layers that fit in its free GPU memory once the stored activations and
    the backward's working set are set aside, with room to recompute one more layer (on the
    CPU: up to 2 GiB of them). Call after allocating the sources."""
    L = adapter.n_layers
    if opts.keep_graph_layers is not None:
        return set(range(L - min(opts.keep_graph_layers, L), L))
    dtype_bytes = torch.finfo(dtype).bits // 8
    mem = memory_per_token(adapter, graph, dtype_bytes)
    per_layer = mem["graph"] * B * T
    pools: dict[torch.device, list[int]] = {}  # one memory per GPU; the CPU's is shared
    for l in range(L):
        dev = adapter.layer_device(l)
        pools.setdefault(dev if dev.type == "cuda" else torch.device("cpu"), []).append(l)
    keep: set[int] = set()
    for dev, layers in pools.items():
        if dev.type == "cuda":
            resid = (len(layers) + 1) * adapter.d_model * dtype_bytes * B * T
            budget = KEEP_GRAPH_FRACTION * (free_cuda_bytes(dev) - resid - mem["working"] * B * T
                                            - fixed_bytes(adapter, graph, dev)) - per_layer
        else:
            budget = CPU_KEEP_GRAPH_BYTES
        n = int(max(0, min(len(layers), budget // max(per_layer, 1))))
        keep.update(layers[len(layers) - n:])
    return keep


def fit_batch_tokens(adapter: Adapter, graph: Graph, dtype_bytes: int, free_bytes: int, device) -> int:
    """Padded tokens per batch such that every layer's graph can be kept (no recomputation) within
    85% of free_bytes (the memory left once the model is loaded); at least 1. Longer samples still
    run, alone, recomputing the layers that do not fit."""
    mem = memory_per_token(adapter, graph, dtype_bytes)
    per_token = mem["stored"] + mem["working"] + adapter.n_layers * mem["graph"]
    return max(1, int(BATCH_MEMORY_FRACTION * (free_bytes - fixed_bytes(adapter, graph, device))) // per_token)


def attribute_batch(model: LoadedModel | Adapter, batch: Batch, graph: Graph, loss_fn: LossFn = self_ce_loss,
                    ablation: str = "zero", ig_steps: int = 0, opts: EngineOptions | None = None):
    """Scores of one batch: ([B, F, Bk] float32 with non-edges zeroed, clean loss [B] float32)."""
    adapter = model.adapter if isinstance(model, LoadedModel) else model
    opts = opts or EngineOptions()
    if ablation not in ("zero", "corrupted"):
        raise AttributionError(f"ablation must be 'zero' or 'corrupted', not {ablation!r}")
    if ablation == "corrupted" and batch.corrupt_ids is None:
        raise AttributionError("clean/corrupted EAP needs corrupted inputs (corrupt_ids)")
    dev = adapter.embed_device
    batch = batch.to(dev)
    at_head = batch.to(adapter.head_device)
    dtype = next(adapter.hf.parameters()).dtype
    B, T = batch.ids.shape
    mask = batch.position_mask
    loss_of = lambda x: loss_fn(adapter, x.to(adapter.head_device), at_head)  # noqa: E731
    scores = torch.zeros(B, graph.n_forward, graph.n_backward, dtype=torch.float32, device=dev)

    with torch.no_grad():
        e_clean = adapter.embed(batch.ids)
    if ablation == "zero" and ig_steps == 0:  # the paper's setting: one pass does it all
        sources = _Stores(graph, adapter, B, T, dtype)
        keep = layers_to_keep(adapter, graph, B, T, opts, dtype)
        resid, kept = _forward(adapter, graph, e_clean, sources, keep)
        sources.scale_(-1.0, mask)
        sources.gather()
        loss, g_final = loss_of(resid[-1])
        _backward(adapter, graph, resid, kept, g_final, sources, scores, 1.0, opts)
    else:
        sources = _Stores(graph, adapter, B, T, dtype)
        resid, _ = _forward(adapter, graph, e_clean, sources)
        loss = loss_of(resid[-1])[0]  # the clean loss, reported in every mode
        del resid
        if ablation == "corrupted":
            with torch.no_grad():
                e_base = adapter.embed(batch.corrupt_ids)
            corrupted = _Stores(graph, adapter, B, T, dtype)
            _forward(adapter, graph, e_base, corrupted)[0].clear()
            corrupted.sub_(sources)  # a_corrupted - a_clean
            sources = corrupted
            sources.scale_(1.0, mask)
        else:
            e_base = torch.zeros_like(e_clean)
            sources.scale_(-1.0, mask)
        sources.gather()
        keep = layers_to_keep(adapter, graph, B, T, opts, dtype)
        for e in ig_points(e_clean, e_base, ig_steps):
            resid, kept = _forward(adapter, graph, e, None, keep)
            _backward(adapter, graph, resid, kept, loss_of(resid[-1])[1], sources, scores, 1.0 / max(ig_steps, 1),
                      opts)
            del resid, kept
    scores *= graph.real_edge_mask.to(dev)
    return scores, loss


def ig_points(e_clean: torch.Tensor, e_base: torch.Tensor, steps: int):
    """Where the gradients are taken: the clean input for plain EAP (steps = 0); for EAP-IG with m
    steps, e_base + (k/m)(e_clean - e_base) for k = 0 .. m-1, the left Riemann sum of EAP-IG's own
    code (hannamw/EAP-IG, src/eap/attribute.py, get_scores_eap_ig: `for step in range(0, steps)`)."""
    if steps == 0:
        yield e_clean
    for k in range(steps):
        yield e_base + (k / steps) * (e_clean - e_base)


def graph_of(adapter: Adapter, granularity: str) -> Graph:
    return Graph(adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, granularity)


def pack_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sample indices (longest first) into batches of at most max_tokens padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@dataclass
class AttributionResult:
    scores: torch.Tensor  # [N, F, Bk] float32, non-edges zero
    loss: torch.Tensor  # [N] float32
    graph: Graph
    manifest: dict = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"scores": self.scores.contiguous(), "real_edge_mask": self.graph.real_edge_mask.contiguous(),
                   "loss": self.loss.contiguous()}, str(out / "scores.safetensors"))
        self.graph.save(out / "graph.json")
        with open(out / "manifest.json", "w") as fh:
            json.dump(self.manifest, fh, indent=1)


def attribute(model: LoadedModel, samples: Sequence[Sample], cut_len: int,
              settings: AttributionSettings = AttributionSettings(), loss_fn: LossFn = self_ce_loss,
              corrupt: Sequence[Sample] | None = None, opts: EngineOptions | None = None,
              on_batch: Callable[[list[int], torch.Tensor, torch.Tensor], None] | None = None,
              progress: bool = False) -> AttributionResult:
    """Score every sample; per-sample matrices in the order of `samples`.

    on_batch(indices, scores [b,F,Bk], loss [b]) is called after each batch (for caching)."""
    if not samples:
        raise AttributionError("no samples to attribute")
    graph = graph_of(model.adapter, settings.granularity)
    vocab = model.hf.get_input_embeddings().num_embeddings
    pad = (model.tokenizer.pad_token_id if model.tokenizer is not None else None) or 0
    lengths = [len(sample_tokens(s, cut_len)[0]) for s in samples]
    max_tokens = settings.max_batch_tokens or default_batch_tokens(model, graph)
    batches = pack_batches(lengths, max_tokens)
    scores = torch.zeros(len(samples), graph.n_forward, graph.n_backward)
    loss = torch.zeros(len(samples))
    bar = _progress(len(samples), progress)
    for idx in batches:
        batch = make_batch([samples[i] for i in idx], cut_len, vocab, pad,
                           None if corrupt is None else [corrupt[i] for i in idx])
        s, l_ = attribute_batch(model, batch, graph, loss_fn, settings.ablation, settings.ig_steps, opts)
        s, l_ = s.cpu(), l_.cpu()
        check_finite(model.name, [samples[i] for i in idx], s, l_)
        scores[idx], loss[idx] = s, l_
        if on_batch is not None:
            on_batch(idx, s, l_)
        bar.update(len(idx))
    bar.close()
    manifest = result_manifest(model.name, samples, cut_len, settings,
                               dtype=str(model.dtype).replace("torch.", ""), device=str(model.device))
    return AttributionResult(scores, loss, graph, manifest)


def check_finite(model_name: str, samples: Sequence[Sample], scores: torch.Tensor, loss: torch.Tensor,
                 consequence: str = "the sample is stopped and nothing of it is cached or pooled") -> None:
    """NonFiniteError naming the model and the first sample whose loss or scores [b, F, Bk] are
    not finite, and what follows (`consequence`)."""
    bad_loss = ~torch.isfinite(loss)
    bad = (bad_loss | ~torch.isfinite(scores).flatten(1).all(1)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        what = "loss is" if bad_loss[i] else "scores are"
        raise NonFiniteError(f"model {model_name}, sample idx {samples[i].idx}: its {what} not finite "
                             f"(loss {loss[i].item()}); {consequence}. Usual causes: float16 overflow (use "
                             "bfloat16 or float32) or damaged weights")


def result_manifest(model_name: str, samples: Sequence[Sample], cut_len: int, settings: AttributionSettings,
                    **extra) -> dict:
    """manifest.json of an attribution result (format in the README): the model, the sample ids in
    score order, T_cut, the settings, the scoring and library versions, then `extra`."""
    return {"model": model_name, "sample_ids": [s.idx for s in samples], "cut_len": cut_len,
            "settings": asdict(settings), "scoring_version": SCORING_VERSION, "versions": library_versions(),
            **extra}


def default_batch_tokens(model: LoadedModel, graph: Graph) -> int:
    """Tokens per batch: every layer's graph kept in the free GPU memory (fit_batch_tokens) on
    CUDA; CPU_BATCH_TOKENS on CPU."""
    if model.device.type != "cuda":
        return CPU_BATCH_TOKENS
    return fit_batch_tokens(model.adapter, graph, torch.finfo(model.dtype).bits // 8,
                            free_cuda_bytes(model.device), model.device)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="attribute", unit="sample", disable=not enabled, file=sys.stderr)


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def command(argv: list[str]) -> int:
    from eapcore.harness import read_samples
    from eapcore.engine.models import ModelLoadError, load_model

    p = argparse.ArgumentParser(prog="python -m eapcore attribute", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="hub id or local checkpoint folder")
    p.add_argument("--samples", required=True, help="answers jsonl (harness format)")
    p.add_argument("--cut-len", type=int, required=True, help="T_cut: answer tokens scored")
    p.add_argument("--granularity", choices=["layer", "head"], default="layer")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--ablation", choices=["zero"], default="zero",
                   help="zero ablation (the paper's); clean/corrupted EAP is available from Python")
    p.add_argument("--ig-steps", type=int, default=0, help="EAP-IG steps over input embeddings (0: plain EAP)")
    p.add_argument("--max-batch-tokens", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        samples, report = read_samples(args.samples)
        if report.problems:
            print(report.summary(), file=sys.stderr)
        if not samples:
            raise AttributionError(f"{args.samples}: no readable samples")
        model = load_model(args.model, args.dtype, args.device, trust_remote_code=args.trust_remote_code)
        settings = AttributionSettings(granularity=args.granularity, ablation=args.ablation,
                                       ig_steps=args.ig_steps, dtype=args.dtype,
                                       device=args.device if args.device in ("cpu", "cuda") else "auto",
                                       max_batch_tokens=args.max_batch_tokens)
        start = time.perf_counter()
        result = attribute(model, samples, args.cut_len, settings, progress=True)
    except (AttributionError, ModelLoadError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result.manifest["seconds"] = round(time.perf_counter() - start, 3)
    result.save(args.out)
    print(f"wrote {args.out}: scores {tuple(result.scores.shape)}, mean loss {result.loss.mean():.4f}")
    return 0
