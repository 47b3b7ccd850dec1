"""Tiny models (Llama, Qwen2), a byte-level tokenizer, datasets and a reward built in code (no hub), for tests,
demos and smoke runs."""

from __future__ import annotations

import random
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte symbols + ``<pad>``, ``<s>``, ``</s>``; no merges."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=512
    )
    return tokenizer


def _decoder_sizes(tokenizer: PreTrainedTokenizerFast, hidden_size: int) -> dict[str, Any]:
    """2 layers, 4 heads (2 KV heads), the tokenizer's vocabulary and special tokens."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0, hidden_size: int = 64
) -> LlamaForCausalLM:
    """A 2-layer Llama (about 0.1 M parameters) with random weights, in fp32."""
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**_decoder_sizes(tokenizer, hidden_size), tie_word_embeddings=False))


def tiny_qwen2(
    tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0, hidden_size: int = 64
) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 (biases on q/k/v, tied embeddings) with random weights, in fp32: an architecture beside Llama."""
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**_decoder_sizes(tokenizer, hidden_size), tie_word_embeddings=True))


_WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "log",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
]


def _sentence(rng: random.Random, length: int = 8) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(length))


def tiny_sft_dataset(n: int = 32, seed: int = 0) -> Dataset:
    """``{"text": ...}`` rows of short pseudo-sentences."""
    rng = random.Random(seed)
    return Dataset.from_list([{"text": _sentence(rng)} for _ in range(n)])


def tiny_dpo_dataset(n: int = 16, seed: int = 0) -> Dataset:
    """``{"prompt", "chosen", "rejected"}`` rows: chosen repeats the prompt's last word, rejected does not."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = _sentence(rng, 5)
        last = prompt.split()[-1]
        rows.append({"prompt": prompt, "chosen": f" {last} {last}", "rejected": f" {rng.choice(_WORDS)} sat"})
    return Dataset.from_list(rows)


def tiny_prompt_dataset(n: int = 16, seed: int = 0) -> Dataset:
    """``{"prompt": ...}`` rows for GRPO and RLOO: short pseudo-sentences to continue."""
    rng = random.Random(seed)
    return Dataset.from_list([{"prompt": _sentence(rng, 4)} for _ in range(n)])


def tiny_kto_dataset(n: int = 16, seed: int = 0) -> Dataset:
    """``{"prompt", "completion", "label"}`` rows for KTO: desirable completions repeat the prompt's last word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = _sentence(rng, 5)
        last = prompt.split()[-1]
        good = i % 2 == 0
        rows.append(
            {"prompt": prompt, "completion": f" {last} {last}" if good else f" {rng.choice(_WORDS)} sat", "label": good}
        )
    return Dataset.from_list(rows)


def letters_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """A verifiable toy reward for GRPO/RLOO: the fraction of a completion's characters that are ``a``–``z`` or space.

    Takes TRL's reward-function arguments (``completions`` as strings, or as chat messages).
    """
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum("a" <= ch <= "z" or ch == " " for ch in text) / max(len(text), 1) for text in texts]
