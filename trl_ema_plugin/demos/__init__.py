"""Tiny models, tokenizers and datasets built in code (no hub), for tests and demos, yours included.

from trl_ema_plugin.demos import tiny_llama, tiny_tokenizer, tiny_sft_dataset
"""

from .tiny import tiny_dpo_dataset, tiny_llama, tiny_sft_dataset, tiny_tokenizer

__all__ = ["tiny_dpo_dataset", "tiny_llama", "tiny_sft_dataset", "tiny_tokenizer"]
