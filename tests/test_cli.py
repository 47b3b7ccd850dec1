"""``ema-export`` (and the ``axolotl ema-export`` click command) on checkpoints of a real TRL run."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml
from ds_common import cpu_training_args
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from trl import SFTTrainer

from trl_ema_plugin.cli.export import find_averaged_folder, main
from trl_ema_plugin.config.flat_keys import weight_averaging_config_from_flat
from trl_ema_plugin.integrations.trl import WeightAveragingCallback

LORA_R, LORA_ALPHA = 4, 8
# the run is configured with the YAML keys an Axolotl user writes: one source for both
AVERAGING_YAML = """
weight_averaging: true
weight_averaging_averagers:
  - {name: bema, method: bema, update_every: 1, update_after: 1, lag: 2}
  - {name: ema_05, method: ema, decay: 0.5}
weight_averaging_eval: false
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer, sft_data):
    """A 4-step SFT + LoRA run of a saved tiny Llama, with checkpoints at steps 2 and 4."""
    from trl_ema_plugin.demos.tiny import tiny_llama

    root = tmp_path_factory.mktemp("cli")
    base = root / "base"
    tiny_llama(tokenizer, seed=3).save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = weight_averaging_config_from_flat(yaml.safe_load(AVERAGING_YAML))
    args = cpu_training_args(
        str(root / "out"), max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=4,
        learning_rate=0.05, max_length=64, seed=0,
    )  # fmt: skip
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear", lora_dropout=0.0)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_data[0],
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[WeightAveragingCallback(config=config)],
    )
    trainer.train()
    return root


def _lora(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if "lora_" in k}


def test_export_writes_the_averaged_adapter_that_loads_with_peft(run, tmp_path):
    checkpoint = run / "out" / "checkpoint-4"
    out = tmp_path / "adapter"
    assert main([str(checkpoint), "--output", str(out)]) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert filecmp.cmp(out / name, checkpoint / "averaged" / name, shallow=False)
    assert (out / "tokenizer.json").is_file()  # the run's tokenizer travels with the adapter
    assert not (out / "averager_state.safetensors").exists()

    averaged = load_file(out / "adapter_model.safetensors")
    raw = load_file(checkpoint / "adapter_model.safetensors")
    assert averaged.keys() == raw.keys()
    assert any(not torch.equal(averaged[k], raw[k]) for k in raw)

    base = AutoModelForCausalLM.from_pretrained(run / "base")
    peft_model = PeftModel.from_pretrained(base, out)
    loaded = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == averaged.keys()
    for key, tensor in averaged.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)


def test_merge_applies_w_plus_scaled_ba(run, tmp_path):
    """merged W = W_base + (α/r)·B·A of the *averaged* adapter, for every LoRA-wrapped linear."""
    source = run / "out"  # the final averaged/ of the run
    out = tmp_path / "merged"
    assert main([str(source), "--output", str(out), "--merge"]) == 0  # base model from adapter_config.json

    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(run / "base").state_dict()
    adapter = load_file(source / "averaged" / "adapter_model.safetensors")
    scale = LORA_ALPHA / LORA_R
    checked = 0
    for key in adapter:
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        a, b = adapter[key], adapter[key.replace("lora_A", "lora_B")]
        expected = base[f"{module}.weight"] + scale * b @ a
        torch.testing.assert_close(merged[f"{module}.weight"], expected, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked == 14  # 7 linear layers x 2 decoder layers
    assert (out / "tokenizer.json").is_file()


def test_named_averager_and_list(run, tmp_path, capsys):
    checkpoint = run / "out" / "checkpoint-2"
    assert main([str(checkpoint), "--list"]) == 0
    listing = capsys.readouterr().out
    assert "bema\tprimary\tstep 2\tadapter" in listing and "ema_05\textra\tstep 2\tadapter" in listing

    out = tmp_path / "ema"
    assert main([str(checkpoint), "--name", "ema_05", "-o", str(out)]) == 0
    assert filecmp.cmp(
        out / "adapter_model.safetensors", checkpoint / "averaged-ema_05" / "adapter_model.safetensors", shallow=False
    )
    # an averager folder itself is a valid source too
    assert find_averaged_folder(checkpoint / "averaged-ema_05").name == "ema_05"


def test_errors_are_clear(run, tmp_path, capsys):
    checkpoint = run / "out" / "checkpoint-4"
    assert main([str(checkpoint), "--name", "nope", "-o", str(tmp_path / "x")]) == 2
    assert "no averager named 'nope'" in capsys.readouterr().err
    assert main([str(run / "base"), "-o", str(tmp_path / "x")]) == 2
    assert "holds no averaged weights" in capsys.readouterr().err
    # an output that is the run itself, or any non-empty folder, or a file: refused, nothing written
    before = sorted(p.name for p in (run / "out").iterdir())
    assert main([str(run / "out"), "-o", str(run / "out")]) == 2
    assert f"--output {run / 'out'} is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "out").iterdir()) == before
    (tmp_path / "file").write_text("x")
    assert main([str(checkpoint), "-o", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    # a run folder without a final export names the checkpoints that hold averages
    partial = tmp_path / "partial"
    shutil.copytree(checkpoint, partial / "checkpoint-4")
    assert main([str(partial), "-o", str(tmp_path / "y")]) == 2
    assert "its checkpoints that hold some: checkpoint-4" in capsys.readouterr().err
    assert main([str(checkpoint), "-o", str(tmp_path / "x"), "--base-model", "m"]) == 2
    assert "only with --merge" in capsys.readouterr().err


def test_console_script(run, tmp_path):
    script = Path(sys.executable).parent / "ema-export"
    assert script.is_file(), "the package declares the ema-export console script"
    out = tmp_path / "adapter"
    result = subprocess.run(
        [str(script), str(run / "out"), "-o", str(out)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert filecmp.cmp(
        out / "adapter_model.safetensors", run / "out" / "averaged" / "adapter_model.safetensors", shallow=False
    )


def test_axolotl_command_entry_point_and_click_command(run, tmp_path):
    from click.testing import CliRunner

    (found,) = [ep for ep in entry_points(group="axolotl.cli_commands") if ep.name == "ema-export"]
    command = found.load()
    import click

    assert isinstance(command, click.Command)

    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"base_model": str(run / "base"), "output_dir": str(run / "out")}))
    result = CliRunner().invoke(command, [str(cfg), "--merge", "--output", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "model.safetensors").is_file()

    result = CliRunner().invoke(
        command, ["--source", str(run / "out" / "checkpoint-4"), "--name", "nope", "--output", str(tmp_path / "y")]
    )
    assert result.exit_code == 1 and "no averager named 'nope'" in result.output
