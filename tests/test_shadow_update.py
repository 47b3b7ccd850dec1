"""The update path (flat buffers, staging, chunks, one flat adapter, the background worker, the side stream):
bit for bit the per-tensor math of the averagers' list API, and of the inline schedule in real training runs."""

from __future__ import annotations

import threading

import oracles
import pytest
import torch
from ds_common import cpu_training_args
from peft import get_peft_model
from safetensors.torch import load_file
from trl import DPOConfig, DPOTrainer
from trl_helpers import WeightRecorder, lora_config, sft_trainer

from trl_ema_plugin import (
    AveragedReferenceCallback,
    AveragerSpec,
    SelfDistillationCallback,
    WeightAveragingCallback,
    attach,
)
from trl_ema_plugin.demos.tiny import tiny_llama
from trl_ema_plugin.shadow import AveragedWeights, LocalLayout
from trl_ema_plugin.shadow.live import LiveWeights
from trl_ema_plugin.shadow.runner import HostSnapshot, StreamRunner, UpdateRunner, WorkerRunner, choose_schedule
from trl_ema_plugin.shadow.store import step_together

SHAPES = [(5,), (3, 4), (7,), (1,), (2, 3, 2), (9,)]
SPECS = {
    "ema": dict(method="ema", decay=0.7, update_after=1),
    "ema_warmup": dict(method="ema", decay=0.95, use_ema_warmup=True, inv_gamma=2.0, power=0.5),
    "bema": dict(method="bema", lag=3.0, multiplier=0.5, ema_power=0.6, bias_power=0.3, update_after=2, update_every=1),
    "bema_sparse": dict(method="bema", lag=2.0, bias_power=0.4, update_every=2),  # keeps θ of the last update
    "dema": dict(method="dema", ema_power=0.6, lag=2, multiplier=2.0, update_after=1, update_every=2),
    "ouema": dict(
        method="ouema", lag=0, ema_power=0.5, bias_power=0.3, update_every=1
    ),  # α_1 = 1: z = θ, then (θ − αθ0)/(1 − α)
}
# (live dtype, layout of the live weights, staging chunk in elements, schedule): every way θ reaches the math
CASES = [
    (torch.float32, "separate", 1 << 24, "inline"),  # in place, per-tensor views (foreach)
    (torch.float32, "contiguous", 1 << 24, "inline"),  # in place, one flat tensor
    (torch.bfloat16, "separate", 1 << 24, "inline"),  # one conversion into the staging buffer
    (torch.bfloat16, "separate", 4, "inline"),  # chunks of 4 elements: windows that cut tensors
    (torch.bfloat16, "contiguous", 5, "inline"),  # chunks of one flat tensor
    (torch.bfloat16, "separate", 1 << 24, "worker"),  # host copy, update in the background thread
    (torch.float32, "contiguous", 1 << 24, "worker"),
]


def trajectory(steps: int, dtype: torch.dtype, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    theta = [torch.randn(s, generator=g) for s in SHAPES]
    out = []
    for _ in range(steps + 1):
        out.append([t.to(dtype) for t in theta])
        theta = [t + 0.1 * torch.randn(t.shape, generator=g) for t in theta]
    return out


def by_list_api(settings: dict, traj: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The per-tensor path: the averager driven with lists of fp32 tensors (one foreach call per op)."""
    spec = AveragerSpec(**settings)
    averager = spec.build()
    averager.allocate([t.numel() for t in traj[0]], "cpu")
    flat = [[t.float().reshape(-1) for t in step] for step in traj]
    for t, theta in enumerate(flat):
        if not averager.started and t >= spec.update_after:
            averager.start(theta, t)
        elif averager.started and spec.is_update_step(t):
            averager.update(theta, t)
    out = [torch.empty_like(x) for x in flat[-1]]
    averager.average_into(out, flat[-1], len(flat) - 1)
    return {"out": torch.cat(out), **{k: v.clone() for k, v in averager.buffers.items()}}


def make_runner(layout: LocalLayout, chunk: int, schedule: str) -> UpdateRunner:
    if schedule == "worker":
        return WorkerRunner(HostSnapshot(layout, chunk))
    return UpdateRunner(LiveWeights(layout, "cpu", chunk))


def live_params(traj: list[list[torch.Tensor]], layout_kind: str) -> tuple[list[torch.nn.Parameter], LocalLayout]:
    params = [torch.nn.Parameter(t.clone()) for t in traj[0]]
    layout = LocalLayout([(f"p{i}", p) for i, p in enumerate(params)])
    if layout_kind == "contiguous":
        assert layout.make_contiguous() and layout.flat is not None
    return params, layout


def write(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)


@pytest.mark.parametrize(("dtype", "layout_kind", "chunk", "schedule"), CASES)
def test_every_read_of_theta_gives_the_per_tensor_results_bit_for_bit(dtype, layout_kind, chunk, schedule):
    traj = trajectory(9, dtype)
    params, layout = live_params(traj, layout_kind)
    runner = make_runner(layout, chunk, schedule)
    weights = {name: AveragedWeights(AveragerSpec(**s), layout, "cpu", runner=runner) for name, s in SPECS.items()}
    assert weights["bema_sparse"].averager.keep_last_weights
    assert all(w.runner is runner for w in weights.values())
    for t, theta in enumerate(traj):
        runner.before_weights_change()
        write(params, theta)
        step_together(list(weights.values()), t)  # θ_t read once for every due average
    for name, w in weights.items():
        expected = by_list_api(SPECS[name], traj)
        out = torch.cat(w.average_local(len(traj) - 1))
        assert torch.equal(out, expected["out"]), name
        for buffer, value in w.averager.buffers.items():
            assert torch.equal(value, expected[buffer]), f"{name}/{buffer}"
    runner.close()
    expected_mode = {torch.float32: "flat" if layout_kind == "contiguous" else "direct", torch.bfloat16: "staged"}
    if schedule == "inline":
        assert runner.reader.mode == expected_mode[dtype]
        assert runner.reader.memory_bytes() == (0 if dtype == torch.float32 else 4 * min(chunk, 46))


def test_float32_oracle_replays_the_flat_update_exactly():
    """Against tests/oracles.py in float32 (the averagers' order of operations), bit for bit."""
    traj = trajectory(8, torch.bfloat16, seed=3)
    params, layout = live_params(traj, "contiguous")
    for name in ("ema", "bema", "dema"):
        w = AveragedWeights(AveragerSpec(**SPECS[name]), layout, "cpu")
        for t, theta in enumerate(traj):
            write(params, theta)
            w.step(t)
        got = torch.cat(w.average_local(len(traj) - 1))
        fp32 = {t: [x.float() for x in step] for t, step in enumerate(traj)}
        expected = torch.cat([x.reshape(-1) for x in oracles.averaged(fp32, SPECS[name], dtype=torch.float32)])
        assert torch.equal(got, expected), name


def test_reader_follows_a_replaced_parameter_storage():
    """``param.data = ...`` after the adapter was laid out flat: the next read uses the new storage."""
    traj = trajectory(6, torch.float32, seed=1)
    params, layout = live_params(traj, "contiguous")
    w = AveragedWeights(AveragerSpec(**SPECS["ema"]), layout, "cpu")
    for t, theta in enumerate(traj):
        if t == 3:
            assert w.runner.reader.mode == "flat"
            params[1].data = params[1].data.clone()  # e.g. a checkpoint loaded with assign=True
        write(params, theta)
        w.step(t)
    assert layout.flat is None and w.runner.reader.mode == "direct"
    assert torch.equal(torch.cat(w.average_local(len(traj) - 1)), by_list_api(SPECS["ema"], traj)["out"])


def test_make_contiguous_keeps_values_and_parameter_objects():
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    before = [p.detach().clone() for p in params]
    ids = [id(p) for p in params]
    layout = LocalLayout([(f"p{i}", p) for i, p in enumerate(params)])
    assert layout.flat is None
    assert layout.make_contiguous()
    assert [id(p) for p in params] == ids and all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    flat = layout.flat
    assert flat is not None and flat.numel() == sum(p.numel() for p in params)
    with torch.no_grad():
        params[2].add_(1.0)  # writes through the parameter reach the flat tensor
    assert torch.equal(flat[17:24], before[2].reshape(-1) + 1.0)
    mixed = LocalLayout([("a", torch.nn.Parameter(torch.ones(2))), ("b", torch.nn.Parameter(torch.ones(2).double()))])
    assert not mixed.make_contiguous() and mixed.flat is None


def test_worker_error_surfaces_at_the_next_wait():
    traj = trajectory(3, torch.float32)
    params, layout = live_params(traj, "separate")
    w = AveragedWeights(AveragerSpec(method="ema"), layout, "cpu", runner=WorkerRunner(HostSnapshot(layout)))
    w.step(0)
    params[0].data = torch.zeros(11)  # the tracked weights change size: the update in the worker fails
    w.step(1)
    with pytest.raises(RuntimeError, match="changed their sizes"):
        w.wait()
    w.runner.close()


def test_schedule_follows_the_device_and_deepspeed():
    cpu = LocalLayout([("a", torch.nn.Parameter(torch.ones(2)))])
    assert choose_schedule(cpu, offload=False, engine_steps_in_backward=False) == "inline"
    assert choose_schedule(cpu, offload=True, engine_steps_in_backward=False) == "worker"
    assert choose_schedule(cpu, offload=True, engine_steps_in_backward=True) == "inline"  # DeepSpeed
    split = LocalLayout(
        [("a", torch.nn.Parameter(torch.ones(2))), ("b", torch.nn.Parameter(torch.ones(2, device="meta")))]
    )
    assert choose_schedule(split, offload=True, engine_steps_in_backward=False) == "inline"  # a device_map model


# ----------------------------------------------------------------------------------- real trainers
AVERAGERS = [
    {"name": "bema", "method": "bema", "update_every": 1, "update_after": 1, "lag": 3.0, "bias_power": 0.3},
    {"name": "ema", "method": "ema", "decay": 0.8},
    {"name": "dema", "method": "dema", "update_every": 2, "lag": 2.0},
    {"name": "ouema", "method": "ouema", "update_every": 1, "lag": 2.0},
]


def averaging_run(tmp_path, offload: bool, peft: str | None = "lora"):
    callback = WeightAveragingCallback(averagers=AVERAGERS, offload=offload)
    recorder = WeightRecorder()
    trainer = sft_trainer(
        str(tmp_path), [callback, recorder], peft=peft, max_steps=6, eval_strategy="steps", eval_steps=3,
        save_strategy="steps", save_steps=4,
    )  # fmt: skip
    attach(trainer)
    trainer.train()
    return trainer, callback, recorder


@pytest.mark.parametrize("peft", ["lora", None])
def test_offloaded_worker_run_equals_the_inline_run_bit_for_bit(tmp_path, peft):
    """offload=True runs every update in a background thread; evaluation, checkpoints, the export and the
    averages are those of the inline run, bit for bit."""
    inline_trainer, inline, inline_rec = averaging_run(tmp_path / "inline", offload=False, peft=peft)
    worker_trainer, worker, worker_rec = averaging_run(tmp_path / "worker", offload=True, peft=peft)
    assert inline.runner.schedule == "inline" and worker.runner.schedule == "worker"
    assert worker.runner.updates_run == 7  # steps 0-6 each start or update an average, in the worker thread
    assert worker.runner.worker_threads and threading.main_thread().name not in worker.runner.worker_threads
    assert all(b.device.type == "cpu" for w in worker.weights.values() for b in w.averager.buffers.values())
    for step, weights in inline_rec.weights.items():  # training itself is unchanged
        assert all(torch.equal(weights[n], worker_rec.weights[step][n]) for n in weights), step
    for name in inline.weights:
        a, b = inline.averaged_tensors(name), worker.averaged_tensors(name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    logs = lambda trainer: [  # noqa: E731
        {k: v for k, v in entry.items() if k.startswith("eval_") and k.endswith("_loss")}
        for entry in trainer.state.log_history
        if any(k.startswith("eval_") for k in entry)
    ]
    assert logs(inline_trainer) == logs(worker_trainer) and any("eval_bema_loss" in e for e in logs(inline_trainer))
    for folder in ["checkpoint-4/averaged", "checkpoint-4/averaged-ouema", "averaged", "averaged-dema"]:
        a = load_file(str(tmp_path / "inline" / folder / "averager_state.safetensors"))
        b = load_file(str(tmp_path / "worker" / folder / "averager_state.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


def test_offloaded_teacher_and_dpo_reference_equal_the_inline_ones(tmp_path, tokenizer, sft_data, dpo_data):
    """The self-distillation teacher and the DPO reference read the averages after the worker's update."""
    finals = {}
    for offload in (False, True):
        averaging = WeightAveragingCallback(method="bema", update_every=1, offload=offload, eval=False)
        distill = SelfDistillationCallback(lambda_=0.5, temperature=2.0)
        trainer = sft_trainer(str(tmp_path / f"sft{offload}"), [averaging, distill], max_steps=5)
        attach(trainer)
        trainer.train()
        finals[("sft", offload)] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        assert distill.teacher_forwards > 0
        reference = AveragedReferenceCallback(method="bema", update_every=1, ref_update_every=2, offload=offload)
        args = cpu_training_args(
            str(tmp_path / f"dpo{offload}"), DPOConfig, max_steps=5, per_device_train_batch_size=4,
            learning_rate=1e-2, max_length=64, gradient_checkpointing=False, seed=0,
        )  # fmt: skip
        base = tiny_llama(tokenizer, seed=0)
        torch.manual_seed(1)
        policy = get_peft_model(base, lora_config())
        dpo = DPOTrainer(
            model=policy, args=args, train_dataset=dpo_data[0], processing_class=tokenizer, callbacks=[reference]
        )
        attach(dpo)
        dpo.train()
        assert reference.weights.runner.schedule == ("worker" if offload else "inline")
        finals[("dpo", offload)] = reference.reference_tensors()
    for what in ("sft", "dpo"):
        a, b = finals[(what, False)], finals[(what, True)]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), what


def test_a_flat_adapter_trains_exactly_like_separate_tensors(tmp_path):
    """The callback lays the LoRA adapter out in one flat buffer; training, checkpoints and resume are unchanged."""
    plain = WeightRecorder()
    sft_trainer(str(tmp_path / "plain"), [plain], max_steps=5, save_strategy="steps", save_steps=3).train()
    recorder = WeightRecorder()
    callback = WeightAveragingCallback(method="ema", decay=0.8, eval=False)
    trainer = sft_trainer(
        str(tmp_path / "flat"), [callback, recorder], max_steps=5, save_strategy="steps", save_steps=3
    )
    trainer.train()
    assert callback.primary.layout.flat is not None and callback.runner.reader.mode == "flat"
    for step, weights in plain.weights.items():
        assert all(torch.equal(weights[n], recorder.weights[step][n]) for n in weights), step
    for run in ("plain", "flat"):  # the saved adapters hold the live weights of step 3
        saved = load_file(str(tmp_path / run / "checkpoint-3" / "adapter_model.safetensors"))
        assert len(saved) == len(plain.weights[3])
    a = load_file(str(tmp_path / "plain" / "checkpoint-3" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "flat" / "checkpoint-3" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- CUDA
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (side stream, pinned copies)"
)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("schedule", ["stream", "worker"])
def test_cuda_schedules_equal_the_inline_update_bit_for_bit(dtype, schedule):
    """The side stream (and the offload worker fed by pinned asynchronous copies) read θ_t after the optimizer
    step and before the next one writes θ, while the training stream keeps writing the weights."""
    g = torch.Generator().manual_seed(0)
    shapes = [(4096, 16), (16, 4096), (333,), (16, 1024)] * 8
    steps = [[torch.randn(s, generator=g).to("cuda", dtype) for s in shapes] for _ in range(12)]
    results = {}
    for mode in ("inline", schedule):
        params = [torch.nn.Parameter(x.clone()) for x in steps[0]]
        layout = LocalLayout([(f"p{i}", p) for i, p in enumerate(params)])
        # the worker is compared with the synchronous offload (the update on the CPU), the stream with the GPU's
        device = torch.device("cpu") if schedule == "worker" else params[0].device
        runner = WorkerRunner(HostSnapshot(layout)) if mode == "worker" else (
            StreamRunner(LiveWeights(layout, device), device) if mode == "stream" else UpdateRunner(LiveWeights(layout, device))
        )  # fmt: skip
        weights = [
            AveragedWeights(AveragerSpec(**SPECS[n]), layout, device, runner=runner) for n in ("bema", "ema", "ouema")
        ]
        for t, values in enumerate(steps):
            runner.before_weights_change()  # as on_pre_optimizer_step
            with torch.no_grad():
                for p, v in zip(params, values, strict=True):
                    p.mul_(0.5).add_(v)  # the "optimizer step" on the training stream
            step_together(weights, t)
            torch.cuda._sleep(1_000_000)  # a long "forward" on the training stream while the update runs
        results[mode] = [torch.cat([x.cpu() for x in w.average_local(len(steps) - 1)]) for w in weights]
        runner.close()
    assert all(torch.equal(a, b) for a, b in zip(results["inline"], results[schedule], strict=True))


@needs_cuda
def test_cuda_trainer_run_on_the_side_stream_matches_the_float32_oracle(tmp_path):
    """A real SFT run on the GPU uses the side stream; its averages equal the float32 oracle of the recorded
    weights bit for bit."""
    recorder = WeightRecorder()
    specs = [{"name": "bema", **SPECS["bema"]}, {"name": "ema", **SPECS["ema"]}]
    callback = WeightAveragingCallback(averagers=specs, eval=False, export_at_end=False)
    trainer = sft_trainer(str(tmp_path), [callback, recorder], max_steps=6, use_cpu=False)
    trainer.train()
    assert callback.runner.schedule == "stream"
    for spec in specs:
        got = callback.averaged_tensors(spec["name"])
        expected = oracles.averaged(recorder.weights, spec, dtype=torch.float32)
        assert all(torch.equal(got[n], expected[n]) for n in expected), spec["name"]
