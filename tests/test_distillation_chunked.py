"""The self-distillation term in chunks of tokens: the values and gradients of the unchunked term (fp32 rounding),
the trainer's own logits reused where it builds them, the memory of one chunk, and Liger kernel where it runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ds_common import cpu_training_args
from trl import SFTConfig, SFTTrainer
from trl_helpers import lora_config

from trl_ema_plugin import SelfDistillationCallback, WeightAveragingCallback, attach
from trl_ema_plugin.distillation import ChunkedTerm, chunked_distillation_sum, per_token_distillation, teacher_targets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_distillation import peak_cpu_bytes

DIVERGENCES = [("forward_kl", None), ("reverse_kl", None), ("generalized_jsd", 0.3)]


def problem(tokens: int = 23, hidden: int = 16, vocab: int = 50, seed: int = 0, completions: float = 0.7):
    """Student hidden states [2, tokens, H] (with grad), a frozen bias-free head, teacher rows, a completion mask."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, tokens, hidden, generator=g, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    torch.nn.init.normal_(head.weight, generator=g)
    mask = torch.rand(2, tokens, generator=g) < completions
    teacher = student.detach()[mask] + 0.2 * torch.randn(int(mask.sum()), hidden, generator=g)
    return student, head, teacher, mask


def unchunked(student, head, teacher, mask, divergence, beta, tau, top_k):
    targets = teacher_targets(head(teacher), tau, top_k)
    return per_token_distillation(head(student[mask]), targets, divergence=divergence, beta=beta, temperature=tau).sum()


@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunks_give_the_unchunked_value_and_gradient(divergence, beta, top_k, chunk):
    student, head, teacher, mask = problem()
    tau = 2.0
    expected = unchunked(student, head, teacher, mask, divergence, beta, tau, top_k)
    (2.5 * expected).backward()  # a scaled term, as λ / tokens scales it
    expected_grad, student.grad = student.grad.clone(), None
    term = ChunkedTerm(head, lambda lo, hi: head(teacher[lo:hi]), divergence, beta, tau, top_k, chunk)
    got = chunked_distillation_sum(student, mask.reshape(-1).nonzero().squeeze(1), term)
    (2.5 * got).backward()
    torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=1e-6)
    scale = expected_grad.abs().max().item()  # fp32 rounding of GEMMs of other shapes: relative to the largest
    torch.testing.assert_close(student.grad, expected_grad, rtol=1e-5, atol=1e-5 * scale)
    assert expected.item() > 0


def test_logits_as_the_source_give_the_same_term():
    """The trainer's own logits (TRL 1.9 builds them): no projection of the student."""
    student, head, teacher, mask = problem(seed=1)
    logits = head(student)  # [2, T, V], part of the graph as the trainer's logits are
    expected = unchunked(student, head, teacher, mask, "forward_kl", None, 1.5, None)
    expected.backward()
    expected_grad, student.grad = student.grad.clone(), None
    term = ChunkedTerm(None, lambda lo, hi: head(teacher[lo:hi]), "forward_kl", None, 1.5, None, 4)
    got = chunked_distillation_sum(head(student), mask.reshape(-1).nonzero().squeeze(1), term)
    got.backward()
    torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=1e-6)
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(student.grad, expected_grad, rtol=1e-5, atol=1e-5 * scale)
    assert logits.shape[-1] == 50


def test_no_completion_token_is_a_connected_zero():
    student, head, teacher, _ = problem()
    term = ChunkedTerm(head, lambda lo, hi: head(teacher[lo:hi]))
    got = chunked_distillation_sum(student, torch.zeros(0, dtype=torch.long), term)
    got.backward()
    assert got.item() == 0.0 and torch.equal(student.grad, torch.zeros_like(student))


def test_peak_memory_holds_one_chunk_not_every_token():
    """4096 tokens x 4096 vocabulary: 64 MiB per fp32 [N, V] copy; chunks of 64 tokens hold 1 MiB each."""
    student, head, teacher, mask = problem(tokens=2048, hidden=32, vocab=4096, seed=2, completions=1.0)
    index = mask.reshape(-1).nonzero().squeeze(1)
    full_copy = index.numel() * 4096 * 4

    def reference() -> None:
        unchunked(student, head, teacher, mask, "forward_kl", None, 2.0, None).backward()

    def chunked() -> None:
        term = ChunkedTerm(head, lambda lo, hi: head(teacher[lo:hi]), "forward_kl", None, 2.0, None, 64)
        chunked_distillation_sum(student, index, term).backward()

    peaks = {name: peak_cpu_bytes(fn) for name, fn in (("reference", reference), ("chunked", chunked))}
    if peaks["reference"] is None:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    assert peaks["reference"] >= 3 * full_copy  # logits, log-probabilities, ... of every token at once (measured: 8)
    assert peaks["chunked"] <= full_copy / 2  # a few [64, V] tensors, and the [N, H] gradient (measured: 0.3 copy)


# ----------------------------------------------------------------------------------- real trainers
def causal_lm_loss(outputs, labels, num_items_in_batch=None):
    """The next-token cross-entropy from the model's own logits: with this ``compute_loss_func`` and
    ``loss_type="nll"`` TRL's forward builds them (TRL 1.16's fused head and TRL 1.9's default ``chunked_nll`` do
    not)."""
    logits, targets = outputs.logits[:, :-1].float(), labels[:, 1:]
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum())


def distilled_run(tmp_path, tokenizer, model, data, reference: bool, with_logits: bool, chunk_tokens: int = 3):
    averaging = WeightAveragingCallback(method="bema", update_every=1, lag=2.0, bias_power=0.3, eval=False)
    distillation = SelfDistillationCallback(lambda_=0.8, temperature=2.0)
    distillation.use_reference_path = reference
    distillation.chunk_elements = chunk_tokens * len(tokenizer)  # chunks of 3 tokens
    args = cpu_training_args(
        str(tmp_path), SFTConfig, max_steps=3, max_length=48, logging_steps=1, learning_rate=5e-3,
        per_device_train_batch_size=4, **({"loss_type": "nll"} if with_logits else {}),
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer,
        peft_config=lora_config(init_lora_weights=False), callbacks=[averaging, distillation],
        compute_loss_func=causal_lm_loss if with_logits else None,
    )  # fmt: skip
    attach(trainer)
    trainer.train()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".default." in n}
    logged = [e["loss/distill"] for e in trainer.state.log_history if "loss/distill" in e]
    return weights, logged, distillation


@pytest.mark.parametrize("with_logits", [False, True], ids=["hidden states", "the trainer's logits"])
def test_chunked_training_equals_the_reference_path(tmp_path, tokenizer, sft_data, with_logits):
    """Three distilled SFT steps: the chunked term trains the adapter as the unchunked one did (fp32 rounding)."""
    from trl_ema_plugin.demos.tiny import tiny_llama

    runs = {
        reference: distilled_run(
            tmp_path / str(reference), tokenizer, tiny_llama(tokenizer, seed=0), sft_data[0], reference, with_logits
        )
        for reference in (True, False)
    }
    (ref_weights, ref_logged, ref_cb), (weights, logged, callback) = runs[True], runs[False]
    assert callback.teacher_forwards == ref_cb.teacher_forwards == 3
    assert ref_cb.logits_reused == 0
    if with_logits:
        assert callback.logits_reused == 3  # the student's logits were the trainer's own
    assert all(v > 0 for v in logged[1:])
    assert logged == pytest.approx(ref_logged, rel=1e-5, abs=1e-7)
    for name, value in ref_weights.items():  # Adam normalises the gradients: their rounding shows a little more
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5)


def test_liger_kernel_is_refused_where_it_cannot_run(tmp_path, tokenizer, model, sft_data):
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine the Liger path may run (see the CUDA test)")
    averaging = WeightAveragingCallback(method="ema", decay=0.5)
    distillation = SelfDistillationCallback(kernel="liger")
    trainer = SFTTrainer(
        model=model, args=cpu_training_args(str(tmp_path), SFTConfig, max_steps=1, max_length=48),
        train_dataset=sft_data[0], processing_class=tokenizer, peft_config=lora_config(),
        callbacks=[averaging, distillation],
    )  # fmt: skip
    attach(trainer)
    with pytest.raises(ValueError, match=r"kernel='liger' cannot run here: .*; use kernel='torch'"):
        trainer.train()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger kernel's fused linear JSD needs CUDA (Triton)")
@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
def test_liger_path_equals_the_torch_path_on_cuda(divergence, beta):
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (an optional dependency)")
    from trl_ema_plugin.config.distillation import SelfDistillationConfig
    from trl_ema_plugin.integrations.trl.liger import liger_distillation_sum

    student, head, teacher, mask = problem(tokens=64, hidden=32, vocab=512, seed=3)
    student = student.detach().cuda().requires_grad_(True)
    head, teacher, mask = head.cuda(), teacher.cuda(), mask.cuda()
    config = SelfDistillationConfig(divergence=divergence, beta=beta, temperature=2.0, kernel="liger")

    class CausalLM(torch.nn.Module):  # what liger_distillation_sum reads: the output layer
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = head

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.lm_head

    got, count = liger_distillation_sum(CausalLM(), student, mask, teacher, config)
    got.backward()
    liger_grad, student.grad = student.grad.clone(), None
    expected = unchunked(student, head, teacher, mask, divergence, config.jsd_beta, 2.0, None)
    expected.backward()
    assert count == int(mask.sum())
    torch.testing.assert_close(got, expected.detach(), rtol=1e-4, atol=1e-5)
    # Liger sums over the vocabulary in its own order (a chunked GEMM, then its JSD kernel): on an H200 a few
    # gradient elements near zero differ from the torch path by up to 3e-6, hence the gradient's atol of 1e-5
    torch.testing.assert_close(liger_grad, student.grad, rtol=1e-4, atol=1e-5)
