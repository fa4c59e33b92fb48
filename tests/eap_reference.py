"""A slow, obviously-correct EAP reference: autograd through per-edge coefficients.

Every destination's input is rebuilt explicitly as

    in_v = sum_u a_u  +  sum_u c[u, v] * delta_a_u        (delta_a fixed, c = 0)

from the live source outputs a_u (plus, at head granularity, the attention output biases, which are
no node's). dL/dc[u, v] at c = 0 is then the EAP score of u -> v by definition. At head
granularity each head's q (k, v) input goes through the layer norm and projection (with any q/k
norm, Qwen3's per head or OLMo's over all heads) on its own and keeps its head's slice; head h's
output is head_values(z)_h @ head_out_weight[h] (OLMo: its share of the normed attention output).
It uses only the adapter's primitive modules (norms, projections, attention core, MLP, unembed),
never the engine, and materialises everything: tiny models only.
"""
from __future__ import annotations

import torch

from eapcore.graph import Graph


def run(adapter, graph: Graph, e: torch.Tensor, loss_fn, delta=None, coef_value=None):
    """Forward from embeddings e [B,T,d]. Returns (loss [B], sources [B,F,T,d], coef).

    delta [B,F,T,d]: fixed source differences (None: a plain forward).
    coef_value [F, Bk]: the coefficients' value (default 0); a one-hot value applies that single
    edge's ablation exactly (exact activation patching)."""
    B, T, d = e.shape
    F_, Bk = graph.n_forward, graph.n_backward
    coef = torch.zeros(F_, Bk, dtype=e.dtype) if coef_value is None else coef_value.to(e.dtype).clone()
    coef.requires_grad_(True)
    srcs: list[torch.Tensor] = [e]
    const = torch.zeros_like(e)  # attention output biases at head granularity
    H, G, dh = adapter.n_heads, adapter.n_kv_heads, adapter.d_head

    def dest_input(col: int) -> torch.Tensor:
        n = len(srcs)
        out = const.clone()
        for u in range(n):
            out = out + srcs[u]
            if delta is not None:
                out = out + coef[u, col] * delta[:, u]
        return out

    for l in range(graph.n_layers):
        cols = graph.layer_destinations(l)
        norm = adapter.ln1(l)
        if graph.granularity == "layer":
            xq, xk, xv = (dest_input(cols.start + i) for i in range(3))
            q, k, v = adapter.qkv(l, norm(xq), norm(xk), norm(xv))
        else:
            parts = {"q": [], "k": [], "v": []}
            for which, n_h, offset in (("q", H, 0), ("k", G, H), ("v", G, H + G)):
                for h in range(n_h):
                    x_h = norm(dest_input(cols.start + offset + h))
                    full = adapter.qkv(l, x_h, x_h, x_h)["qkv".index(which)]
                    parts[which].append(full[..., h * dh:(h + 1) * dh])
            q, k, v = (torch.cat(parts[w], dim=-1) for w in "qkv")
        z = adapter.attend(l, q, k, v)
        if graph.granularity == "layer":
            srcs.append(adapter.attn_out(l, z))
        else:
            w_o, zs = adapter.head_out_weight(l), adapter.head_values(l, z)
            heads = [zs[..., h * dh:(h + 1) * dh] @ w_o[h] for h in range(H)]
            const = const + (adapter.attn_out(l, z) - sum(heads))  # the bias, if any
            srcs.extend(heads)
        xm = dest_input(cols.stop - 1)
        srcs.append(adapter.mlp(l, adapter.ln2(l)(xm)))
    x_final = dest_input(Bk - 1)
    loss = loss_fn(adapter, x_final)
    return loss, torch.stack(srcs, dim=1), coef


def reference_scores(adapter, graph: Graph, e_clean, loss_fn, e_corrupt=None, ig_steps: int = 0):
    """EAP scores [B, F, Bk] by autograd through c (see module docstring); one sample at a time."""
    B = e_clean.shape[0]
    out = torch.zeros(B, graph.n_forward, graph.n_backward, dtype=torch.float64)
    for b in range(B):
        ec = e_clean[b: b + 1]
        _, a_clean, _ = run(adapter, graph, ec, loss_fn)
        if e_corrupt is None:
            delta, e_base = -a_clean.detach(), torch.zeros_like(ec)
        else:
            e_base = e_corrupt[b: b + 1]
            _, a_corr, _ = run(adapter, graph, e_base, loss_fn)
            delta = (a_corr - a_clean).detach()
        # EAP-IG's left Riemann sum (k = 0 .. m-1, as hannamw/EAP-IG computes it); plain EAP: clean
        points = [ec] if ig_steps == 0 else [e_base + (k / ig_steps) * (ec - e_base) for k in range(ig_steps)]
        for e in points:
            loss, _, coef = run(adapter, graph, e.detach(), loss_fn, delta=delta)
            (g,) = torch.autograd.grad(loss.sum(), coef)
            out[b] += g.double() / len(points)
    return out * graph.real_edge_mask


def source_delta(adapter, graph: Graph, e_clean, loss_fn, e_corrupt=None) -> torch.Tensor:
    """delta_a [B,F,T,d]: -a(clean) for zero ablation, a(corrupted) - a(clean) otherwise."""
    with torch.no_grad():
        _, a_clean, _ = run(adapter, graph, e_clean, loss_fn)
        if e_corrupt is None:
            return -a_clean
        _, a_corr, _ = run(adapter, graph, e_corrupt, loss_fn)
        return a_corr - a_clean


def patched_losses(adapter, graph: Graph, e_clean, loss_fn, e_corrupt=None) -> torch.Tensor:
    """Exact activation patching: L(edge u->v ablated) - L(clean) for every real edge, [F, Bk]
    (batch summed). Ablated = zeroed, or replaced by its corrupted-run value."""
    delta = source_delta(adapter, graph, e_clean, loss_fn, e_corrupt)
    out = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.float64)
    with torch.no_grad():
        base = run(adapter, graph, e_clean, loss_fn)[0].sum()
        for u, v in graph.real_edge_mask.nonzero().tolist():
            one = torch.zeros(graph.n_forward, graph.n_backward)
            one[u, v] = 1.0
            out[u, v] = (run(adapter, graph, e_clean, loss_fn, delta, one)[0].sum() - base).double()
    return out
