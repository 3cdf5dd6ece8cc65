"""A tiny random Llama with an offline byte-level BPE tokenizer, saved as a Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path

# a 2-layer Llama with 64-wide attention and a 96-wide MLP (vocabulary 100), for tests that build it in memory
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
)

TEXTS = [
    "Question: How many apples? Answer: 3 + 4 = 7 #### 7",
    "Problem: Solve x. Solution: \\boxed{2}",
    "def f(x):\n    return x + 1\n[DONE]",
    "You are an expert Python programmer, and here is your task: Your code should pass these tests:",
]


def tiny_tokenizer():
    """A byte-level BPE (400 tokens) trained on a few strings: it can encode any text, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def save_tiny_llama(
    path: Path, tokenizer, hidden_size: int = 32, intermediate_size: int = 64, **config
) -> Path:
    """Save a 2-layer random ``LlamaForCausalLM`` (seed 0) for ``tokenizer`` and the tokenizer to ``path``.

    Extra keyword arguments override ``LlamaConfig`` fields. Returns ``path``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    settings.update(config)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**settings)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_model(path: Path, hidden_size: int = 32, intermediate_size: int = 64) -> Path:
    """:func:`save_tiny_llama` with the offline byte-level BPE of :func:`tiny_tokenizer`."""
    return save_tiny_llama(path, tiny_tokenizer(), hidden_size, intermediate_size)
