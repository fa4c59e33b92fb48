"""Conformance of the engine with transformers on every configuration real checkpoints use.

The matrix: each architecture x {RoPE default, linear, dynamic, llama3, yarn; a window shorter than
the input on every layer; per-layer windows; tied embeddings; attention (and MLP) biases} where
the architecture has the setting, plus GELU MLPs for Llama and Qwen3, each
run on a right-padded batch of three samples of 40, 33 and 27 tokens, longer than the windows (5)
and than the original context (24 positions; 16 for llama3 and yarn). Checked against the model
run by transformers with an attention mask: the loss and the gradient of the loss with respect to
the input embeddings through the adapter, and, through the engine at both granularities, the loss
and the input node's scores (zero ablation: the input's scores over all destinations sum to
-<e, dL/de> per sample, as e enters every destination's input).
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from eapcore.engine.attribution import IGNORE, attribute_batch, graph_of, make_batch
from eapcore.harness import Sample
from eapcore.engine.models import LoadedModel, ModelLoadError, check_architecture, check_conformance, make_adapter
from eapcore.engine.windowed_attention import causal_attention, window_block_mask

VOCAB = 64
LENGTHS = (40, 33, 27)
CUT = 10
ROPE = {
    "rope-default": {"rope_type": "default"},
    "rope-linear": {"rope_type": "linear", "factor": 2.0},
    "rope-dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "rope-llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16},
    "rope-yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}
ROPE_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "olmo3")


def rope(arch: str, params: dict) -> dict:
    params = {"rope_theta": 10000.0, **params}
    if arch == "olmo3":  # rotary tables per layer type; OLMo 3 scales its full-attention layers
        return {"rope_parameters": {"full_attention": params,
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
    return {"rope_parameters": params}


def cases():
    # Mistral without a window here (its v0.2+ configs; the window cases below have one)
    plain = lambda arch: {"sliding_window": None} if arch == "mistral" else {}  # noqa: E731
    out = [(arch, name, rope(arch, p) | plain(arch)) for arch in ROPE_ARCHS for name, p in ROPE.items()]
    every = {"mistral": dict(sliding_window=5),
             "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=0),
             "qwen3": dict(use_sliding_window=True, sliding_window=5, max_window_layers=0),
             "olmo3": dict(sliding_window=5, layer_types=["sliding_attention"] * 3)}
    per_layer = {"qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
                 "qwen3": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
                 "olmo3": dict(sliding_window=5, layer_types=["sliding_attention", "full_attention",
                                                              "sliding_attention"])}
    out += [(arch, "window-all-layers", kw) for arch, kw in every.items()]
    out += [(arch, "window-per-layer", kw) for arch, kw in per_layer.items()]
    out += [(arch, "tied-embeddings", dict(tie_word_embeddings=True) | plain(arch)) for arch in ROPE_ARCHS]
    out += [(arch, "biases", dict(attention_bias=True) | ({"mlp_bias": True} if arch == "llama" else {}))
            for arch in ("llama", "qwen3", "olmo2", "olmo3")]
    out += [("llama", "gelu-mlp", dict(hidden_act="gelu")), ("qwen3", "gelu-mlp", dict(hidden_act="gelu_pytorch_tanh"))]
    out += [("gpt2", "default", {}), ("gpt2", "untied", dict(tie_word_embeddings=False))]
    return out


def build(arch: str, overrides: dict, seed: int = 0) -> LoadedModel:
    size = dict(n_positions=64) if arch == "gpt2" else dict(max_position_embeddings=24)
    hf = random_model(arch, VOCAB, seed, n_layers=3, std=0.3, **(size | overrides))
    return LoadedModel(arch, hf, None, make_adapter(hf, arch), arch)


def padded_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    samples = [Sample(i, torch.randint(4, VOCAB, (n - CUT + 1,), generator=g).tolist(),
                      torch.randint(4, VOCAB, (CUT,), generator=g).tolist()) for i, n in enumerate(LENGTHS)]
    batch = make_batch(samples, CUT, VOCAB)
    assert batch.lengths.tolist() == list(LENGTHS)
    return batch


def per_sample_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none", ignore_index=IGNORE)
    return ce.sum(1) / (targets != IGNORE).sum(1)


def transformers_loss_and_grad(model: LoadedModel, batch):
    """Per-sample loss and dL/d(input embeddings) through the model's own forward, padded batch
    with an attention mask (GPT-2: the embedding input is the token embeddings, to which the
    model adds its positions; the gradient is the same)."""
    e = model.hf.get_input_embeddings()(batch.ids).detach().requires_grad_(True)
    logits = model.hf(inputs_embeds=e, attention_mask=batch.position_mask.long()).logits
    loss = per_sample_ce(logits, batch.targets)
    (g,) = torch.autograd.grad(loss.sum(), e)
    return loss.detach(), g


def adapter_loss_and_grad(model: LoadedModel, batch):
    ad = model.adapter
    e = ad.embed(batch.ids).detach().requires_grad_(True)
    loss = per_sample_ce(ad.unembed(ad.final_hidden(e)), batch.targets)
    (g,) = torch.autograd.grad(loss.sum(), e)
    return loss.detach(), g, e.detach()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("arch,variant,overrides", cases(), ids=[f"{a}-{v}" for a, v, _ in cases()])
def test_matrix_losses_and_input_gradients_equal_transformers(arch, variant, overrides):
    model = build(arch, overrides)
    windows = [w for w in model.adapter.windows if w]
    if variant.startswith("window"):
        assert windows and max(windows) < min(LENGTHS)
        if variant == "window-per-layer":
            assert None in model.adapter.windows
    assert set(check_conformance(model)) == ({"short", "window"} if windows else {"short"})
    batch = padded_batch()
    ref_loss, ref_grad = transformers_loss_and_grad(model, batch)
    loss, grad, e = adapter_loss_and_grad(model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert rel(grad, ref_grad) < 1e-4, rel(grad, ref_grad)
    assert ref_grad[~batch.position_mask].abs().max() == 0 and ref_grad.abs().max() > 0
    input_effect = -(e * ref_grad).sum((1, 2))  # per sample: -<e, dL/de>
    for granularity in ("layer", "head"):
        scores, engine_loss = attribute_batch(model, batch, graph_of(model.adapter, granularity))
        torch.testing.assert_close(engine_loss, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scores[:, 0].sum(1), input_effect, rtol=1e-4, atol=1e-5 * input_effect.abs().max())


def test_the_probe_refuses_an_adapter_that_misses_a_config_field():
    """The issue's reproduction: Qwen2 with windows on the layers from max_window_layers on; an
    adapter applying them to no layer (as the engine once applied them to all alike) is refused
    with the fields named; the real adapter passes."""
    kw = dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)
    model = build("qwen2", kw)
    assert model.adapter.windows == [None, None, 4]
    check_conformance(model, probe_len=11)
    model.adapter.windows = [4, 4, 4]
    with pytest.raises(ModelLoadError, match=r"differs from transformers'.*sliding_window=4, max_window_layers=2"):
        check_conformance(model, probe_len=11)
    model.adapter.windows = [None, None, None]
    with pytest.raises(ModelLoadError, match="longer than its attention window of 4"):
        check_conformance(model, probe_len=3)


def test_the_window_probe_is_skipped_with_a_warning_on_the_cpu_for_large_models(monkeypatch):
    from eapcore.engine import models

    model = build("mistral", dict(sliding_window=5))
    monkeypatch.setattr(models, "CPU_PROBE_FLOPS", 1.0)  # as if the model had billions of parameters
    with pytest.warns(UserWarning, match=r"probe longer than its attention window \(14 tokens\) is skipped"):
        assert set(check_conformance(model)) == {"short"}


def test_config_fields_the_engine_does_not_reproduce_are_refused_by_name():
    with pytest.raises(ModelLoadError, match="is_causal=False"):
        check_architecture(tiny_config("llama", VOCAB, is_causal=False))
    with pytest.raises(ModelLoadError, match="layer_types contains 'chunked_attention'"):
        check_architecture(tiny_config("qwen2", VOCAB, layer_types=["chunked_attention", "full_attention"]))
    with pytest.raises(ModelLoadError, match="reorder_and_upcast_attn=True"):
        check_architecture(tiny_config("gpt2", VOCAB, reorder_and_upcast_attn=True))
    assert check_architecture(tiny_config("olmo3", VOCAB)) == "olmo3"


def test_load_model_checks_conformance(tmp_path, monkeypatch):
    """load_model runs the probe: a model whose adapter would drift is refused at load."""
    from conftest import char_tokenizer
    from eapcore.engine import models

    folder = tmp_path / "qwen2-windows"
    random_model("qwen2", len(char_tokenizer()), n_layers=3,
                 use_sliding_window=True, sliding_window=4, max_window_layers=1).save_pretrained(folder)
    assert models.load_model(str(folder), with_tokenizer=False).adapter.windows == [None, 4, 4]
    monkeypatch.setattr(models, "layer_windows", lambda config, arch: [None] * config.num_hidden_layers)
    with pytest.raises(ModelLoadError, match="refused"):
        models.load_model(str(folder), with_tokenizer=False)


# ---- the windowed attention kernels -----------------------------------------------------------------

@pytest.mark.parametrize("B,H,G,T,window", [(2, 4, 2, 300, 100), (1, 2, 2, 517, 130), (2, 4, 1, 260, 256),
                                            (1, 4, 2, 1000, 7)])
def test_blocks_kernel_equals_masked_attention_in_float64(B, H, G, T, window, monkeypatch):
    """Outputs and q/k/v gradients of the blocks kernel (small blocks, so keys are shared by
    several) against attention with the full T x T window mask, float64."""
    from eapcore.engine import windowed_attention

    monkeypatch.setattr(windowed_attention, "BLOCK_SCORE_ELEMENTS", 2 ** 12)
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, n, T, 8, generator=g, dtype=torch.float64, requires_grad=True) for n in (H, G, G))
    i = torch.arange(T)
    mask = (i[None] <= i[:, None]) & (i[None] > i[:, None] - window)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.4, enable_gqa=H != G)
    out = causal_attention(q, k, v, 0.4, window, "blocks")
    cot = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(ref, (q, k, v), cot)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T,window", [(300, 100), (517, 130), (1000, 7), (640, 512)])
def test_flex_block_mask_selects_the_window(T, window):
    """The block-sparse mask built from tile indices: FlexAttention's forward with it (eager, on
    the CPU; compiled on CUDA in tests/test_gpu.py) equals the blocks kernel, and its tiles are
    the ones the window touches (no T x T evaluation)."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, n, T, 8, generator=g) for n in (4, 2, 2))
    mask = window_block_mask(T, window, q.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        out = flex_attention(q, k, v, block_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, causal_attention(q, k, v, 0.3, window, "blocks"), rtol=1e-5, atol=1e-6)
    dense = mask.to_dense()[0, 0].bool()  # [tiles, tiles]: tiles visited (partial or full)
    t = torch.arange(dense.shape[0])
    first, last = t * 128, torch.clamp((t + 1) * 128 - 1, max=T - 1)
    needed = (first[None] <= last[:, None]) & (last[None] > first[:, None] - window)
    assert torch.equal(dense, needed)
