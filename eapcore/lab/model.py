"""The lab's word-level tokenizer and tiny Llama model.

Tokens are whole words with their leading space (" apples"), single digits (" 1", "2"),
punctuation, newlines, one token for ``\\boxed{`` and the specials <pad> <s> </s> <unk>. The
decoder concatenates tokens, so decode(encode(text)) == text for every text over the vocabulary.
The tokenizer prepends <s>, like the DeepSeek-Math tokenizer.
"""
from __future__ import annotations

from typing import Iterable

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
SPLIT_PATTERN = r" ?\\boxed\{| ?[A-Za-z]+| ?[0-9]|\n| ?[^\sA-Za-z0-9]"


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")


def build_tokenizer(texts: Iterable[str]):
    """A PreTrainedTokenizerFast whose vocabulary is every piece of `texts` (sorted, stable)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    pre = _pre_tokenizer()
    # always covered: the prompt template, bare whitespace, every digit with and without a space
    from .problems import TEMPLATE

    pieces: set[str] = {" ", "\n", *"0123456789", *(" " + d for d in "0123456789")}
    for text in [TEMPLATE.format(question=""), *texts]:
        pieces.update(piece for piece, _ in pre.pre_tokenize_str(text))
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + sorted(pieces - set(SPECIALS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", clean_up_tokenization_spaces=False, padding_side="left",
        model_max_length=256)


def build_model(tokenizer, hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 512, seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized to `tokenizer` (about 1 M parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
