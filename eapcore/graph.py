"""The attribution graph: node names, matrix index order and the real-edge mask.

Scores live in one dense matrix `[F, B]` (forward = sources, backward = destinations). Forward
indices follow execution order, so the sources feeding a destination are a prefix of the forward
list: `n_sources(dest)` tells its length.

Layer granularity (the paper's graph), L layers:
    forward  = input, a0, m0, a1, m1, ..., a{L-1}, m{L-1}                    (2L+1)
    backward = a0.q, a0.k, a0.v, m0, a1.q, ..., m{L-1}, logits                (4L+1)
    real edges: 4L^2 + 3L + 1
Head granularity (EAP-IG style), H query heads and G key-value heads per layer:
    forward  = input, a0.h0 .. a0.h{H-1}, m0, a1.h0, ...                       (1 + L(H+1))
    backward per layer l = a{l}.h{h}.q (h < H), a{l}.kv{g}.k (g < G), a{l}.kv{g}.v (g < G), m{l};
             then logits                                                      (L(H+2G+1) + 1)
With grouped-query attention the k and v inputs are per key-value head: each feeds a group of
H/G query heads. At head granularity the attention output bias (GPT-2) belongs to no head and is
not a source.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property

_NAME = re.compile(r"^(?:(input|logits)|([am])(\d+)(?:\.(h|kv)(\d+))?(?:\.([qkv]))?)$")


@dataclass(frozen=True)
class NodeInfo:
    """Parsed node name. kind: input | attn | mlp | logits; port: q | k | v | None."""

    name: str
    kind: str
    layer: int | None = None  # None for input / logits
    head: int | None = None  # query head (h) or key-value head (kv), head granularity only
    port: str | None = None


def parse_node(name: str) -> NodeInfo:
    m = _NAME.match(name)
    if not m:
        raise ValueError(f"not a node name: {name!r}")
    special, am, layer, _, head, port = m.groups()
    if special:
        return NodeInfo(name, special)
    return NodeInfo(name, "attn" if am == "a" else "mlp", int(layer),
                    None if head is None else int(head), port)


@dataclass(frozen=True)
class Graph:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    granularity: str = "layer"  # layer | head

    def __post_init__(self):
        if self.granularity not in ("layer", "head"):
            raise ValueError(f"granularity must be 'layer' or 'head', not {self.granularity!r}")

    # ---- per-layer block sizes -------------------------------------------------------------
    @property
    def src_per_attn(self) -> int:
        """Forward nodes per attention layer (1, or one per head)."""
        return 1 if self.granularity == "layer" else self.n_heads

    @property
    def dst_q(self) -> int:
        return 1 if self.granularity == "layer" else self.n_heads

    @property
    def dst_kv(self) -> int:
        return 1 if self.granularity == "layer" else self.n_kv_heads

    @property
    def dst_per_layer(self) -> int:
        return self.dst_q + 2 * self.dst_kv + 1

    # ---- names -------------------------------------------------------------------------------
    @cached_property
    def forward(self) -> list[str]:
        names = ["input"]
        for l in range(self.n_layers):
            if self.granularity == "layer":
                names.append(f"a{l}")
            else:
                names += [f"a{l}.h{h}" for h in range(self.n_heads)]
            names.append(f"m{l}")
        return names

    @cached_property
    def backward(self) -> list[str]:
        names = []
        for l in range(self.n_layers):
            if self.granularity == "layer":
                names += [f"a{l}.q", f"a{l}.k", f"a{l}.v"]
            else:
                names += [f"a{l}.h{h}.q" for h in range(self.n_heads)]
                names += [f"a{l}.kv{g}.{p}" for p in "kv" for g in range(self.n_kv_heads)]
            names.append(f"m{l}")
        return names + ["logits"]

    @property
    def n_forward(self) -> int:
        return 1 + self.n_layers * (self.src_per_attn + 1)

    @property
    def n_backward(self) -> int:
        return self.n_layers * self.dst_per_layer + 1

    # ---- index arithmetic -----------------------------------------------------------------------
    def attn_sources(self, layer: int) -> slice:
        """Forward indices of layer `layer`'s attention node(s)."""
        start = 1 + layer * (self.src_per_attn + 1)
        return slice(start, start + self.src_per_attn)

    def mlp_source(self, layer: int) -> int:
        return 1 + layer * (self.src_per_attn + 1) + self.src_per_attn

    def layer_destinations(self, layer: int) -> slice:
        """Backward indices of layer `layer`: its q, k, v inputs then its MLP input."""
        start = layer * self.dst_per_layer
        return slice(start, start + self.dst_per_layer)

    def n_sources_before_attn(self, layer: int) -> int:
        """Sources feeding layer `layer`'s q/k/v inputs: everything before its attention."""
        return self.attn_sources(layer).start

    def n_sources_before_mlp(self, layer: int) -> int:
        return self.mlp_source(layer)

    @cached_property
    def real_edge_mask(self):
        """bool torch.Tensor [F, B]: True where a source can feed the destination (it runs
        strictly before). torch is imported here only, so node-name parsing needs no torch."""
        import torch

        mask = torch.zeros(self.n_forward, self.n_backward, dtype=torch.bool)
        for l in range(self.n_layers):
            dst = self.layer_destinations(l)
            mask[: self.n_sources_before_attn(l), dst.start: dst.stop - 1] = True
            mask[: self.n_sources_before_mlp(l), dst.stop - 1] = True
        mask[:, -1] = True
        return mask

    @property
    def n_real_edges(self) -> int:
        return int(self.real_edge_mask.sum())

    # ---- serialisation ----------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"granularity": self.granularity, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "forward": self.forward, "backward": self.backward}

    @classmethod
    def from_json(cls, data: dict) -> "Graph":
        graph = cls(data["n_layers"], data["n_heads"], data["n_kv_heads"], data["granularity"])
        if data.get("forward", graph.forward) != graph.forward or data.get("backward", graph.backward) != graph.backward:
            raise ValueError("graph.json node lists do not match its declared shape")
        return graph

    def save(self, path) -> None:
        with open(path, "w") as fh:
            json.dump(self.to_json(), fh, indent=1)
