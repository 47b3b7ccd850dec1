"""Damaged state files are named, with what to do; intact ones (checksummed, or of format 1) resume exactly.

A real 6-step SFT run writes checkpoints 2, 4 and 6; each test damages a copy of it the way a disk, a copy or a
user does, and resumes with ``trainer.train(resume_from_checkpoint=True)`` (checkpoint-6) in a real trainer.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from ds_common import cpu_training_args
from peft import get_peft_model
from safetensors.torch import load_file
from trl import DPOConfig, DPOTrainer
from trl_helpers import lora_config, sft_trainer

from trl_ema_plugin import WeightAveragingCallback, attach
from trl_ema_plugin.demos.tiny import tiny_dpo_dataset, tiny_llama, tiny_tokenizer
from trl_ema_plugin.integrations.trl.reference import REFERENCE_FOLDER, AveragedReferenceCallback
from trl_ema_plugin.persistence import STATE_JSON, STATE_TENSORS, StateFileError, read_metadata

AVERAGERS = [{"method": "ema", "decay": 0.5}, {"method": "bema", "update_every": 1, "lag": 2.0}]


def trainer_for(out: Path):
    callback = WeightAveragingCallback(averagers=AVERAGERS, eval=False)
    return sft_trainer(str(out), [callback], save_strategy="steps", save_steps=2), callback


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "run"
    trainer_for(out)[0].train()
    return out


@pytest.fixture
def copy(run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def refused(out: Path, with_attach: bool = False) -> str:
    trainer, _ = trainer_for(out)
    if with_attach:
        attach(trainer)
    with pytest.raises(ValueError) as raised:
        trainer.train(resume_from_checkpoint=True)
    assert isinstance(raised.value, StateFileError)
    return str(raised.value)


def advice(out: Path) -> str:
    return (
        f"Resume from {out / 'checkpoint-4'} instead (trainer.train(resume_from_checkpoint='{out / 'checkpoint-4'}'))"
    )


def test_checksums_of_every_file_are_recorded(run):
    folder = run / "checkpoint-6" / "averaged"
    metadata = json.loads((folder / STATE_JSON).read_text())
    assert metadata["format_version"] == 2
    assert sorted(metadata["files"]) == ["adapter_config.json", "adapter_model.safetensors", STATE_TENSORS]
    for name, digest in metadata["files"].items():
        assert digest["bytes"] == (folder / name).stat().st_size and len(digest["sha256"]) == 64


def test_truncated_state_tensors(copy):
    path = copy / "checkpoint-6" / "averaged" / STATE_TENSORS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = refused(copy)
    assert f"{path} is damaged: it has {len(data) // 2} bytes, but {STATE_JSON} recorded {len(data)}" in message
    assert advice(copy) in message


def test_corrupted_data_under_an_intact_header(copy):
    """Bytes of the tensor data changed, the safetensors header intact: it would load, with wrong averages."""
    path = copy / "checkpoint-6" / "averaged-bema" / STATE_TENSORS
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x7f\xc0\x00\x00\x7f\xc0\x00\x00"  # two NaNs in the last tensor
    path.write_bytes(bytes(data))
    message = refused(copy)
    assert f"{path} is damaged: its sha256 differs from the one recorded in {STATE_JSON}" in message
    assert advice(copy).replace("averaged", "averaged-bema") in message


def test_invalid_json(copy):
    path = copy / "checkpoint-6" / "averaged" / STATE_JSON
    path.write_text(path.read_text()[:-40])
    message = refused(copy)
    assert f"{path} is damaged: not valid JSON" in message and advice(copy) in message


def test_missing_counters_block(copy):
    path = copy / "checkpoint-6" / "averaged" / STATE_JSON
    metadata = json.loads(path.read_text())
    del metadata["counters"]
    path.write_text(json.dumps(metadata))
    message = refused(copy)
    assert f"{path}: the averager state lacks its 'counters' block" in message and advice(copy) in message


def test_truncated_averaged_adapter_is_named_before_transformers_loads_it(copy):
    """transformers loads checkpoint-6/averaged/ as an adapter before any callback runs: attach() checks it first."""
    path = copy / "checkpoint-6" / "averaged" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    message = refused(copy, with_attach=True)
    assert f"{path} is damaged: it has 100 bytes" in message and advice(copy) in message


def test_without_an_older_checkpoint_the_advice_is_to_start_afresh(copy):
    for step in (2, 4):
        shutil.rmtree(copy / f"checkpoint-{step}")
    path = copy / "checkpoint-6" / "averaged" / STATE_TENSORS
    path.write_bytes(path.read_bytes()[:-1])
    message = refused(copy)
    expected = f"Resume from another checkpoint, or delete {copy / 'checkpoint-6' / 'averaged'} to start it afresh"
    assert expected in message


def test_a_folder_lost_while_an_older_checkpoint_holds_it_names_that_checkpoint(copy):
    """checkpoint-6 without averaged/ (and no staged copy): restarting the average would throw checkpoint-4's away."""
    shutil.rmtree(copy / "checkpoint-6" / "averaged")
    trainer, _ = trainer_for(copy)
    with pytest.raises(ValueError, match=re.escape(f"but {copy / 'checkpoint-4'} holds it. {advice(copy)}")):
        trainer.train(resume_from_checkpoint=True)


def test_a_format_1_checkpoint_resumes_exactly_with_a_note(run, copy):
    """A checkpoint written before checksums existed (format_version 1, no counters of skipped updates)."""
    for folder in ("averaged", "averaged-bema"):
        path = copy / "checkpoint-4" / folder / STATE_JSON
        metadata = json.loads(path.read_text())
        del metadata["files"], metadata["counters"]["skipped_updates"], metadata["counters"]["last_skipped_step"]
        path.write_text(json.dumps({**metadata, "format_version": 1}))
    shutil.rmtree(copy / "checkpoint-6")
    trainer, _ = trainer_for(copy)
    with pytest.warns(UserWarning, match="written before state files carried checksums .format_version 1.: it is read"):
        trainer.train(resume_from_checkpoint=True)
    for folder in ("averaged", "averaged-bema"):
        assert read_metadata(copy / folder)["counters"] == read_metadata(run / folder)["counters"]
        a, b = load_file(run / folder / STATE_TENSORS), load_file(copy / folder / STATE_TENSORS)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_dpo_reference_state_is_named(tmp_path):
    tokenizer = tiny_tokenizer()

    def dpo(out):
        args = cpu_training_args(
            str(out), DPOConfig, max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=4,
            learning_rate=1e-2, max_length=64, gradient_checkpointing=False, seed=0,
        )  # fmt: skip
        return DPOTrainer(
            model=get_peft_model(tiny_llama(tokenizer, seed=0), lora_config()),
            args=args,
            train_dataset=tiny_dpo_dataset(16, seed=0),
            processing_class=tokenizer,
            callbacks=[AveragedReferenceCallback("ema", decay=0.5, update_every=1)],
        )

    out = tmp_path / "run"
    dpo(out).train()
    path = out / "checkpoint-4" / REFERENCE_FOLDER / STATE_TENSORS
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(StateFileError) as raised:
        dpo(out).train(resume_from_checkpoint=True)
    message = str(raised.value)
    assert f"{path} is damaged" in message
    assert f"Resume from {out / 'checkpoint-2'} instead" in message


def test_temporary_folders_of_earlier_versions_inside_checkpoints(copy):
    """Earlier versions wrote checkpoint-N/.averaged.tmp-<id>/ (transformers loads it as an adapter and fails):
    attach() names such a folder in the checkpoint resumed from; the next save removes those of the others."""
    for step in (2, 6):
        shutil.copytree(
            copy / f"checkpoint-{step}" / "averaged", copy / f"checkpoint-{step}" / ".averaged.tmp-0123abcd"
        )
    trainer, _ = trainer_for(copy)
    attach(trainer)
    with pytest.raises(ValueError) as raised:
        trainer.train(resume_from_checkpoint=True)
    message = str(raised.value)
    assert f"{copy / 'checkpoint-6'} holds .averaged.tmp-0123abcd, temporary folders a stopped save" in message
    shutil.rmtree(copy / "checkpoint-6")
    trainer, _ = trainer_for(copy)
    trainer.train(resume_from_checkpoint=str(copy / "checkpoint-4"))
    assert not list(copy.glob("checkpoint-*/.averaged.*"))


def test_a_trainer_state_cut_short_names_the_checkpoint_to_resume_from(copy):
    """The trainer's own trainer_state.json, cut short (killed while transformers wrote it): with attach() the
    resume stops before transformers reads it, naming the newest complete checkpoint."""
    state = copy / "checkpoint-6" / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    trainer, _ = trainer_for(copy)
    attach(trainer)
    with pytest.raises(ValueError) as raised:
        trainer.train(resume_from_checkpoint=True)
    assert str(raised.value).startswith(
        f"{copy / 'checkpoint-6'} is incomplete: its trainer_state.json is not valid JSON (cut short?) (the run "
        f"stopped while the trainer was saving it); resume from {copy / 'checkpoint-4'} "
    )
