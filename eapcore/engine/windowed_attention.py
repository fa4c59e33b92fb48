"""Causal attention, optionally over a sliding window of keys, never with a T x T mask.

Shapes: q [B, H, T, dh], k and v [B, G, T, dh] with G dividing H (grouped-query attention stays
grouped); the result is [B, H, T, dh]. Query t attends keys s with s <= t and, with a window W,
t - W < s (W keys including itself), which is what transformers' sliding-window masks allow.

Without a window, or when T <= W, this is PyTorch's fused causal attention (unchanged fast path).
With a window binding (T > W) there are two kernels, equal up to float rounding:
- "flex" (default on CUDA): FlexAttention compiled by torch.compile on first use (once more when a
  second length comes, which torch.compile then treats as dynamic), with a block-sparse mask
  built from the window's structure (tiles of 128 x 128 wholly outside the window are skipped,
  tiles wholly inside it skip the mask): work and memory grow with T x W, not T^2.
- "blocks" (default elsewhere: FlexAttention has no CPU backward): queries in blocks of Bq, each
  attending only the W + Bq - 1 keys its window can reach, through SDPA with a [Bq, W + Bq - 1]
  band mask; an autograd Function that keeps q, k and v only and recomputes each block in the
  backward, so no block's scores outlive it.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

KERNELS = ("flex", "blocks")
FLEX_TILE = 128  # FlexAttention's default sparse block size
BLOCK_SCORE_ELEMENTS = 2 ** 26  # the blocks kernel's scores per block (256 MB in float32)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None,
                     kernel: str | None = None) -> torch.Tensor:
    """Causal (sliding-window if `window`) attention; `kernel` None picks flex on CUDA, blocks elsewhere."""
    T = q.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if window is None or T <= window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    kernel = kernel or ("flex" if q.is_cuda else "blocks")
    if kernel == "flex":
        return _compiled_flex()(q, k, v, block_mask=window_block_mask(T, window, q.device), scale=scale,
                                enable_gqa=gqa)
    if kernel == "blocks":
        return _Blocks.apply(q, k, v, scale, window)
    raise ValueError(f"attention kernel must be one of {KERNELS}, not {kernel!r}")


# ---- flex -----------------------------------------------------------------------------------------

@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@functools.cache
def _window_mask_mod(window: int):
    """FlexAttention mask function of a causal window (one object per window, so compiled code is reused)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return mask_mod


@functools.lru_cache(maxsize=8)
def window_block_mask(T: int, window: int, device: torch.device):
    """The FlexAttention BlockMask of a causal window over T positions, built from tile indices
    (O((T/128)^2) integers) instead of evaluating the mask at T x T points."""
    from torch.nn.attention.flex_attention import BlockMask

    n = -(-T // FLEX_TILE)
    i = torch.arange(n, device=device)[:, None]  # query tile: positions [128 i, 128 i + 127]
    j = torch.arange(n, device=device)[None, :]  # key tile
    # a key tile is touched if some key in it is within some query's window, and wholly inside
    # every query's window ("full") if its first key is within the last query's window and its
    # last key precedes the first query
    touched = (j <= i) & ((j + 1) * FLEX_TILE - 1 > i * FLEX_TILE - window)
    full = (j < i) & (j * FLEX_TILE > (i + 1) * FLEX_TILE - 1 - window)
    partial = touched & ~full

    def as_indices(sel):  # (counts [1,1,n], indices [1,1,n,n]): the selected tiles first, ascending
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)
        return sel.sum(-1).to(torch.int32)[None, None], order.to(torch.int32)[None, None]

    return BlockMask.from_kv_blocks(*as_indices(partial), *as_indices(full), FLEX_TILE, _window_mask_mod(window),
                                    seq_lengths=(T, T))


# ---- blocks ---------------------------------------------------------------------------------------

def _query_blocks(T: int, window: int, size: int):
    """(first query, end query, first key) of each block of `size` queries."""
    for i0 in range(0, T, size):
        yield i0, min(T, i0 + size), max(0, i0 - window + 1)


def _band(q, k, v, i0: int, j0: int, scale: float, window: int) -> torch.Tensor:
    """Attention of queries i0.. over keys j0.. (q [B,H,n,dh], k/v [B,G,m,dh]) within the window."""
    t = torch.arange(i0, i0 + q.shape[-2], device=q.device)[:, None]
    s = torch.arange(j0, j0 + k.shape[-2], device=q.device)[None, :]
    mask = (s <= t) & (s > t - window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _block_size(q: torch.Tensor, window: int) -> int:
    B, H = q.shape[:2]
    return max(1, min(window, BLOCK_SCORE_ELEMENTS // (B * H * 2 * window)))


class _Blocks(torch.autograd.Function):
    """Windowed attention one block of queries at a time; saves q, k, v only (the backward
    recomputes each block's attention and differentiates it)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, window: int):
        ctx.save_for_backward(q, k, v)
        ctx.scale, ctx.window = scale, window
        out = torch.empty_like(q)
        for i0, i1, j0 in _query_blocks(q.shape[-2], window, _block_size(q, window)):
            out[:, :, i0:i1] = _band(q[:, :, i0:i1], k[:, :, j0:i1], v[:, :, j0:i1], i0, j0, scale, window)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        dq = torch.empty_like(q)
        # keys are reached by several blocks: accumulate in float32 at least
        dk = torch.zeros(k.shape, dtype=torch.promote_types(k.dtype, torch.float32), device=k.device)
        dv = torch.zeros_like(dk)
        for i0, i1, j0 in _query_blocks(q.shape[-2], ctx.window, _block_size(q, ctx.window)):
            with torch.enable_grad():
                qb, kb, vb = (t.detach().requires_grad_(True) for t in (q[:, :, i0:i1], k[:, :, j0:i1], v[:, :, j0:i1]))
                out = _band(qb, kb, vb, i0, j0, ctx.scale, ctx.window)
            gq, gk, gv = torch.autograd.grad(out, (qb, kb, vb), grad[:, :, i0:i1])
            dq[:, :, i0:i1] = gq
            dk[:, :, j0:i1] += gk
            dv[:, :, j0:i1] += gv
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None
