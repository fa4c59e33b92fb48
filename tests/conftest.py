"""Shared test setup: no network, a temp HF home, and tiny random checkpoints of each architecture."""
from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path

# No hub: a miss fails at once instead of retrying for ~30 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf-home-"))
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "math"

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "olmo3", "gpt2")


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.printable)
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
           "olmo2": "Olmo2Config", "olmo3": "Olmo3Config"}


def tiny_config(arch: str, vocab_size: int, n_layers: int = 2, **overrides):
    """A few-thousand-parameter config of `arch` with GQA where the architecture has it (Qwen3
    with a head width that is not d / H, as its real configs; OLMo 3 with its sliding window on
    every layer but the last, as its real configs have it on three of four), plus `overrides`."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        return tf.GPT2Config(**(dict(n_embd=32, n_layer=n_layers, n_head=4, n_positions=256) | common | overrides))
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **common)
    if arch == "qwen3":
        kw["head_dim"] = 12
    if arch == "olmo3":
        kw.update(sliding_window=6, layer_types=["sliding_attention"] * (n_layers - 1) + ["full_attention"])
    return getattr(tf, CONFIGS[arch])(**(kw | overrides))


def random_model(arch: str, vocab_size: int, seed: int = 0, n_layers: int = 2, std: float = 0.3, **overrides):
    """A random tiny causal LM of `arch` (tiny_config plus overrides) in eval mode, weights frozen
    (`model_of`)."""
    return model_of(tiny_config(arch, vocab_size, n_layers, **overrides), seed, std).requires_grad_(False)


def model_of(config, seed: int = 0, std: float = 0.3):
    """A causal LM of `config` in eval mode with seeded, larger-than-default weights, so scores are
    far from rounding noise and greedy choices far from ties."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, std)
            elif name.endswith("weight"):  # norm gains near 1
                p.normal_(1.0, 0.1)
            else:  # biases (Qwen2 q/k/v, GPT-2 everywhere)
                p.normal_(0, 0.1)
    return model.eval()


def make_checkpoint(folder: Path, arch: str, seed: int = 0, n_layers: int = 2, std: float = 0.3) -> Path:
    """Save a random tiny causal LM of `arch` with a char tokenizer as a Hugging Face folder."""
    tok = char_tokenizer()
    model = random_model(arch, len(tok), seed, n_layers, std)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{arch: folder} of tiny random checkpoints, made once per test session."""
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: make_checkpoint(root / f"tiny-{arch}", arch, seed=i) for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA
