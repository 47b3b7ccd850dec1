"""Runnable example: SFTTrainer + LoRA + BEMA under DeepSpeed ZeRO-3, the shadow sharded over the ranks.

On GPUs (a model folder or hub id, the repo's ZeRO-3 config):

    deepspeed --num_gpus 4 examples/deepspeed/train_zero3.py \\
        --model Qwen/Qwen2.5-0.5B --deepspeed example_configs/deepspeed_zero3.json --bf16

On this repository's CPU machines (tiny model built in code, about a minute; the first DeepSpeed
run compiles a communication op for ~70 s):

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/deepspeed/train_zero3.py --cpu

``accelerate launch --use_deepspeed --zero_stage 3 --num_processes N train_zero3.py`` works too
(leave ``--deepspeed`` out then: accelerate's plugin supplies the config). Nothing in the
callback names the ZeRO stage: it reads it from the trainer.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch.distributed as dist
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from trl_ema_plugin import WeightAveragingCallback, attach
from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ZERO3_JSON = os.path.join(HERE, "..", "..", "example_configs", "deepspeed_zero3.json")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or hub id (default: a tiny Llama built in code)")
    parser.add_argument("--deepspeed", default=ZERO3_JSON, help="DeepSpeed config json (default: the ZeRO-3 example)")
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--cpu", action="store_true", help="train on CPU (with DS_ACCELERATOR=cpu)")
    parser.add_argument("--bf16", action="store_true")
    args, _ = parser.parse_known_args()  # the deepspeed launcher adds --local_rank
    return args


def model_and_data(name: str | None):
    if name is None:
        tokenizer = tiny_tokenizer()
        return tiny_llama(tokenizer), tokenizer, tiny_sft_dataset(320), tiny_sft_dataset(32, seed=1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype="auto")
    return model, tokenizer, tiny_sft_dataset(320), tiny_sft_dataset(32, seed=1)


def main() -> None:
    options = parse()
    model, tokenizer, train, evaluation = model_and_data(options.model)
    output_dir = options.output_dir or os.path.join(tempfile.gettempdir(), "trl-ema-zero3-example")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=output_dir,
            deepspeed=options.deepspeed,  # ZeRO-3: each rank averages only its own partition
            max_steps=options.max_steps,
            per_device_train_batch_size=max(1, 8 // world_size),
            learning_rate=1e-2 if options.model is None else 1e-4,
            eval_strategy="steps",
            eval_steps=10,
            save_steps=10,
            report_to=[],
            use_cpu=options.cpu,
            bf16=options.bf16,
            fp16=False,
            max_length=64,
            disable_tqdm=True,
        ),
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
        callbacks=[WeightAveragingCallback(method="bema", update_freq=1)],
    )
    attach(trainer)  # optional: every eval metric for the average (eval_bema_*), resume from any path
    trainer.train()
    averaging = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, WeightAveragingCallback))
    rank = dist.get_rank() if dist.is_initialized() else 0
    weights = averaging.primary
    print(
        f"rank {rank}: {type(weights.layout).__name__} owns {sum(weights.layout.local_sizes()):,} of "
        f"{weights.layout.full_numel():,} averaged elements, shadow {weights.memory_bytes():,} bytes"
    )
    if trainer.is_world_process_zero():
        for entry in trainer.state.log_history:
            if "eval_loss" in entry or "eval_bema_loss" in entry:
                print({k: round(v, 4) for k, v in entry.items() if k.endswith("loss") or k == "step"})
        print(f"averaged adapter: {os.path.join(output_dir, 'averaged')}")


if __name__ == "__main__":
    main()
