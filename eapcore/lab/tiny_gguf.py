"""A tiny Llama model with a byte-level BPE tokenizer, written as a GGUF file as llama.cpp would.

It stands in for SmolLM2's GGUF file in the tests and in the CPU rehearsal of the GPU lab
(`eapcore.lab.smollm2 --tiny`): same architecture family, same tokenizer type ("gpt2", byte-level
BPE, specials <|endoftext|> <|im_start|> <|im_end|>, pad = eos, no BOS added), tied embeddings,
2-D weights quantized (Q8_0 by default) and norms in float32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # unk, bos, eos (as in SmolLM2)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 400):
    """A byte-level BPE `tokenizers.Tokenizer` learned on `texts` (digits split one by one)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"),
                             behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return tok


def build_model(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, seed: int = 0):
    """A randomly initialised LlamaForCausalLM with tied embeddings, SmolLM2's special-token ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init, so logits differ clearly per token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def _permute(w, n_head: int):
    """llama.cpp's row order for q/k (interleaved rotary halves), as its HF converter writes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_tensors(model) -> dict[str, "object"]:
    """{GGUF tensor name: float32 numpy array} of a tied-embedding LlamaForCausalLM."""
    c = model.config
    out = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight}
    for i, layer in enumerate(model.model.layers):
        for hf_name, g_name in _NAMES.items():
            w = layer.get_submodule(hf_name).weight
            if g_name == "attn_q":
                w = _permute(w, c.num_attention_heads)
            elif g_name == "attn_k":
                w = _permute(w, c.num_key_value_heads)
            out[f"blk.{i}.{g_name}.weight"] = w
    return {k: v.detach().float().numpy() for k, v in out.items()}


def quantize(array, qtype: str):
    """(stored array, ggml type) of a float32 array; 1-D tensors always stay float32."""
    import gguf

    t = getattr(gguf.GGMLQuantizationType, qtype)
    if array.ndim < 2 or t == gguf.GGMLQuantizationType.F32:
        return array, gguf.GGMLQuantizationType.F32
    return gguf.quants.quantize(array, t), t


def dequantized(array, qtype: str):
    """The float32 values a reader gets back from `quantize(array, qtype)` (gguf's own dequantizer)."""
    import gguf

    stored, t = quantize(array, qtype)
    return stored if t == gguf.GGMLQuantizationType.F32 else gguf.quants.dequantize(stored, t)


def write_gguf(model, tokenizer, path: str | Path, qtype: str = "Q8_0",
               chat_template: str | None = None) -> Path:
    """Write `model` (tiny Llama, tied embeddings) and `tokenizer` (from `train_tokenizer`)."""
    import json

    import gguf

    c = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "Q8_0" else gguf.LlamaFileType.ALL_F32)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if len(tokens) != c.vocab_size:
        raise ValueError(f"tokenizer has {len(tokens)} tokens, model {c.vocab_size}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_unk_token_id(vocab[SPECIALS[0]])
    w.add_bos_token_id(vocab[SPECIALS[1]])
    w.add_eos_token_id(vocab[SPECIALS[2]])
    w.add_pad_token_id(vocab[SPECIALS[2]])
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    for name, array in gguf_tensors(model).items():
        stored, t = quantize(array, qtype)
        w.add_tensor(name, stored, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_tiny_gguf(path: str | Path, texts: Sequence[str], vocab_size: int = 400, qtype: str = "Q8_0",
                   seed: int = 0, **shape) -> Path:
    """Train a tokenizer on `texts`, build a random tiny model of its size, write both to `path`."""
    tok = train_tokenizer(texts, vocab_size)
    model = build_model(tok.get_vocab_size(), seed=seed, **shape)
    return write_gguf(model, tok, path, qtype)
