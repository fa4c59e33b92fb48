"""Load a Hugging Face causal LM (hub id or local folder) and expose it to the EAP engine.

`load_model` returns a `LoadedModel`: the frozen transformers model, its tokenizer and an
`Adapter`, a functional view of one transformer layer split at the places the attribution graph
needs (separate q, k, v inputs; attention output; MLP input and output). The adapter calls the
model's own modules and rotary embedding, so its forward equals the model's, while the engine
decides what to keep and where gradients flow. Supported: Llama, Mistral, Qwen2, Qwen3 (one
family: pre-RMSNorm, RoPE, grouped-query attention, gated MLP; Qwen3 adds per-head q/k norms),
OLMo 2 and OLMo 3 (norms on the attention's and MLP's outputs, q/k norms over the whole
projection) and GPT-2; per-layer sliding windows as the config sets them.

Conformance: `check_config` refuses, naming the field, configurations the adapter does not
reproduce; `check_conformance` (run by `load_model`) compares the adapter's forward with the
model's own on a padded probe batch, and on a probe longer than the attention window when the
model has one, and refuses the model if they differ. No configuration is scored unchecked.

Weights never require gradients here. Nothing is unpickled: checkpoints load through
transformers (safetensors preferred); `trust_remote_code` stays off unless the caller turns it on.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from eapcore import modelfiles
from eapcore.engine.windowed_attention import causal_attention
from eapcore.modelfiles import CheckpointError

SUPPORTED = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "olmo2": "OLMo 2",
             "olmo3": "OLMo 3", "gpt2": "GPT-2"}
POST_NORM = ("olmo2", "olmo3")  # norms on the blocks' outputs, none on their inputs
LAYER_TYPES = {"full_attention": False, "sliding_attention": True}  # layer type -> windowed
WINDOW_BY_LAYER_TYPE = ("qwen2", "qwen3", "olmo3")  # windows per layer from config.layer_types
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(CheckpointError):
    """A model could not be loaded or is refused; the message says why and what to do. Problems of
    the files or the hub are modelfiles.CheckpointError, this class's base."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


def load_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The transformers config of a folder or hub id, with one-line errors for the usual mistakes
    (eapcore.modelfiles: no or broken config.json, truncated weights, custom code without opt-in,
    hub unreachable)."""
    from eapcore.engine import checkpoints

    if checkpoints.is_derived(name_or_path):  # a GGUF file or a LoRA adapter
        try:
            return checkpoints.load_config(name_or_path, revision)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not read the config of {name_or_path!r}: {err}") from None
    return _engine_error(modelfiles.load_config, name_or_path, revision, trust_remote_code)


def _engine_error(load: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """load(*args, **kwargs) with its CheckpointError raised as this module's ModelLoadError."""
    try:
        return load(*args, **kwargs)
    except ModelLoadError:
        raise
    except CheckpointError as err:
        raise ModelLoadError(str(err)) from None


def config_dims(config) -> dict[str, int]:
    """The sizes a config gives: n_layers, d_model, n_heads, n_kv_heads, vocab (any architecture)."""
    get = lambda *names: next(getattr(config, n) for n in names if getattr(config, n, None) is not None)  # noqa: E731
    heads = get("num_attention_heads", "n_head")
    return {"n_layers": get("num_hidden_layers", "n_layer"), "d_model": get("hidden_size", "n_embd"),
            "n_heads": heads, "n_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "vocab": get("vocab_size")}


def check_architecture(config) -> str:
    """The config's architecture if the engine supports it and every setting it uses
    (`check_config`); ModelLoadError naming the architecture or field otherwise."""
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED:
        raise ModelLoadError(f"unsupported architecture {arch!r}: the EAP engine supports "
                             f"{', '.join(SUPPORTED.values())} ({', '.join(SUPPORTED)})")
    problems = check_config(config, arch)
    if problems:
        raise ModelLoadError(f"unsupported {SUPPORTED[arch]} configuration: {'; '.join(problems)}. The engine "
                             "would score it wrongly, so it is refused")
    return arch


def check_config(config, arch: str) -> list[str]:
    """Config fields with values that transformers applies and the adapter would not, one line each
    naming the field. Everything else reaches the scores through the model's own modules, which
    the adapter calls (rotary scaling of every kind, q/k norms, biases, tied embeddings,
    activations, head widths), and `check_conformance` verifies that on the loaded model."""
    problems = []
    if getattr(config, "is_causal", True) is False:
        problems.append("is_causal=False: bidirectional attention is not supported")
    types = getattr(config, "layer_types", None) if arch in WINDOW_BY_LAYER_TYPE else None
    unknown = sorted(set(types or ()) - set(LAYER_TYPES))
    if unknown:
        problems.append(f"layer_types contains {', '.join(map(repr, unknown))}: only full_attention and "
                        "sliding_attention layers are supported")
    if arch == "gpt2":
        for name in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if getattr(config, name, False):
                problems.append(f"{name}=True is not supported")
    return problems



def layer_windows(config, arch: str) -> list[int | None]:
    """Each layer's attention window (keys within the last W positions), None for full causal
    attention, as transformers applies them: Mistral's `sliding_window` on every layer; Qwen2,
    Qwen3 and OLMo 3 on the layers `layer_types` marks sliding_attention (Qwen2/Qwen3 configs
    derive it from use_sliding_window and max_window_layers: layers >= max_window_layers slide)."""
    n = config.num_hidden_layers if arch != "gpt2" else config.n_layer
    window = getattr(config, "sliding_window", None)
    if arch == "mistral":
        return [window] * n
    if arch in WINDOW_BY_LAYER_TYPE and getattr(config, "layer_types", None):
        return [window if LAYER_TYPES[t] else None for t in config.layer_types[:n]]
    return [None] * n


@dataclass
class LoadedModel:
    name: str
    hf: Any  # transformers PreTrainedModel, eval mode, weights frozen
    tokenizer: Any
    adapter: "Adapter"
    arch: str

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype


def load_model(name_or_path: str, dtype: str = "float32", device: str = "auto", revision: str | None = None,
               trust_remote_code: bool = False, with_tokenizer: bool = True,
               devices: Sequence[str] | None = None) -> LoadedModel:
    """Load a checkpoint for attribution: eval mode, frozen weights, on `device` in `dtype`,
    its adapter checked against the model itself (`check_conformance`). devices: spread the
    layers over these devices instead (a model too large for one GPU; loaded on the CPU first,
    placed by eapcore.engine.placement balanced on the devices' free memory)."""
    from eapcore.engine import checkpoints

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    name = name_or_path
    try:  # a GGUF file or a LoRA adapter becomes a plain folder (cached)
        name_or_path = checkpoints.local_folder(name_or_path, revision)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load {name_or_path!r}: {err}") from None
    config = load_config(name_or_path, revision, trust_remote_code)
    arch = check_architecture(config)
    dev = resolve_device(device) if not devices else torch.device("cpu")
    for d in devices or ():
        resolve_device(str(d))  # a clear error for a CUDA device on a machine without one
    hf = _engine_error(modelfiles.load_causal_lm, name_or_path, revision, trust_remote_code, dtype=DTYPES[dtype])
    hf.to(dev).eval().requires_grad_(False)
    tok = _engine_error(modelfiles.load_tokenizer, name_or_path, revision, trust_remote_code) if with_tokenizer else None
    model = LoadedModel(name, hf, tok, make_adapter(hf, arch), arch)
    if devices:
        from eapcore.engine import placement

        try:
            placement.dispatch(model.adapter, placement.balanced_map(model.adapter, devices))
        except ValueError as err:
            raise ModelLoadError(f"{name}: {err}") from None
    check_conformance(model)
    return model


def make_adapter(hf, arch: str) -> "Adapter":
    if arch == "gpt2":
        return GPT2Adapter(hf)
    return Olmo2Adapter(hf) if arch in POST_NORM else LlamaFamilyAdapter(hf)


PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}  # relative; half precision: 5e-2


CPU_PROBE_FLOPS = 2e12  # a longer window probe is skipped on the CPU (about 20 s on two cores)


def check_conformance(model: LoadedModel, probe_len: int = 12) -> dict[str, float]:
    """Compare the adapter's forward with the model's own (`model.hf` with an attention mask) on a
    right-padded batch of two random probes, and, when a layer or the config has an attention
    window, on one probe longer than the largest window (skipped, with a warning, on the CPU when
    it would cost more than CPU_PROBE_FLOPS: a 7B model's 4096-token window). Returns
    {probe: relative error}; raises ModelLoadError, naming the config's non-default fields, if the
    final hidden states or the last logits differ by more than rounding (1e-4 of their largest
    value in float32, 5e-2 in half precision)."""
    ad, hf = model.adapter, model.hf
    windows = [w for w in ad.windows + [getattr(hf.config, "sliding_window", None)] if w]  # the config's too
    probes = {"short": [probe_len, probe_len - 3]}
    if windows:
        T = max(windows) + 9
        if model.device.type == "cpu" and 2 * T * sum(p.numel() for p in hf.parameters()) > CPU_PROBE_FLOPS:
            warnings.warn(f"{model.name}: the probe longer than its attention window ({T} tokens) is skipped on "
                          "the CPU (too slow for a model this size); the windows are as transformers applies them "
                          "(tests/test_conformance.py) and the short probe passed", stacklevel=2)
        else:
            probes["window"] = [T]
    tol = PROBE_TOLERANCE.get(model.dtype, 5e-2)
    vocab = hf.get_input_embeddings().num_embeddings
    errors = {}
    for name, rows in probes.items():
        T = rows[0]
        dev = ad.embed_device  # the model may be spread over devices (its outputs on ad.head_device)
        mask = torch.arange(T, device=dev)[None] < torch.tensor(rows, device=dev)[:, None]
        ids = torch.randint(0, vocab, (len(rows), T), generator=torch.Generator().manual_seed(T)).to(dev)
        ids = ids.masked_fill(~mask, 0)
        with torch.no_grad():
            ours = ad.final_hidden(ad.embed(ids))
            theirs = hf.base_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            last = hf(input_ids=ids[:1], logits_to_keep=4).logits[0].float()
            ours_last = ad.unembed(ours[0, -4:]).float()
        mask = mask.to(ours.device)
        err = max(((ours - theirs).float()[mask].abs().max() / theirs.float()[mask].abs().max()).item(),
                  ((ours_last - last).abs().max() / last.abs().max()).item())
        errors[name] = err
        if not err <= tol:
            what = f"a probe of {T} tokens" + (f" (longer than its attention window of {max(windows)})"
                                                if name == "window" else "")
            raise ModelLoadError(f"{model.name}: the engine's forward differs from transformers' by {err:.2g} "
                                 f"(relative) on {what}, so its scores would be wrong and the model is refused. "
                                 f"Its config's non-default settings: {_config_summary(hf.config)}")
    return errors


def _config_summary(config) -> str:
    """The config's fields that differ from its class's defaults, but for sizes and bookkeeping."""
    skip = {"architectures", "transformers_version", "dtype", "torch_dtype", "model_type", "vocab_size",
            "bos_token_id", "eos_token_id", "pad_token_id", "_name_or_path", "use_cache", "hidden_size",
            "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "initializer_range", "attention_dropout", "n_embd", "n_layer", "n_head", "n_inner"}
    diff = {k: v for k, v in config.to_diff_dict().items() if k not in skip}
    return ", ".join(f"{k}={v!r}" for k, v in diff.items()) or "none"


def per_head(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[h] = x[:, :, h] @ w[h] for each head: x [B, c, h, k], w [h, k, d] -> out [h, B, c, d]
    (contiguous; written in place by one batched matmul)."""
    h, B, c, d = out.shape
    torch.bmm(x.permute(2, 0, 1, 3).reshape(h, B * c, -1), w, out=out.view(h, B * c, d))
    return out


class Adapter:
    """Functional view of a decoder-only transformer. Shapes: B batch, T positions, d model width,
    H query heads, G key-value heads, dh head width. All activations in the model's dtype."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    windows: list[int | None]  # each layer's attention window (None: full causal)
    attention_kernel: str | None = None  # windowed attention kernel (windowed_attention.KERNELS; None: auto)
    device_map: list[torch.device] | None = None  # each layer's device when spread (placement.dispatch)

    def __init__(self, hf):
        self.hf = hf
        self.config = hf.config

    # the modules by role (eapcore.engine.placement puts them on devices) and where they are
    def embed_modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def layer_module(self, layer: int) -> torch.nn.Module:
        raise NotImplementedError

    def head_modules(self) -> list[torch.nn.Module]:  # the final norm and the unembedding
        raise NotImplementedError

    @property
    def tied(self) -> bool:
        return self.hf.get_input_embeddings().weight is self.hf.get_output_embeddings().weight

    # where each part runs: as placed by placement.dispatch (device_map; there "cpu:1" is a CPU
    # device of its own, so the multi-device path runs on a CPU too), else the model's one device
    def layer_device(self, layer: int) -> torch.device:
        return self.device_map[layer] if self.device_map else next(self.hf.parameters()).device

    @property
    def embed_device(self) -> torch.device:
        return self.device_map[-1 if self.tied else 0] if self.device_map else next(self.hf.parameters()).device

    @property
    def head_device(self) -> torch.device:
        return self.device_map[-1] if self.device_map else next(self.hf.parameters()).device

    # every method below: one step of the residual-stream computation, on the device of its weights
    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # [B,T] -> [B,T,d]
        raise NotImplementedError

    def ln1(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:  # the layer norms, [.., d] -> [.., d]
        raise NotImplementedError

    def ln2(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def ln_final(self) -> Callable[[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def proj_weight(self, layer: int, which: str) -> torch.Tensor:
        """[out, in] matrix W of projection q|k|v|o, applied as x @ W.T (+ bias)."""
        raise NotImplementedError

    def qkv(self, layer: int, hq, hk, hv):  # normed inputs [B,T,d] -> [B,T,H*dh], [B,T,G*dh] x2
        raise NotImplementedError

    def attend(self, layer: int, q, k, v) -> torch.Tensor:  # -> z [B,T,H*dh]
        raise NotImplementedError

    def attn_out(self, layer: int, z: torch.Tensor) -> torch.Tensor:  # [B,T,H*dh] -> [B,T,d]
        raise NotImplementedError

    def mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor:  # normed [B,T,d] -> [B,T,d]
        raise NotImplementedError

    def unembed(self, x: torch.Tensor) -> torch.Tensor:  # final-normed [.., d] -> logits [.., V]
        raise NotImplementedError

    # head granularity: head h writes head_values(z)_h @ head_out_weight[h] into the residual
    # stream, and its q (k, v) input is the residual stream seen by head h's slice of qkv's output
    def head_out_weight(self, layer: int) -> torch.Tensor:
        """W_O split by head: [H, dh, d]."""
        w = self.proj_weight(layer, "o")  # [d, H*dh]
        return w.T.reshape(self.n_heads, self.d_head, self.d_model)

    def head_values(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """The per-head factors stored for the head outputs, [B,T,H*dh] (here z itself)."""
        return z

    def head_in_weight(self, layer: int, which: str) -> torch.Tensor:
        """W_q / W_k / W_v split by head: [heads, dh, d]."""
        w = self.proj_weight(layer, which)  # [heads*dh, d]
        return w.reshape(-1, self.d_head, self.d_model)

    def head_cotangents(self, layer: int, which: str, x: torch.Tensor, grad: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
        """For each head, the gradient of its slice of qkv's `which` output pulled back to ln1's
        output (ln1_vjp takes it to the residual stream): out[h] = grad_h @ W[h]. x [B,c,d] is the
        layer's residual input, grad [B,c,heads*dh] the gradient of qkv's output, out [heads,B,c,d]."""
        w = self.head_in_weight(layer, which)
        return per_head(grad.unflatten(-1, (w.shape[0], self.d_head)), w, out)

    def ln1_vjp(self, layer: int, x: torch.Tensor, cot: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Vector-Jacobian products of ln1 at x [B,c,d] for a stack of cotangents cot [V,B,c,d],
        written into out [V,B,c,d] (generic: autograd, vectorised over V)."""
        _, vjp = torch.func.vjp(self.ln1(layer), x)
        return out.copy_(torch.func.vmap(vjp)(cot)[0])

    def final_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Plain forward through the adapter from input embeddings x [B,T,d] to the final norm's
        output [B,T,d] (for the checks against the model itself); x moves to each layer's device."""
        for l in range(self.n_layers):
            x = x.to(self.layer_device(l))
            h = self.ln1(l)(x)
            x = x + self.attn_out(l, self.attend(l, *self.qkv(l, h, h, h)))
            x = x + self.mlp(l, self.ln2(l)(x))
        return self.ln_final()(x.to(self.head_device))

    def forward_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.final_hidden(self.embed(ids)))


def _rms_norm(module, x: torch.Tensor) -> torch.Tensor:
    """The Llama-family RMSNorm (float32 statistics, gain applied in the input dtype) as one fused
    kernel, equal to the module's own forward. On a GPU the kernel computes in float32 internally,
    so half-precision inputs need no float32 copy (which autograd would keep)."""
    xf = x if x.is_cuda else x.float()
    return module.weight * F.rms_norm(xf, (x.shape[-1],), eps=module.variance_epsilon).to(x.dtype)


def _rms_norm_gain_first(module, x: torch.Tensor) -> torch.Tensor:
    """OLMo's RMSNorm: the gain applied in float32 before rounding to the input dtype."""
    xf = x if x.is_cuda else x.float()
    return F.rms_norm(xf, (x.shape[-1],), module.weight.to(xf.dtype), eps=module.variance_epsilon).to(x.dtype)


class _GatedSiLU(torch.autograd.Function):
    """silu(gate) * up that saves only gate and up and recomputes silu in the backward: a third
    less activation memory than autograd keeps for the plain expression, with the same numbers
    (the same kernels on the same inputs)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


class LlamaFamilyAdapter(Adapter):
    """Llama, Mistral, Qwen2, Qwen3: pre-RMSNorm, RoPE, grouped-query attention, gated MLP; Qwen3
    normalises each head's q and k (RMSNorm over dh, before RoPE), which `attend` applies, so
    qkv's outputs are the plain projections and stay per-head."""

    def __init__(self, hf):
        super().__init__(hf)
        c = hf.config
        self.arch = c.model_type
        self.layers = hf.model.layers
        attn = self.layers[0].self_attn
        self.n_layers = c.num_hidden_layers
        self.n_heads = c.num_attention_heads
        self.n_kv_heads = getattr(c, "num_key_value_heads", None) or self.n_heads
        self.d_model = c.hidden_size
        self.d_head = attn.head_dim
        self.scaling = attn.scaling
        self.windows = layer_windows(c, self.arch)
        # OLMo 3 keeps one rotary table per layer type (its rope_parameters are keyed by type)
        self._rope_types = c.layer_types if self.arch == "olmo3" else [None] * self.n_layers
        self._head_qk_norm = self.arch == "qwen3"
        self._rope = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
        self._gated_silu = getattr(c, "hidden_act", None) == "silu"
        self._cos_sin: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def embed_modules(self):
        return [self.hf.model.embed_tokens]

    def layer_module(self, layer):
        return self.layers[layer]

    def head_modules(self):
        return [self.hf.model.norm, self.hf.lm_head]

    def embed(self, ids):
        return self.hf.model.embed_tokens(ids)

    def ln1(self, layer):
        return partial(_rms_norm, self.layers[layer].input_layernorm)

    def ln2(self, layer):
        return partial(_rms_norm, self.layers[layer].post_attention_layernorm)

    def ln1_vjp(self, layer, x, cot, out):
        """RMSNorm's VJP in closed form, float32: r (w c) - x r^3 mean(x w c), r = 1/rms(x)
        (x is shared by all V cotangents instead of copied per cotangent as vmap would)."""
        norm = self.layers[layer].input_layernorm
        xf = x.float()
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm.variance_epsilon)  # [B,c,1]
        u = (norm.weight * cot).float()  # the gain is applied in the input dtype, as in the forward
        s = (u * xf).mean(-1, keepdim=True)  # [V,B,c,1]
        return out.copy_(u.mul_(r).addcmul_(xf * r.pow(3), s, value=-1.0))

    def ln_final(self):
        return partial(_rms_norm, self.hf.model.norm)

    def proj_weight(self, layer, which):
        attn = self.layers[layer].self_attn
        return getattr(attn, f"{which}_proj").weight

    def qkv(self, layer, hq, hk, hv):
        attn = self.layers[layer].self_attn
        return attn.q_proj(hq), attn.k_proj(hk), attn.v_proj(hv)

    def rotary(self, T: int, like: torch.Tensor, layer: int = 0):
        """(cos, sin) of positions 0..T-1 for `layer` from the model's own rotary embedding (every
        scaling type transformers implements); one length is cached."""
        kind = self._rope_types[layer]
        key = (T, like.device, like.dtype, kind)
        if key not in self._cos_sin:
            pos = torch.arange(T, device=like.device)[None]
            args = (like, pos) if kind is None else (like, pos, kind)
            self._cos_sin = {k: v for k, v in self._cos_sin.items() if k[0] == T}
            self._cos_sin[key] = self.hf.model.rotary_emb(*args)
        return self._cos_sin[key]

    def attend(self, layer, q, k, v):
        B, T, _ = q.shape
        q, k, v = (t.view(B, T, -1, self.d_head) for t in (q, k, v))
        if self._head_qk_norm:
            attn = self.layers[layer].self_attn
            q, k = _rms_norm(attn.q_norm, q), _rms_norm(attn.k_norm, k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        cos, sin = self.rotary(T, q, layer)
        q, k = self._rope(q, k, cos, sin)
        z = causal_attention(q, k, v, self.scaling, self.windows[layer], self.attention_kernel)
        return z.transpose(1, 2).reshape(B, T, -1)

    def attn_out(self, layer, z):
        return self.layers[layer].self_attn.o_proj(z)

    def mlp(self, layer, h):
        mlp = self.layers[layer].mlp
        if self._gated_silu:  # the module's own computation, with the leaner autograd state
            return mlp.down_proj(_GatedSiLU.apply(mlp.gate_proj(h), mlp.up_proj(h)))
        return mlp(h)

    def unembed(self, x):
        return self.hf.lm_head(x)


class Olmo2Adapter(LlamaFamilyAdapter):
    """OLMo 2 and OLMo 3: no norms on the blocks' inputs (ln1 and ln2 are the identity); RMSNorm
    on the attention's output (after o_proj) and on the MLP's output before each is added to the
    residual stream, so those normed outputs are the sources; q and k RMSNorm over the whole
    projection (all heads together), applied in qkv, before RoPE.

    Head granularity: head h's output is its share of the normed attention output,
    r * g * (z_h @ W_O[h]), with g the norm's gain and r = 1/rms of the whole attention output at
    that position (so the heads sum to what the block writes; an o_proj bias belongs to no head);
    head h's q input is the residual stream as seen by head h's slice of the normed projection,
    whose norm statistic it computes from its own input (so an edge into head h's q changes head
    h's query only)."""

    def ln1(self, layer):
        return _identity

    ln2 = ln1

    def ln1_vjp(self, layer, x, cot, out):
        return out.copy_(cot)

    def ln_final(self):
        return partial(_rms_norm_gain_first, self.hf.model.norm)

    def qkv(self, layer, hq, hk, hv):
        attn = self.layers[layer].self_attn
        return (_rms_norm_gain_first(attn.q_norm, attn.q_proj(hq)), _rms_norm_gain_first(attn.k_norm, attn.k_proj(hk)),
                attn.v_proj(hv))

    def attn_out(self, layer, z):
        return _rms_norm_gain_first(self.layers[layer].post_attention_layernorm, self.layers[layer].self_attn.o_proj(z))

    def mlp(self, layer, h):
        return _rms_norm_gain_first(self.layers[layer].post_feedforward_layernorm, super().mlp(layer, h))

    def head_out_weight(self, layer):
        return super().head_out_weight(layer) * self.layers[layer].post_attention_layernorm.weight

    def head_values(self, layer, z):
        """z scaled per position by r = 1/rms(o_proj(z)), the post-attention norm's statistic."""
        norm = self.layers[layer].post_attention_layernorm
        o = self.layers[layer].self_attn.o_proj(z)
        ms = torch.linalg.vector_norm(o, dim=-1, keepdim=True, dtype=torch.float32).square() / o.shape[-1]
        return (z * torch.rsqrt(ms + norm.variance_epsilon)).to(z.dtype)

    def head_cotangents(self, layer, which, x, grad, out):
        """Through the q (k) norm over the whole projection p = x @ W.T (+ b), in float32: with
        u = g * grad restricted to head j and r = 1/rms(p), the norm's VJP is r u - p r^3 mean(p u);
        pulled back through W this is r u_j @ W[j] - r^3 mean_j(p u) (p @ W): one batched matmul
        for the first term and one shared product p @ W for the second."""
        if which == "v":
            return super().head_cotangents(layer, which, x, grad, out)
        attn = self.layers[layer].self_attn
        norm = attn.q_norm if which == "q" else attn.k_norm
        w = self.head_in_weight(layer, which)  # [n, dh, d]
        p = getattr(attn, f"{which}_proj")(x).float()  # [B,c,n*dh] (ln1 is the identity)
        r = torch.rsqrt(p.square().mean(-1, keepdim=True) + norm.variance_epsilon)  # [B,c,1]
        u = grad.float() * norm.weight.float()
        s = (p * u).unflatten(-1, (w.shape[0], self.d_head)).sum(-1) * r.pow(3) / p.shape[-1]  # [B,c,n]
        per_head((u * r).to(out.dtype).unflatten(-1, (w.shape[0], self.d_head)), w, out)
        shared = (p.to(out.dtype) @ w.reshape(-1, self.d_model))  # [B,c,d]
        return out.sub_(s.permute(2, 0, 1)[..., None].to(out.dtype) * shared)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class GPT2Adapter(Adapter):
    """GPT-2: pre-LayerNorm, learned positions, fused qkv (Conv1D, x @ W + b), GELU MLP."""

    def __init__(self, hf):
        super().__init__(hf)
        c = hf.config
        self.blocks = hf.transformer.h
        self.n_layers = c.n_layer
        self.n_heads = self.n_kv_heads = c.n_head
        self.d_model = c.n_embd
        self.d_head = c.n_embd // c.n_head
        self.windows = [None] * self.n_layers
        self.scaling = self.d_head ** -0.5 if getattr(c, "scale_attn_weights", True) else 1.0

    def embed_modules(self):
        return [self.hf.transformer.wte, self.hf.transformer.wpe]

    def layer_module(self, layer):
        return self.blocks[layer]

    def head_modules(self):
        return [self.hf.transformer.ln_f, self.hf.lm_head]

    def embed(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        return self.hf.transformer.wte(ids) + self.hf.transformer.wpe(pos)

    def ln1(self, layer):
        return self.blocks[layer].ln_1

    def ln2(self, layer):
        return self.blocks[layer].ln_2

    def ln_final(self):
        return self.hf.transformer.ln_f

    def proj_weight(self, layer, which):
        attn = self.blocks[layer].attn
        if which == "o":
            return attn.c_proj.weight.T  # Conv1D stores [in, out]
        i = "qkv".index(which) * self.d_model
        return attn.c_attn.weight[:, i: i + self.d_model].T

    def qkv(self, layer, hq, hk, hv):
        w, b = self.blocks[layer].attn.c_attn.weight, self.blocks[layer].attn.c_attn.bias
        d = self.d_model
        return tuple(torch.addmm(b[i * d:(i + 1) * d], h.reshape(-1, d), w[:, i * d:(i + 1) * d]).view(*h.shape[:-1], d)
                     for i, h in enumerate((hq, hk, hv)))

    def attend(self, layer, q, k, v):
        B, T, _ = q.shape
        q, k, v = (t.view(B, T, self.n_heads, self.d_head).transpose(1, 2) for t in (q, k, v))
        return causal_attention(q, k, v, self.scaling).transpose(1, 2).reshape(B, T, -1)

    def attn_out(self, layer, z):
        return self.blocks[layer].attn.c_proj(z)

    def mlp(self, layer, h):
        return self.blocks[layer].mlp(h)

    def unembed(self, x):
        return self.hf.lm_head(x)


TL_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def to_hooked_transformer(model: LoadedModel, **cfg_overrides):
    """The same weights as a TransformerLens HookedTransformer (3.x), for hook-based tools.

    The config is built from the checkpoint's own config (never guessed from the folder name) and
    the weights converted with TransformerLens' converters, with no weight processing (no folded
    layer norms, no centring), so its outputs equal the model's. Sliding windows become
    TransformerLens' local attention. Refused (ModelLoadError): OLMo 3, RoPE scaling, windows of
    different sizes, OLMo 2 with grouped-query attention (TransformerLens 3.9's converter assumes
    as many key-value heads as query heads). Needs `transformer-lens`."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained import weight_conversions as wc

    c, ad = model.hf.config, model.adapter
    rope = getattr(c, "rope_parameters", None) or {}
    windows = {w for w in ad.windows if w}
    problems = [f"architecture {model.arch}" if model.arch not in TL_ARCHITECTURES else "",
                f"rope_type {rope.get('rope_type')!r}" if rope.get("rope_type", "default") != "default" else "",
                f"windows of sizes {sorted(windows)}" if len(windows) > 1 else "",
                "OLMo 2 with grouped-query attention" if model.arch == "olmo2" and ad.n_kv_heads != ad.n_heads else ""]
    if any(problems):
        raise ModelLoadError(f"{model.name}: no TransformerLens conversion for {', '.join(filter(None, problems))}")
    cfg = dict(d_model=ad.d_model, d_head=ad.d_head, n_heads=ad.n_heads, n_layers=ad.n_layers,
               d_vocab=model.hf.get_input_embeddings().num_embeddings, dtype=model.dtype,
               device=str(model.device), original_architecture=TL_ARCHITECTURES[model.arch])
    if model.arch == "gpt2":
        cfg.update(d_mlp=c.n_inner or 4 * ad.d_model, n_ctx=c.n_positions, eps=c.layer_norm_epsilon,
                   act_fn=c.activation_function, normalization_type="LN", positional_embedding_type="standard")
    else:
        cfg.update(d_mlp=c.intermediate_size, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps,
                   act_fn=c.hidden_act, n_key_value_heads=ad.n_kv_heads if ad.n_kv_heads != ad.n_heads else None,
                   normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=ad.d_head,
                   rotary_base=rope.get("rope_theta", 10000.0), rotary_adjacent_pairs=False, final_rms=True,
                   gated_mlp=True, use_qk_norm=model.arch == "qwen3")
    if windows:
        cfg.update(use_local_attn=True, window_size=windows.pop(),
                   attn_types=["local" if w else "global" for w in ad.windows])
    cfg.update(cfg_overrides)
    tl_cfg = HookedTransformerConfig(**cfg)
    convert = getattr(wc, f"convert_{model.arch}_weights")
    tl = HookedTransformer(tl_cfg, tokenizer=model.tokenizer)
    tl.load_and_process_state_dict(convert(model.hf, tl_cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False,
                                   refactor_factored_attn_matrices=False)
    return tl.eval()
