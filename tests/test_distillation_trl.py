"""Self-distillation on real TRL trainers (SFT, DPO) with tiny real models and real PEFT adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from ds_common import cpu_training_args
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from trl_helpers import grads, logged, lora_config, params

from trl_ema_plugin import WeightAveragingCallback, attach
from trl_ema_plugin.integrations.trl.distillation import SelfDistillationCallback
from trl_ema_plugin.shadow import adapter_twin_names

TEACHER = "ema_teacher"


def lora(variant: str = "lora") -> LoraConfig:
    # init_lora_weights=False: lora_B is random, so an adapter that was never written differs from the trained one
    return lora_config(variant, init_lora_weights=False)


def cpu_args(config_class, tmp_path, **overrides):
    """Two short steps on the CPU (the trainer's default seed)."""
    values = dict(max_steps=2, max_length=48, logging_steps=1, learning_rate=5e-3)
    return cpu_training_args(str(tmp_path / "out"), config_class, **{**values, **overrides})


def sft_trainer(tmp_path, tokenizer, model, data, *, variant="lora", averager=None, distill=None, **args):
    averaging = WeightAveragingCallback(**(averager or {"method": "ema", "decay": 0.5}))
    distillation = SelfDistillationCallback(**(distill or {"lambda_": 1.0, "temperature": 2.0}))
    trainer = SFTTrainer(
        model=model,
        args=cpu_args(SFTConfig, tmp_path, **{"per_device_train_batch_size": 4, **args}),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora(variant),
        callbacks=[averaging, distillation],
    )
    attach(trainer)
    return trainer, averaging, distillation


def dpo_trainer(tmp_path, tokenizer, model, data, *, distill=None, **args):
    averaging = WeightAveragingCallback(method="bema", update_every=1, lag=2.0, bias_power=0.3)
    distillation = SelfDistillationCallback(**(distill or {"lambda_": 1.0}))
    trainer = DPOTrainer(
        model=model,
        args=cpu_args(DPOConfig, tmp_path, **{"per_device_train_batch_size": 2, **args}),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora(),
        callbacks=[averaging, distillation],
    )
    attach(trainer)
    return trainer, averaging, distillation


def first_batch(trainer) -> dict:
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def hand_term(trainer, averaging, batch, positions, lam: float, tau: float) -> torch.Tensor:
    """λ τ² mean KL(p_T ‖ p_S) on ``positions``: student = default adapter (with grad), teacher = averaged weights
    swapped into the default adapter by the averaging callback (not through the teacher adapter)."""
    model = trainer.model
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    step = trainer.state.global_step
    with averaging.primary.swapped_in(step), torch.no_grad():
        model.eval()
        teacher_logits = model(**inputs).logits
        model.train()
    student_logits = model(**inputs).logits
    p_t = torch.softmax(teacher_logits[:, :-1][positions] / tau, -1)
    log_p_s = torch.log_softmax(student_logits[:, :-1][positions] / tau, -1)
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum(-1)
    return lam * tau**2 * kl.mean()


# ----------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("variant", ["lora", "dora", "rslora"])
def test_term_is_exactly_zero_while_teacher_equals_student(tmp_path, tokenizer, model, sft_data, variant):
    """learning_rate=0: the student never moves, so the EMA teacher equals it at every step (warm-up 0, no dropout)."""
    trainer, _, distillation = sft_trainer(
        tmp_path, tokenizer, model, sft_data[0], variant=variant, learning_rate=0.0, max_steps=3
    )
    trainer.train()
    assert distillation.teacher_forwards == 3
    assert logged(trainer, "loss/distill") == [0.0, 0.0, 0.0]
    assert logged(trainer, "loss/task") == pytest.approx(logged(trainer, "loss"), rel=1e-6)
    student = params(trainer.model, "default")
    teacher = params(trainer.model, TEACHER)
    assert teacher and len(teacher) == len(student)
    for name, value in student.items():
        assert torch.equal(teacher[name.replace(".default.", f".{TEACHER}.")], value)
    if variant == "dora":
        assert any("lora_magnitude_vector" in n for n in teacher)


def test_sft_hook_value_and_gradients_match_hand_computation(tmp_path, tokenizer, model, sft_data):
    lam, tau = 0.7, 2.0
    trainer, averaging, _ = sft_trainer(
        tmp_path, tokenizer, model, sft_data[0], distill={"lambda_": lam, "temperature": tau}
    )
    trainer.train()  # 2 steps with EMA decay 0.5: the teacher differs from the student
    peft_model = trainer.model
    peft_model.train()
    batch = first_batch(trainer)
    positions = batch["labels"][:, 1:] != -100

    peft_model.zero_grad()
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    total = trainer.compute_loss(peft_model, dict(batch))
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == flags  # restored after the teacher forward
    teacher_before = params(peft_model, TEACHER)
    # the teacher adapter holds the averager's weights of this step
    averaged = averaging.primary.averaged_tensors(trainer.state.global_step)
    twins = dict(zip(adapter_twin_names(list(averaged), "default", TEACHER), averaged.values(), strict=True))
    for name, value in teacher_before.items():
        torch.testing.assert_close(value, twins[name].to(value.dtype), rtol=0, atol=0)
    total.backward()
    g_total = grads(peft_model)

    peft_model.zero_grad()
    task = trainer.compute_loss.__wrapped__(peft_model, dict(batch))
    task.backward()
    g_task = grads(peft_model)
    peft_model.zero_grad()
    term = hand_term(trainer, averaging, batch, positions, lam, tau)
    term.backward()
    g_term = grads(peft_model)

    assert term.item() > 1e-4
    assert trainer._metrics["train"]["loss/distill"][-1] == pytest.approx(term.item(), rel=1e-4)
    assert (total - task).item() == pytest.approx(term.item(), abs=2e-6)  # fp32 loss ≈ 5: absolute tolerance
    # gradients: only the student adapter, and exactly task + hand term
    assert set(g_total) == {n for n, p in peft_model.named_parameters() if ".default." in n and p.requires_grad}
    for name, value in g_total.items():
        torch.testing.assert_close(value, g_task[name] + g_term[name], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None and not p.requires_grad for n, p in peft_model.named_parameters() if f".{TEACHER}." in n)
    # an optimizer step moves the student, never the teacher
    student_before = params(peft_model, "default")
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    peft_model.zero_grad()
    trainer.compute_loss(peft_model, dict(batch)).backward()
    optimizer.step()
    assert all(torch.equal(v, params(peft_model, TEACHER)[n]) for n, v in teacher_before.items())
    assert any(not torch.equal(v, params(peft_model, "default")[n]) for n, v in student_before.items())
    # evaluation passes through: the loss is the trainer's own
    peft_model.eval()
    with torch.no_grad():
        assert (
            trainer.compute_loss(peft_model, dict(batch)).item()
            == trainer.compute_loss.__wrapped__(peft_model, dict(batch)).item()
        )


def test_dpo_distills_on_the_chosen_completions(tmp_path, tokenizer, model, dpo_data):
    lam = 0.5
    trainer, averaging, distillation = dpo_trainer(
        tmp_path, tokenizer, model, dpo_data[0], distill={"lambda_": lam, "warmup_steps": 1}, max_steps=3
    )
    trainer.train()
    assert distillation.teacher_forwards == 2  # steps 1 and 2; none during the warm-up step 0
    distill = logged(trainer, "loss/distill")
    assert distill[0] == 0.0 and all(v > 0 for v in distill[1:])
    assert logged(trainer, "loss") == pytest.approx(
        [a + b for a, b in zip(logged(trainer, "loss/task"), distill, strict=True)], rel=1e-5
    )

    peft_model = trainer.model
    peft_model.train()
    batch = first_batch(trainer)
    half = batch["input_ids"].size(0) // 2
    positions = batch["completion_mask"][:, 1:].bool()
    positions[half:] = False  # the rejected half is not distilled
    total = trainer.compute_loss(peft_model, dict(batch))
    task = trainer.compute_loss.__wrapped__(peft_model, dict(batch))
    term = hand_term(trainer, averaging, batch, positions, lam, 1.0)
    assert term.item() > 1e-6
    assert trainer._metrics["train"]["loss/distill"][-1] == pytest.approx(term.item(), rel=1e-4)
    assert (total - task).item() == pytest.approx(term.item(), abs=1e-6)


def test_gradient_accumulation_matches_the_full_batch(tmp_path, tokenizer, sft_data):
    from trl_ema_plugin.demos.tiny import tiny_llama

    runs = {}
    for accumulation, batch in ((1, 4), (2, 2)):
        trainer, _, distillation = sft_trainer(
            tmp_path / f"ga{accumulation}",
            tokenizer,
            tiny_llama(tokenizer),
            sft_data[0],
            variant="dora",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=3,
            distill={"lambda_": 2.0, "temperature": 1.5, "divergence": "generalized_jsd", "beta": 0.3},
        )
        trainer.train()
        assert distillation.teacher_forwards == 3 * accumulation
        runs[accumulation] = (logged(trainer, "loss/distill"), params(trainer.model, "default"))
    (d1, w1), (d2, w2) = runs[1], runs[2]
    assert d1[0] == d2[0] == 0.0 and d1[-1] > 0
    assert d2 == pytest.approx(d1, rel=1e-3)
    for name, value in w1.items():
        torch.testing.assert_close(w2[name], value, rtol=1e-4, atol=1e-5)


def test_distill_every_and_top_k(tmp_path, tokenizer, model, sft_data):
    trainer, _, distillation = sft_trainer(
        tmp_path, tokenizer, model, sft_data[0], max_steps=4, distill={"distill_every": 2, "top_k": 8, "lambda_": 1.0}
    )
    trainer.train()
    assert distillation.teacher_forwards == 2  # steps 0 and 2
    distill = logged(trainer, "loss/distill")
    assert distill[1] == distill[3] == 0.0 and distill[2] > 0


def test_misuse_fails_clearly(tmp_path, tokenizer, model, sft_data):
    data = sft_data[0]
    args = cpu_args(SFTConfig, tmp_path, per_device_train_batch_size=4)
    no_averaging = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora(),
        callbacks=[SelfDistillationCallback()],
    )  # fmt: skip
    with pytest.raises(ValueError, match="WeightAveragingCallback"):
        attach(no_averaging)
    with pytest.raises(ValueError, match=r"trl_ema_plugin\.attach"):
        no_averaging.train()
    wrong_teacher = SFTTrainer(
        model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora(),
        callbacks=[WeightAveragingCallback(method="ema"), SelfDistillationCallback(teacher="bema")],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"teacher='bema'.*averagers are: ema"):
        attach(wrong_teacher)
    full_model = SFTTrainer(
        model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tokenizer,
        callbacks=[WeightAveragingCallback(method="ema"), SelfDistillationCallback()],
    )  # fmt: skip
    with pytest.raises(ValueError, match="PEFT model"):
        attach(full_model)
    with pytest.raises(ValueError, match="lambda_"):
        SelfDistillationCallback(lambda_=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        SelfDistillationCallback(temperature=0.0)
    with pytest.raises(ValueError, match="divergence"):
        SelfDistillationCallback(divergence="js")


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tokenizer, sft_data):
    """BEMA updated every 2 steps, checkpoint at 3: the resumed teacher is rebuilt from the restored averager.

    Checkpoints also hold the ``ema_teacher/`` adapter (PEFT saves every adapter); transformers loads
    it back on resume, which must leave the teacher frozen and the student the only trainable adapter.
    """
    from trl_ema_plugin.demos.tiny import tiny_llama

    def make():
        return sft_trainer(
            tmp_path, tokenizer, tiny_llama(tokenizer), sft_data[0], max_steps=6, save_strategy="steps", save_steps=3,
            averager={"method": "bema", "update_every": 2, "lag": 3.0}, distill={"lambda_": 1.0},
        )  # fmt: skip

    full, _, _ = make()
    full.train()
    assert (tmp_path / "out" / "checkpoint-3" / TEACHER / "adapter_model.safetensors").is_file()
    expected = logged(full, "loss/distill")
    import shutil

    shutil.rmtree(tmp_path / "out" / "checkpoint-6")
    resumed, _, distillation = make()
    resumed.train(resume_from_checkpoint=True)
    assert distillation.teacher_forwards == 3  # steps 3, 4, 5
    assert expected[3] > 0
    assert logged(resumed, "loss/distill") == pytest.approx(expected, rel=1e-5)
    trainable = {n for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
