"""GPT-2 layouts: LoRA on ``Conv1D`` layers (``fan_in_fan_out``) and full fine-tuning with tied embeddings."""

from __future__ import annotations

import oracles
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel
from trl_helpers import WeightRecorder, sft_trainer

from trl_ema_plugin import WeightAveragingCallback
from trl_ema_plugin.demos.tiny import tiny_tokenizer

EMA_KW = dict(method="ema", decay=0.6, update_after=1, update_every=1)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """2 layers, 32 wide; ``lm_head.weight`` is ``transformer.wte.weight`` (tied)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def test_lora_on_conv1d_layers_is_averaged_and_exported(tmp_path):
    recorder = WeightRecorder()
    callback = WeightAveragingCallback(**EMA_KW, eval=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    trainer = sft_trainer(str(tmp_path), [recorder, callback], peft=lora, model=tiny_gpt2(), max_steps=4)
    trainer.train()
    expected = oracles.averaged(recorder.weights, EMA_KW)
    assert len(expected) == 2 * 2 * 4  # A and B of 4 Conv1D layers in 2 blocks
    averaged = callback.averaged_tensors()
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name].double(), value, rtol=1e-5, atol=1e-6)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "averaged"))
    params = dict(loaded.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(params[name].double(), value, rtol=1e-5, atol=1e-6)
    # merging (what ``ema-export --merge`` does) transposes for Conv1D: W + s·(BA)ᵀ, shape of the Conv1D weight
    merged = loaded.merge_and_unload()
    assert merged.transformer.h[0].attn.c_attn.weight.shape == (32, 96)


def test_full_finetune_with_tied_embeddings(tmp_path):
    recorder = WeightRecorder()
    callback = WeightAveragingCallback(**EMA_KW, eval=False)
    trainer = sft_trainer(str(tmp_path), [recorder, callback], peft=None, model=tiny_gpt2(), max_steps=4)
    trainer.train()
    expected = oracles.averaged(recorder.weights, EMA_KW)
    assert "transformer.wte.weight" in expected and "lm_head.weight" not in expected  # one shadow for the tied pair
    averaged = callback.averaged_tensors()
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name].double(), value, rtol=1e-5, atol=1e-6)
    # the exported model holds the averaged embedding, and its head is tied to it again on load
    saved = load_file(str(tmp_path / "averaged" / "model.safetensors"))
    torch.testing.assert_close(saved["transformer.wte.weight"].double(), expected["transformer.wte.weight"])
    assert saved.get("lm_head.weight") is None or torch.equal(saved["lm_head.weight"], saved["transformer.wte.weight"])
    reloaded = GPT2LMHeadModel.from_pretrained(str(tmp_path / "averaged"))
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(reloaded.lm_head.weight.double(), expected["transformer.wte.weight"])
