"""A real training process for tests/test_crash_safety.py, which SIGKILLs itself at a chosen point of a save.

    python crash_child.py OUT --kind sft|dpo [--kill POINT:N] [--resume true|PATH] [--attach] [--save-total-limit K]
                          [--phases LOG [--phase-step N] [--pause SECONDS]]

Six steps of the tiny Llama with LoRA, a checkpoint every 2 steps: SFT with a WeightAveragingCallback of two
averagers (``averaged/`` EMA, ``averaged-bema/`` BEMA), or DPO with an AveragedReferenceCallback (BEMA) writing
``reference/``. ``--kill POINT:N`` sends SIGKILL to this process (no clean-up, no exception handler runs):

* ``state-file:N``        right after the N-th ``averager_state.safetensors`` is written (its folder has no JSON yet);
* ``trainer-save:N``      when the trainer starts writing its N-th checkpoint (our state is staged, complete);
* ``trainer-optimizer:N`` in the middle of the trainer's N-th checkpoint (model written, no optimizer nor state);
* ``on-save:N``           when our callback's N-th ``on_save`` begins (the trainer's checkpoint is complete);
* ``promote:N``           right after the N-th staged folder was renamed into its checkpoint.

``--phases LOG``: before each write of the save of ``checkpoint-<phase-step>`` (ours and the trainer's, listed in
:data:`PHASES`), append its name to ``LOG`` and pause ``--pause`` seconds, so that another process can SIGKILL
this one between any two of them.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "deepspeed_scripts")]

import torch  # noqa: E402

torch.set_num_threads(1)


def kill_after(owner: object, name: str, count: int, before: bool) -> None:
    """Wrap ``owner.name`` so that its ``count``-th call SIGKILLs the process (before or after it runs)."""
    original = getattr(owner, name)
    calls = {"n": 0}

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if before and calls["n"] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if not before and calls["n"] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapped)


def install_kill(point: str) -> None:
    import transformers

    import trl_ema_plugin.integrations.trl.lifecycle as lifecycle
    import trl_ema_plugin.persistence as persistence

    name, count = point.split(":")
    count = int(count)
    if name == "state-file":
        kill_after(persistence, "save_file", count, before=False)
    elif name == "trainer-save":
        kill_after(transformers.Trainer, "_save_checkpoint", count, before=True)
    elif name == "trainer-optimizer":
        kill_after(transformers.Trainer, "_save_optimizer_and_scheduler", count, before=True)
    elif name == "on-save":
        kill_after(lifecycle.PluginCallback, "on_save", count, before=True)
    elif name == "promote":
        kill_after(lifecycle, "replace_folder", count, before=False)
    else:
        raise SystemExit(f"unknown kill point {name!r}")


#: the writes of one checkpoint save, as ``--phases`` names them: (module, class or None, function, phase name)
PHASES = (
    ("trl_ema_plugin.model_files", None, "save_file", "averaged-weights"),
    ("trl_ema_plugin.persistence", None, "save_file", "state-tensors"),
    ("trl_ema_plugin.persistence", None, "folder_digests", "state-json"),
    ("trl_ema_plugin.scratch", None, "replace_folder", "rename-staged"),
    ("transformers", "Trainer", "save_model", "trainer-model"),
    ("transformers", "Trainer", "_save_optimizer_and_scheduler", "trainer-optimizer"),
    ("transformers", "Trainer", "_save_rng_state", "trainer-rng"),
    ("transformers.trainer_callback", "TrainerState", "save_to_json", "trainer-state"),
    ("trl_ema_plugin.integrations.trl.lifecycle", None, "replace_folder", "rename-into-checkpoint"),
    ("trl_ema_plugin.integrations.trl.lifecycle", None, "remove_stale_scratch", "clean-up"),
)


def install_phases(log: Path, step: int, pause: float) -> None:
    """Log (and pause before) every write of :data:`PHASES` from the staging of ``checkpoint-<step>`` to the end of
    its ``on_save``."""
    import importlib
    import time

    import trl_ema_plugin.integrations.trl.lifecycle as lifecycle

    armed = {"on": False}

    def phase(name: str) -> None:
        if armed["on"]:
            with log.open("a") as handle:
                handle.write(name + "\n")
            time.sleep(pause)

    for module, cls, function, name in PHASES:
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        original = getattr(owner, function)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            phase(_name)
            return _original(*args, **kwargs)

        setattr(owner, function, wrapped)

    stage, on_save = lifecycle.PluginCallback.stage, lifecycle.PluginCallback.on_save

    def staging(self, args, state):
        armed["on"] = armed["on"] or state.global_step == step
        return stage(self, args, state)

    def saving(self, args, state, control, **kwargs):
        try:
            return on_save(self, args, state, control, **kwargs)
        finally:
            armed["on"] = armed["on"] and state.global_step != step

    lifecycle.PluginCallback.stage, lifecycle.PluginCallback.on_save = staging, saving


def build_trainer(out: str, kind: str, save_total_limit: int | None):
    from trl_helpers import lora_config, sft_trainer

    from trl_ema_plugin import WeightAveragingCallback
    from trl_ema_plugin.integrations.trl.reference import AveragedReferenceCallback

    saving = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2, "save_total_limit": save_total_limit}
    if kind == "sft":
        averaging = WeightAveragingCallback(
            averagers=[
                {"method": "ema", "decay": 0.7},
                {"method": "bema", "update_every": 1, "update_after": 1, "lag": 2.0},
            ],
            eval=False,
        )
        return sft_trainer(out, [averaging], **saving)
    from ds_common import cpu_training_args
    from trl import DPOConfig, DPOTrainer

    from trl_ema_plugin.demos.tiny import tiny_dpo_dataset, tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    args = cpu_training_args(
        out, DPOConfig, per_device_train_batch_size=4, learning_rate=1e-2, max_length=64, logging_steps=1,
        gradient_checkpointing=False, seed=0, **saving,
    )  # fmt: skip
    reference = AveragedReferenceCallback("bema", update_every=1, update_after=1, lag=2.0, ref_update_every=1)
    return DPOTrainer(
        model=tiny_llama(tokenizer, seed=0),
        args=args,
        train_dataset=tiny_dpo_dataset(16, seed=0),
        processing_class=tokenizer,
        peft_config=lora_config(),
        callbacks=[reference],
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kind", choices=("sft", "dpo"), default="sft")
    parser.add_argument("--kill")
    parser.add_argument("--resume")
    parser.add_argument("--attach", action="store_true")
    parser.add_argument("--save-total-limit", type=int)
    parser.add_argument("--phases", type=Path)
    parser.add_argument("--phase-step", type=int, default=4)
    parser.add_argument("--pause", type=float, default=0.0)
    cli = parser.parse_args()
    if cli.kill:
        install_kill(cli.kill)
    if cli.phases:
        install_phases(cli.phases, cli.phase_step, cli.pause)
    trainer = build_trainer(cli.out, cli.kind, cli.save_total_limit)
    if cli.attach:
        from trl_ema_plugin import attach

        attach(trainer)
    resume = {"true": True, None: None}.get(cli.resume, cli.resume)
    trainer.train(resume_from_checkpoint=resume)


if __name__ == "__main__":
    main()
