"""Shared fixtures: tiny models, tokenizers and datasets built in code (no hub)."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

from trl_ema_plugin.experiments.tiny import tiny_dpo_dataset, tiny_llama, tiny_sft_dataset, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_llama(tokenizer)


@pytest.fixture(scope="session")
def sft_data():
    return tiny_sft_dataset(32, seed=0), tiny_sft_dataset(8, seed=1)


@pytest.fixture(scope="session")
def dpo_data():
    return tiny_dpo_dataset(16, seed=0), tiny_dpo_dataset(8, seed=1)


def free_port() -> int:
    """A TCP port the OS hands out, for distinct --master_port values under pytest-xdist."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
