"""The GRPO study (d) harness: the code reward, the KL probe, and a tiny run of the whole study.

The documented run is ``python benchmarks/evidence_grpo.py --full`` (SmolLM2-135M, hours on CPU), never a test.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from rl_helpers import BEMA, generation_trainer

from experiments.code_reward import REWARD_FUNCTIONS, names, parses
from experiments.grpo_report import GRPO_BEGIN, GRPO_END
from experiments.grpo_runner import PRESETS, InitialKLProbe
from experiments.grpo_study import main as grpo_main
from experiments.grpo_study import plan
from trl_ema_plugin import AveragedReferenceCallback, attach

#: a prompt as the study builds it: the def line, the docstring, and the three spaces of the body's indentation
PROMPT = 'def area(width, height):\n    """The area of a rectangle."""\n   '
REFERENCE = "    return width * height\n"
#: completion → (parses, names F1 against REFERENCE's identifiers {width, height})
CASES = {
    " return width * height\n": (1.0, 1.0),  # the real body
    " return width * height\nprint(area)\n": (1.0, 1.0),  # the function ends at the first line at column 0
    " x = width\n": (1.0, 2 * 1 / (2 + 2)),  # {x, width}: one of two names right, one of two found
    " return 'height'  # width\n": (1.0, 0.0),  # names in strings and comments do not count
    "": (0.0, 0.0),  # no statement after the docstring (the prompt alone parses)
    " return (width *\n": (0.0, 2 * 1 / (1 + 2)),  # cut mid-expression: no parse, its names still count
    "```\nThis function returns the area.": (0.0, 0.0),  # a markdown fence, then prose at column 0
}


def test_code_reward_parses_and_names():
    completions = list(CASES)
    kwargs = {"prompts": [PROMPT] * len(completions), "completions": completions}
    assert (parses, names) == REWARD_FUNCTIONS  # TRL sums them: reward in [0, 2]
    assert parses(**kwargs) == [p for p, _ in CASES.values()]
    assert names(**kwargs, reference=[REFERENCE] * len(completions)) == pytest.approx([n for _, n in CASES.values()])
    chat = [[{"role": "assistant", "content": c}] for c in completions]  # conversational completions: the text
    assert parses(prompts=kwargs["prompts"], completions=chat) == parses(**kwargs)


@pytest.mark.parametrize("moving", [False, True], ids=["fixed_ref", "bema_ref"])
def test_kl_probe_measures_the_policy_against_the_initial_model_and_the_reference(tmp_path, moving):
    """The KL to the reference TRL used is TRL's logged ``kl``. Fixed reference: the KL to the initial model equals
    it at every batch, and is > 0 once the policy moved. Moving reference: equal at the first batch ("ref" is the
    initial adapter), different later."""
    callbacks = [AveragedReferenceCallback("bema", ref_update_every=1, **BEMA)] if moving else []
    trainer = generation_trainer("grpo", tmp_path, callbacks, max_steps=4)
    if moving:
        attach(trainer)
    probe = InitialKLProbe(trainer)
    trainer.train()
    assert [step for step, _, _ in probe.values] == [0, 1, 2, 3]  # one probe per generation batch
    to_initial = [kl for _, kl, _ in probe.values]
    to_reference = [kl for _, _, kl in probe.values]
    logged = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert to_reference == pytest.approx(logged, rel=1e-5, abs=1e-9)  # TRL's own kl, batch by batch
    assert to_initial[0] == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA adapter (B = 0) is the base model
    assert to_initial[-1] > 1e-4  # the policy moved away from it
    if moving:
        assert to_reference[0] == pytest.approx(to_initial[0], abs=1e-7)
        assert abs(to_reference[-1] - to_initial[-1]) > 1e-5
    else:
        assert to_reference == pytest.approx(to_initial, abs=1e-7)


HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def study(argv: list[str]) -> None:
    """``benchmarks/evidence_grpo.py`` in-process; without matplotlib (the Axolotl stack installs no [experiments]
    extra) the runs, the table and the page are written, then an ImportError says how to get the plot."""
    if HAS_MATPLOTLIB:
        assert grpo_main(argv) == 0
    else:
        with pytest.raises(ImportError, match=r"plots need matplotlib: pip install matplotlib"):
            grpo_main(argv)


def test_tiny_study_runs_every_variant_resumes_and_fills_the_evidence_block(tmp_path, capsys):
    out, docs = tmp_path / "out", tmp_path / "docs"
    docs.mkdir()
    page = docs / "evidence.md"
    page.write_text(f"# Evidence\n\nbefore\n{GRPO_BEGIN}\nNot run yet.\n{GRPO_END}\nafter\n")
    argv = ["--tiny", "--out", str(out), "--docs", str(docs), "--no-progress", "--threads", "1"]
    study(argv)
    if HAS_MATPLOTLIB:
        assert (docs / "evidence_grpo.png").read_bytes()[:4] == b"\x89PNG"
    files = sorted((out / "runs").glob("*.json"))
    assert [f.stem for f in files] == sorted(r.run_id for r in plan(PRESETS["tiny"]))
    records = {r["label"]: r for r in (json.loads(f.read_text()) for f in files)}
    assert set(records) == {"initial", "fixed_ref", "bema_ref", "bema_ref_sd"}
    assert records["initial"]["steps"] == 0 and records["initial"]["curves"] == {}
    for label in ("fixed_ref", "bema_ref", "bema_ref_sd"):
        run = records[label]
        assert [step for step, _ in run["curves"]["reward"]] == [1, 2]
        assert len(run["kl_probe"]) == 2 and len(run["cpu_step_seconds"]) == 2
    for run in records.values():
        assert "eval_reward" in run["evaluation"] and len(run["prompts"]["eval"]) == 2
    stamps = {f: f.stat().st_mtime_ns for f in files}
    page.write_text(f"# Evidence\n\nbefore\n{GRPO_BEGIN}\nstale\n{GRPO_END}\nafter\n")
    study(argv)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # every run recorded: nothing trains again
    text = page.read_text()
    assert text.startswith(f"# Evidence\n\nbefore\n{GRPO_BEGIN}\n") and text.endswith(f"{GRPO_END}\nafter\n")
    assert "stale" not in text and "Held-out prompts (2 × 4 completions" in text
    for label in records:
        assert f"| {label} |" in text
    assert "4 finished run(s)" in capsys.readouterr().out or not HAS_MATPLOTLIB
