"""The plugin's hooks on a real TRL trainer, as Axolotl calls them (add_callbacks_post_trainer, then
post_trainer_create); the full ``axolotl train`` runs are in test_axolotl_e2e.py."""

from __future__ import annotations

import importlib

import pytest

pytest.importorskip("axolotl", reason="could not import 'axolotl': the plugin tests run on the axolotl stack only")

from axolotl.integrations.base import BasePlugin, load_plugin
from axolotl.utils.dict import DictDefault
from ds_common import cpu_training_args
from peft import LoraConfig
from trl import SFTTrainer

from trl_ema_plugin.integrations.trl import WeightAveragingCallback

PLUGIN = "trl_ema_plugin.integrations.axolotl.WeightAveragingPlugin"
pytestmark = pytest.mark.axolotl


def sft_trainer(tmp_path, model, tokenizer, sft_data) -> SFTTrainer:
    args = cpu_training_args(str(tmp_path), max_steps=2, per_device_train_batch_size=4, max_length=64)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    return SFTTrainer(model=model, args=args, train_dataset=sft_data[0], processing_class=tokenizer, peft_config=lora)


def test_plugin_loads_by_its_dotted_path_and_declares_the_args_model():
    plugin = load_plugin(PLUGIN)  # what `plugins: [...]` does
    assert isinstance(plugin, BasePlugin)
    module, name = plugin.get_input_args().rsplit(".", 1)
    args = getattr(importlib.import_module(module), name)
    assert {"weight_averaging", "weight_averaging_update_every", "weight_averaging_averagers"} <= set(args.model_fields)


def test_hooks_add_the_callback_and_attach_the_trainer(tmp_path, model, tokenizer, sft_data):
    plugin = load_plugin(PLUGIN)
    cfg = DictDefault({"weight_averaging": "ema", "weight_averaging_decay": 0.5, "weight_averaging_name": "ema_05"})
    trainer = sft_trainer(tmp_path, model, tokenizer, sft_data)
    callbacks = plugin.add_callbacks_post_trainer(cfg, trainer)
    assert len(callbacks) == 1 and isinstance(callbacks[0], WeightAveragingCallback)
    spec = callbacks[0].config.primary
    assert (spec.method, spec.decay, spec.label, spec.cadence) == ("ema", 0.5, "ema_05", 1)
    for callback in callbacks:  # what Axolotl's trainer builder does with them
        trainer.add_callback(callback)
    assert callbacks[0].trainer is None
    plugin.post_trainer_create(cfg, trainer)
    assert callbacks[0].trainer is trainer  # attach(): full eval metrics, resume from any path
    trainer.train()
    assert (tmp_path / "averaged" / "adapter_model.safetensors").is_file()


def test_no_keys_no_callbacks(tmp_path, model, tokenizer, sft_data):
    plugin = load_plugin(PLUGIN)
    trainer = sft_trainer(tmp_path, model, tokenizer, sft_data)
    assert plugin.add_callbacks_post_trainer(DictDefault({"learning_rate": 0.1}), trainer) == []
    plugin.post_trainer_create(DictDefault({}), trainer)  # nothing of ours on the trainer: a no-op
    assert not any(hasattr(cb, "attach_to") for cb in trainer.callback_handler.callbacks)


def test_self_distillation_keys_add_the_loss_hook(tmp_path, model, tokenizer, sft_data):
    from trl_ema_plugin.integrations.trl.distillation import SelfDistillationCallback

    plugin = load_plugin(PLUGIN)
    cfg = DictDefault(
        {
            "adapter": "lora",
            "weight_averaging": "bema",
            "weight_averaging_update_every": 1,
            "self_distillation": True,
            "self_distillation_weight": 0.25,
            "self_distillation_temperature": 2.0,
        }
    )
    trainer = sft_trainer(tmp_path, model, tokenizer, sft_data)
    callbacks = plugin.add_callbacks_post_trainer(cfg, trainer)
    assert [type(cb) for cb in callbacks] == [WeightAveragingCallback, SelfDistillationCallback]
    assert (callbacks[1].config.lambda_, callbacks[1].config.temperature) == (0.25, 2.0)
    for callback in callbacks:
        trainer.add_callback(callback)
    plugin.post_trainer_create(cfg, trainer)
    assert callbacks[1].trainer is trainer and callbacks[1].averaging is callbacks[0]
    assert "ema_teacher" in trainer.model.peft_config  # the teacher: a second adapter, added before training
