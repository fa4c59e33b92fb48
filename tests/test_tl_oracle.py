"""An oracle independent of the adapter: EAP scores through TransformerLens 3.9 hooks.

The model is converted to a HookedTransformer (TransformerLens' own converters and attention, no
code of the adapter) with split q/k/v inputs, per-head results and MLP-input hooks. Scores are
read off the hooks by definition (zero ablation): score(u -> v) = -<a_u, dL/d(input of v)>, with
a_u a source's hooked output and the destination's input gradient from the backward hooks. They
must equal the engine's at both granularities.

Where the two graphs are defined differently on purpose (DESIGN.md): OLMo 2's q and k norms span
all heads; in TransformerLens every head's q input feeds the shared norm statistic, in the engine
head h's q input feeds head h's query only. The sum over a layer's heads is the same in both and
is what is compared for those destinations.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import random_model
from eapcore.engine.attribution import IGNORE, attribute_batch, graph_of, make_batch
from eapcore.harness import Sample
from eapcore.engine.models import LoadedModel, ModelLoadError, make_adapter, to_hooked_transformer

pytest.importorskip("transformer_lens")

VOCAB = 64
CASES = {"llama": {}, "mistral": dict(sliding_window=6), "qwen2": {}, "qwen3": {},
         "olmo2": dict(num_key_value_heads=4), "gpt2": {}}


def hooked_scores(tl, graph, ids, targets, post_norm: bool) -> torch.Tensor:
    """[F, Bk] scores of one unpadded sample from TransformerLens hooks."""
    L, head = graph.n_layers, graph.granularity == "head"
    acts: dict[int, torch.Tensor] = {}  # forward index -> [T, d]
    grads: dict[int, torch.Tensor] = {}  # backward index -> [T, d]
    scale: dict[int, torch.Tensor] = {}

    def store(fn):
        def hook(act, hook):
            fn(act.detach()[0])  # returns nothing: the activation is left as it is
        return hook

    def put_act(i):
        return store(lambda a: acts.__setitem__(i, acts.get(i, 0) + a))

    def put_grad(cols, split):
        def fn(g):
            g = g.detach()[0]
            if split and not head:  # the layer's q (k, v) input feeds all its heads: sum the copies
                g = g.sum(1)
            for j, c in enumerate(cols):
                grads[c] = g[:, j] if head and split else g
        return lambda grad, hook: fn(grad)

    fwd = [("hook_embed", put_act(0))]
    if tl.cfg.positional_embedding_type == "standard":  # GPT-2: the input node is both embeddings' sum
        fwd.append(("hook_pos_embed", put_act(0)))
    bwd = [(f"blocks.{L - 1}.hook_resid_post", put_grad([graph.n_backward - 1], False))]
    for l in range(L):
        cols = graph.layer_destinations(l)
        srcs = graph.attn_sources(l)
        if head:
            fwd.append((f"blocks.{l}.attn.hook_result",
                        store(lambda a, s=srcs: [acts.__setitem__(s.start + h, a[:, h]) for h in range(a.shape[1])])))
            if post_norm:  # the head's share of the normed attention output: w * result / rms(attention output)
                fwd.append((f"blocks.{l}.ln1.hook_scale", store(lambda a, l=l: scale.__setitem__(l, a))))
            q, kv = graph.n_heads, graph.n_kv_heads
            ports = {"q": range(cols.start, cols.start + q), "k": range(cols.start + q, cols.start + q + kv),
                     "v": range(cols.start + q + kv, cols.start + q + 2 * kv)}
        else:
            fwd.append((f"blocks.{l}.hook_attn_out", put_act(srcs.start)))
            ports = {p: [cols.start + i] for i, p in enumerate("qkv")}
        fwd.append((f"blocks.{l}.hook_mlp_out", put_act(graph.mlp_source(l))))
        bwd += [(f"blocks.{l}.hook_{p}_input", put_grad(list(c), True)) for p, c in ports.items()]
        bwd.append((f"blocks.{l}.hook_mlp_in", put_grad([cols.stop - 1], False)))
    with tl.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
        logits = tl(ids)
        mask = targets != IGNORE
        F.cross_entropy(logits[mask].float(), targets[mask]).backward()
    if head and post_norm:
        for l in range(L):
            w = tl.blocks[l].ln1.w.detach()
            for u in range(graph.attn_sources(l).start, graph.attn_sources(l).stop):
                acts[u] = acts[u] / scale[l] * w
    a = torch.stack([acts[u] for u in range(graph.n_forward)])  # [F, T, d]
    g = torch.stack([grads[v] for v in range(graph.n_backward)])  # [Bk, T, d]
    return -torch.einsum("utd,vtd->uv", a.double(), g.double()) * graph.real_edge_mask


def fold_heads(scores: torch.Tensor, graph, ports: str) -> torch.Tensor:
    """Scores with each layer's per-head `ports` destinations replaced by their sum over heads."""
    out = scores.clone()
    q, kv = graph.n_heads, graph.n_kv_heads
    for l in range(graph.n_layers):
        c = graph.layer_destinations(l).start
        spans = {"q": (c, c + q), "k": (c + q, c + q + kv)}
        for p in ports:
            a, b = spans[p]
            out[..., a] = out[..., a:b].sum(-1)
            out[..., a + 1:b] = 0
    return out


@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_engine_equals_transformerlens_hooks(arch, granularity):
    hf = random_model(arch, VOCAB, seed=3, n_layers=2, std=0.3, **CASES[arch])
    model = LoadedModel(arch, hf, None, make_adapter(hf, arch), arch)
    tl = to_hooked_transformer(model, use_split_qkv_input=True, use_attn_result=True, use_hook_mlp_in=True)
    graph = graph_of(model.adapter, granularity)
    g = torch.Generator().manual_seed(1)
    for n in (9, 14):  # Mistral's window is 6: the longer input exceeds it
        sample = Sample(0, torch.randint(4, VOCAB, (n - 4,), generator=g).tolist(),
                        torch.randint(4, VOCAB, (5,), generator=g).tolist())
        batch = make_batch([sample], 5, VOCAB)
        ref = hooked_scores(tl, graph, batch.ids, batch.targets, post_norm=arch == "olmo2")
        ours = attribute_batch(model, batch, graph)[0][0].double()
        if arch == "olmo2" and granularity == "head":
            ref, ours = fold_heads(ref, graph, "qk"), fold_heads(ours, graph, "qk")
        err = ((ours - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-4, f"{arch} {granularity} T={n}: max error {err:.2e} relative to the largest score"
        assert ref.abs().max() > 1e-2


def test_conversions_the_oracle_cannot_make_are_refused():
    hf = random_model("olmo2", VOCAB, n_layers=2)  # grouped-query attention
    with pytest.raises(ModelLoadError, match="OLMo 2 with grouped-query attention"):
        to_hooked_transformer(LoadedModel("o", hf, None, make_adapter(hf, "olmo2"), "olmo2"))
    hf = random_model("llama", VOCAB, n_layers=2, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                    "rope_theta": 1e4})
    with pytest.raises(ModelLoadError, match="rope_type 'linear'"):
        to_hooked_transformer(LoadedModel("l", hf, None, make_adapter(hf, "llama"), "llama"))
