"""The distillation hook recomputes logits from the backbone's hidden states: as each model's forward does."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from trl_ema_plugin.integrations.trl.student_outputs import output_logits

SIZES = dict(
    vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip

MODELS = {
    "llama (unscaled)": lambda: LlamaForCausalLM(LlamaConfig(**SIZES)),
    "granite (logits / logits_scaling)": lambda: GraniteForCausalLM(GraniteConfig(**SIZES, logits_scaling=8.0)),
    "cohere (logits * logit_scale)": lambda: CohereForCausalLM(CohereConfig(**SIZES, logit_scale=0.25)),
    "gemma2 (softcapping)": lambda: Gemma2ForCausalLM(Gemma2Config(**SIZES, head_dim=8, final_logit_softcapping=3.0)),
}


@pytest.mark.parametrize("build", MODELS.values(), ids=MODELS.keys())
def test_output_logits_equal_the_models_own_logits(build):
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(3, 50, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
        hidden = model.base_model(ids).last_hidden_state
        got = output_logits(model, hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
