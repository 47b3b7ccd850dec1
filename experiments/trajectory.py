"""Record a LoRA SFT run's trainable weights θ_t at every optimizer step, to average them offline later.

Averaging never changes training, and every averager is a deterministic function of the sequence
θ_0, θ_1, ..., θ_T. So one recorded run serves any number of averager settings: replay the sequence
through the package's own ``AveragedWeights`` (:mod:`experiments.offline`) instead of training again.

A run trains exactly as study (a) of :mod:`experiments.studies` does (LoRA r=8, α=16 on q/k/v/o,
dropout 0, lr 2e-4 with TRL's linear decay to 0 over ``max_steps``, batch 4, rows of at most 128
tokens, fp32 on CPU), except that ``seed`` picks the *sample* of train functions too (study (a) kept
one sample and varied only the LoRA init and the data order). The eval sample is picked by the
same seed, by the evaluator.

On disk, under ``<root>/<run id>/``:

* ``meta.json``: the run's settings, written first;
* ``step_00000.safetensors`` ... ``step_<T>.safetensors``: θ_t, every trainable tensor in fp32;
* ``done.json``: train losses, CPU seconds per step, library versions; written last, so a folder
  without it is an interrupted run (it is recorded again from step 0).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .runner import PRESETS, Scale, load_model, median_seconds, sft_data, train_losses, with_lora

STEP_FILE = "step_{:05d}.safetensors"
META, DONE = "meta.json", "done.json"


@dataclass(frozen=True)
class RecordedRun:
    """One recorded SFT run: ``seed`` picks the train sample, LoRA init and data order."""

    seed: int
    steps: int
    n_train: int = 1024
    scale_name: str = "full"

    @property
    def run_id(self) -> str:
        return f"sft-seed{self.seed}-steps{self.steps}-n{self.n_train}-{self.scale_name}"

    @property
    def scale(self) -> Scale:
        return PRESETS[self.scale_name]


class ThetaRecorder(TrainerCallback):
    """Saves the trainable tensors θ_t (fp32 copies) at the start and after every optimizer step."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.cpu_seconds: list[float] = []
        self._cpu_start = 0.0

    def _save(self, model: torch.nn.Module, step: int) -> None:
        from safetensors.torch import save_file

        tensors = {
            n: p.detach().to("cpu", torch.float32, copy=True) for n, p in model.named_parameters() if p.requires_grad
        }
        tmp = self.folder / f".tmp-{STEP_FILE.format(step)}"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.folder / STEP_FILE.format(step))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._save(model, state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._cpu_start = time.process_time()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.cpu_seconds.append(time.process_time() - self._cpu_start)
        self._save(model, state.global_step)


def run_folder(root: str | os.PathLike[str], run: RecordedRun) -> Path:
    return Path(root) / run.run_id


def is_recorded(root: str | os.PathLike[str], run: RecordedRun) -> bool:
    return (run_folder(root, run) / DONE).is_file()


def record(run: RecordedRun, root: str | os.PathLike[str], callbacks: list[TrainerCallback] | None = None) -> Path:
    """Train ``run`` and save θ_0..θ_T under ``root``; a finished recording is left as it is.

    ``callbacks`` ride along (the test attaches the online ``WeightAveragingCallback`` to compare).
    """
    from trl import SFTConfig, SFTTrainer

    folder = run_folder(root, run)
    if (folder / DONE).is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted recording: start again from step 0
    folder.mkdir(parents=True)
    scale = run.scale
    base, tokenizer = load_model(scale, run.seed)
    model = with_lora(base, scale, run.seed)
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the order the callback's shadow uses
    meta = {**asdict(run), "run_id": run.run_id, "scale": scale.as_dict(), "parameter_names": names}
    (folder / META).write_text(json.dumps(meta, indent=1))
    train = sft_data(tokenizer, scale, "train", run.n_train, seed=run.seed)
    recorder = ThetaRecorder(folder)
    args = SFTConfig(
        output_dir=str(folder / "work"), max_steps=run.steps, per_device_train_batch_size=scale.batch_size,
        learning_rate=scale.learning_rate, seed=run.seed, max_length=scale.max_length, logging_steps=1,
        save_strategy="no", eval_strategy="no", use_cpu=True, bf16=False, fp16=False, report_to=[], disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[recorder, *(callbacks or [])],
    )
    started = time.time()
    trainer.train()
    shutil.rmtree(Path(args.output_dir), ignore_errors=True)
    done = {
        "train_loss": train_losses(trainer.state.log_history),
        "learning_rate": [
            [int(e["step"]), float(e["learning_rate"])] for e in trainer.state.log_history if "learning_rate" in e
        ],
        "cpu_step_seconds": recorder.cpu_seconds,
        "median_cpu_step_seconds": median_seconds(recorder.cpu_seconds),
        "wall_seconds": time.time() - started,
        "torch_threads": torch.get_num_threads(),
        "environment": _versions(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (folder / DONE).write_text(json.dumps(done, indent=1))
    return folder


def _versions() -> dict[str, str]:
    import platform

    import peft
    import transformers
    import trl

    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl.__version__, "peft": peft.__version__,
    }  # fmt: skip


class Trajectory:
    """A finished recording: ``theta(t)`` gives θ_t as ``{name: fp32 tensor}``."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if not (self.folder / DONE).is_file():
            raise FileNotFoundError(f"{self.folder} holds no finished recording (no {DONE}); record it first")
        self.meta: dict[str, Any] = json.loads((self.folder / META).read_text())
        self.done: dict[str, Any] = json.loads((self.folder / DONE).read_text())
        self.steps: int = int(self.meta["steps"])
        self.seed: int = int(self.meta["seed"])
        self.run_id: str = self.meta["run_id"]
        self.names: list[str] = list(self.meta["parameter_names"])

    def theta(self, step: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.folder / STEP_FILE.format(step)))
