"""The EAP engine against a slow per-edge-coefficient reference, exact patching, and bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr

import eap_reference as R
from conftest import ARCHS
from eapcore.engine.attribution import (IGNORE, AttributionError, EngineOptions, attribute,
                                 attribute_batch, graph_of, make_batch, metric_loss)
from eapcore.graph import Graph
from eapcore.harness import Sample, write_samples
from eapcore.engine.models import Adapter, ModelLoadError, load_model, to_hooked_transformer
from eapcore.specs import AttributionSettings
from eapcore.stats.report import load_scores

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(checkpoints):
    return {arch: load_model(str(folder)) for arch, folder in checkpoints.items()}


def random_samples(n, seed=0, vocab=90, answer=8):
    g = torch.Generator().manual_seed(seed)
    return [Sample(i, torch.randint(4, vocab, (4 + 3 * i,), generator=g).tolist(),
                   torch.randint(4, vocab, (answer,), generator=g).tolist()) for i in range(n)]


def ce_loss(batch):
    """Reference loss: mean CE on target positions, full logits (for the reference forward)."""
    def loss(adapter, x):
        logits = adapter.unembed(adapter.ln_final()(x)).float()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none",
                                               ignore_index=IGNORE)
        return ce.sum(1) / (batch.targets != IGNORE).sum(1)
    return loss


def reference_one_by_one(adapter, graph, samples, cut, **kw):
    out = []
    for s in samples:
        b = make_batch([s], cut, 10 ** 6)
        out.append(R.reference_scores(adapter, graph, adapter.embed(b.ids), ce_loss(b), **kw)[0])
    return torch.stack(out)


def test_adapter_forward_equals_model(models):
    ids = torch.randint(4, 90, (2, 11))
    for arch, m in models.items():
        torch.testing.assert_close(m.adapter.forward_logits(ids), m.hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_silu_keeps_gate_and_up_only_and_matches_autograd(models, dtype):
    """The adapter's gated MLP: same output and input gradients as autograd on the module's own
    expression, bit for bit, while autograd keeps two d_ff-wide tensors instead of three."""
    mlp = models["llama"].hf.model.layers[0].mlp.to(dtype)
    ad = models["llama"].adapter
    h = torch.randn(2, 7, ad.d_model, dtype=dtype)
    g = torch.randn(2, 7, ad.d_model, dtype=dtype)
    saved = []
    outs, grads = [], []
    for fn in (lambda x: ad.mlp(0, x), mlp.forward):
        x = h.clone().requires_grad_(True)
        n = len(saved)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(x)
        saved_ff = sum(t.shape == (2, 7, mlp.intermediate_size) for t in saved[n:])  # weights are 2-d
        outs.append((out, saved_ff))
        grads.append(torch.autograd.grad(out, x, g)[0])
    mlp.float()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(grads[0], grads[1])
    assert (outs[0][1], outs[1][1]) == (2, 3)


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_memory_model_matches_the_tensors_a_kept_layer_holds(models, granularity):
    """memory_per_token's graph term (which sizes batches and decides recomputation) against the
    tensors autograd saves for one layer plus those the engine holds, counted by storage (weights,
    the shared rotary tables and the layer's input, which is stored anyway, excluded)."""
    from eapcore.engine.attribution import _layer, memory_per_token

    for arch in ("llama", "mistral", "qwen2", "qwen3", "olmo2", "olmo3"):
        m = models[arch]
        ad = m.adapter
        B, T = 2, 64
        x = torch.randn(B, T, ad.d_model)
        ad.rotary(T, x)
        skip = {p.untyped_storage().data_ptr() for p in m.hf.parameters()} | {x.untyped_storage().data_ptr()}
        skip |= {t.untyped_storage().data_ptr() for pair in ad._cos_sin.values() for t in pair}
        held = {}

        def count(t):
            if t.untyped_storage().data_ptr() not in skip:
                held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            state = _layer(ad, 0, x, True, granularity == "layer")
        for t in (state.attn, state.mlp, state.xm, state.z) + state.qkv:
            count(t)
        model = memory_per_token(ad, graph_of(ad, granularity), 4)["graph"] * B * T
        assert 0.9 * model <= sum(held.values()) <= 1.1 * model, (arch, sum(held.values()), model)


def test_closed_form_norm_vjp_equals_autograd(models):
    """The Llama-family RMSNorm VJP (used for per-head destinations) equals the generic one."""
    ad = models["qwen2"].adapter
    x = torch.randn(2, 5, ad.d_model)
    cot = torch.randn(7, 2, 5, ad.d_model)
    ours = ad.ln1_vjp(1, x, cot, torch.empty_like(cot))
    generic = Adapter.ln1_vjp(ad, 1, x, cot, torch.empty_like(cot))
    torch.testing.assert_close(ours, generic, rtol=1e-5, atol=1e-6)
    assert ours.abs().max() > 0.1


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_scores_equal_reference(models, arch, granularity):
    """Batched, uneven lengths, both granularities: equal to the reference to 1e-5 relative."""
    m = models[arch]
    graph = graph_of(m.adapter, granularity)
    samples = random_samples(3)
    scores, loss = attribute_batch(m, make_batch(samples, 5, 200), graph)
    ref = reference_one_by_one(m.adapter, graph, samples, 5)
    assert scores.dtype == torch.float32
    assert torch.all(scores[:, ~graph.real_edge_mask] == 0)
    err = (scores.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, f"max error {err:.2e} relative to the largest score"
    assert ref.abs().max() > 1e-2  # the comparison is not trivially between zeros


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_recompute_and_kept_graphs_agree(models, granularity):
    m = models["qwen2"]
    graph = graph_of(m.adapter, granularity)
    batch = make_batch(random_samples(2), 4, 200)
    a, _ = attribute_batch(m, batch, graph, opts=EngineOptions(keep_graph_layers=0))
    b, _ = attribute_batch(m, batch, graph, opts=EngineOptions(keep_graph_layers=1, position_chunk=3))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * a.abs().max().item())


def test_batch_invariance(models):
    m = models["llama"]
    samples = random_samples(4, seed=3)
    settings = AttributionSettings(max_batch_tokens=10 ** 6)
    together = attribute(m, samples, 6, settings)
    alone = attribute(m, samples, 6, AttributionSettings(max_batch_tokens=1))
    torch.testing.assert_close(together.scores, alone.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together.loss, alone.loss)
    assert together.manifest["sample_ids"] == [s.idx for s in samples]


def test_clean_loss_is_the_models_own(models):
    m = models["mistral"]
    s = random_samples(1, seed=5)[0]
    res = attribute(m, [s], 4)
    ids = torch.tensor([s.prompt_ids + s.answer_ids[:3]])
    logits = m.hf(ids).logits[0, len(s.prompt_ids) - 1:]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(s.answer_ids[:4]))
    torch.testing.assert_close(res.loss[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_corrupted_and_ig_modes_equal_reference(models, granularity):
    m = models["qwen2"]
    graph = graph_of(m.adapter, granularity)
    clean = random_samples(2, seed=7)
    corrupt = [Sample(s.idx, s.prompt_ids[:-1] + [(s.prompt_ids[-1] + 5) % 90 + 4], s.answer_ids) for s in clean]
    batch = make_batch(clean, 4, 200, corrupt=corrupt)
    for ablation, steps in (("corrupted", 0), ("corrupted", 3), ("zero", 2)):
        scores, _ = attribute_batch(m, batch, graph, ablation=ablation, ig_steps=steps)
        ref = []
        for b in range(2):
            one = make_batch([clean[b]], 4, 200, corrupt=[corrupt[b]])
            e_corr = m.adapter.embed(one.corrupt_ids) if ablation == "corrupted" else None
            ref.append(R.reference_scores(m.adapter, graph, m.adapter.embed(one.ids), ce_loss(one),
                                          e_corrupt=e_corr, ig_steps=steps)[0])
        ref = torch.stack(ref)
        assert (scores.double() - ref).abs().max() / ref.abs().max() < 1e-5, (ablation, steps)


def test_ig_points_are_eap_igs_left_riemann_sum():
    """EAP-IG's own code takes gradients at e_base + (k/m)(e_clean - e_base) for k in range(m);
    plain EAP at the clean input."""
    from eapcore.engine.attribution import ig_points

    clean, base = torch.full((1, 2, 3), 3.0), torch.zeros(1, 2, 3)
    assert [p[0, 0, 0].item() for p in ig_points(clean, base, 3)] == [0.0, 1.0, 2.0]
    assert [p[0, 0, 0].item() for p in ig_points(clean, base, 0)] == [3.0]


def test_clean_corrupted_agrees_with_exact_patching(tmp_path):
    """Rank agreement of EAP with exact activation patching (each edge patched on its own), on a
    3-layer model with moderate weights, summed over four prompts that differ in two tokens."""
    from conftest import make_checkpoint

    m = load_model(str(make_checkpoint(tmp_path / "m", "llama", seed=1, n_layers=3, std=0.1)))
    graph = graph_of(m.adapter, "layer")
    g = torch.Generator().manual_seed(4)
    clean = [Sample(i, torch.randint(4, 90, (8,), generator=g).tolist(),
                    torch.randint(4, 90, (4,), generator=g).tolist()) for i in range(4)]
    corrupt = [Sample(s.idx, s.prompt_ids[:-2] + [5, 6], s.answer_ids) for s in clean]
    batch = make_batch(clean, 4, 200, corrupt=corrupt)
    scores, _ = attribute_batch(m, batch, graph, ablation="corrupted")
    exact = R.patched_losses(m.adapter, graph, m.adapter.embed(batch.ids), ce_loss(batch),
                             m.adapter.embed(batch.corrupt_ids))
    mask = graph.real_edge_mask
    rho = spearmanr(scores.sum(0)[mask].numpy(), exact[mask].numpy()).statistic
    assert rho > 0.8, rho


class LinearAdapter(Adapter):
    """A transformer with every module linear (no norms, attention = values, linear MLP) and a
    linear metric, so first-order EAP is exact: each score is the true effect of its edge."""

    def __init__(self, d=6, L=2, H=2):
        torch.manual_seed(0)
        self.n_layers, self.n_heads, self.n_kv_heads, self.d_model, self.d_head = L, H, H, d, d // H
        self.W = {(l, w): torch.randn(d, d, dtype=torch.float64) / d ** 0.5 for l in range(L) for w in "qkvom"}
        self.E = torch.randn(20, d, dtype=torch.float64)
        self.U = torch.randn(d, 20, dtype=torch.float64)
        self.config = None
        self.hf = torch.nn.Linear(1, 1).double()  # carries device and dtype

    def embed(self, ids):
        return self.E[ids]

    def ln1(self, layer):
        return lambda x: x

    ln2 = ln1

    def ln_final(self):
        return lambda x: x

    def proj_weight(self, layer, which):
        return self.W[(layer, which)]

    def qkv(self, layer, hq, hk, hv):
        return tuple(h @ self.W[(layer, w)].T for h, w in zip((hq, hk, hv), "qkv"))

    def attend(self, layer, q, k, v):
        return v + 0.5 * q + 0.25 * k  # linear in its inputs

    def attn_out(self, layer, z):
        return z @ self.W[(layer, "o")].T

    def mlp(self, layer, h):
        return h @ self.W[(layer, "m")].T

    def unembed(self, x):
        return x @ self.U


def test_linear_model_scores_are_exact_and_sum_to_total():
    ad = LinearAdapter()
    graph = Graph(ad.n_layers, ad.n_heads, ad.n_kv_heads, "layer")
    batch = make_batch([Sample(0, [1, 4], [2, 7, 3])], 3, 20)
    metric = lambda logits, b: logits[:, :, 3].sum(1)  # noqa: E731 - linear in the logits
    loss = metric_loss(metric)
    scores, _ = attribute_batch(ad, batch, graph, loss)
    ref_loss = lambda a, x: metric(a.unembed(x), batch)  # noqa: E731
    e = ad.embed(batch.ids)
    exact = R.patched_losses(ad, graph, e, ref_loss)
    mask = graph.real_edge_mask
    torch.testing.assert_close(scores[0][mask].double(), exact[mask], rtol=1e-5, atol=1e-6)
    # sum over a destination's incoming edges = effect of zeroing that destination's whole input
    with torch.no_grad():
        full = ref_loss(ad, torch.zeros_like(e)) - ref_loss(ad, R.run(ad, graph, e, ref_loss)[1].sum(1))
    torch.testing.assert_close(scores[0][:, -1].sum().double(), full.sum(), rtol=1e-5, atol=1e-6)


def test_sign_convention_removing_a_helpful_edge_is_positive():
    """The input -> logits edge carries the right answer: removing it raises the loss."""
    ad = LinearAdapter()
    ad.U = ad.E.T.clone() * 3  # logits favour the current token strongly...
    graph = Graph(ad.n_layers, ad.n_heads, ad.n_kv_heads, "layer")
    batch = make_batch([Sample(0, [5, 9], [9, 9])], 2, 20)  # ...and the target repeats it
    scores, _ = attribute_batch(ad, batch, graph)
    exact = R.patched_losses(ad, graph, ad.embed(batch.ids), ce_loss(batch))
    assert exact[0, -1] > 0 and scores[0, 0, -1] > 0


def test_hooked_transformer_conversion_matches(models):
    ids = torch.randint(4, 90, (1, 9))
    for arch in ("qwen2", "gpt2"):
        tl = to_hooked_transformer(models[arch])
        torch.testing.assert_close(tl(ids), models[arch].hf(ids).logits, rtol=1e-4, atol=1e-4)


# ---- bad input ------------------------------------------------------------------------------

def test_model_errors(tmp_path, checkpoints):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'bert'"):
        load_model(str(bad))
    with pytest.raises(ModelLoadError, match="hub"):
        load_model("no-such-org/no-such-model-xyz")


def test_sample_errors(models):
    m = models["llama"]
    with pytest.raises(AttributionError, match="fewer than T_cut=9"):
        attribute(m, random_samples(1, answer=8), 9)
    with pytest.raises(AttributionError, match="outside the model's vocabulary"):
        attribute(m, [Sample(0, [1, 2, 10 ** 6], [3, 4])], 2)


def test_non_finite_loss_stops_the_sample_by_name(models):
    """A loss that is NaN for one sample: attribute() raises naming the model and that sample, after
    handing over (for caching) only the batches before it."""
    from eapcore.engine.attribution import NonFiniteError, self_ce_loss

    def nan_for_token_7(adapter, x, batch):
        loss, grad = self_ce_loss(adapter, x, batch)
        return torch.where(batch.ids[:, 0] == 7, float("nan"), loss), grad

    samples = random_samples(3)
    samples[0] = Sample(5, [7] + samples[0].prompt_ids[1:], samples[0].answer_ids)  # the shortest: batched last
    handed = []
    with pytest.raises(NonFiniteError, match=r"model .*tiny-llama, sample idx 5: its loss is not finite \(loss nan\)"):
        attribute(models["llama"], samples, 4, AttributionSettings(max_batch_tokens=1), loss_fn=nan_for_token_7,
                  on_batch=lambda idx, s, l: handed.extend(idx))
    assert handed == [2, 1]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "eapcore", "attribute", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_writes_documented_format(tmp_path, checkpoints):
    samples = random_samples(3)
    path = tmp_path / "s.jsonl"
    write_samples(path, samples)
    with open(path, "a") as fh:
        fh.write("{not json\n")
    out = tmp_path / "out"
    r = run_cli("--model", str(checkpoints["qwen2"]), "--samples", str(path), "--cut-len", "4",
                "--granularity", "head", "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "line 4: malformed JSON" in r.stderr
    res = load_scores(out)  # the one reader of the result format (eapcore.stats.report)
    graph = json.loads((out / "graph.json").read_text())
    assert res.scores.shape == (3, len(graph["forward"]), len(graph["backward"]))
    assert graph["forward"][:2] == ["input", "a0.h0"] and graph["backward"][-1] == "logits"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sample_ids"] == [0, 1, 2] and manifest["cut_len"] == 4
    assert "torch" in manifest["versions"]
    direct = attribute(load_model(str(checkpoints["qwen2"])), samples, 4, AttributionSettings(granularity="head"))
    torch.testing.assert_close(torch.from_numpy(res.scores), direct.scores)
    torch.testing.assert_close(torch.from_numpy(res.loss), direct.loss)


def test_cli_bad_input_is_a_message_not_a_traceback(tmp_path, checkpoints):
    path = tmp_path / "s.jsonl"
    write_samples(path, random_samples(1, answer=3))
    r = run_cli("--model", str(tmp_path / "missing"), "--samples", str(path), "--cut-len", "2", "--out", str(tmp_path))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--model", str(checkpoints["llama"]), "--samples", str(path), "--cut-len", "5", "--out", str(tmp_path))
    assert r.returncode == 2 and "fewer than T_cut=5" in r.stderr and "Traceback" not in r.stderr


def test_bfloat16_on_cpu_stays_close_to_float32(checkpoints):
    """Half precision loads and scores (accumulated in float32) within bf16 rounding of float32."""
    samples = random_samples(2, seed=9)
    ref = attribute(load_model(str(checkpoints["qwen2"])), samples, 4)
    half = attribute(load_model(str(checkpoints["qwen2"]), dtype="bfloat16"), samples, 4,
                     AttributionSettings(dtype="bfloat16"))
    assert half.scores.dtype == torch.float32 and half.manifest["dtype"] == "bfloat16"
    mask = ref.graph.real_edge_mask
    rel = (half.scores - ref.scores)[:, mask].norm() / ref.scores[:, mask].norm()
    assert rel < 0.1, rel
