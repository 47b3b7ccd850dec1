"""Callback settings that cannot work are refused before training, naming what to do instead.

Real TRL trainers (SFT, DPO) on the tiny Llama: two callbacks that would write the same checkpoint folder, a DPO
reference callback in a run without a reference, a DPO policy without adapters.
"""

from __future__ import annotations

import re

import pytest
from ds_common import cpu_training_args
from peft import get_peft_model
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer
from trl_helpers import lora_config, sft_trainer

from trl_ema_plugin import WeightAveragingCallback, attach
from trl_ema_plugin.demos.tiny import tiny_dpo_dataset, tiny_llama, tiny_tokenizer
from trl_ema_plugin.integrations.trl.reference import AveragedReferenceCallback

TWO_AVERAGING = (
    "WeightAveragingCallback(averagers: ema) and WeightAveragingCallback(averagers: bema) are on one trainer, and "
    "both write averaged/ (the second would overwrite the first). Pass one WeightAveragingCallback(averagers=[{...}, "
    "{...}]) with every averager"
)


def dpo_trainer(tmp_path, callbacks, peft: bool = True) -> DPOTrainer:
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, seed=0)
    if not peft:  # DPOTrainer loads the reference model from the policy's path
        model.save_pretrained(tmp_path / "base")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    args = cpu_training_args(
        str(tmp_path), DPOConfig, max_steps=2, per_device_train_batch_size=4, max_length=64,
        gradient_checkpointing=False, save_strategy="steps", save_steps=1,
    )  # fmt: skip
    return DPOTrainer(
        model=get_peft_model(model, lora_config()) if peft else model,
        args=args,
        train_dataset=tiny_dpo_dataset(8, seed=0),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


@pytest.mark.parametrize("attached", [False, True], ids=["callbacks", "attach"])
def test_two_weight_averaging_callbacks_are_refused_before_training(tmp_path, attached):
    first, second = WeightAveragingCallback(method="ema"), WeightAveragingCallback(method="bema", update_every=1)
    trainer = sft_trainer(str(tmp_path), [first, second], save_strategy="steps", save_steps=1)
    with pytest.raises(ValueError, match=re.escape(TWO_AVERAGING)):
        if attached:
            attach(trainer)
        trainer.train()
    assert trainer.state.global_step == 0 and not list(tmp_path.glob("checkpoint-*"))


def test_two_reference_callbacks_are_refused(tmp_path):
    trainer = dpo_trainer(tmp_path, [AveragedReferenceCallback("ema"), AveragedReferenceCallback("bema")])
    expected = (
        "AveragedReferenceCallback(method='ema') and AveragedReferenceCallback(method='bema') are on one trainer, and "
        "both write reference/ (the second would overwrite the first). A trainer has one reference: keep one "
        "AveragedReferenceCallback."
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        trainer.train()
    assert trainer.state.global_step == 0


def test_averaging_beside_a_reference_callback_is_fine(tmp_path):
    trainer = dpo_trainer(
        tmp_path, [WeightAveragingCallback(method="ema", eval=False), AveragedReferenceCallback("ema")]
    )
    attach(trainer)
    trainer.train()
    assert (tmp_path / "checkpoint-2" / "averaged").is_dir() and (tmp_path / "checkpoint-2" / "reference").is_dir()


@pytest.mark.parametrize("attached", [False, True], ids=["callbacks", "attach"])
def test_reference_callback_in_an_sft_run_is_refused(tmp_path, attached):
    trainer = sft_trainer(str(tmp_path), [AveragedReferenceCallback("ema")])
    expected = (
        "AveragedReferenceCallback moves the reference policy (the 'ref' adapter) of TRL's DPO, KTO, GRPO and RLOO "
        "trainers, but this run is trained with SFTConfig, which has no reference forward"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        if attached:
            attach(trainer)
        trainer.train()
    assert trainer.state.global_step == 0
    assert "ref" not in trainer.model.peft_config  # refused before anything was added


def test_a_dpo_policy_without_adapters_is_told_so_not_about_a_ref_model(tmp_path):
    """DPOTrainer builds a ref_model itself for a model without adapters; the user passed none."""
    trainer = dpo_trainer(tmp_path, [AveragedReferenceCallback("ema")], peft=False)
    with pytest.raises(ValueError, match="needs a PEFT \\(LoRA\\) policy") as raised:
        attach(trainer)
    assert "ref_model" not in str(raised.value)
