"""The teacher and the DPO reference are frozen twins of the trained adapter on the same base weights."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from trl_ema_plugin.demos.tiny import tiny_llama, tiny_tokenizer
from trl_ema_plugin.integrations.trl.dpo_reference import add_reference_adapter
from trl_ema_plugin.integrations.trl.teacher import TeacherAdapter


def _add_teacher(model) -> str:
    return TeacherAdapter(model).name


def _add_reference(model) -> str:
    add_reference_adapter(model)
    return "ref"


@pytest.mark.parametrize("init", ["pissa", "olora", True])
@pytest.mark.parametrize("add_twin", [_add_teacher, _add_reference], ids=["teacher", "reference"])
def test_twin_copies_the_adapter_and_leaves_the_base_weights_alone(init, add_twin):
    """PiSSA and OLoRA rewrite the base weights on every add_adapter of their config; the twin must not."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    model = get_peft_model(tiny_llama(tiny_tokenizer(), seed=0), lora)
    with torch.no_grad():  # a trained adapter, not its initial state
        for name, param in model.named_parameters():
            if ".default." in name:
                param.add_(0.01 * torch.randn_like(param))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    twin = add_twin(model)
    after = dict(model.named_parameters())
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed"
        assert after[name].requires_grad == (".default." in name), name
        if ".default." in name:
            copy = after[name.replace(".default.", f".{twin}.")]
            assert torch.equal(copy, value) and not copy.requires_grad, name
    assert model.active_adapter == "default"
