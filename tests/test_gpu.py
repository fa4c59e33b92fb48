"""GPU path: bf16 scores on CUDA equal the float32 CPU path on the same weights (bf16 tolerance).

Skipped without a CUDA device (CI has none); run on the GPU machine:
    python -m pytest tests/test_gpu.py
"""
import pytest
import torch

from eapcore.engine.attribution import attribute_batch, graph_of, make_batch
from eapcore.harness import Sample
from eapcore.engine.models import LoadedModel, make_adapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_model(arch: str, dtype, device, window: int | None = None) -> LoadedModel:
    """4 layers, width 256; Mistral with an attention window of `window` (default: 4096, unused);
    Qwen3 with heads of 32 (its config's default is 128) and per-head q/k norms, OLMo 2 with its
    q/k and output norms."""
    import transformers as tf

    cls = {"qwen2": tf.Qwen2Config, "llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen3": tf.Qwen3Config,
           "olmo2": tf.Olmo2Config}[arch]
    cfg = cls(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, **({"sliding_window": window} if window else {}), **({"head_dim": 32} if arch == "qwen3" else {}))
    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            p.copy_(p.to(torch.bfloat16).float())  # the same weights in either dtype
    hf = hf.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LoadedModel(arch, hf, None, make_adapter(hf, arch), arch)


def batch_and_reference(arch, granularity, window=None):
    g = torch.Generator().manual_seed(1)
    samples = [Sample(i, torch.randint(0, 1000, (200 + 50 * i,), generator=g).tolist(),
                      torch.randint(0, 1000, (300,), generator=g).tolist()) for i in range(3)]
    batch = make_batch(samples, 256, 1000)
    cpu = small_model(arch, torch.float32, "cpu", window)
    graph = graph_of(cpu.adapter, granularity)
    return batch, graph, *attribute_batch(cpu, batch, graph)


def compare(out, ref, mask):
    rel = ((out - ref)[:, mask].norm() / ref[:, mask].norm()).item()
    corr = torch.corrcoef(torch.stack([out[:, mask].flatten(), ref[:, mask].flatten()]))[0, 1].item()
    return rel, corr


@pytest.mark.parametrize("arch,window", [("qwen2", None), ("mistral", None), ("mistral", 128), ("qwen3", None),
                                         ("olmo2", None)])
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_cuda_matches_cpu(arch, window, granularity):
    """float32 on CUDA equals the CPU path; bf16 on CUDA stays within bf16 rounding of it. With a
    window of 128 on inputs of 455-555 tokens: CUDA's flex kernel against the CPU's blocks kernel."""
    batch, graph, ref, ref_loss = batch_and_reference(arch, granularity, window)
    out32, loss32 = attribute_batch(small_model(arch, torch.float32, "cuda", window), batch, graph)
    rel32, _ = compare(out32.cpu(), ref, graph.real_edge_mask)
    assert rel32 < 1e-4, f"float32 CUDA vs CPU relative error {rel32:.3g}"
    out, loss = attribute_batch(small_model(arch, torch.bfloat16, "cuda", window), batch, graph)
    assert out.dtype == torch.float32
    rel, corr = compare(out.cpu(), ref, graph.real_edge_mask)
    print(f"{arch} window {window} {granularity}: bf16 vs fp32 relative error {rel:.4f}, correlation {corr:.5f}")
    assert rel < 0.15 and corr > 0.99, (rel, corr)
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "qwen3", "olmo2"])
def test_adapter_forward_equals_model_in_bf16_on_cuda(arch):
    m = small_model(arch, torch.bfloat16, "cuda")
    ids = torch.randint(0, 1000, (2, 300), device="cuda")
    with torch.no_grad():
        ours, theirs = m.adapter.forward_logits(ids).float(), m.hf(ids).logits.float()
    assert (ours - theirs).abs().max() <= 2e-2 * theirs.abs().max()


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_memory_model_matches_what_a_kept_layer_takes(granularity):
    """attribution.memory_per_token's graph term (which sizes batches and decides which layers are
    recomputed) within -20% / +10% of the memory one layer's kept autograd state really takes."""
    from eapcore.engine.attribution import _layer, memory_per_token

    m = small_model("qwen2", torch.bfloat16, "cuda")
    B, T = 2, 2048
    x = torch.randn(B, T, m.adapter.d_model, device="cuda", dtype=torch.bfloat16)
    m.adapter.rotary(T, x)  # the rotary cache is shared by all layers: not per-layer state
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    state = _layer(m.adapter, 0, x, True, granularity == "layer")
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    model = memory_per_token(m.adapter, graph_of(m.adapter, granularity), 2)["graph"] * B * T
    print(f"{granularity}: kept {kept / B / T:.0f} bytes per token, model {model / B / T:.0f}")
    assert 0.8 * model <= kept <= 1.1 * model
    del state


@pytest.mark.parametrize("U,V", [(57, 4), (700, 37)])
def test_contraction_on_cuda_equals_float64(U, V):
    """Both contraction paths (few destinations; many, in pieces of sources) on strided
    source-major views, against float64 on the same bf16 values."""
    from eapcore.engine.attribution import contract

    g = torch.Generator(device="cuda").manual_seed(0)
    store = torch.randn(U + 3, 2, 40, 64, device="cuda", generator=g).bfloat16()
    src = store[1: U + 1]  # a strided view, as the engine passes its stored sources
    dst = torch.randn(V, 2, 40, 64, device="cuda", generator=g).bfloat16()
    out = contract(src, dst)
    ref = torch.einsum("ubtd,vbtd->buv", src.double(), dst.double())
    assert out.dtype == torch.float32 and out.shape == (2, U, V)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kernel", ["flex", "blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_windowed_attention_on_cuda_equals_float64(kernel, dtype):
    """Both windowed kernels on CUDA (flex compiled, with its block-sparse mask; blocks), output and
    q/k/v gradients, against attention with the full window mask in float64 on the same values."""
    import torch.nn.functional as F

    from eapcore.engine.windowed_attention import causal_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, G, T, dh, W = 2, 8, 2, 1000, 64, 300
    q, k, v = (torch.randn(B, n, T, dh, device="cuda", generator=g).to(dtype).requires_grad_(True) for n in (H, G, G))
    cot = torch.randn(B, H, T, dh, device="cuda", generator=g).to(dtype)
    out = causal_attention(q, k, v, dh ** -0.5, W, kernel)
    grads = torch.autograd.grad(out, (q, k, v), cot)
    i = torch.arange(T, device="cuda")
    mask = (i[None] <= i[:, None]) & (i[None] > i[:, None] - W)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask, scale=dh ** -0.5, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), cot.double())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out,) + grads, (ref,) + ref_grads):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err < tol, f"{kernel} {dtype} {name}: relative error {err:.2e}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_model_spread_over_two_gpus_equals_one_gpu(tmp_path, granularity):
    """The layers on cuda:0 and cuda:1 (eapcore.engine.placement): the same scores and loss, bit
    for bit, as the whole model on cuda:0 (the same kernels on the same shapes; the sources are
    gathered to each destination's device), in float32 and bfloat16."""
    from eapcore.engine.models import load_model

    m = small_model("qwen2", torch.float32, "cpu")
    m.hf.save_pretrained(tmp_path)
    batch, graph, _, _ = batch_and_reference("qwen2", granularity)
    for dtype in ("float32", "bfloat16"):
        one = load_model(str(tmp_path), dtype, "cuda:0", with_tokenizer=False)
        two = load_model(str(tmp_path), dtype, with_tokenizer=False, devices=["cuda:0", "cuda:1"])
        assert {d.index for d in two.adapter.device_map} == {0, 1}
        ref, ref_loss = attribute_batch(one, batch, graph)
        out, loss = attribute_batch(two, batch, graph)
        assert torch.equal(out.cpu(), ref.cpu()) and torch.equal(loss.cpu(), ref_loss.cpu()), dtype


@pytest.mark.parametrize("arch,window", [("qwen2", None), ("mistral", 128), ("olmo2", None)])
def test_the_same_batch_twice_gives_the_same_bits(arch, window):
    """Attribution on CUDA is deterministic: the same batch attributed twice gives the same scores
    and loss bit for bit, in bfloat16 and float32 (resumed runs and the Ray executor rely on it)."""
    batch, graph, _, _ = batch_and_reference(arch, "head", window)
    for dtype in (torch.bfloat16, torch.float32):
        model = small_model(arch, dtype, "cuda", window)
        (a, la), (b, lb) = attribute_batch(model, batch, graph), attribute_batch(model, batch, graph)
        assert torch.equal(a, b) and torch.equal(la, lb), (arch, dtype, (a - b).abs().max().item(),
                                                           (la - lb).abs().max().item())
