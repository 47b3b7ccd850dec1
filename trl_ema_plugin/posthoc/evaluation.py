"""The loss a sweep compares: mean negative log-likelihood per target token of a causal LM on an eval set.

Rows are ``{"text": ...}`` (every token is a target) or ``{"prompt": ..., "completion": ...}`` (the completion's
tokens are the targets, as TRL's SFT trains on completions), read from a JSON-lines file by :func:`read_rows`.
Each row is tokenized once (at most ``max_length`` tokens); :class:`TokenLoss` loads synthesized tensors into the
model and returns Σ NLL / Σ target tokens over all rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .model_files import load_into

IGNORE = -100


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of a JSON-lines eval file; an error names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file (expected JSON lines with text, or prompt and completion)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        fields = set(row) & {"text", "prompt", "completion"} if isinstance(row, dict) else set()
        if fields not in ({"text"}, {"prompt", "completion"}) or not all(isinstance(row[f], str) for f in fields):
            raise ValueError(f"{path}:{number}: a row needs a string text, or strings prompt and completion")
        rows.append({f: row[f] for f in fields})
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def tokenize_row(tokenizer: Any, row: Mapping[str, str], max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are the ids, with the prompt's positions set to -100."""
    if "text" in row:
        ids = tokenizer(row["text"])["input_ids"][:max_length]
        return ids, list(ids)
    prompt = tokenizer(row["prompt"])["input_ids"]
    ids = tokenizer(row["prompt"] + row["completion"])["input_ids"][:max_length]
    start = min(len(prompt), len(ids))
    return ids, [IGNORE] * start + ids[start:]


class TokenLoss:
    """Mean NLL per target token of ``model`` on ``rows``, after loading the tensors it is called with."""

    def __init__(
        self, model: nn.Module, tokenizer: Any, rows: Sequence[Mapping[str, str]], max_length: int = 512,
        batch_size: int = 8,
    ) -> None:  # fmt: skip
        self.model = model
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        encoded = [tokenize_row(tokenizer, row, max_length) for row in rows]
        if not any(label != IGNORE for _, labels in encoded for label in labels[1:]):
            raise ValueError("the eval rows have no target tokens within max_length")
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # batches of similar length
        self.batches = []
        for start in range(0, len(order), batch_size):
            chunk = [encoded[i] for i in order[start : start + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk])
            labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in chunk])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk])
            self.batches.append((ids, labels, mask))

    @torch.no_grad()
    def __call__(self, tensors: Mapping[str, Tensor] | None = None) -> float:
        if tensors is not None:
            load_into(self.model, tensors)
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        total, count = 0.0, 0
        try:
            for ids, labels, mask in self.batches:
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
                targets = labels[:, 1:].to(device)
                nll = nn.functional.cross_entropy(
                    logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum"
                )
                total += float(nll)
                count += int((targets != IGNORE).sum())
        finally:
            self.model.train(was_training)
        return total / count
