"""A third-party averager, registered through the ``trl_ema_plugin.averagers`` entry-point group,
is usable by name: in the flat YAML keys, in the TRL callback, in a real training run.

The third party is a real installed distribution: a ``.dist-info`` folder with ``entry_points.txt``
on ``sys.path`` of a fresh interpreter (the registry reads entry points once per process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = '''
"""A simple moving average: the mean of θ over the start step and every update step."""
import torch
from trl_ema_plugin.averagers.base import Averager


class SimpleMovingAverage(Averager):
    buffer_names = ("total",)
    hyperparameters = ("scale",)  # the settings (options) it takes; a constructor argument is not one by itself

    def __init__(self, scale: float = 1.0, verbose: bool = False) -> None:
        super().__init__()
        self.scale = scale
        self.verbose = verbose  # a constructor argument, not a setting

    def _start(self, theta, t):
        torch._foreach_copy_(self.views("total"), theta)

    def _update(self, theta, t):
        torch._foreach_add_(self.views("total"), theta)

    def average_into(self, out, theta, t):
        torch._foreach_copy_(out, self.views("total"))
        torch._foreach_mul_(out, self.scale / (self.num_updates + 1))


class Undeclared(Averager):
    """Declares no hyperparameters (Averager has no default): refused when registered."""

    buffer_names = ()

    def _start(self, theta, t):
        pass

    def _update(self, theta, t):
        pass

    def average_into(self, out, theta, t):
        pass
'''

SCRIPT = """
import json, sys
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from trl import SFTConfig, SFTTrainer

from trl_ema_plugin import registered_methods
from trl_ema_plugin.config.flat_keys import weight_averaging_config_from_flat
from trl_ema_plugin.demos.tiny import tiny_llama, tiny_sft_dataset, tiny_tokenizer
from trl_ema_plugin.integrations.trl import WeightAveragingCallback

out = sys.argv[1]
assert "sma" in registered_methods(), registered_methods()
config = weight_averaging_config_from_flat({
    "weight_averaging": "sma",
    "weight_averaging_update_every": 1,
    "weight_averaging_update_after": 1,
    "weight_averaging_options": {"scale": 1.0},
})
try:
    weight_averaging_config_from_flat({"weight_averaging": "sma", "weight_averaging_decay": 0.9})
    raise AssertionError("decay accepted for sma")
except ValueError as exc:
    assert "weight_averaging_decay=0.9: does not apply to weight_averaging='sma'" in str(exc), exc
try:  # only what the class declares is a setting, not every constructor argument
    weight_averaging_config_from_flat({"weight_averaging": "sma", "weight_averaging_options": {"verbose": True}})
    raise AssertionError("verbose accepted for sma")
except ValueError as exc:
    assert "weight_averaging_options={'verbose': True}: verbose is not an argument of weight_averaging='sma' (allowed: scale)" in str(exc), exc

tok = tiny_tokenizer()
args = SFTConfig(output_dir=out, max_steps=4, save_steps=1, per_device_train_batch_size=4, learning_rate=0.05,
                 use_cpu=True, max_length=64, report_to=[], bf16=False, seed=0)
trainer = SFTTrainer(model=tiny_llama(tok), args=args, train_dataset=tiny_sft_dataset(32), processing_class=tok,
                     peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
                     callbacks=[WeightAveragingCallback(config=config)])
trainer.train()

# hand computation: the mean of the adapters of steps 1..4 (update_after=1, then every step)
steps = [load_file(f"{out}/checkpoint-{t}/adapter_model.safetensors") for t in (1, 2, 3, 4)]
averaged = load_file(f"{out}/averaged/adapter_model.safetensors")
for key in averaged:
    expected = sum(s[key] for s in steps) / 4
    torch.testing.assert_close(averaged[key], expected, rtol=1e-6, atol=1e-7)
assert not torch.equal(averaged[key], steps[-1][key])
state = json.load(open(f"{out}/averaged/averager_state.json"))
print("OK", state["name"], state["counters"]["num_updates"])
"""


def _install_third_party(site: Path) -> None:
    (site / "thirdparty_sma").mkdir(parents=True)
    (site / "thirdparty_sma" / "__init__.py").write_text(PACKAGE)
    dist = site / "thirdparty_sma-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-sma\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[trl_ema_plugin.averagers]\nsma = thirdparty_sma:SimpleMovingAverage\n")


def test_third_party_averager_by_name_through_entry_point(tmp_path):
    site = tmp_path / "site"
    _install_third_party(site)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "OK sma 3"


def test_without_the_distribution_the_name_is_rejected():
    from trl_ema_plugin import registered_methods
    from trl_ema_plugin.config.flat_keys import weight_averaging_config_from_flat

    assert "sma" not in registered_methods()  # this process has no thirdparty-sma on sys.path
    with pytest.raises(
        ValueError,
        match=r"weight_averaging='sma': not a registered averager, true or false \(allowed: bema \| dema \| ema \| ouema",
    ):
        weight_averaging_config_from_flat({"weight_averaging": "sma"})


BAD_ENTRY_POINTS = {
    "import fails": (
        "broken = thirdparty_missing_module:Nothing",
        r"entry point broken = .* failed to load: ModuleNotFoundError",
    ),
    "not an Averager": ("notone = os.path:join", r"entry point notone = 'os.path:join' .* is not a subclass"),
    "takes a built-in name": ("ema = thirdparty_sma:SimpleMovingAverage", r"method 'ema' is already registered by EMA"),
    "declares no hyper-parameters": (
        "undeclared = thirdparty_sma:Undeclared",
        r"entry point undeclared = .*: Undeclared declares no hyperparameters: add the class attribute hyperparameters",
    ),
}


@pytest.mark.parametrize(("line", "message"), BAD_ENTRY_POINTS.values(), ids=BAD_ENTRY_POINTS.keys())
def test_a_bad_entry_point_is_a_clear_error_that_names_it(tmp_path, line, message):
    site = tmp_path / "site"
    _install_third_party(site)
    (site / "thirdparty_sma-0.1.dist-info" / "entry_points.txt").write_text(f"[trl_ema_plugin.averagers]\n{line}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    check = (
        "import re, sys\nfrom trl_ema_plugin import AveragerSpec\n"
        "try:\n    AveragerSpec(method='ema')\nexcept ValueError as exc:\n"
        "    print(str(exc)); sys.exit(0 if re.search(sys.argv[1], str(exc)) else 3)\nsys.exit(4)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", check, message], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
