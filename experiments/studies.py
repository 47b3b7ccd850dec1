"""The three evidence studies, as a list of runs that a resumable output folder records one by one.

(a) ``sft``: one SFT run per seed with every averager attached at once (``averagers=[...]``):
    eval loss vs step for the raw weights and each average.
(b) ``lowdata``: ``lowdata_train`` examples, several epochs: plain LoRA vs LoRA + self-distillation
    from an EMA / BEMA teacher (held-out eval loss of the student; the teacher's own loss too).
(c) ``dpo``: TRL's fixed reference vs a reference adapter kept at the EMA / BEMA average of the
    policy; eval reward accuracy and margin vs step.
``timing``: a few steps of each (b) and (c) configuration without evaluation, timed in CPU seconds
    of this process (one torch thread), for step-time ratios that other jobs on the machine do not skew.

Every finished run is written to ``<out>/runs/<run id>.json``; a second call skips those, so an
interrupted study resumes at the first unfinished run (that run restarts from step 0).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runner import DPORun, Scale, SFTRun, dpo_data, load_tokenizer, run_dpo, run_sft, sft_data

STUDIES = ("sft", "lowdata", "dpo", "timing")
TIMING_STEPS = 6

#: (a) every averager of the SFT study, attached to one run. Chosen before any result was seen:
#: EMA decays whose horizons 1/(1−d) (10 and 50 steps) fit an 80-step run, and BEMA/DEMA/OUEMA at
#: TRL's defaults except update_every=1 (TRL's update_freq=400 would never update in 80 steps).
SFT_AVERAGERS: list[dict[str, Any]] = [
    {"name": "ema_0.9", "method": "ema", "decay": 0.9},
    {"name": "ema_0.98", "method": "ema", "decay": 0.98},
    {"name": "bema", "method": "bema", "update_every": 1},
    {"name": "dema", "method": "dema", "update_every": 1},
    {"name": "ouema", "method": "ouema", "update_every": 1},
]
#: (b) teachers; the distillation term keeps SelfDistillationConfig's defaults (λ=0.5, τ=1, forward KL).
TEACHERS = {"ema_teacher": SFT_AVERAGERS[0], "bema_teacher": SFT_AVERAGERS[2]}
#: (c) reference update rules (ref ← average after every optimizer step).
REFERENCES = {
    "fixed_ref": None,
    "ema_ref": {"method": "ema", "decay": 0.9},
    "bema_ref": {"method": "bema", "update_every": 1},
}


@dataclass(frozen=True)
class PlannedRun:
    study: str
    label: str
    seed: int
    steps: int
    settings: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def run_id(self) -> str:
        return f"{self.study}-{self.label}-seed{self.seed}"


def plan(scale: Scale, studies: tuple[str, ...] = STUDIES) -> list[PlannedRun]:
    """Every run of the chosen studies, in execution order."""
    unknown = [s for s in studies if s not in STUDIES]
    if unknown:
        raise ValueError(f"unknown studies {unknown}; allowed values: {', '.join(STUDIES)}")
    runs: list[PlannedRun] = []
    if "sft" in studies:
        runs += [
            PlannedRun("sft", "averagers", seed, scale.sft_steps, {"averagers": SFT_AVERAGERS}) for seed in scale.seeds
        ]
    if "lowdata" in studies:
        for seed in scale.seeds[:1]:  # one seed: three runs of several epochs each
            runs.append(PlannedRun("lowdata", "plain", seed, scale.lowdata_steps, {}))
            for label, spec in TEACHERS.items():
                distill = {"teacher": spec["name"]}
                runs.append(
                    PlannedRun(
                        "lowdata", label, seed, scale.lowdata_steps, {"averagers": [spec], "distillation": distill}
                    )
                )
    if "dpo" in studies:
        for seed in scale.seeds[:1]:  # one seed: a DPO step costs about three SFT steps
            runs += [
                PlannedRun("dpo", label, seed, scale.dpo_steps, {"reference": ref}) for label, ref in REFERENCES.items()
            ]
    if "timing" in studies:
        steps = min(TIMING_STEPS, scale.lowdata_steps, scale.dpo_steps)
        runs.append(PlannedRun("timing", "lowdata-plain", 0, steps, {"of": "lowdata"}))
        for label, spec in TEACHERS.items():
            settings = {"of": "lowdata", "averagers": [spec], "distillation": {"teacher": spec["name"]}}
            runs.append(PlannedRun("timing", f"lowdata-{label}", 0, steps, settings))
        for label, ref in REFERENCES.items():
            runs.append(PlannedRun("timing", f"dpo-{label}", 0, steps, {"of": "dpo", "reference": ref}))
    return runs


class DataCache:
    """Datasets of one scale, built once per process (the same eval rows for every run and method)."""

    def __init__(self, scale: Scale) -> None:
        self.scale = scale
        self._tokenizer: Any = None
        self._data: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        if name not in self._data:
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self.scale)
            tok, s = self._tokenizer, self.scale
            builders = {
                "sft_train": lambda: sft_data(tok, s, "train", s.sft_train),
                "sft_eval": lambda: sft_data(tok, s, "eval", s.n_eval),
                "lowdata_train": lambda: sft_data(tok, s, "train", s.lowdata_train, seed=1),
                "dpo_train": lambda: dpo_data(tok, s, "train", s.dpo_train),
                "dpo_eval": lambda: dpo_data(tok, s, "eval", s.dpo_eval),
            }
            self._data[name] = builders[name]()
        return self._data[name]


def execute(run: PlannedRun, scale: Scale, data: DataCache, work: Path, progress: Any = None) -> dict[str, Any]:
    """Train one planned run and return its result dict."""
    output_dir = work / run.run_id
    if run.study == "sft":
        spec = SFTRun(scale, run.seed, run.steps, scale.sft_eval_every, output_dir, averagers=run.settings["averagers"])
        return run_sft(spec, data.get("sft_train"), data.get("sft_eval"), progress)
    study = run.settings.get("of", run.study)  # a timing run repeats a run of that study without evaluation
    if study == "lowdata":
        spec = SFTRun(
            scale, run.seed, run.steps, scale.lowdata_eval_every if run.study != "timing" else 0, output_dir,
            averagers=run.settings.get("averagers", []), distillation=run.settings.get("distillation"),
        )  # fmt: skip
        return run_sft(spec, data.get("lowdata_train"), data.get("sft_eval"), progress)
    every = scale.dpo_eval_every if run.study != "timing" else 0
    spec = DPORun(scale, run.seed, run.steps, every, output_dir, reference=run.settings["reference"])
    return run_dpo(spec, data.get("dpo_train"), data.get("dpo_eval"), progress)


def _environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers
    import trl

    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl.__version__, "peft": peft.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }  # fmt: skip


def check_scale(out: Path, scale: Scale) -> None:
    """Refuse to mix results of two scales in one output folder."""
    path = out / "scale.json"
    if path.exists():
        recorded = json.loads(path.read_text())
        if recorded != json.loads(json.dumps(scale.as_dict())):
            raise ValueError(
                f"{out} holds results of scale {recorded.get('name')!r} with other sizes; "
                f"use another --out folder for scale {scale.name!r}"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(scale.as_dict(), indent=2))


def result_path(out: Path, run: PlannedRun) -> Path:
    return out / "runs" / f"{run.run_id}.json"


def _claim(out: Path, run: PlannedRun) -> Path | None:
    """Lock ``run`` for this process (``runs/<id>.running`` holds the pid); None if another live process holds it."""
    lock = result_path(out, run).with_suffix(".running")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: one process wins
        except FileExistsError:
            if _holder_alive(lock):
                return None  # a live process is running it (e.g. a second `--studies` process on the same folder)
            lock.unlink(missing_ok=True)  # stale lock of a process that died: take the run over
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(str(os.getpid()))
        if result_path(out, run).exists():  # finished by another process since the caller looked
            lock.unlink(missing_ok=True)
            return None
        return lock
    return None


def _holder_alive(lock: Path) -> bool:
    try:
        os.kill(int(lock.read_text().strip() or 0), 0)
    except PermissionError:
        return True  # the process exists (another user's)
    except (ValueError, ProcessLookupError, FileNotFoundError):
        return False
    return True


def run_planned(
    runs: list[PlannedRun],
    scale: Any,
    out: Path,
    execute_run: Callable[[PlannedRun, Any], dict[str, Any]],
    show_progress: bool = True,
) -> list[Path]:
    """Run each of ``runs`` that ``out`` does not hold yet; return the result files.

    ``execute_run(run, progress_bar)`` returns the run's measurements; they are written with the run's settings,
    the scale and the environment to ``runs/<run id>.json`` (atomically). Each run is checked again just before it
    starts, and locked while it runs, so two processes can share one output folder.
    """
    from tqdm.auto import tqdm

    check_scale(out, scale)
    total = sum(r.steps for r in runs)
    done = sum(r.steps for r in runs if result_path(out, r).exists())
    with tqdm(total=total, initial=done, unit="step", disable=not show_progress, dynamic_ncols=True) as bar:
        for run in runs:
            if result_path(out, run).exists():
                continue
            lock = _claim(out, run)
            if lock is None:
                continue
            try:
                bar.set_postfix_str(run.run_id)
                started = time.time()
                result = execute_run(run, bar)
                record = {
                    "run_id": run.run_id, "study": run.study, "label": run.label, "seed": run.seed, "steps": run.steps,
                    "settings": run.settings, "scale": scale.as_dict(), "environment": _environment(),
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": time.time() - started, **result,
                }  # fmt: skip
                path = result_path(out, run)
                tmp = path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(record, indent=1))
                os.replace(tmp, path)
            finally:
                lock.unlink(missing_ok=True)
    return [result_path(out, r) for r in runs]


def run_studies(
    scale: Scale, out: str | os.PathLike[str], studies: tuple[str, ...] = STUDIES, show_progress: bool = True
) -> list[Path]:
    """Run every planned run of ``studies`` that ``out`` does not hold yet (:func:`run_planned`); return the
    result files. Two processes (e.g. ``--studies sft`` and ``--studies dpo``) can share one output folder."""
    out = Path(out)
    data = DataCache(scale)
    return run_planned(
        plan(scale, studies), scale, out, lambda run, bar: execute(run, scale, data, out / "work", bar), show_progress
    )


def load_results(out: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every finished run recorded in ``out``, in file-name order."""
    folder = Path(out) / "runs"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
