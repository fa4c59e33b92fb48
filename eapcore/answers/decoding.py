"""Greedy continuous batching over a Hugging Face causal LM's own modules: the generation path a
run takes by default (eapcore.answers.generation picks it), token for token equal to transformers' `generate`.
On the CPU it beats plain `generate` too (the demo: 1.37 s of CPU time against 2.12 s at batch 128).

Why this design (measured on an H200, Qwen2-7B shape, bf16; ENVIRONMENT.md, BENCHMARKS.md):
- plain `generate` (93 tokens/s at batch 8, 1,926 at 256) pads a batch to its longest answer,
  grows its cache by concatenation, copies the cache per query head for grouped-query attention
  under a mask, and spends each step in Python with a device sync per token;
- a static cache with `torch.compile` (5,652 tokens/s at 256 with equal lengths) compiles for a
  minute and still runs a batch to its longest answer; transformers' continuous batching gave 888
  tokens/s at its defaults and ran out of memory with CUDA graphs; vLLM cannot be installed here
  (it stays the opt-in backend where it is).
So: continuous batching of our own, in which every layer, norm, rotary embedding and head is the
model's own module (any architecture whose attention goes through transformers'
`AttentionInterface` works unchanged; ARCHITECTURES lists the ones tested against `generate`) and
only the attention call is ours, registered under ATTENTION for the duration of a call:
- `slots` sequences decode together; each slot owns rows of a preallocated, zeroed KV cache
  [slots, kv_heads, length, head_dim] per layer (length = longest prompt + max_new_tokens + one
  sync interval), sized from free GPU memory (`plan_slots`);
- prompts are taken longest first; newcomers are prefilled in batches of similar lengths (left
  padded, `logits_to_keep=1`) and their keys and values written straight into the freed slots.
  A slot's keys sit at buffer positions [start, pos]: start is its prompt's left padding, and the
  rotary position of buffer position j is j - start;
- a decode step runs the rows of slots [0, rows) (`rows` shrinks at the end of a job, when the
  remaining sequences are moved down); each row writes its one new key at its own position and
  attends to its own positions only, with the grouped query heads folded into the query length
  (q [rows, kv_heads, group, head_dim]) so keys are never copied per query head, reading the
  cache only up to the longest position in use (rounded up to KEY_BLOCK);
- the device runs `sync_every` steps ahead of Python (each step feeds its argmax to the next on
  the device); then one transfer brings the new tokens back, finished answers (EOS or their own
  max_new_tokens) are cut and returned, and their slots are refilled. A slot that finished inside
  an interval runs at most sync_every - 1 wasted steps;
- on CUDA each decode step is captured once per (rows, key length) as a CUDA graph (one replay per
  step instead of ~1,000 kernel launches from Python), with the eager step as fallback when a
  capture fails (the reason is kept in `stats["graphs"]`).
What it does not do (vLLM does): paged memory (a slot reserves room for the longest answer
allowed), attention that skips the masked part of shorter slots, sampling. Greedy only:
argmax of the raw logits, no logits processors.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

ATTENTION = "eapcore_slots"
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "olmo3", "gpt2")
KEY_BLOCK = {"cuda": 256, "cpu": 16}  # key length read per step, rounded up to this (one graph per block)
MAX_SLOTS = 256  # past ~256 rows a 7B decode step is bound by compute: more slots add memory, not speed
_STEP: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("eapcore_slot_step", default=None)


def unsupported_reason(model: Any) -> str | None:
    """Why `model` cannot decode here (None if it can)."""
    arch = getattr(model.config, "model_type", None)
    if arch not in ARCHITECTURES:
        return f"architecture {arch!r} is not among those checked against generate ({', '.join(ARCHITECTURES)})"
    return None


class _Step:
    """What the attention calls of one forward do with their keys and values.

    kind "probe": record each attention module's key shape and attend plainly (a one-token input).
    kind "prefill": row i is a prompt left-padded by shift[i] to width W, written to slot slots[i]
    at buffer positions [0, W). kind "decode": row r is slot r; its new key goes to position pos[r]
    and it attends to [start[r], pos[r]] within the first `keys` positions.
    """

    def __init__(self, kind: str, cache: dict | None = None, slots=None, shift=None, start=None, pos=None,
                 keys: int = 0):
        self.kind, self.cache, self.slots, self.shift, self.start, self.pos, self.keys = \
            kind, cache, slots, shift, start, pos, keys
        self.layers: dict[Any, tuple[int, int, torch.dtype]] = {}
        self._masks: dict[int | None, torch.Tensor] = {}
        self._rows: torch.Tensor | None = None

    def _mask(self, window: int | None, dtype: torch.dtype, width: int, device) -> torch.Tensor:
        """Bool (prefill [n, 1, W, W]) or additive (decode [rows, 1, 1, keys]) mask, once per window."""
        if window in self._masks:
            return self._masks[window]
        if self.kind == "prefill":
            t = torch.arange(width, device=device)
            ok = (t[:, None] >= t[None, :])[None] & (t[None, None, :] >= self.shift[:, None, None])
            if window:
                ok &= (t[:, None] - t[None, :] < window)[None]
            mask = (ok | torch.eye(width, dtype=torch.bool, device=device))[:, None]  # pads see themselves
        else:
            j = torch.arange(self.keys, device=device)[None]
            ok = (j >= self.start[:, None]) & (j <= self.pos[:, None])
            if window:
                ok &= j > self.pos[:, None] - window
            mask = torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill_(~ok, float("-inf"))[:, None, None]
        self._masks[window] = mask
        return mask

    def attend(self, module, query, key, value, scaling, window):
        """query [n, H, T, D], key/value [n, Hkv, T, D] (rotary applied) -> output [n, T, H, D]."""
        n, heads, width, dim = query.shape
        group = heads // key.shape[1]
        if self.kind == "decode":
            k_cache, v_cache = self.cache[module]
            if self._rows is None:
                self._rows = torch.arange(n, device=query.device)
            rows = self._rows
            k_cache[rows, :, self.pos] = key[:, :, 0]
            v_cache[rows, :, self.pos] = value[:, :, 0]
            q = query.reshape(n, key.shape[1], group, dim)  # query heads of one kv head as query rows
            out = F.scaled_dot_product_attention(q, k_cache[:n, :, :self.keys], v_cache[:n, :, :self.keys],
                                                 attn_mask=self._mask(window, query.dtype, 0, query.device),
                                                 scale=scaling)
            return out.reshape(n, 1, heads, dim)
        if self.kind == "probe":
            self.layers[module] = (key.shape[1], dim, key.dtype)
            mask = None
        else:
            k_cache, v_cache = self.cache[module]
            k_cache[self.slots, :, :width] = key
            v_cache[self.slots, :, :width] = value
            mask = self._mask(window, query.dtype, width, query.device)
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1),
                                             attn_mask=mask, scale=scaling)
        return out.transpose(1, 2)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """The attention function registered as ATTENTION (transformers' AttentionInterface signature)."""
    step = _STEP.get()
    if step is None:
        raise RuntimeError(f"attention implementation {ATTENTION!r} runs only inside SlotDecoder")
    extra = sorted(k for k in ("softcap", "s_aux", "sinks") if kwargs.get(k) is not None)
    if extra:
        raise NotImplementedError(f"SlotDecoder attention does not implement {extra}")
    return step.attend(module, query, key, value, scaling, sliding_window), None


@contextlib.contextmanager
def _slot_attention(model):
    """Route the model's attention through `_attention` inside the block (restored after)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _attention)
    previous = model.config._attn_implementation
    model.config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = previous


def plan_slots(kv_bytes_per_token: int, length: int, free_bytes: int, workspace_bytes: int,
               cap: int = MAX_SLOTS, reserve: float = 0.1) -> int:
    """Slots whose KV cache (length tokens each) fits in `free_bytes` after the workspace and a reserve."""
    usable = free_bytes * (1 - reserve) - workspace_bytes
    return max(0, min(cap, int(usable // (kv_bytes_per_token * length))))


class SlotDecoder:
    """Greedy answers of `model` by continuous batching (module docstring).

    slots: sequences decoded together (0: from free GPU memory, at most MAX_SLOTS; 64 on the CPU).
    sync_every: decode steps between two looks at the tokens (0: 16 on CUDA, 1 on the CPU).
    prefill_tokens: prompt tokens per prefill forward. cuda_graphs: None = on for CUDA.
    Answers: token ids up to and including the first EOS, or `max_new_tokens` of them; no padding.
    After a call, `stats` holds counters: tokens (generated, in answers or in flight), steps,
    row_steps (rows computed), prefill_tokens, seconds, slots, length, graphs (on/off and why).
    """

    def __init__(self, model: Any, eos_ids: Iterable[int], slots: int = 0, *, sync_every: int = 0,
                 prefill_tokens: int = 8192, cuda_graphs: bool | None = None, pad_id: int = 0):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"SlotDecoder: {reason}; use the plain transformers backend")
        self.model, self.eos = model, frozenset(eos_ids)
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.slots, self.pad_id, self.prefill_tokens = slots, pad_id, max(1, prefill_tokens)
        self.sync_every = sync_every or (16 if cuda else 1)
        self.graphs_wanted = cuda if cuda_graphs is None else (cuda_graphs and cuda)
        self.block = KEY_BLOCK["cuda" if cuda else "cpu"]
        self.max_position = getattr(model.config, "max_position_embeddings", None)
        self.position_cap = self.max_position - 1 if self.max_position else 1 << 30
        self.stats: dict[str, Any] = {}
        self._layers: dict[Any, tuple[int, int, torch.dtype]] | None = None

    # ------------------------------------------------------------------------------- planning
    def layers(self) -> dict[Any, tuple[int, int, torch.dtype]]:
        """{attention module: (kv_heads, head_dim, dtype)}, from a one-token forward."""
        if self._layers is None:
            step = _Step("probe")
            one = torch.full((1, 1), self.pad_id, device=self.device)
            with self._on_device():
                self._forward(step, one, torch.zeros_like(one))
            self._layers = step.layers
        return self._layers

    def kv_bytes_per_token(self) -> int:
        return sum(2 * h * d * torch.finfo(dt).bits // 8 for h, d, dt in self.layers().values())

    def _workspace_bytes(self, rows: int) -> int:
        """Activations of one prefill forward and the logits of one decode step (an upper estimate)."""
        cfg = self.model.config
        hidden = cfg.hidden_size
        inner = getattr(cfg, "intermediate_size", None) or 4 * hidden
        size = next(self.model.parameters()).element_size()
        heads = cfg.num_attention_heads
        per_token = (8 * hidden + 4 * inner + 3 * heads * (hidden // heads)) * size
        return self.prefill_tokens * per_token + 4 * rows * cfg.vocab_size * 4

    def _choose_slots(self, n_prompts: int, length: int) -> int:
        """The slots asked for, or (0) as many as free memory holds; ValueError if they do not fit."""
        wanted = min(self.slots, n_prompts)
        if self.device.type != "cuda":
            return wanted or min(64, n_prompts)
        free = torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device) \
            - torch.cuda.memory_allocated(self.device)  # blocks PyTorch holds but does not use count as free
        cap = wanted or min(MAX_SLOTS, n_prompts)
        fit = plan_slots(self.kv_bytes_per_token(), length, free, self._workspace_bytes(cap), cap=1 << 20)
        if fit < max(1, wanted):
            each = self.kv_bytes_per_token() * length / 2**30
            raise ValueError(f"{max(1, wanted)} answer(s) of up to {length} tokens need {each:.2f} GiB of KV cache "
                             f"each, {free / 2**30:.1f} GiB of GPU memory is free: at most {fit} fit; lower the "
                             "batch size (0: from free memory) or max_new_tokens")
        return min(cap, fit)

    # -------------------------------------------------------------------------------- forward
    def _forward(self, step: _Step, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] at each row's last input position."""
        positions = positions.clamp(max=self.position_cap)  # rows running past their answer stay in range
        token = _STEP.set(step)
        try:
            return self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1).logits[:, -1]
        finally:
            _STEP.reset(token)

    def _decode_once(self, rows: int, keys: int) -> None:
        """One step of slots [0, rows): writes the argmax to self.nxt and advances cur and pos."""
        pos, start = self.pos[:rows], self.start[:rows]
        step = _Step("decode", self.cache, start=start, pos=pos, keys=keys)
        logits = self._forward(step, self.cur[:rows, None], (pos - start)[:, None])
        nxt = logits.argmax(-1)
        self.nxt[:rows].copy_(nxt)
        self.cur[:rows].copy_(nxt)
        pos.add_(1).clamp_(max=self.length - 1)

    def _graph(self, rows: int, keys: int):
        """The CUDA graph of one decode step (captured on first use), or None to run it eagerly."""
        if not self.graphs_wanted:
            return None
        if (rows, keys) not in self._graphs:
            t0 = time.perf_counter()
            saved = self.cur.clone(), self.pos.clone()
            try:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # warm-up: lazy initialisations happen outside the capture
                    self._decode_once(rows, keys)
                torch.cuda.current_stream(self.device).wait_stream(side)
                self.cur.copy_(saved[0])
                self.pos.copy_(saved[1])
                graph = torch.cuda.CUDAGraph()
                self._pool = self._pool or torch.cuda.graph_pool_handle()
                with torch.cuda.graph(graph, pool=self._pool):
                    self._decode_once(rows, keys)
            except Exception as err:  # any capture failure: eager from here on, reason kept
                torch.cuda.synchronize(self.device)
                self.cur.copy_(saved[0])
                self.pos.copy_(saved[1])
                self.graphs_wanted = False
                self.stats["graphs"] = f"off: capture failed ({type(err).__name__}: {str(err)[:300]})"
                return None
            self._graphs[(rows, keys)] = graph
            self.stats["capture_s"] = self.stats.get("capture_s", 0.0) + time.perf_counter() - t0
            self.stats["graphs"] = f"on: {len(self._graphs)} captured"
        return self._graphs[(rows, keys)]

    def _prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Write the prompts' keys and values into `slots`; returns their first answer tokens [n]."""
        width = max(map(len, prompts))
        shift = [width - len(p) for p in prompts]
        ids = torch.tensor([[self.pad_id] * s + list(p) for s, p in zip(shift, prompts)], device=self.device)
        shift_t = torch.tensor(shift, device=self.device)
        positions = (torch.arange(width, device=self.device)[None] - shift_t[:, None]).clamp(min=0)
        index = torch.tensor(slots, device=self.device)
        first = self._forward(_Step("prefill", self.cache, slots=index, shift=shift_t), ids, positions).argmax(-1)
        self.start[index] = shift_t
        self.pos[index] = width
        self.cur[index] = first
        self.stats["prefill_tokens"] += len(prompts) * width
        return first

    # --------------------------------------------------------------------------------- decode
    def __call__(self, prompts: list[list[int]], max_new_tokens: int | Sequence[int]) -> list[list[int]]:
        """Answers in prompt order (the generation Backend protocol)."""
        out: list[list[int]] = [[] for _ in prompts]
        for i, answer in self.stream(prompts, max_new_tokens):
            out[i] = answer
        return out

    @contextlib.contextmanager
    def _on_device(self):
        with torch.inference_mode(), _slot_attention(self.model):
            yield

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
               stop: Callable[[], bool] | None = None) -> Iterator[tuple[int, list[int]]]:
        """Yield (prompt index, answer) as answers finish. max_new_tokens: one for all, or one per
        prompt. stop() is asked after each sync interval; True ends the stream (unfinished answers
        are dropped). The model is in its usual state whenever the stream yields."""
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(prompts) or any(m < 1 for m in limits):
            raise ValueError("max_new_tokens must be >= 1, one value or one per prompt")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        if not prompts:
            return
        t0 = time.perf_counter()
        longest = max(map(len, prompts)) + max(limits)
        self.length = math.ceil((longest + self.sync_every) / self.block) * self.block
        self.position_cap = max(self.max_position or 0, longest) - 1  # real rows never reach it
        with self._on_device():
            n_slots = self._choose_slots(len(prompts), self.length)
            self.stats = {"tokens": 0, "steps": 0, "row_steps": 0, "prefill_tokens": 0, "slots": n_slots,
                          "length": self.length, "graphs": "on" if self.graphs_wanted else "off", "capture_s": 0.0}
            self.cache = {m: (torch.zeros(n_slots, h, self.length, d, dtype=dt, device=self.device),
                              torch.zeros(n_slots, h, self.length, d, dtype=dt, device=self.device))
                          for m, (h, d, dt) in self.layers().items()}
            self.cur, self.pos, self.start, self.nxt = (torch.zeros(n_slots, dtype=torch.long, device=self.device)
                                                        for _ in range(4))
            self.out = torch.zeros(n_slots, self.sync_every, dtype=torch.long, device=self.device)
            self._graphs: dict[tuple[int, int], Any] = {}
            self._pool = None  # the CUDA graphs' shared memory pool, made at the first capture
        job = _Job(prompts, limits, n_slots)
        try:
            with self._on_device():
                self._launch(job)
            while job.steps:
                with self._on_device():
                    finished = self._collect(job)
                    if job.queue or job.active():
                        self._launch(job)  # the device decodes on while the caller handles `finished`
                yield from finished
                if stop is not None and stop():
                    return
        finally:
            self.stats["seconds"] = time.perf_counter() - t0
            del self.cache, self._graphs, self.cur, self.pos, self.start, self.nxt, self.out

    def _launch(self, job: _Job) -> None:
        """Refill free slots and queue up to sync_every decode steps on the device (no sync)."""
        free = [s for s in range(job.slots) if job.owner[s] < 0]
        if job.queue and free and (len(free) >= job.refill_at or len(job.queue) <= len(free)):
            self._refill(free, job)
        active = job.active()
        if not job.queue and not job.pending and len(active) <= self._rows_for(active[-1] + 1, job.slots) // 2:
            self._compact(active, job)
            active = job.active()
        rows = self._rows_for(active[-1] + 1, job.slots)
        steps = min(self.sync_every, max(job.limits[job.owner[s]] - len(job.answer[s]) for s in active))
        keys = min(self.length, math.ceil((max(job.pos[s] for s in active) + steps + 1) / self.block) * self.block)
        graph = self._graph(rows, keys)
        for j in range(steps):
            graph.replay() if graph is not None else self._decode_once(rows, keys)
            self.out[:rows, j].copy_(self.nxt[:rows])
        self.stats["steps"] += steps
        self.stats["row_steps"] += steps * rows
        job.rows, job.steps = rows, steps

    def _collect(self, job: _Job) -> list[tuple[int, list[int]]]:
        """Read the launched steps' tokens back (the one sync of an interval); returns the finished
        (prompt index, answer) pairs and frees their slots."""
        firsts = {s: t for slots, tokens in job.pending for s, t in zip(slots, tokens.tolist())}
        job.pending = []
        new_tokens = self.out[:job.rows, :job.steps].tolist()
        finished = []
        for s in job.active():
            job.pos[s] = min(job.pos[s] + job.steps, self.length - 1)
            limit, got = job.limits[job.owner[s]], job.answer[s]
            for tok in ([firsts[s]] if s in firsts else []) + new_tokens[s]:
                got.append(tok)
                self.stats["tokens"] += 1
                if tok in self.eos or len(got) >= limit:
                    finished.append(s)
                    break
        job.steps = 0
        if not finished:
            return []
        index = torch.tensor(finished, device=self.device)  # their rows restart at 0 until a new prompt comes
        self.pos[index] = 0
        self.start[index] = 0
        done = [(job.owner[s], job.answer[s]) for s in finished]
        for s in finished:
            job.release(s)
        return done

    def _rows_for(self, highest: int, n_slots: int) -> int:
        """Rows a decode step runs: on CUDA rounded up to a multiple of 32 (fewer graphs)."""
        return min(n_slots, math.ceil(highest / 32) * 32) if self.graphs_wanted else highest

    def _refill(self, free: list[int], job: _Job) -> None:
        """Prefill the next prompts into free slots (lowest first), in batches of similar width."""
        take = [job.queue.popleft() for _ in range(min(len(free), len(job.queue)))]
        i = 0
        while i < len(take):
            width = len(job.prompts[take[i]])  # the longest of this batch (the queue is longest first)
            n = max(1, min(len(take) - i, self.prefill_tokens // width))
            batch, slots = take[i:i + n], free[i:i + n]
            job.pending.append((slots, self._prefill(slots, [job.prompts[j] for j in batch])))
            for s, j in zip(slots, batch):
                job.owner[s], job.answer[s], job.pos[s] = j, [], width
            i += n

    def _compact(self, active: list[int], job: _Job) -> None:
        """Move the sequences of `active` slots into slots [0, len(active)) (keys, values, state)."""
        moves = [(src, dst) for dst, src in enumerate(active) if src != dst]
        if not moves:
            return
        src = torch.tensor([m[0] for m in moves], device=self.device)
        dst = torch.tensor([m[1] for m in moves], device=self.device)
        for k_cache, v_cache in self.cache.values():
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]
        for state in (self.cur, self.pos, self.start):
            state[dst] = state[src]
        vacated = torch.tensor(sorted(set(active) - set(range(len(active)))), device=self.device)
        self.pos[vacated] = 0
        self.start[vacated] = 0
        for s, d in moves:
            job.owner[d], job.answer[d], job.pos[d] = job.owner[s], job.answer[s], job.pos[s]
            job.release(s)


class _Job:
    """Host-side state of one stream: the queue (longest prompt first) and each slot's owner
    (prompt index, -1 when free), answer so far and next buffer position (a copy of the device's)."""

    def __init__(self, prompts: Sequence[Sequence[int]], limits: list[int], slots: int):
        self.prompts, self.limits, self.slots = prompts, limits, slots
        self.queue = deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
        self.owner, self.answer, self.pos = [-1] * slots, [[] for _ in range(slots)], [0] * slots
        self.pending: list[tuple[list[int], torch.Tensor]] = []  # (slots, first tokens) not yet read back
        self.refill_at = max(1, slots // 16)
        self.rows = self.steps = 0  # of the interval in flight (steps 0: none)

    def active(self) -> list[int]:
        return [s for s in range(self.slots) if self.owner[s] >= 0]

    def release(self, s: int) -> None:
        self.owner[s], self.answer[s], self.pos[s] = -1, [], 0
