"""The offline BEMA study (experiments/trajectory.py, offline.py, bema_sweep.py) on the tiny model, in seconds.

The study records θ_t of a real SFT run once and averages it offline; these tests check that the
offline averages are bit-identical to those the online ``WeightAveragingCallback`` holds in the
same run, and that the offline eval loss is the trainer's ``eval_loss`` on completion tokens.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tempfile

import pytest
import torch
from packaging.version import Version
from transformers import TrainerCallback

from experiments.offline import RAW, CompletionLoss, ResultCache, evaluate_run, replay
from experiments.runner import PRESETS, load_model, sft_data, with_lora
from experiments.trajectory import STEP_FILE, RecordedRun, Trajectory, is_recorded, record
from trl_ema_plugin import WeightAveragingCallback

STEPS = 7
#: every averager and cadence the study uses: sparse updates (keep_last_weights), a β floor, γ ≠ 1
SETTINGS = {
    "ema_0.9": {"method": "ema", "decay": 0.9},
    "bema_trl": {"method": "bema", "update_every": 1},
    "bema_eta0.5": {"method": "bema", "update_every": 1, "bias_power": 0.5, "lag": 1},
    "bema_u3": {"method": "bema", "update_every": 3, "multiplier": 1 / 3, "min_ema_multiplier": 0.2},
    "dema": {"method": "dema", "update_every": 1},
    "ouema": {"method": "ouema", "update_every": 2},
}


class OnlineProbe(TrainerCallback):
    """After the averaging callback: the averaged tensors of every averager at every step."""

    def __init__(self, averaging: WeightAveragingCallback) -> None:
        self.averaging = averaging
        self.seen: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def _grab(self, step: int) -> None:
        for name in self.averaging.weights:
            tensors = self.averaging.averaged_tensors(name, step)
            self.seen[(name, step)] = {k: v.clone() for k, v in tensors.items()}

    def on_train_begin(self, args, state, control, **kwargs):
        self._grab(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self._grab(state.global_step)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("trajectories")
    run = RecordedRun(seed=3, steps=STEPS, n_train=16, scale_name="tiny")
    averaging = WeightAveragingCallback(
        averagers=[{"name": n, **s} for n, s in SETTINGS.items()], eval=False, export_at_end=False,
        save_checkpoints=False,
    )  # fmt: skip
    probe = OnlineProbe(averaging)
    folder = record(run, root, callbacks=[averaging, probe])
    return run, root, Trajectory(folder), probe


def test_recording_holds_every_step_and_finishes(recorded):
    run, root, trajectory, _ = recorded
    assert is_recorded(root, run)
    assert sorted(p.name for p in trajectory.folder.glob("step_*.safetensors")) == [
        STEP_FILE.format(t) for t in range(STEPS + 1)
    ]
    first, last = trajectory.theta(0), trajectory.theta(STEPS)
    assert list(first) and set(first) == set(trajectory.names)
    assert all(first[n].dtype == torch.float32 for n in first)
    assert any(not torch.equal(first[n], last[n]) for n in first)  # training moved the adapter
    assert len(trajectory.done["cpu_step_seconds"]) == STEPS
    assert trajectory.done["learning_rate"][-1][1] < trajectory.done["learning_rate"][0][1]  # linear decay


def test_offline_replay_is_bit_identical_to_the_online_callback(recorded):
    _, _, trajectory, probe = recorded
    wanted = {name: set(range(STEPS + 1)) for name in SETTINGS}
    compared = 0
    for step, name, tensors in replay(trajectory, SETTINGS, wanted):
        online = probe.seen[(name, step)]
        assert set(online) == set(tensors)
        for key in tensors:
            assert torch.equal(online[key], tensors[key]), (name, step, key)
        compared += 1
    assert compared == len(SETTINGS) * (STEPS + 1)
    final = {name: probe.seen[(name, STEPS)] for name in SETTINGS}
    key = next(k for k in trajectory.names if "lora_B" in k)
    assert not torch.equal(final["bema_trl"][key], final["bema_eta0.5"][key])  # the settings do differ


@pytest.mark.skipif(
    Version(importlib.metadata.version("trl")) < Version("1.16"),
    reason="the study runs on the latest stack; TRL 1.9's SFTTrainer eval_loss is 5e-4 (relative) off this mean",
)
def test_completion_loss_is_the_trainers_eval_loss(recorded):
    from trl import SFTConfig, SFTTrainer

    run, _, trajectory, _ = recorded
    scale = PRESETS["tiny"]
    base, tokenizer = load_model(scale, run.seed)
    model = with_lora(base, scale, run.seed)
    rows = sft_data(tokenizer, scale, "eval", 6, seed=run.seed)
    loss = CompletionLoss(model, tokenizer, rows, scale, batch_size=4)
    result = loss(trajectory.theta(STEPS))
    per_row = [n / c for n, c in zip(result["row_nll"], result["row_tokens"], strict=True)]
    with tempfile.TemporaryDirectory() as work:
        args = SFTConfig(
            output_dir=work, per_device_eval_batch_size=1, max_length=scale.max_length, use_cpu=True, report_to=[],
            disable_tqdm=True, save_strategy="no", prediction_loss_only=True,
        )  # fmt: skip
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows, processing_class=tokenizer)
        expected = trainer.evaluate()["eval_loss"]  # batch 1: the mean over rows of each row's mean token loss
    assert sum(per_row) / len(per_row) == pytest.approx(expected, rel=1e-5)
    assert result["loss"] == pytest.approx(sum(result["row_nll"]) / sum(result["row_tokens"]))
    unbatched = CompletionLoss(model, tokenizer, rows, scale, batch_size=1)(trajectory.theta(STEPS))
    assert unbatched["row_nll"] == pytest.approx(result["row_nll"], rel=1e-4)  # padding: only float rounding
    assert unbatched["loss"] != pytest.approx(loss(trajectory.theta(0))["loss"], rel=1e-3)  # weights were loaded


def test_results_are_cached_and_resumed(recorded, tmp_path):
    run, _, trajectory, _ = recorded
    scale = PRESETS["tiny"]
    base, tokenizer = load_model(scale, run.seed)
    model = with_lora(base, scale, run.seed)
    loss = CompletionLoss(model, tokenizer, sft_data(tokenizer, scale, "eval", 4, seed=run.seed), scale)
    floor = {**SETTINGS["bema_trl"], "min_ema_multiplier": 0.01}  # never binds in 7 steps: β_t ≥ 17^-0.5
    settings = {RAW: {}, "bema_trl": SETTINGS["bema_trl"], "bema_floor": floor}
    steps = {name: {0, 3, STEPS} for name in settings}
    cache = ResultCache(tmp_path / "r.json", {"run": trajectory.run_id, "n_eval": 4})
    assert evaluate_run(trajectory, settings, steps, cache, loss) == 5  # step 0 once: every average is θ_0 there
    assert cache.get("bema_floor", STEPS)["same_weights_as"] == "bema_trl"
    assert cache.get("bema_floor", STEPS)["loss"] == cache.get("bema_trl", STEPS)["loss"]
    assert cache.get("bema_trl", STEPS)["loss"] != cache.get(RAW, STEPS)["loss"]
    again = ResultCache(tmp_path / "r.json", {"run": trajectory.run_id, "n_eval": 4})
    assert again.get("bema_trl", STEPS)["loss"] == cache.get("bema_trl", STEPS)["loss"]
    assert evaluate_run(trajectory, settings, steps, again, loss) == 0
    with pytest.raises(ValueError, match=r"setting 'bema_trl' .* rename it"):
        evaluate_run(trajectory, {"bema_trl": {"method": "bema", "update_every": 2}}, steps, again, loss)
    with pytest.raises(ValueError, match="another context"):
        ResultCache(tmp_path / "r.json", {"run": trajectory.run_id, "n_eval": 8})


def test_tuning_stage_runs_and_reports_end_to_end(tmp_path):
    from experiments.bema_report import choose, drift_ratio, load_stage, marker, tuning_rows
    from experiments.bema_sweep import Stage, run_stage, tuning_settings, write_report

    runs = tuple(RecordedRun(seed, steps, n_train=16, scale_name="tiny") for steps in (5, 10) for seed in (1, 2))
    stage = Stage("tuning", runs, n_eval=4)
    run_stage(stage, tmp_path / "data", wait=False)
    results = load_stage(stage, tmp_path / "data")
    assert sorted(results.loss) == [(5, 1), (5, 2), (10, 1), (10, 2)]
    assert set(results.loss[(10, 1)]) == set(tuning_settings(10))
    assert set(results.loss[(10, 1)]["bema_trl"]) == {2, 5, 10}  # step 0 is raw@0 for every setting
    rows = {r["name"]: r for r in tuning_rows(results, stage)}
    assert rows["ema_0.9"]["eligible"] is False  # a reference is never a candidate
    chosen, why = choose(list(rows.values()), results.settings[10])
    assert (chosen is None or chosen.startswith("bema")) and why
    docs = tmp_path / "docs"
    docs.mkdir()
    begin, end = marker("tuning")
    (docs / "evidence.md").write_text(f"# page\n{begin}\nold\n{end}\ntail\n")
    if importlib.util.find_spec("matplotlib") is None:  # the Axolotl stack installs no [experiments] extra
        with pytest.raises(ImportError, match=r"plots need matplotlib: pip install matplotlib"):
            write_report(stage, tmp_path / "data", docs)
    else:
        written = write_report(stage, tmp_path / "data", docs)
        assert (docs / "evidence_bema_tuning.png").read_bytes()[:4] == b"\x89PNG" and docs / "bema_tuning.md" in written
    page = (docs / "evidence.md").read_text()
    assert "old" not in page and "| `bema_trl` |" in page and page.endswith(f"{end}\ntail\n")
    # the drift model: TRL's η = 0.2 extrapolates past θ_T, η = κ = 0.5 stays near it, an EMA lags
    ratio = drift_ratio(tuning_settings(240), 240, [120, 240], decay=False)
    assert ratio["bema_trl"][240] > 1.2 and abs(ratio["bema_eta0.5"][240] - 1) < 0.01 and ratio["ema_0.98"][240] < 0.85
