"""The verifiable reward of the GRPO study: does the completed function parse, and does it use the real body's names?

A prompt is a stdlib function's ``def`` line(s) and docstring, possibly followed by the start of the body's
indentation (spaces); a completion continues the code. Two reward functions, in TRL's reward-function convention
(``prompts``, ``completions``, and the dataset column ``reference``, the real body), which ``GRPOTrainer`` sums
(range 0–2):

* :func:`parses`: 1 if ``ast.parse(prompt + body)`` succeeds and the function has a statement after its
  docstring (an empty body would make the prompt alone parse), else 0;
* :func:`names`: F1 between the identifier sets of ``body`` and of the real body (0 if either is empty),

where ``body`` (:func:`function_body`) is the prompt's trailing spaces plus the completion, up to the first
non-blank line at column 0, ``prompt`` is the prompt without those spaces, and the
identifiers (:func:`identifiers`) are the ``NAME`` tokens that are not keywords (strings and comments ignored).
Fixed before any GRPO run (docs/evidence.md, study (d)).
"""

from __future__ import annotations

import ast
import io
import keyword
import tokenize
from typing import Any

_KEYWORDS = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist)


def function_body(completion: str) -> str:
    """The completion up to (not including) its first non-blank line that starts at column 0."""
    lines = completion.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if line.strip() and not line[0].isspace():
            return "".join(lines[:index])
    return completion


def identifiers(code: str) -> set[str]:
    """``NAME`` tokens of ``code`` that are not Python keywords; tokenizing stops at the first error (a cut body)."""
    names: set[str] = set()
    try:
        for token in tokenize.generate_tokens(io.StringIO(code).readline):
            if token.type == tokenize.NAME and token.string not in _KEYWORDS:
                names.add(token.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return names


def body_parses(prompt: str, body: str) -> bool:
    """``prompt + body`` is valid Python and the prompt's function has a statement after its docstring."""
    try:
        tree = ast.parse(prompt + body)
    except (SyntaxError, ValueError):
        return False
    function = tree.body[0] if tree.body else None
    return isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(function.body) >= 2


def name_f1(body: str, reference: str) -> float:
    """F1 = 2·|A ∩ B| / (|A| + |B|) of the identifier sets A (``body``) and B (``reference``)."""
    ours, theirs = identifiers(body), identifiers(reference)
    if not ours or not theirs:
        return 0.0
    return 2 * len(ours & theirs) / (len(ours) + len(theirs))


def split_prompt(prompt: str, completion: str) -> tuple[str, str]:
    """(the prompt without its trailing spaces, the function body: those spaces + the completion, cut at column 0)."""
    head = prompt.rstrip(" ")
    return head, function_body(prompt[len(head) :] + completion)


def _texts(completions: list[Any]) -> list[str]:
    return [c if isinstance(c, str) else c[-1]["content"] for c in completions]


def parses(prompts: list[str], completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 where the prompt followed by the completion's function body is valid Python with a statement after the
    docstring, else 0.0."""
    pairs = (split_prompt(p, c) for p, c in zip(prompts, _texts(completions), strict=True))
    return [float(body_parses(head, body)) for head, body in pairs]


def names(prompts: list[str], completions: list[Any], reference: list[str], **kwargs: Any) -> list[float]:
    """F1 of the identifiers of the completion's function body against those of the real body."""
    pairs = zip(prompts, _texts(completions), reference, strict=True)
    return [name_f1(split_prompt(p, c)[1], r) for p, c, r in pairs]


REWARD_FUNCTIONS = (parses, names)
