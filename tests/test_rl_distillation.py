"""On-policy self-distillation in GRPO and RLOO: λ·τ²·D(student ‖ averaged teacher) on the sampled completion
tokens, on real TRL trainers with transformers generation, tiny Llama and Qwen2 models and a reward in code."""

from __future__ import annotations

import shutil

import pytest
import torch
from rl_helpers import generation_trainer, kto_trainer, lora_policy
from trl_helpers import grads, logged, params

from trl_ema_plugin import SelfDistillationCallback, WeightAveragingCallback, attach
from trl_ema_plugin.integrations.trl.student_outputs import completion_positions

TEACHER = "ema_teacher"


def distilled(kind, output_dir, *, architecture="llama", averager=None, distill=None, **overrides):
    averaging = WeightAveragingCallback(**(averager or {"method": "ema", "decay": 0.5}), eval=False)
    distillation = SelfDistillationCallback(**(distill or {"lambda_": 1.0}))
    trainer = generation_trainer(kind, output_dir, [averaging, distillation], architecture=architecture, **overrides)
    attach(trainer)
    return trainer, averaging, distillation


def test_completion_positions_follow_the_sampled_tokens():
    inputs = {
        "prompt_ids": torch.zeros(2, 3, dtype=torch.long),
        "completion_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
        "tool_mask": torch.tensor([[1, 1, 1], [1, 0, 1]]),
    }
    # hidden position P − 1 + j predicts completion token j; tool-written tokens (tool_mask 0) are not sampled
    assert completion_positions(inputs).int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 1, 0]]


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_term_is_exactly_zero_while_teacher_equals_student(tmp_path, kind):
    """learning_rate=0: the student never moves, so the EMA teacher equals it at every step (no dropout)."""
    trainer, _, distillation = distilled(kind, tmp_path, learning_rate=0.0, max_steps=3, steps_per_generation=2)
    trainer.train()
    assert distillation.teacher_forwards == 3  # every optimizer step, also those without a new generation batch
    assert logged(trainer, "loss/distill") == [0.0, 0.0, 0.0]
    student, teacher = params(trainer.model, "default"), params(trainer.model, TEACHER)
    assert teacher and len(teacher) == len(student)
    for name, value in student.items():
        assert torch.equal(teacher[name.replace(".default.", f".{TEACHER}.")], value)


def hand_term(trainer, averaging, batch, lam: float, tau: float) -> torch.Tensor:
    """λ τ² mean KL(p_T ‖ p_S) over the sampled completion tokens: the student is the policy adapter (with grad),
    the teacher the averaged weights swapped into it by the averaging callback (not the teacher adapter)."""
    model = trainer.model
    prompt, completion = batch["prompt_ids"], batch["completion_ids"]
    inputs = {
        "input_ids": torch.cat([prompt, completion], dim=1),
        "attention_mask": torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
    }
    with averaging.primary.swapped_in(trainer.state.global_step), torch.no_grad():
        model.eval()
        teacher_logits = model(**inputs).logits
        model.train()
    student_logits = model(**inputs).logits
    mask = batch["completion_mask"].bool()
    start = prompt.size(1) - 1  # the logits at P − 1 + j predict completion token j
    teacher_logits = teacher_logits[:, start : start + completion.size(1)][mask]
    student_logits = student_logits[:, start : start + completion.size(1)][mask]
    p_t = torch.softmax(teacher_logits / tau, -1)
    log_p_s = torch.log_softmax(student_logits / tau, -1)
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum(-1)
    return lam * tau**2 * kl.mean()


@pytest.mark.parametrize(("kind", "architecture"), [("grpo", "llama"), ("grpo", "qwen2"), ("rloo", "llama")])
def test_value_and_gradients_match_hand_computation(tmp_path, kind, architecture):
    lam, tau = 0.7, 2.0
    trainer, averaging, _ = distilled(
        kind, tmp_path, architecture=architecture, distill={"lambda_": lam, "temperature": tau}, max_steps=2
    )
    trainer.train()  # 2 steps with EMA decay 0.5: the teacher differs from the student
    model = trainer.model
    model.train()
    batch = trainer._buffered_inputs[0]  # a micro-batch as compute_loss receives it: prompts + sampled completions
    assert bool(batch["completion_mask"].any())

    model.zero_grad()
    total = trainer.compute_loss(model, dict(batch))
    averaged = averaging.averaged_tensors(step=trainer.state.global_step)
    for name, value in params(model, TEACHER).items():  # the teacher adapter holds the averager's weights
        torch.testing.assert_close(value, averaged[name.replace(f".{TEACHER}.", ".default.")], rtol=0, atol=0)
    total.backward()
    g_total = grads(model)
    model.zero_grad()
    task = trainer.compute_loss.__wrapped__(model, dict(batch))
    task.backward()
    g_task = grads(model)
    model.zero_grad()
    term = hand_term(trainer, averaging, batch, lam, tau)
    term.backward()
    g_term = grads(model)

    assert term.item() > 1e-5
    # a KL of near-equal distributions in fp32: the cancellation leaves ~1e-7 of absolute noise
    assert trainer._metrics["train"]["loss/distill"][-1] == pytest.approx(term.item(), rel=1e-4, abs=5e-7)
    assert (total - task).item() == pytest.approx(term.item(), rel=1e-4, abs=5e-7)
    assert set(g_total) == {n for n, p in model.named_parameters() if ".default." in n and p.requires_grad}
    for name, value in g_total.items():
        torch.testing.assert_close(value, g_task[name] + g_term[name], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None and not p.requires_grad for n, p in model.named_parameters() if f".{TEACHER}." in n)
    model.eval()  # evaluation passes through: the loss is the trainer's own
    with torch.no_grad():
        assert (
            trainer.compute_loss(model, dict(batch)).item()
            == trainer.compute_loss.__wrapped__(model, dict(batch)).item()
        )


def test_sft_options_in_grpo(tmp_path):
    """warmup_steps, distill_every, top_k, reverse KL and a temperature, with a generation batch per 2 steps."""
    distill = {"lambda_": 1.0, "warmup_steps": 1, "distill_every": 2, "top_k": 8, "divergence": "reverse_kl",
               "temperature": 1.5}  # fmt: skip
    trainer, _, distillation = distilled("grpo", tmp_path, distill=distill, max_steps=6, steps_per_generation=2)
    trainer.train()
    assert distillation.teacher_forwards == 3  # optimizer steps 1, 3, 5 (0-based global_step)
    values = logged(trainer, "loss/distill")
    assert len(values) == 6 and [values[i] for i in (0, 2, 4)] == [0.0, 0.0, 0.0]
    assert all(values[i] > 0 for i in (1, 3, 5))
    assert logged(trainer, "loss") == pytest.approx(
        [a + b for a, b in zip(logged(trainer, "loss/task"), values, strict=True)], rel=1e-5, abs=1e-7
    )


def test_gradient_accumulation_normalises_like_the_task_loss(tmp_path):
    """GRPO with accumulation 2: the term is scaled for accumulation as the task loss is, so loss = task + term."""
    trainer, _, distillation = distilled(
        "grpo", tmp_path, max_steps=3, gradient_accumulation_steps=2, distill={"lambda_": 2.0}
    )
    trainer.train()
    assert distillation.teacher_forwards == 6
    values = logged(trainer, "loss/distill")
    assert values[0] == 0.0 and all(v > 0 for v in values[1:])
    assert logged(trainer, "loss") == pytest.approx(
        [a + b for a, b in zip(logged(trainer, "loss/task"), values, strict=True)], rel=1e-5, abs=1e-7
    )


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """BEMA updated every 2 steps, checkpoint at the generation boundary 2: the resumed teacher is rebuilt from
    the restored averager, and the term after the checkpoint equals the uninterrupted run's."""

    def make():
        return distilled(
            "grpo", tmp_path / "out", max_steps=6, steps_per_generation=2, save_strategy="steps", save_steps=2,
            averager={"method": "bema", "update_every": 2, "update_after": 1, "lag": 3.0}, distill={"lambda_": 1.0},
        )  # fmt: skip

    full, _, _ = make()
    full.train()
    expected = logged(full, "loss/distill")
    assert (tmp_path / "out" / "checkpoint-2" / TEACHER / "adapter_model.safetensors").is_file()
    for step in (4, 6):
        shutil.rmtree(tmp_path / "out" / f"checkpoint-{step}")
    resumed, _, distillation = make()
    resumed.train(resume_from_checkpoint=True)
    assert distillation.teacher_forwards == 4  # steps 2, 3, 4, 5
    assert all(v > 0 for v in expected[2:])
    assert logged(resumed, "loss/distill") == pytest.approx(expected, rel=1e-5)
    trainable = {n for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)


def test_teacher_starts_at_the_adapter(tmp_path):
    """Given a trained adapter (non-zero B), the teacher is a copy of it before the first step, not zeros."""
    model, _ = lora_policy()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".default." in name:
                param.add_(0.05)
    averaging = WeightAveragingCallback(method="ema", decay=0.5, eval=False)
    distillation = SelfDistillationCallback(lambda_=1.0)
    trainer = attach(generation_trainer("grpo", tmp_path, [averaging, distillation], model=model, max_steps=1))
    for name, value in params(trainer.model, "default").items():
        teacher = params(trainer.model, TEACHER)[name.replace(".default.", f".{TEACHER}.")]
        assert torch.equal(teacher, value) and bool(value.abs().sum() > 0)


def test_kto_is_refused(tmp_path):
    callbacks = [WeightAveragingCallback(method="ema", decay=0.5), SelfDistillationCallback()]
    trainer = kto_trainer(tmp_path, callbacks, model=lora_policy()[0])
    with pytest.raises(ValueError, match="not KTOTrainer"):
        attach(trainer)
