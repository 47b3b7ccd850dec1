"""Offline datasets from real text that every machine has: the Python standard library's source.

Each example is one documented function, cut with :mod:`ast`:

* **prompt** = the ``def`` line(s) and the docstring; **completion** = the rest of the body
  (comments included, indentation made relative to the ``def``).
* **Split by module**: the top-level module or package (``email``, ``json``, ``os`` ...) decides
  the split, through a fixed hash of its name (``eval`` when ``sha256(salt + name) % 100 <
  eval_percent``). Eval modules are never seen in training, whole packages stay on one side,
  and a completion that also occurs in a train module is dropped from eval.
* **DPO pairs** from the same functions: ``chosen`` = the real body; ``rejected`` = a plausible
  wrong body, alternating between (even rows) *another function's body* from the same file
  (else the same split) and (odd rows) a *corrupted* copy of the real body, where 1–2 code
  tokens are flipped (``==``↔``!=``, ``<``↔``>=``, ``and``↔``or``, ``True``↔``False``,
  ``+``↔``-``, ``0``↔``1``, ``max``↔``min``, ``break``↔``continue`` ...) through :mod:`tokenize`,
  so strings and comments stay intact.

Everything is deterministic for a given Python version (``seed`` only picks and orders rows).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import random
import sysconfig
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

SPLITS = ("train", "eval")
SALT = "trl-ema-plugin/stdlib-split/v1"
DEFAULT_EVAL_PERCENT = 20
EXCLUDED_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
TRIVIAL_BODIES = {"pass", "...", "raise NotImplementedError", "raise NotImplementedError()"}
_FLIPS = {
    "==": "!=", "!=": "==", "<": ">=", ">=": "<", ">": "<=", "<=": ">",
    "+": "-", "-": "+", "+=": "-=", "-=": "+=", "*": "/", "/": "*",
    "and": "or", "or": "and", "True": "False", "False": "True", "0": "1", "1": "0", "None": "0",
    "max": "min", "min": "max", "any": "all", "all": "any", "break": "continue", "continue": "break",
    "startswith": "endswith", "endswith": "startswith", "lower": "upper", "upper": "lower",
}  # fmt: skip


@dataclass(frozen=True)
class FunctionExample:
    """One documented stdlib function: ``prompt`` (signature + docstring) → ``completion`` (body)."""

    module: str  # file path relative to the stdlib root, e.g. "json/decoder.py"
    top: str  # top-level module or package: the unit of the train/eval split
    name: str
    lineno: int
    prompt: str
    completion: str

    @property
    def source(self) -> str:
        return f"{self.module}:{self.lineno}:{self.name}"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def top_level_name(relative: Path) -> str:
    """``json/decoder.py`` → ``json``; ``os.py`` → ``os``."""
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def split_of(top: str, eval_percent: int = DEFAULT_EVAL_PERCENT) -> str:
    """``"eval"`` or ``"train"`` for a top-level module, from a fixed hash of its name (never tuned)."""
    digest = int(hashlib.sha256(f"{SALT}/{top}".encode()).hexdigest(), 16)
    return "eval" if digest % 100 < eval_percent else "train"


def _strip_indent(lines: list[str], indent: int) -> list[str]:
    """Remove ``indent`` leading columns of whitespace (fewer where a line has fewer)."""
    out = []
    for line in lines:
        lead = len(line) - len(line.lstrip(" \t"))
        out.append(line[min(lead, indent) :])
    return out


def functions_in_source(source: str, module: str, top: str) -> list[FunctionExample]:
    """Every function with a docstring and at least one statement after it."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        if ast.get_docstring(node, clean=False) is None:
            continue
        doc, first = node.body[0], node.body[1]
        if doc.lineno == node.lineno or first.lineno <= doc.end_lineno:
            continue  # one-line def or statement on the docstring's line: no clean cut
        head = _strip_indent(lines[node.lineno - 1 : doc.end_lineno], node.col_offset)
        body = _strip_indent(lines[doc.end_lineno : node.end_lineno], node.col_offset)
        completion = "\n".join(body).strip("\n") + "\n"
        if not completion.strip():
            continue
        found.append(FunctionExample(module, top, node.name, node.lineno, "\n".join(head) + "\n", completion))
    return found


@functools.lru_cache(maxsize=4)
def stdlib_functions(root: str | None = None) -> tuple[FunctionExample, ...]:
    """All usable functions of the stdlib under ``root``, sorted by (module, line)."""
    base = Path(root) if root is not None else stdlib_root()
    examples: list[FunctionExample] = []
    for path in sorted(base.rglob("*.py")):
        relative = path.relative_to(base)
        if EXCLUDED_PARTS.intersection(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        try:
            with tokenize.open(path) as handle:
                source = handle.read()
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        examples.extend(functions_in_source(source, relative.as_posix(), top_level_name(relative)))
    examples.sort(key=lambda e: (e.module, e.lineno))
    return tuple(examples)


def split_functions(
    split: str,
    *,
    max_prompt_chars: int = 600,
    min_completion_chars: int = 40,
    max_completion_chars: int = 600,
    eval_percent: int = DEFAULT_EVAL_PERCENT,
    root: str | None = None,
) -> list[FunctionExample]:
    """The functions of one split (``"train"`` or ``"eval"``), length-filtered and de-duplicated."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; allowed values: {', '.join(SPLITS)}")
    every = stdlib_functions(root)
    train_bodies = {e.completion for e in every if split_of(e.top, eval_percent) == "train"}
    chosen, seen = [], set()
    for example in every:
        if split_of(example.top, eval_percent) != split or example.completion in seen:
            continue
        if split == "eval" and example.completion in train_bodies:
            continue  # identical body in a train module: not held out
        if example.completion.strip() in TRIVIAL_BODIES or len(example.prompt) > max_prompt_chars:
            continue
        if not min_completion_chars <= len(example.completion) <= max_completion_chars:
            continue
        seen.add(example.completion)
        chosen.append(example)
    return chosen


def _shuffled(examples: list[FunctionExample], seed: int) -> list[FunctionExample]:
    order = list(examples)
    random.Random(seed).shuffle(order)
    return order


def _first(
    rows: Iterator[dict[str, Any]], n: int | None, keep: Callable[[dict[str, Any]], bool] | None, split: str
) -> Dataset:
    """The first ``n`` rows (all when None) that ``keep`` accepts."""
    chosen = []
    for row in rows:
        if keep is None or keep(row):
            chosen.append(row)
            if n is not None and len(chosen) == n:
                break
    if n is not None and len(chosen) < n:
        raise ValueError(f"asked for n={n} {split} examples but only {len(chosen)} pass the filters")
    return Dataset.from_list(chosen)


def sft_rows(
    split: str = "train", seed: int = 0, with_source: bool = False, **filters: Any
) -> Iterator[dict[str, Any]]:
    """Prompt-completion rows of ``split`` in a seeded order."""
    for example in _shuffled(split_functions(split, **filters), seed):
        row = {"prompt": example.prompt, "completion": example.completion}
        if with_source:
            row["source"] = example.source
        yield row


def stdlib_sft_dataset(
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    with_source: bool = False,
    keep: Callable[[dict[str, Any]], bool] | None = None,
    **filters: Any,
) -> Dataset:
    """TRL prompt-completion rows ``{"prompt", "completion"}`` (loss on the completion only).

    ``keep(row)`` filters rows (e.g. by token length); the first ``n`` kept rows of the seeded order are used.
    """
    return _first(sft_rows(split, seed, with_source, **filters), n, keep, split)


def corrupt_body(body: str, rng: random.Random, flips: int = 2) -> str | None:
    """Flip up to ``flips`` code tokens of ``body`` (never inside strings or comments); None if none can flip."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(body).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    spots = [t for t in tokens if t.type in (tokenize.OP, tokenize.NAME, tokenize.NUMBER) and t.string in _FLIPS]
    if not spots:
        return None
    chosen = sorted(rng.sample(spots, min(flips, len(spots))), key=lambda t: t.start, reverse=True)
    lines = body.splitlines(keepends=True)
    for tok in chosen:
        (row, start), (_, end) = tok.start, tok.end
        line = lines[row - 1]
        lines[row - 1] = line[:start] + _FLIPS[tok.string] + line[end:]
    corrupted = "".join(lines)
    return corrupted if corrupted != body else None


def _other_body(example: FunctionExample, pool: list[FunctionExample], rng: random.Random) -> str:
    same_file = [e for e in pool if e.module == example.module and e.completion != example.completion]
    candidates = same_file or [e for e in pool if e.completion != example.completion]
    return rng.choice(candidates).completion


def dpo_rows(
    split: str = "train", seed: int = 0, with_source: bool = False, **filters: Any
) -> Iterator[dict[str, Any]]:
    """``{"prompt", "chosen", "rejected"}`` rows of ``split`` in a seeded order.

    Row i (0-based) rejects another function's body when i is even, a corrupted copy of its own
    body when i is odd (another function's body when no token can flip). Each row's choice is
    seeded by its source, so it does not depend on the rows before it.
    """
    pool = split_functions(split, **filters)
    for index, example in enumerate(_shuffled(pool, seed)):
        rng = random.Random(f"dpo/{seed}/{example.source}")
        rejected, kind = None, "other_function"
        if index % 2 == 1:
            rejected, kind = corrupt_body(example.completion, rng), "corrupted"
        if rejected is None:
            rejected, kind = _other_body(example, pool, rng), "other_function"
        row = {"prompt": example.prompt, "chosen": example.completion, "rejected": rejected}
        if with_source:
            row.update(source=example.source, rejected_kind=kind)
        yield row


def stdlib_dpo_dataset(
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    with_source: bool = False,
    keep: Callable[[dict[str, Any]], bool] | None = None,
    **filters: Any,
) -> Dataset:
    """DPO pairs: the real body (chosen) against another body or a corrupted one (rejected); see :func:`dpo_rows`."""
    return _first(dpo_rows(split, seed, with_source, **filters), n, keep, split)
