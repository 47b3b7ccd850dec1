"""A folder the CPU example configs (``example_configs/cpu/``) run in, built in code (no hub).

    python -m experiments.axolotl_cpu WORKDIR
    cd WORKDIR && axolotl train /path/to/example_configs/cpu/sft_lora_bema.yml

writes ``tiny-llama/`` (a 2-layer Llama and its byte-level tokenizer, ``save_pretrained``),
``sft.jsonl`` (``{"text"}`` rows), ``dpo.jsonl`` (``{"prompt", "chosen", "rejected"}`` rows), ``prompts.jsonl``
(``{"prompt"}`` rows for ``rl: grpo``), ``kto.jsonl`` (``{"prompt", "completion", "label"}`` rows for ``rl: kto``)
and ``deepspeed_zero3.json`` (ZeRO-3 for 2 CPU processes), the relative paths those configs name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trl_ema_plugin.demos.tiny import (
    tiny_dpo_dataset,
    tiny_kto_dataset,
    tiny_llama,
    tiny_prompt_dataset,
    tiny_sft_dataset,
    tiny_tokenizer,
)

MODEL_FOLDER = "tiny-llama"
SFT_DATA = "sft.jsonl"
DPO_DATA = "dpo.jsonl"
PROMPT_DATA = "prompts.jsonl"
KTO_DATA = "kto.jsonl"
DEEPSPEED_CONFIG = "deepspeed_zero3.json"

#: ZeRO-3 on CPU processes. No ``train_batch_size``: "auto" fails DeepSpeed's batch check under
#: torchrun. Persistence threshold 0: every LoRA weight is partitioned, ``p.data`` empty between
#: forwards (the case where a write to the local shard must reach the next forward).
ZERO3_CPU = {
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prepare_cpu_workspace(folder: str | Path, sft_rows: int = 64, dpo_rows: int = 32, seed: int = 0) -> Path:
    """Write the tiny model, its tokenizer, the datasets and the ZeRO-3 config into ``folder``; return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, seed=seed)
    model.save_pretrained(str(folder / MODEL_FOLDER))
    tokenizer.save_pretrained(str(folder / MODEL_FOLDER))
    write_jsonl(tiny_sft_dataset(sft_rows, seed=seed).to_list(), folder / SFT_DATA)
    write_jsonl(tiny_dpo_dataset(dpo_rows, seed=seed).to_list(), folder / DPO_DATA)
    write_jsonl(tiny_prompt_dataset(dpo_rows, seed=seed).to_list(), folder / PROMPT_DATA)
    write_jsonl(tiny_kto_dataset(dpo_rows, seed=seed).to_list(), folder / KTO_DATA)
    (folder / DEEPSPEED_CONFIG).write_text(json.dumps(ZERO3_CPU, indent=2))
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m {__spec__.name if __spec__ else 'axolotl_cpu'} WORKDIR")
    print(prepare_cpu_workspace(sys.argv[1]))
