"""Post-hoc EMA through a real TRL run: PostHocEMACallback on SFTTrainer + LoRA, the snapshots it writes against
the float64 oracles of the recorded trajectory, the offline replay, resume, the sweep and ``ema-export``.

Every run: the tiny Llama (saved, so that its adapter names a base model), LoRA r=4 on all linear layers, 10 steps
at lr 2e-2, σ_rel 0.05 and 0.10, averaging from step 1 (``update_after=1``), a snapshot every 2 steps (3, 5, 7, 9)
and at the last step (10), checkpoints at steps 4 and 8.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import oracles
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback
from trl_helpers import WeightRecorder, sft_trainer

from trl_ema_plugin import PostHocEMACallback, PostHocEMAConfig
from trl_ema_plugin.cli.export import main
from trl_ema_plugin.config.flat_keys import POSTHOC_EMA, flat_from_config, posthoc_ema_config_from_flat
from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset
from trl_ema_plugin.posthoc import (
    list_snapshots,
    plan_synthesis,
    read_theta0,
    replay,
    sweep,
    synthesize,
    synthesize_bema,
)
from trl_ema_plugin.posthoc.evaluation import TokenLoss
from trl_ema_plugin.posthoc.snapshots import snapshot_path

SIGMA_RELS = [0.05, 0.10]
SETTINGS = {"sigma_rels": SIGMA_RELS, "every": 2, "update_after": 1}
MAX_STEPS, SNAPSHOTS = 10, [3, 5, 7, 9, 10]
#: float rounding of the synthesis: fp32 snapshots summed in float64 with weights that sum to 1
ROUNDING = {"rtol": 1e-6, "atol": 1e-7}


def train(output_dir: Path, base: Path, callbacks: list, resume: str | None = None, **overrides) -> object:
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)  # LoRA's initialisation: the same in every run (trl 1.9 wraps the model before seeding)
    values = {"max_steps": MAX_STEPS, "save_strategy": "steps", "save_steps": 4, **overrides}
    trainer = sft_trainer(str(output_dir), callbacks, model=model, **values)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("base")
    tiny_llama(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, base) -> dict:
    """The uninterrupted run: its output_dir and its trajectory θ_0..θ_10."""
    out = tmp_path_factory.mktemp("run") / "out"
    recorder = WeightRecorder()
    train(out, base, [recorder, PostHocEMACallback(**SETTINGS)])
    return {"out": out, "trajectory": recorder.weights}


def tensors_of(path: Path, buffer: str) -> dict[str, torch.Tensor]:
    prefix = f"{buffer}/"
    return {k[len(prefix) :]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}


def profile(sigma_rel: float) -> str:
    return f"sigma_rel_{sigma_rel!r}"


# --------------------------------------------------------------------------- the snapshots
def test_snapshots_hold_the_power_emas_and_weights_of_the_run(run):
    out, trajectory = run["out"], run["trajectory"]
    snapshots = list_snapshots(out)
    assert [s.global_step for s in snapshots] == SNAPSHOTS
    assert [s.t for s in snapshots] == [step - 1 for step in SNAPSHOTS]  # t counts from update_after
    assert {p.sigma_rel for p in snapshots[0].profiles} == set(SIGMA_RELS)
    theta0 = read_theta0(out)
    assert theta0.global_step == 1
    for name, value in tensors_of(theta0.path, "theta").items():
        assert torch.equal(value, trajectory[1][name]), name
    for snapshot in snapshots:
        step = snapshot.global_step
        for name, value in tensors_of(snapshot.path, "theta").items():
            assert torch.equal(value, trajectory[step][name]), f"θ at {step}: {name}"
        for sigma_rel in SIGMA_RELS:
            stored = tensors_of(snapshot.path, profile(sigma_rel))
            hand = oracles.power_ema(trajectory, sigma_rel=sigma_rel, update_after=1, at=step)
            assert set(stored) == set(hand)
            for name in hand:
                torch.testing.assert_close(stored[name].double(), hand[name], **ROUNDING)
    raw_gap = max(float((trajectory[10][n].double() - hand[n]).abs().max()) for n in hand)
    assert raw_gap > 1e-3  # the EMA really differs from the raw weights


def test_a_tracked_sigma_rel_reproduces_its_ema(run):
    for step in (5, 10):
        for sigma_rel in SIGMA_RELS:
            got = synthesize(run["out"], sigma_rel, step)
            hand = oracles.power_ema(run["trajectory"], sigma_rel=sigma_rel, update_after=1, at=step)
            for name in hand:
                torch.testing.assert_close(got[name].double(), hand[name], **ROUNDING)


def test_an_untracked_sigma_rel_matches_the_float64_hand_solve(run):
    out, step, target = run["out"], 9, 0.075
    inputs = [(s.global_step, s.t, p) for s in list_snapshots(out) if s.global_step <= step for p in SIGMA_RELS]
    x = oracles.posthoc_weights([(t, p) for _, t, p in inputs], step - 1, target)
    plan = plan_synthesis(out, target, step)
    assert [(i.snapshot.global_step, i.profile.sigma_rel) for i in plan.inputs] == [(g, p) for g, _, p in inputs]
    np.testing.assert_allclose([i.weight for i in plan.inputs], x, rtol=1e-9, atol=1e-12)
    got = synthesize(out, target, step)
    for name in got:
        hand = sum(
            xi * tensors_of(snapshot_path(out / "posthoc", g), profile(p))[name].double()
            for xi, (g, _, p) in zip(x, inputs, strict=True)
        )
        torch.testing.assert_close(got[name].double(), hand, **ROUNDING)


def test_posthoc_bema_of_the_run(run):
    out, trajectory = run["out"], run["trajectory"]
    ema = synthesize(out, 0.075)
    got = synthesize_bema(out, 0.075, alpha=0.4)
    for name in ema:
        hand = ema[name].double() + 0.4 * (trajectory[10][name].double() - trajectory[1][name].double())
        torch.testing.assert_close(got[name].double(), hand, **ROUNDING)


def assert_same_snapshot_files(folder: Path, expected: Path) -> None:
    """The same θ_0 and snapshot files in both folders, with equal headers and bit-for-bit equal tensors."""
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")
    assert names == sorted(p.name for p in expected.iterdir() if p.suffix == ".safetensors")
    for name in names:
        with safe_open(str(expected / name), "pt") as a, safe_open(str(folder / name), "pt") as b:
            assert a.metadata() == b.metadata(), name
            assert set(a.keys()) == set(b.keys())
            for key in a.keys():  # noqa: SIM118
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), f"{name}: {key}"


def test_replaying_the_recorded_trajectory_writes_the_same_files(run, tmp_path):
    """The online recorder and the offline replay of θ_0..θ_T share one code path: identical files."""
    trajectory = run["trajectory"]
    replay(((t, trajectory[t]) for t in sorted(trajectory)), PostHocEMAConfig(**SETTINGS), tmp_path, every=2)
    assert_same_snapshot_files(tmp_path, run["out"] / "posthoc")


def test_offloaded_emas_update_in_the_worker_and_write_the_same_files(run, base, tmp_path):
    """offload=True: the EMAs live in CPU memory and update in the offload worker thread, both in one job per step
    (one runner: θ_t is read once for both); snapshots and checkpoints wait for it and equal the inline run's."""
    callback = PostHocEMACallback(**SETTINGS, offload=True)
    train(tmp_path / "out", base, [callback])
    runner = callback.recorder.runner
    assert runner.schedule == "worker" and all(w.runner is runner for w in callback.recorder.weights.values())
    assert runner.updates_run == MAX_STEPS  # the start at step 1 and the updates at steps 2..10
    assert runner.worker_threads and threading.main_thread().name not in runner.worker_threads
    assert_same_snapshot_files(tmp_path / "out" / "posthoc", run["out"] / "posthoc")
    for step in (4, 8):
        folder = f"checkpoint-{step}/posthoc_ema/averager_state.safetensors"
        a, b = load_file(str(run["out"] / folder)), load_file(str(tmp_path / "out" / folder))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


def test_checkpoints_hold_the_emas_and_the_folder_describes_the_adapter(run):
    out = run["out"]
    for step in (4, 8):
        state = json.loads((out / f"checkpoint-{step}" / "posthoc_ema" / "averager_state.json").read_text())
        assert state["global_step"] == step and state["sigma_rels"] == SIGMA_RELS
    description = json.loads((out / "posthoc" / "model.json").read_text())
    assert description["format"] == "peft" and description["adapter_name"] == "default"
    some = next(iter(description["keys"]))
    assert description["keys"][some] == some.replace(".default.", ".")  # PEFT's saved key


# ------------------------------------------------------------------------------ resume
class StopAt(TrainerCallback):
    """Ends training after step ``step``, as a crash would (the last checkpoint is older)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_writes_the_snapshots_of_the_uninterrupted_run(run, base, tmp_path):
    out = tmp_path / "out"
    train(out, base, [StopAt(6), PostHocEMACallback(**SETTINGS)])
    folder = out / "posthoc"
    assert [s.global_step for s in list_snapshots(out)] == [3, 5, 6]  # 6: the last step of the stopped run
    leftover = folder / ".snapshot-00000007.safetensors.tmp-deadbeef"
    leftover.write_bytes(b"partial")  # a write the crash interrupted
    expected = "moved 2 post-hoc EMA file(s) that do not belong to this run's trajectory (written after step 4"
    with pytest.warns(UserWarning, match=re.escape(expected)):
        train(out, base, [PostHocEMACallback(**SETTINGS)], resume=str(out / "checkpoint-4"))
    assert not leftover.exists()
    aside = [p for p in folder.iterdir() if p.is_dir()]
    assert len(aside) == 1 and aside[0].name.startswith("abandoned-step4-")
    assert sorted(p.name for p in aside[0].iterdir()) == [
        "snapshot-00000005.safetensors",
        "snapshot-00000006.safetensors",
    ]
    assert [s.global_step for s in list_snapshots(out)] == SNAPSHOTS
    for step in SNAPSHOTS:
        resumed, uninterrupted = (
            load_file(str(snapshot_path(folder, step))),
            load_file(str(snapshot_path(run["out"] / "posthoc", step))),
        )
        assert set(resumed) == set(uninterrupted)
        for key, value in uninterrupted.items():
            assert torch.equal(resumed[key], value), f"step {step}: {key}"


def test_resume_refuses_other_sigma_rels(run, base, tmp_path):
    checkpoint = tmp_path / "checkpoint-8"
    shutil.copytree(run["out"] / "checkpoint-8", checkpoint)
    callback = PostHocEMACallback(sigma_rels=[0.05, 0.2], every=2, update_after=1)
    message = (
        f"{checkpoint / 'posthoc_ema'} holds the post-hoc EMAs of sigma_rels=[0.05, 0.1], but this run asks for "
        "sigma_rels=[0.05, 0.2]"
    )
    from trl_ema_plugin import attach

    model = AutoModelForCausalLM.from_pretrained(base)
    trainer = attach(sft_trainer(str(tmp_path / "out"), [callback], model=model, max_steps=MAX_STEPS))
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_a_new_run_moves_an_earlier_runs_snapshots_aside(run, tmp_path):
    trajectory = run["trajectory"]
    steps = [(t, trajectory[t]) for t in sorted(trajectory)]
    replay(steps, PostHocEMAConfig(**SETTINGS), tmp_path, every=2)
    replay(steps[:6], PostHocEMAConfig(sigma_rels=SIGMA_RELS, every=2, update_after=2), tmp_path, every=2)
    assert [(s.global_step, s.started_at) for s in list_snapshots(tmp_path)] == [(4, 2), (5, 2)]
    assert read_theta0(tmp_path).started_at == 2
    (aside,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(list(aside.iterdir())) == len(SNAPSHOTS) + 1  # the earlier run's snapshots and θ_0


# ------------------------------------------------------------------------------- sweep
def eval_rows(path: Path) -> Path:
    rows = [{"text": row["text"]} for row in tiny_sft_dataset(8, seed=1)]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def independent_loss(adapter: Path, base: Path, tokenizer, rows_file: Path) -> float:
    """Mean token NLL through HF's own loss on one batch of every row (the exported adapter on the base model)."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    texts = [json.loads(line)["text"] for line in rows_file.read_text().splitlines()]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(model(**batch, labels=labels).loss)


def test_the_sweep_picks_the_best_sigma_rel_on_a_tiny_eval_set(run, base, tokenizer, tmp_path, capsys):
    rows = eval_rows(tmp_path / "eval.jsonl")
    grid = [0.02, 0.05, 0.1, 0.2]
    assert (
        main(
            [
                str(run["out"]),
                "--posthoc-sweep",
                *map(str, grid),
                "--eval-data",
                str(rows),
                "-o",
                str(tmp_path / "best"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    losses = {}
    for sigma_rel in grid:  # each candidate exported and evaluated independently
        folder = tmp_path / f"s{sigma_rel}"
        assert main([str(run["out"]), "--posthoc-sigma-rel", str(sigma_rel), "-o", str(folder)]) == 0
        losses[sigma_rel] = independent_loss(folder, base, tokenizer, rows)
    best = min(losses, key=losses.get)
    assert len({round(v, 6) for v in losses.values()}) == len(grid)  # the candidates really differ
    table = dict(line.split("\t")[:2] for line in printed.splitlines() if re.match(r"^(0\.\d+|raw)\t", line))
    assert set(table) == {f"{s:g}" for s in grid} | {"raw"}
    for sigma_rel, loss in losses.items():
        assert float(table[f"{sigma_rel:g}"]) == pytest.approx(loss, rel=1e-5), (sigma_rel, printed)
    assert f"best sigma_rel {best:g}" in printed
    assert filecmp_equal(
        tmp_path / "best" / "adapter_model.safetensors", tmp_path / f"s{best}" / "adapter_model.safetensors"
    )
    # the Python API on the same data: the same losses, and the raw weights as the baseline
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "best"))
    result = sweep(
        run["out"], grid, TokenLoss(model, tokenizer, [json.loads(x) for x in rows.read_text().splitlines()])
    )
    assert result.best.sigma_rel == best
    for point in result.points:
        assert point.loss == pytest.approx(losses[point.sigma_rel], rel=1e-5)
    assert result.raw is not None and result.raw.loss not in losses.values()


def filecmp_equal(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


# -------------------------------------------------------------------------------- export
def test_export_writes_a_loadable_adapter_of_the_synthesized_weights(run, base, tmp_path, capsys):
    out = run["out"]
    assert main([str(out), "--posthoc-sigma-rel", "0.075", "-o", str(tmp_path / "ema")]) == 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "ema"))
    params = dict(model.named_parameters())
    expected = synthesize(out, 0.075)
    for name, value in expected.items():
        assert torch.equal(params[name].detach(), value), name
    assert (
        main([str(out), "--posthoc-sigma-rel", "0.075", "--posthoc-bema-alpha", "0.3", "-o", str(tmp_path / "bema")])
        == 0
    )
    written = load_file(str(tmp_path / "bema" / "adapter_model.safetensors"))
    for name, value in synthesize_bema(out, 0.075, 0.3).items():
        assert torch.equal(written[name.replace(".default.", ".")], value), name
    assert (
        main(
            [str(out), "--posthoc-sigma-rel", "0.075", "--posthoc-step", "5", "--merge", "-o", str(tmp_path / "merged")]
        )
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    at5 = tmp_path / "at5"
    assert main([str(out), "--posthoc-sigma-rel", "0.075", "--posthoc-step", "5", "-o", str(at5)]) == 0
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(at5)).eval()
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, rtol=1e-4, atol=1e-5)


def test_list_shows_the_snapshots_and_the_plan(run, capsys):
    assert main([str(run["out"]), "--list", "--posthoc-sigma-rel", "0.075"]) == 0
    printed = capsys.readouterr().out
    assert f"{run['out']}: no averaged weights" in printed  # no WeightAveragingCallback in this run
    assert "post-hoc EMA snapshots in" in printed and "5, averaging from step 1, sigma_rel 0.05 (γ=16.97)" in printed
    plan = plan_synthesis(run["out"], 0.075)
    assert f"residual {plan.residual:.3e}, sum x before normalising {plan.mass:.6f}" in printed
    assert printed.count("\t+") + printed.count("\t-") >= len(plan.inputs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--posthoc-sigma-rel", "0.5"],
            "--posthoc-sigma-rel=0.5 is out of range; allowed values: 0 < --posthoc-sigma-rel ≤ 0.2887",
        ),
        (
            ["--posthoc-sigma-rel", "0.07", "--posthoc-step", "4"],
            "step=4 is not a snapshot step of {posthoc}; allowed values: 3, 5, 7, 9, 10",
        ),
        (["--posthoc-sigma-rel", "0.07", "--posthoc-bema-alpha", "2"], "--posthoc-bema-alpha=2.0 is out of range"),
        (["--posthoc-sweep", "0.05", "--eval-data", "{missing}"], "{missing} is not a file"),
        (["--posthoc-sweep", "0.05", "--eval-data", "{bad}"], "{bad}:2: not JSON"),
    ],
    ids=["sigma_rel", "step", "alpha", "no eval file", "bad eval line"],
)
def test_cli_errors_name_the_option_or_the_path(run, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    paths = {"posthoc": run["out"] / "posthoc", "missing": tmp_path / "missing.jsonl", "bad": bad}
    args = [a.format(**paths) for a in args]
    assert main([str(run["out"]), *args, "-o", str(tmp_path / "x")]) == 2
    assert message.format(**paths) in capsys.readouterr().err


def test_cli_errors_name_the_broken_file(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run["out"] / "posthoc", copy / "posthoc")
    assert main([str(tmp_path), "--posthoc-sigma-rel", "0.07", "-o", str(tmp_path / "x")]) == 2
    assert f"{tmp_path} holds no snapshot-<step>.safetensors" in capsys.readouterr().err
    target = snapshot_path(copy / "posthoc", 7)
    target.write_bytes(target.read_bytes()[:100])
    assert main([str(copy), "--posthoc-sigma-rel", "0.07", "-o", str(tmp_path / "x")]) == 2
    assert f"{target}: not a complete safetensors file" in capsys.readouterr().err
    shutil.rmtree(copy / "posthoc")
    shutil.copytree(run["out"] / "posthoc", copy / "posthoc")
    (copy / "posthoc" / "model.json").unlink()
    assert main([str(copy), "--posthoc-sigma-rel", "0.07", "-o", str(tmp_path / "y")]) == 2
    assert f"{copy / 'posthoc' / 'model.json'} does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------ settings
def test_yaml_keys_and_python_arguments_build_the_same_recorder():
    cfg = {
        "posthoc_ema": True,
        "posthoc_ema_sigma_rels": [0.05, 0.1],
        "posthoc_ema_every": 2,
        "posthoc_ema_update_after": 1,
    }
    config = posthoc_ema_config_from_flat(cfg)
    assert PostHocEMACallback(config=config).config == PostHocEMACallback(**SETTINGS).config
    assert flat_from_config(POSTHOC_EMA, config) == cfg
    assert posthoc_ema_config_from_flat({"posthoc_ema": False}) is None
    assert PostHocEMAConfig().snapshot_every(240) == 12 and PostHocEMAConfig(update_after=40).snapshot_every(240) == 10
    assert PostHocEMAConfig().snapshot_every(5) == 1


def test_power_ema_is_a_registered_averager_of_the_weight_averaging_callback(base, tmp_path):
    """``method="power_ema"`` in WeightAveragingCallback: the online EMA of one σ_rel, exported as averaged/."""
    from trl_ema_plugin import WeightAveragingCallback

    recorder = WeightRecorder()
    averaging = WeightAveragingCallback(method="power_ema", sigma_rel=0.1, update_after=1)
    assert averaging.config.primary.cadence == 1
    train(tmp_path, base, [recorder, averaging], max_steps=6, save_strategy="no")
    written = load_file(str(tmp_path / "averaged" / "adapter_model.safetensors"))
    hand = oracles.power_ema(recorder.weights, sigma_rel=0.1, update_after=1)
    for name, value in hand.items():
        torch.testing.assert_close(written[name.replace(".default.", ".")].double(), value, **ROUNDING)


def test_axolotl_ema_export_command_synthesizes_too(run, tmp_path):
    import click
    import yaml
    from click.testing import CliRunner

    from trl_ema_plugin.cli.axolotl_command import ema_export

    assert isinstance(ema_export, click.Command)
    shutil.copytree(run["out"] / "posthoc", tmp_path / "run" / "posthoc")
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run")}))
    result = CliRunner().invoke(ema_export, [str(cfg), "--posthoc-sigma-rel", "0.075", "--posthoc-step", "9"])
    assert result.exit_code == 0, result.output
    written = load_file(str(tmp_path / "run" / "ema-posthoc" / "adapter_model.safetensors"))
    for name, value in synthesize(run["out"], 0.075, 9).items():
        assert torch.equal(written[name.replace(".default.", ".")], value), name
    result = CliRunner().invoke(ema_export, [str(cfg), "--posthoc-sigma-rel", "0.5", "--output", str(tmp_path / "x")])
    assert result.exit_code == 1 and "--posthoc-sigma-rel=0.5 is out of range" in result.output
