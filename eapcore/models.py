"""Load a Hugging Face causal LM (hub id or local folder) and expose it to the EAP engine.

`load_model` returns a `LoadedModel`: the frozen transformers model, its tokenizer and an
`Adapter`, a functional view of one transformer layer split at the places the attribution graph
needs (separate q, k, v inputs; attention output; MLP input and output). The adapter calls the
model's own modules and rotary embedding, so its forward equals the model's (tested), while the
engine decides what to keep and where gradients flow. Supported: Llama, Mistral, Qwen2 (one
family: RMSNorm, RoPE, grouped-query attention, gated MLP) and GPT-2.

Weights never require gradients here. Nothing is unpickled: checkpoints load through
transformers (safetensors preferred); `trust_remote_code` stays off unless the caller turns it on.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

SUPPORTED = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gpt2": "GPT-2"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says why and what to do."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is meant as a local folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def load_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The transformers config of a folder or hub id, with clear errors for the usual mistakes."""
    from transformers import AutoConfig

    from eapcore import checkpoints

    if checkpoints.is_derived(name_or_path):  # a GGUF file or a LoRA adapter
        try:
            return checkpoints.load_config(name_or_path, revision)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not read the config of {name_or_path!r}: {err}") from None
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{name_or_path} is a file; give the checkpoint folder that holds config.json")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {name_or_path} has no config.json: it is not a Hugging Face "
                                 "checkpoint folder (save one with model.save_pretrained(folder))")
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if _looks_like_path(name_or_path):
        raise ModelLoadError(f"model folder {name_or_path} does not exist")
    try:
        return AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        hint = ("the hub is switched off here (HF_HUB_OFFLINE=1): download the model on a connected machine "
                "and pass its local folder" if offline else
                "check the id's spelling, your network, and that the model is public or you are logged in")
        raise ModelLoadError(f"could not load model {name_or_path!r} from the Hugging Face hub: {hint}. "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def check_architecture(config) -> str:
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED:
        raise ModelLoadError(f"unsupported architecture {arch!r}: the EAP engine supports "
                             f"{', '.join(SUPPORTED.values())} ({', '.join(SUPPORTED)})")
    return arch


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
               trust_remote_code: bool = False, with_tokenizer: bool = True) -> LoadedModel:
    """Load a checkpoint for attribution: eval mode, frozen weights, on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eapcore import checkpoints

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    name = name_or_path
    try:  # a GGUF file or a LoRA adapter becomes a plain folder (cached)
        name_or_path = checkpoints.local_folder(name_or_path, revision)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load {name_or_path!r}: {err}") from None
    config = load_config(name_or_path, revision, trust_remote_code)
    arch = check_architecture(config)
    dev = resolve_device(device)
    source = str(Path(name_or_path).expanduser()) if Path(name_or_path).expanduser().exists() else name_or_path
    hf = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=DTYPES[dtype],
                                              trust_remote_code=trust_remote_code).to(dev)
    hf.eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code) \
        if with_tokenizer else None
    return LoadedModel(name, hf, tok, make_adapter(hf, arch), arch)


def make_adapter(hf, arch: str) -> "Adapter":
    return GPT2Adapter(hf) if arch == "gpt2" else LlamaFamilyAdapter(hf)


class Adapter:
    """Functional view of a decoder-only transformer. Shapes: B batch, T positions, d model width,
    H query heads, G key-value heads, dh head width. All activations in the model's dtype."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int

    def __init__(self, hf):
        self.hf = hf
        self.config = hf.config

    # every method below: one step of the residual-stream computation
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

    # derived
    def head_out_weight(self, layer: int) -> torch.Tensor:
        """W_O split by head: [H, dh, d], so head h writes z_h @ W_O[h] into the residual."""
        w = self.proj_weight(layer, "o")  # [d, H*dh]
        return w.T.reshape(self.n_heads, self.d_head, self.d_model)

    def ln1_vjp(self, layer: int, x: torch.Tensor, cot: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Vector-Jacobian products of ln1 at x [B,c,d] for a stack of cotangents cot [V,B,c,d],
        written into out [V,B,c,d] (generic: autograd, vectorised over V)."""
        _, vjp = torch.func.vjp(self.ln1(layer), x)
        return out.copy_(torch.func.vmap(vjp)(cot)[0])

    def head_in_weight(self, layer: int, which: str) -> torch.Tensor:
        """W_q / W_k / W_v split by head: [heads, dh, d]."""
        w = self.proj_weight(layer, which)  # [heads*dh, d]
        return w.reshape(-1, self.d_head, self.d_model)

    def forward_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Plain forward through the adapter (for checks against the model itself)."""
        x = self.embed(ids)
        for l in range(self.n_layers):
            h = self.ln1(l)(x)
            x = x + self.attn_out(l, self.attend(l, *self.qkv(l, h, h, h)))
            x = x + self.mlp(l, self.ln2(l)(x))
        return self.unembed(self.ln_final()(x))


def _sdpa(q, k, v, scale: float, window: int | None = None) -> torch.Tensor:
    """Causal attention with grouped-query k/v kept grouped. q [B,H,T,dh], k/v [B,G,T,dh]."""
    T = q.shape[-2]
    mask = None
    if window is not None and T > window:  # sliding window: keys within the last `window` positions
        i = torch.arange(T, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=gqa)


def _rms_norm(module, x: torch.Tensor) -> torch.Tensor:
    """The Llama-family RMSNorm (float32 statistics, gain applied in the input dtype) as one fused
    kernel, equal to the module's own forward. On a GPU the kernel computes in float32 internally,
    so half-precision inputs need no float32 copy (which autograd would keep)."""
    xf = x if x.is_cuda else x.float()
    return module.weight * F.rms_norm(xf, (x.shape[-1],), eps=module.variance_epsilon).to(x.dtype)


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
    """Llama, Mistral, Qwen2: pre-RMSNorm, RoPE, grouped-query attention, gated MLP."""

    def __init__(self, hf):
        super().__init__(hf)
        c = hf.config
        self.layers = hf.model.layers
        attn = self.layers[0].self_attn
        self.n_layers = c.num_hidden_layers
        self.n_heads = c.num_attention_heads
        self.n_kv_heads = getattr(c, "num_key_value_heads", None) or self.n_heads
        self.d_model = c.hidden_size
        self.d_head = attn.head_dim
        self.scaling = attn.scaling
        self.window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
        self._rope = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
        self._gated_silu = getattr(c, "hidden_act", None) == "silu"
        self._cos_sin: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

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

    def rotary(self, T: int, like: torch.Tensor):
        key = (T, like.device, like.dtype)
        if key not in self._cos_sin:
            pos = torch.arange(T, device=like.device)[None]
            self._cos_sin = {key: self.hf.model.rotary_emb(like, pos)}  # keep one length only
        return self._cos_sin[key]

    def attend(self, layer, q, k, v):
        B, T, _ = q.shape
        q = q.view(B, T, -1, self.d_head).transpose(1, 2)
        k = k.view(B, T, -1, self.d_head).transpose(1, 2)
        v = v.view(B, T, -1, self.d_head).transpose(1, 2)
        cos, sin = self.rotary(T, q)
        q, k = self._rope(q, k, cos, sin)
        z = _sdpa(q, k, v, self.scaling, self.window)
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
        if getattr(c, "scale_attn_by_inverse_layer_idx", False) or getattr(c, "reorder_and_upcast_attn", False):
            raise ModelLoadError("GPT-2 configs with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn "
                                 "are not supported")
        self.scaling = self.d_head ** -0.5 if getattr(c, "scale_attn_weights", True) else 1.0

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
        return _sdpa(q, k, v, self.scaling).transpose(1, 2).reshape(B, T, -1)

    def attn_out(self, layer, z):
        return self.blocks[layer].attn.c_proj(z)

    def mlp(self, layer, h):
        return self.blocks[layer].mlp(h)

    def unembed(self, x):
        return self.hf.lm_head(x)


TL_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "gpt2": "GPT2LMHeadModel"}


def to_hooked_transformer(model: LoadedModel, **cfg_overrides):
    """The same weights as a TransformerLens HookedTransformer (3.x), for hook-based tools.

    The config is built from the checkpoint's own config (never guessed from the folder name) and
    the weights converted with TransformerLens' converters, with no weight processing (no folded
    layer norms, no centring), so its outputs equal the model's. Needs `transformer-lens`."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained import weight_conversions as wc

    c, ad = model.hf.config, model.adapter
    cfg = dict(d_model=ad.d_model, d_head=ad.d_head, n_heads=ad.n_heads, n_layers=ad.n_layers,
               d_vocab=model.hf.get_input_embeddings().num_embeddings, dtype=model.dtype,
               device=str(model.device), original_architecture=TL_ARCHITECTURES[model.arch])
    if model.arch == "gpt2":
        cfg.update(d_mlp=c.n_inner or 4 * ad.d_model, n_ctx=c.n_positions, eps=c.layer_norm_epsilon,
                   act_fn=c.activation_function, normalization_type="LN", positional_embedding_type="standard")
    else:
        rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
        cfg.update(d_mlp=c.intermediate_size, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps,
                   act_fn=c.hidden_act, n_key_value_heads=ad.n_kv_heads if ad.n_kv_heads != ad.n_heads else None,
                   normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=ad.d_head,
                   rotary_base=rope, rotary_adjacent_pairs=False, final_rms=True, gated_mlp=True)
    cfg.update(cfg_overrides)
    tl_cfg = HookedTransformerConfig(**cfg)
    convert = getattr(wc, f"convert_{'llama' if model.arch == 'llama' else model.arch}_weights")
    tl = HookedTransformer(tl_cfg, tokenizer=model.tokenizer)
    tl.load_and_process_state_dict(convert(model.hf, tl_cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False,
                                   refactor_factored_attn_matrices=False)
    return tl.eval()
