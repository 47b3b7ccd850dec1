"""A table of bad settings, each rejected before training with one message: the key as the user spelled it, the
value, and the allowed values (or a did-you-mean for an unknown key).

* ``PYTHON``: keyword arguments of the four callbacks and of the config classes (and assignments to them);
* ``YAML``: Axolotl YAML snippets, through our args model (the flat keys, on every stack) and through
  Axolotl's own config validation with the plugin listed (axolotl stack).

The summary tests print the acceptance rate: rejected with such a message / all bad settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from trl_ema_plugin import (
    AveragedReferenceCallback,
    AveragerSpec,
    DPOReferenceConfig,
    PostHocEMACallback,
    PostHocEMAConfig,
    ReferenceConfig,
    SelfDistillationCallback,
    SelfDistillationConfig,
    WeightAveragingCallback,
    WeightAveragingConfig,
)
from trl_ema_plugin.config.errors import NO_VALUE
from trl_ema_plugin.integrations.axolotl.args import TrlEmaPluginArgs

EXAMPLES = Path(__file__).resolve().parents[1] / "example_configs" / "cpu"
OUR_PREFIXES = ("weight_averaging", "self_distillation", "rl_reference", "dpo_reference", "posthoc_ema")
AXOLOTL_MISSING = "could not import 'axolotl': Axolotl's config validation runs on the axolotl stack only"
INF, NAN = math.inf, math.nan
METHODS = "bema | dema | ema | ouema | power_ema"
BEMA_TAKES = "bias_horizon, bias_power, ema_power, lag, min_ema_multiplier, multiplier"
SIGMA_RELS = "non-empty list of numbers > 0.0 and ≤ 0.2886751345948129"


@dataclass(frozen=True)
class Bad:
    """A bad setting: what the message must hold (``key=value`` as given, and ``hint``: allowed values or a
    did-you-mean, and ``says``: what is wrong, where a case pins it)."""

    key: str
    value: Any = NO_VALUE
    hint: str = ""
    says: str = ""

    def missing(self, message: str) -> list[str]:
        """The parts of a complete message that ``message`` lacks (empty: complete)."""
        subject = self.key if self.value is NO_VALUE else f"{self.key}={self.value!r}"
        wanted = [subject, self.hint, self.says]
        missing = [w for w in wanted if w and w not in message]
        if "(allowed: " not in message and "did you mean " not in message:
            missing.append("(allowed: ...) or (did you mean ...?)")
        return missing


@dataclass(frozen=True)
class PythonBad(Bad):
    build: Callable[[], Any] = lambda: None


def call(target: Callable[..., Any], /, **kwargs: Any) -> Callable[[], Any]:
    return lambda: target(**kwargs)


def assign(factory: Callable[[], Any], name: str, value: Any) -> Callable[[], Any]:
    def build() -> None:
        setattr(factory(), name, value)

    return build


WAC, SDC, ARC = WeightAveragingCallback, SelfDistillationCallback, AveragedReferenceCallback


def wa(key: str, value: Any = NO_VALUE, hint: str = "", says: str = "", **kwargs: Any) -> PythonBad:
    """A WeightAveragingCallback case."""
    return PythonBad(key, value, hint, says, build=call(WAC, **kwargs))


def sd(key: str, value: Any = NO_VALUE, hint: str = "", says: str = "", **kwargs: Any) -> PythonBad:
    """A SelfDistillationCallback case."""
    return PythonBad(key, value, hint, says, build=call(SDC, **kwargs))


def ref(key: str, value: Any = NO_VALUE, hint: str = "", says: str = "", **kwargs: Any) -> PythonBad:
    """An AveragedReferenceCallback case."""
    return PythonBad(key, value, hint, says, build=call(ARC, **kwargs))


def ph(key: str, value: Any = NO_VALUE, hint: str = "", says: str = "", **kwargs: Any) -> PythonBad:
    """A PostHocEMACallback case."""
    return PythonBad(key, value, hint, says, build=call(PostHocEMACallback, **kwargs))


ENTRY = {"method": "ema"}
PYTHON: dict[str, PythonBad] = {
    # ------------------------------------------------------------------ weight averaging: method
    "wa: unknown method": wa("method", "swa", METHODS, method="swa"),
    "wa: misspelled method": wa("method", "bemaa", "did you mean 'bema'?", method="bemaa"),
    "wa: method in capitals": wa("method", "EMA", "did you mean 'ema'?", method="EMA"),
    "wa: method not a string": wa("method", 3, METHODS, method=3),
    # ------------------------------------------------------------------ decay
    "wa: decay 1": wa("decay", 1.0, "number > 0.0 and < 1.0", method="ema", decay=1.0),
    "wa: decay 0": wa("decay", 0.0, "number > 0.0 and < 1.0", method="ema", decay=0.0),
    "wa: decay negative": wa("decay", -0.5, "number > 0.0 and < 1.0", method="ema", decay=-0.5),
    "wa: decay inf": wa("decay", INF, "number > 0.0", "finite number", method="ema", decay=INF),
    "wa: decay nan": wa("decay", NAN, "number > 0.0", "finite number", method="ema", decay=NAN),
    "wa: decay True": wa("decay", True, "number > 0.0", "got a bool", method="ema", decay=True),
    "wa: decay as a string": wa("decay", "0.9", "number > 0.0", "without quotes", method="ema", decay="0.9"),
    "wa: decay on bema": wa("decay", 0.9, BEMA_TAKES, "does not apply to method='bema'", method="bema", decay=0.9),
    # ------------------------------------------------------------------ cadence
    "wa: update_every 0": wa("update_every", 0, "integer ≥ 1", method="bema", update_every=0),
    "wa: update_every negative": wa("update_every", -3, "integer ≥ 1", method="bema", update_every=-3),
    "wa: update_every True": wa("update_every", True, "integer ≥ 1", "got a bool", method="bema", update_every=True),
    "wa: update_every 2.0": wa("update_every", 2.0, "integer ≥ 1", "got a float", method="bema", update_every=2.0),
    "wa: update_every 2.5": wa("update_every", 2.5, "integer ≥ 1", method="bema", update_every=2.5),
    "wa: update_every as a string": wa("update_every", "2", "integer ≥ 1", method="bema", update_every="2"),
    "wa: update_freq 0 (alias)": wa("update_freq", 0, "integer ≥ 1", method="bema", update_freq=0),
    "wa: update_freq True": wa("update_freq", True, "integer ≥ 1", "got a bool", method="ema", update_freq=True),
    "wa: update_every and update_freq": wa(
        "update_freq", 3, "one of them", "not both", method="bema", update_every=2, update_freq=3
    ),
    "wa: update_after negative": wa("update_after", -1, "integer ≥ 0", method="ema", update_after=-1),
    "wa: update_after 1.5": wa("update_after", 1.5, "integer ≥ 0", method="ema", update_after=1.5),
    "wa: update_after False": wa("update_after", False, "integer ≥ 0", "got a bool", method="ema", update_after=False),
    "wa: update_after inf": wa("update_after", INF, "integer ≥ 0", method="ema", update_after=INF),
    # ------------------------------------------------------------------ EMA warm-up
    "wa: use_ema_warmup 1": wa("use_ema_warmup", 1, "true | false", method="ema", use_ema_warmup=1),
    "wa: use_ema_warmup 'yes'": wa("use_ema_warmup", "yes", "true | false", method="ema", use_ema_warmup="yes"),
    "wa: inv_gamma 0": wa("inv_gamma", 0.0, "number > 0.0", method="ema", use_ema_warmup=True, inv_gamma=0.0),
    "wa: inv_gamma without warm-up": wa("inv_gamma", 2.0, "use_ema_warmup=True", method="ema", inv_gamma=2.0),
    "wa: power nan": wa("power", NAN, "number > 0.0", "finite", method="ema", use_ema_warmup=True, power=NAN),
    "wa: power negative": wa("power", -1.0, "number > 0.0", method="ema", use_ema_warmup=True, power=-1.0),
    "wa: power without warm-up": wa("power", 0.75, "use_ema_warmup=True", method="ema", power=0.75),
    # ------------------------------------------------------------------ BEMA / DEMA / OUEMA
    "wa: ema_power negative": wa("ema_power", -0.5, "number ≥ 0.0", method="bema", ema_power=-0.5),
    "wa: ema_power inf": wa("ema_power", INF, "number ≥ 0.0", "finite", method="bema", ema_power=INF),
    "wa: ema_power on ema": wa("ema_power", 0.5, "decay", "does not apply to method='ema'", method="ema", ema_power=0.5),
    "wa: bias_power negative": wa("bias_power", -0.1, "number ≥ 0.0", method="ouema", bias_power=-0.1),
    "wa: bias_power on dema": wa("bias_power", 0.2, "ema_power", "does not apply to method='dema'", method="dema", bias_power=0.2),
    "wa: lag inf": wa("lag", INF, "number ≥ 0.0", "finite number", method="bema", lag=INF),
    "wa: lag nan": wa("lag", NAN, "number ≥ 0.0", "finite number", method="ouema", lag=NAN),
    "wa: lag negative": wa("lag", -1.0, "number ≥ 0.0", method="dema", lag=-1.0),
    "wa: lag as a string": wa("lag", "10", "number ≥ 0.0", "got a string", method="bema", lag="10"),
    "wa: lag on ema": wa("lag", 2, "decay", "does not apply to method='ema'", method="ema", lag=2),
    "wa: multiplier 0": wa("multiplier", 0.0, "number > 0.0", method="bema", multiplier=0.0),
    "wa: multiplier -inf": wa("multiplier", -INF, "number > 0.0", "finite", method="bema", multiplier=-INF),
    "wa: min_ema_multiplier 1.5": wa("min_ema_multiplier", 1.5, "≤ 1.0", method="bema", min_ema_multiplier=1.5),
    "wa: min_ema_multiplier negative": wa("min_ema_multiplier", -0.1, "≥ 0.0", method="dema", min_ema_multiplier=-0.1),
    "wa: bias_horizon 0": wa("bias_horizon", 0, "number > 0.0 | max_steps", method="bema", bias_horizon=0),
    "wa: bias_horizon 'max'": wa("bias_horizon", "max", "number > 0.0 | max_steps", method="bema", bias_horizon="max"),
    "wa: bias_horizon with dema": wa("bias_horizon", 60.0, "ema_power", method="dema", bias_horizon=60),
    "wa: preset unknown": wa("preset", "fast", "trl | lora", method="bema", preset="fast"),
    "wa: preset on ema": wa("preset", "lora", "decay", "does not apply to method='ema'", method="ema", preset="lora"),
    "wa: preset on dema": wa("preset", "trl", "ema_power", "does not apply to method='dema'", method="dema", preset="trl"),
    # ------------------------------------------------------------------ name and options
    "wa: name with a space": wa("name", "my ema", "[A-Za-z0-9_.-]", method="ema", name="my ema"),
    "wa: empty name": wa("name", "", "[A-Za-z0-9_.-]", method="ema", name=""),
    "wa: name climbs folders": wa("name", "../up", "[A-Za-z0-9_.-]", method="ema", name="../up"),
    "wa: name not a string": wa("name", 3, "string", method="ema", name=3),
    "wa: options set a built-in field": wa("options", {"decay": 0.5}, "allowed: ", "sets decay", method="ema", options={"decay": 0.5}),
    "wa: options of a built-in averager": wa("options", {"foo": 1}, "bema takes no options", method="bema", options={"foo": 1}),
    "wa: options not a mapping": wa("options", [1], "mapping", method="ema", options=[1]),
    # ------------------------------------------------------------------ unknown keywords
    "wa: misspelled decay": wa("decayy", 0.5, "did you mean decay?", method="ema", decayy=0.5),
    "wa: misspelled update_freq": wa("update_frequency", 2, "did you mean update_freq?", method="ema", update_frequency=2),
    "wa: misspelled eval": wa("evall", False, "did you mean eval?", method="ema", evall=False),
    "wa: unknown keyword": wa("beta", 0.5, "allowed: method, averagers", method="ema", beta=0.5),
    # ------------------------------------------------------------------ run-wide fields
    "wa: eval 'yes'": wa("eval", "yes", "true | false", method="ema", eval="yes"),
    "wa: offload 1": wa("offload", 1, "true | false", method="ema", offload=1),
    "wa: save_checkpoints None": wa("save_checkpoints", None, "true | false", method="ema", save_checkpoints=None),
    "wa: export_at_end 'false'": wa("export_at_end", "false", "true | false", method="ema", export_at_end="false"),
    "wa: device and offload": wa("offload", True, "one of them", method="ema", device="cpu", offload=True),
    "wa: device not a device": wa("device", 3, "'cpu'", method="bema", device=3),
    # ------------------------------------------------------------------ several averagers
    "wa: no averagers": wa("averagers", [], "non-empty list", averagers=[]),
    "wa: averagers a mapping": wa("averagers", ENTRY, "list of AveragerSpec", "got a mapping", averagers=ENTRY),
    "wa: averagers a string": wa("averagers", "ema", "list of AveragerSpec", averagers="ema"),
    "wa: entry not a mapping": wa("averagers[0]", 3, "AveragerSpec", averagers=[3]),
    "wa: repeated names": wa("averagers", NO_VALUE, "distinct name", "repeated: ema", averagers=[ENTRY, {"method": "ema", "decay": 0.9}]),
    "wa: entry misspelled key": wa("averagers[0].decayy", 0.5, "did you mean averagers[0].decay?", averagers=[{"method": "ema", "decayy": 0.5}]),
    "wa: entry unknown method": wa("averagers[1].method", "swa", METHODS, averagers=[ENTRY, {"method": "swa"}]),
    "wa: entry key of another method": wa("averagers[0].decay", 0.9, BEMA_TAKES, averagers=[{"method": "bema", "decay": 0.9}]),
    "wa: entry out of range": wa("averagers[1].decay", 2, "< 1.0", averagers=[ENTRY, {"method": "ema", "name": "b", "decay": 2}]),
    "wa: entry True as a number": wa("averagers[0].update_every", True, "integer ≥ 1", averagers=[{"method": "bema", "update_every": True}]),
    "wa: entry alias beside its key": wa("averagers[0].update_freq", 2, "one of them", averagers=[{"method": "ema", "update_every": 1, "update_freq": 2}]),
    "wa: entry bad name": wa("averagers[0].name", "a/b", "[A-Za-z0-9_.-]", averagers=[{"method": "ema", "name": "a/b"}]),
    "wa: method beside averagers": wa("method", "ema", "inside each entry", "not both", method="ema", averagers=[ENTRY]),
    "wa: hyper-parameter beside averagers": wa("decay", 0.5, "inside each entry", "not both", averagers=[ENTRY], decay=0.5),
    # ------------------------------------------------------------------ self-distillation
    "sd: temperature 0": sd("temperature", 0.0, "number > 0.0", temperature=0.0),
    "sd: temperature negative": sd("temperature", -1.0, "number > 0.0", temperature=-1.0),
    "sd: temperature inf": sd("temperature", INF, "number > 0.0", "finite", temperature=INF),
    "sd: temperature True": sd("temperature", True, "number > 0.0", "got a bool", temperature=True),
    "sd: temperature as a string": sd("temperature", "2", "number > 0.0", "without quotes", temperature="2"),
    "sd: lambda_ negative": sd("lambda_", -0.5, "number ≥ 0.0", lambda_=-0.5),
    "sd: lambda_ nan": sd("lambda_", NAN, "number ≥ 0.0", "finite", lambda_=NAN),
    "sd: weight negative (alias)": sd("weight", -1, "weight is an alias of lambda_", weight=-1),
    "sd: lambda (alias) inf": sd("lambda", INF, "number ≥ 0.0", "finite", **{"lambda": INF}),
    "sd: lambda_ and weight": sd("weight", 0.2, "one of them", "lambda_ or its alias weight", lambda_=0.1, weight=0.2),
    "sd: warmup_steps negative": sd("warmup_steps", -1, "integer ≥ 0", warmup_steps=-1),
    "sd: warmup_steps 1.5": sd("warmup_steps", 1.5, "integer ≥ 0", warmup_steps=1.5),
    "sd: warmup_steps True": sd("warmup_steps", True, "integer ≥ 0", "got a bool", warmup_steps=True),
    "sd: top_k 0": sd("top_k", 0, "integer ≥ 1", top_k=0),
    "sd: top_k True": sd("top_k", True, "integer ≥ 1", "got a bool", top_k=True),
    "sd: top_k 8.0": sd("top_k", 8.0, "integer ≥ 1", "got a float", top_k=8.0),
    "sd: distill_every 0": sd("distill_every", 0, "integer ≥ 1", distill_every=0),
    "sd: distill_every True": sd("distill_every", True, "integer ≥ 1", distill_every=True),
    "sd: unknown divergence": sd("divergence", "kl", "forward_kl | reverse_kl | generalized_jsd", divergence="kl"),
    "sd: misspelled divergence": sd("divergence", "forward_k1", "did you mean 'forward_kl'?", divergence="forward_k1"),
    "sd: divergence not a string": sd("divergence", 1, "forward_kl | reverse_kl", divergence=1),
    "sd: beta 1.5": sd("beta", 1.5, "≤ 1.0", divergence="generalized_jsd", beta=1.5),
    "sd: beta negative": sd("beta", -0.1, "≥ 0.0", divergence="generalized_jsd", beta=-0.1),
    "sd: beta nan": sd("beta", NAN, "≥ 0.0", "finite", divergence="generalized_jsd", beta=NAN),
    "sd: beta with forward_kl": sd("beta", 0.3, "divergence='generalized_jsd'", beta=0.3),
    "sd: adapter_name default": sd("adapter_name", "default", "other than 'default' and 'ref'", adapter_name="default"),
    "sd: adapter_name ref": sd("adapter_name", "ref", "other than 'default' and 'ref'", adapter_name="ref"),
    "sd: adapter_name with a space": sd("adapter_name", "my teacher", "[A-Za-z0-9_-]", adapter_name="my teacher"),
    "sd: unknown kernel": sd("kernel", "triton", "torch | liger", kernel="triton"),
    "sd: top_k with the liger kernel": sd("top_k", 8, "top_k unset with kernel='liger'", top_k=8, kernel="liger"),
    "sd: teacher not an averager name": sd("teacher", "my ema", "[A-Za-z0-9_.-]", teacher="my ema"),
    "sd: teacher not a string": sd("teacher", 3, "string", teacher=3),
    "sd: misspelled temperature": sd("temprature", 2.0, "did you mean temperature?", temprature=2.0),
    "sd: unknown keyword": sd("alpha", 0.5, "allowed: teacher, divergence", alpha=0.5),
    # ------------------------------------------------------------------ DPO reference
    "ref: unknown rule": ref("method", "bemx", "did you mean 'bema'?", method="bemx"),
    "ref: rule in capitals": ref("method", "TR_DPO", "did you mean 'tr_dpo'?", method="TR_DPO"),
    "ref: rule not a string": ref("method", 1, "tr_dpo", method=1),
    "ref: ref_update_every 0": ref("ref_update_every", 0, "integer ≥ 1", method="bema", ref_update_every=0),
    "ref: ref_update_every True": ref("ref_update_every", True, "integer ≥ 1", method="bema", ref_update_every=True),
    "ref: ref_update_every with tr_dpo": ref("ref_update_every", 4, "ref_model_sync_steps", method="tr_dpo", ref_update_every=4),
    "ref: sync steps 0": ref("ref_model_sync_steps", 0, "integer ≥ 1", method="tr_dpo", ref_model_sync_steps=0),
    "ref: sync steps 8.0": ref("ref_model_sync_steps", 8.0, "integer ≥ 1", method="tr_dpo", ref_model_sync_steps=8.0),
    "ref: sync steps with bema": ref("ref_model_sync_steps", 8, "ref_update_every, " + BEMA_TAKES, method="bema", ref_model_sync_steps=8),
    "ref: mixup alpha 0": ref("ref_model_mixup_alpha", 0.0, "number > 0.0 and ≤ 1.0", method="tr_dpo", ref_model_mixup_alpha=0.0),
    "ref: mixup alpha 1.5": ref("ref_model_mixup_alpha", 1.5, "≤ 1.0", method="tr_dpo", ref_model_mixup_alpha=1.5),
    "ref: mixup alpha nan": ref("ref_model_mixup_alpha", NAN, "≤ 1.0", "finite", method="tr_dpo", ref_model_mixup_alpha=NAN),
    "ref: mixup alpha with ema": ref("ref_model_mixup_alpha", 0.5, "decay", method="ema", ref_model_mixup_alpha=0.5),
    "ref: offload with the hard update": ref("offload", True, "offload=False", method="tr_dpo", ref_model_mixup_alpha=1.0, offload=True),
    "ref: offload 'yes'": ref("offload", "yes", "true | false", method="bema", offload="yes"),
    "ref: lag with tr_dpo": ref("lag", 2, "ref_model_sync_steps", method="tr_dpo", lag=2),
    "ref: update_freq with tr_dpo": ref("update_freq", 2, "ref_model_sync_steps", method="tr_dpo", update_freq=2),
    "ref: decay on bema": ref("decay", 0.5, BEMA_TAKES, method="bema", decay=0.5),
    "ref: lag negative": ref("lag", -1, "number ≥ 0.0", method="bema", lag=-1),
    "ref: decay inf": ref("decay", INF, "< 1.0", "finite", method="ema", decay=INF),
    "ref: update_freq 0": ref("update_freq", 0, "integer ≥ 1", method="ema", update_freq=0),
    "ref: update_every and update_freq": ref("update_freq", 2, "one of them", method="ema", update_every=1, update_freq=2),
    "ref: misspelled lag": ref("lagg", 2, "did you mean lag?", method="bema", lagg=2),
    "ref: averager beside its fields": ref("lag", 2, "one of them", method="bema", lag=2, averager=AveragerSpec(method="bema")),
    "ref: options of a built-in averager": ref("options", {"foo": 1}, "ema takes no options", method="ema", options={"foo": 1}),
    # ------------------------------------------------------------------ the power-function EMA, and post-hoc EMA
    "wa: sigma_rel above 1/√12": wa("sigma_rel", 0.3, "number > 0.0 and ≤ 0.2886", method="power_ema", sigma_rel=0.3),
    "wa: sigma_rel 0": wa("sigma_rel", 0.0, "number > 0.0", method="power_ema", sigma_rel=0.0),
    "wa: sigma_rel on ema": wa("sigma_rel", 0.1, "decay", "does not apply to method='ema'", method="ema", sigma_rel=0.1),
    "wa: decay on power_ema": wa("decay", 0.9, "sigma_rel", "does not apply to method='power_ema'", method="power_ema", decay=0.9),
    "ph: sigma_rels entry out of range": ph("sigma_rels[1]", 0.5, SIGMA_RELS, sigma_rels=[0.05, 0.5]),
    "ph: sigma_rels entry 0": ph("sigma_rels[0]", 0.0, SIGMA_RELS, sigma_rels=[0.0]),
    "ph: sigma_rels entry as a string": ph("sigma_rels[0]", "0.05", SIGMA_RELS, "without quotes", sigma_rels=["0.05"]),
    "ph: sigma_rels entry nan": ph("sigma_rels[0]", NAN, SIGMA_RELS, "finite", sigma_rels=[NAN]),
    "ph: sigma_rels entry True": ph("sigma_rels[0]", True, SIGMA_RELS, "got a bool", sigma_rels=[True]),
    "ph: sigma_rels a number": ph("sigma_rels", 0.05, SIGMA_RELS, "got a float", sigma_rels=0.05),
    "ph: sigma_rels empty": ph("sigma_rels", [], SIGMA_RELS, sigma_rels=[]),
    "ph: sigma_rels repeated": ph("sigma_rels", [0.1, 0.1], "distinct numbers", "repeats 0.1", sigma_rels=[0.1, 0.1]),
    "ph: every 0": ph("every", 0, "integer ≥ 1, or unset", every=0),
    "ph: every 2.5": ph("every", 2.5, "integer ≥ 1", every=2.5),
    "ph: update_every 0": ph("update_every", 0, "integer ≥ 1", update_every=0),
    "ph: update_after negative": ph("update_after", -1, "integer ≥ 0", update_after=-1),
    "ph: dtype float64": ph("dtype", "float64", "float32 | bfloat16 | float16", dtype="float64"),
    "ph: keep_weights 'yes'": ph("keep_weights", "yes", "true | false", keep_weights="yes"),
    "ph: offload 1": ph("offload", 1, "true | false", offload=1),
    "ph: singular sigma_rel": ph("sigma_rel", 0.05, "did you mean sigma_rels?", sigma_rel=0.05),
    "ph: misspelled every": ph("evrey", 2, "did you mean every?", evrey=2),
    "config: PostHocEMAConfig every True": PythonBad("every", True, "integer ≥ 1", build=call(PostHocEMAConfig, every=True)),
    "assign: sigma_rels out of range": PythonBad("sigma_rels[0]", 0.4, SIGMA_RELS, build=assign(PostHocEMAConfig, "sigma_rels", [0.4])),
    # ------------------------------------------------------------------ config classes, and assignments
    "config: AveragerSpec lag inf": PythonBad("lag", INF, "number ≥ 0.0", build=call(AveragerSpec, method="bema", lag=INF)),
    "config: WeightAveragingConfig without averagers": PythonBad("averagers", NO_VALUE, "non-empty list", "Field required", build=call(WeightAveragingConfig)),
    "config: SelfDistillationConfig top_k True": PythonBad("top_k", True, "integer ≥ 1", build=call(SelfDistillationConfig, top_k=True)),
    "config: DPOReferenceConfig lag inf": PythonBad("lag", INF, "number ≥ 0.0", build=call(DPOReferenceConfig, method="bema", lag=INF)),
    "assign: decay 2": PythonBad("decay", 2.0, "< 1.0", build=assign(lambda: AveragerSpec(method="ema"), "decay", 2.0)),
    "assign: decay on bema": PythonBad("decay", 0.5, BEMA_TAKES, build=assign(lambda: AveragerSpec(method="bema"), "decay", 0.5)),
    "assign: eval 'no'": PythonBad("eval", "no", "true | false", build=assign(lambda: WeightAveragingConfig(averagers=[ENTRY]), "eval", "no")),
    "assign: temperature nan": PythonBad("temperature", NAN, "number > 0.0", build=assign(SelfDistillationConfig, "temperature", NAN)),
    "assign: reference lag negative": PythonBad("lag", -2, "number ≥ 0.0", build=assign(lambda: DPOReferenceConfig(method="bema"), "lag", -2)),
    "assign: reference lag with tr_dpo": PythonBad("lag", 2, "ref_model_sync_steps", build=assign(lambda: DPOReferenceConfig(method="tr_dpo"), "lag", 2)),
    "config: ReferenceConfig unknown rule": PythonBad("method", "ppo", "tr_dpo", build=call(ReferenceConfig, method="ppo")),
    "config: ReferenceConfig misspelled keyword": PythonBad("ref_update_evry", 4, "did you mean ref_update_every?", build=call(ReferenceConfig, method="bema", ref_update_evry=4)),
    "config: ReferenceConfig sync steps True": PythonBad("ref_model_sync_steps", True, "integer ≥ 1", "got a bool", build=call(ReferenceConfig, method="tr_dpo", ref_model_sync_steps=True)),
    "assign: ReferenceConfig decay on bema": PythonBad("decay", 0.5, BEMA_TAKES, build=assign(lambda: ReferenceConfig(method="bema"), "decay", 0.5)),
}  # fmt: skip


def rejection(build: Callable[[], Any]) -> str | None:
    """The message of the ``ValueError`` that ``build()`` raises (None: accepted)."""
    try:
        build()
    except ValueError as exc:
        return str(exc)
    return None


def python_message(case: PythonBad) -> str | None:
    return rejection(case.build)


def assert_complete(case: Bad, message: str | None) -> None:
    assert message is not None, "accepted"
    assert not case.missing(message), f"{case.missing(message)} missing in: {message}"


@pytest.mark.parametrize("case", PYTHON.values(), ids=PYTHON.keys())
def test_python_bad_setting_is_rejected_with_key_value_and_allowed_values(case):
    message = python_message(case)
    assert_complete(case, message)
    assert "input_value" not in message  # no raw pydantic text


# ------------------------------------------------------------------------------------------- YAML
@dataclass(frozen=True)
class YamlBad(Bad):
    text: str = ""
    base: str = "sft"  # sft (LoRA), full (no adapter), dpo (rl: dpo, LoRA)

    @property
    def cfg(self) -> dict[str, Any]:
        return yaml.safe_load(self.text)


def y(text: str, key: str, value: Any = NO_VALUE, hint: str = "", says: str = "", base: str = "sft") -> YamlBad:
    return YamlBad(key, value, hint, says, text=text, base=base)


WA = "weight_averaging: ema\n"
SD = "weight_averaging: ema\nself_distillation: true\n"
LIST = "weight_averaging: true\nweight_averaging_averagers:\n"
PH = "posthoc_ema: true\n"
YAML: dict[str, YamlBad] = {
    # ------------------------------------------------------------------ the switch
    "unknown method": y("weight_averaging: swa", "weight_averaging", "swa", METHODS + " | true | false"),
    "misspelled method": y("weight_averaging: bemaa", "weight_averaging", "bemaa", "did you mean 'bema'?"),
    "method as a number": y("weight_averaging: 1", "weight_averaging", 1, METHODS),
    "quoted true": y("weight_averaging: 'true'", "weight_averaging", "true", METHODS + " | true | false"),
    # ------------------------------------------------------------------ misspelled keys (Axolotl drops them)
    "prefix misspelled": y("weight_averaging: bema\nweight_averagin_lag: 2", "weight_averagin_lag", 2, "did you mean weight_averaging_lag?"),
    "prefix misspelled (issue)": y("weight_averaging: ema\nweight_averagin_decay: 0.5", "weight_averagin_decay", 0.5, "did you mean weight_averaging_decay?"),
    "key misspelled": y("weight_averaging: ema\nweight_averaging_decayy: 0.5", "weight_averaging_decayy", 0.5, "did you mean weight_averaging_decay?"),
    "switch misspelled": y("weight_averagng: ema", "weight_averagng", "ema", "did you mean weight_averaging?"),
    "switch in capitals": y("Weight_Averaging: ema", "Weight_Averaging", "ema", "did you mean weight_averaging?"),
    "hyphens": y("weight_averaging: ema\nweight-averaging-decay: 0.5", "weight-averaging-decay", 0.5, "did you mean weight_averaging_decay?"),
    "self_distilation (issue)": y(WA + "self_distilation: true", "self_distilation", True, "did you mean self_distillation?"),
    "self_distillation_lamda": y(SD + "self_distillation_lamda: 1", "self_distillation_lamda", 1, "did you mean self_distillation_lambda?"),
    "dpo_refrence (issue)": y("dpo_refrence: bema", "dpo_refrence", "bema", "did you mean dpo_reference?", base="dpo"),
    "sync step misspelled": y("dpo_reference: tr_dpo\ndpo_reference_ref_model_sync_step: 8", "dpo_reference_ref_model_sync_step", 8, "did you mean dpo_reference_ref_model_sync_steps?", base="dpo"),
    # ------------------------------------------------------------------ types and ranges
    "decay quoted": y(WA + "weight_averaging_decay: '0.9'", "weight_averaging_decay", "0.9", "number > 0.0 and < 1.0", "without quotes"),
    "decay 1e-3 (a YAML string)": y(WA + "weight_averaging_decay: 1e-3", "weight_averaging_decay", "1e-3", "number > 0.0", "write 1.0e-3"),
    "decay .inf": y(WA + "weight_averaging_decay: .inf", "weight_averaging_decay", INF, "number > 0.0 and < 1.0", "finite"),
    "decay .nan": y(WA + "weight_averaging_decay: .nan", "weight_averaging_decay", NAN, "number > 0.0 and < 1.0", "finite"),
    "bias_horizon max": y("weight_averaging: bema\nweight_averaging_bias_horizon: max", "weight_averaging_bias_horizon", "max", "max_steps"),
    "preset unknown": y("weight_averaging: bema\nweight_averaging_preset: LoRA", "weight_averaging_preset", "LoRA", "trl | lora"),
    "preset on ema": y(WA + "weight_averaging_preset: lora", "weight_averaging_preset", "lora", "weight_averaging_decay", "does not apply to weight_averaging='ema'"),
    "lag -.inf": y("weight_averaging: bema\nweight_averaging_lag: -.inf", "weight_averaging_lag", -INF, "number ≥ 0.0", "finite"),
    "update_every true": y(WA + "weight_averaging_update_every: true", "weight_averaging_update_every", True, "integer ≥ 1", "got a bool"),
    "update_every 2.5": y(WA + "weight_averaging_update_every: 2.5", "weight_averaging_update_every", 2.5, "integer ≥ 1"),
    "update_every 2.0": y(WA + "weight_averaging_update_every: 2.0", "weight_averaging_update_every", 2.0, "integer ≥ 1", "got a float"),
    "update_freq 0 (alias)": y("weight_averaging: bema\nweight_averaging_update_freq: 0", "weight_averaging_update_freq", 0, "integer ≥ 1"),
    "update_every and update_freq": y(WA + "weight_averaging_update_every: 2\nweight_averaging_update_freq: 2", "weight_averaging_update_freq", 2, "weight_averaging_update_every or weight_averaging_update_freq"),
    "update_after -1": y(WA + "weight_averaging_update_after: -1", "weight_averaging_update_after", -1, "integer ≥ 0"),
    "eval 'yes'": y(WA + "weight_averaging_eval: 'yes'", "weight_averaging_eval", "yes", "true | false"),
    "offload 1": y(WA + "weight_averaging_offload: 1", "weight_averaging_offload", 1, "true | false"),
    "name with a space": y(WA + "weight_averaging_name: my ema", "weight_averaging_name", "my ema", "[A-Za-z0-9_.-]"),
    # ------------------------------------------------------------------ keys that do not apply
    "decay on bema": y("weight_averaging: bema\nweight_averaging_decay: 0.9", "weight_averaging_decay", 0.9, "weight_averaging_bias_power, weight_averaging_ema_power", "does not apply to weight_averaging='bema'"),
    "ema_power on ema": y(WA + "weight_averaging_ema_power: 0.5", "weight_averaging_ema_power", 0.5, "weight_averaging_decay"),
    "options set a built-in field": y(WA + "weight_averaging_options: {decay: 0.5}", "weight_averaging_options", {"decay": 0.5}, "allowed: ", "sets decay"),
    "options of a built-in averager": y("weight_averaging: bema\nweight_averaging_options: {foo: 1}", "weight_averaging_options", {"foo": 1}, "bema takes no options"),
    "key without the switch": y("weight_averaging_lag: 2", "weight_averaging_lag", 2, METHODS),
    # ------------------------------------------------------------------ several averagers
    "true without a list": y("weight_averaging: true", "weight_averaging", True, "weight_averaging_averagers"),
    "list without true": y(WA + "weight_averaging_averagers: [{method: ema}]", "weight_averaging_averagers", [{"method": "ema"}], "weight_averaging: true"),
    "key beside the list": y(LIST + "  - {method: ema}\nweight_averaging_decay: 0.9", "weight_averaging_decay", 0.9, "weight_averaging_eval"),
    "empty list": y(LIST + "  []", "weight_averaging_averagers", [], "non-empty list"),
    "list a mapping": y(LIST + "  {method: ema}", "weight_averaging_averagers", {"method": "ema"}, "list of AveragerSpec"),
    "entry misspelled key": y(LIST + "  - {method: ema, decayy: 0.9}", "weight_averaging_averagers[0].decayy", 0.9, "did you mean weight_averaging_averagers[0].decay?"),
    "entry unknown method": y(LIST + "  - {method: ema}\n  - {method: swa}", "weight_averaging_averagers[1].method", "swa", METHODS),
    "entry key of another method": y(LIST + "  - {method: bema, decay: 0.9}", "weight_averaging_averagers[0].decay", 0.9, BEMA_TAKES),
    "entry repeated names": y(LIST + "  - {method: ema}\n  - {method: ema, decay: 0.9}", "weight_averaging_averagers", NO_VALUE, "distinct name", "repeated: ema"),
    "entry out of range": y(LIST + "  - {method: ema, decay: 2}", "weight_averaging_averagers[0].decay", 2, "< 1.0"),
    "entry true as a number": y(LIST + "  - {method: bema, update_every: true}", "weight_averaging_averagers[0].update_every", True, "integer ≥ 1"),
    # ------------------------------------------------------------------ self-distillation
    "distillation switch 'yes'": y(WA + "self_distillation: 'yes'", "self_distillation", "yes", "true | false"),
    "top_k true (issue)": y(SD + "self_distillation_top_k: true", "self_distillation_top_k", True, "integer ≥ 1", "got a bool"),
    "temperature 0": y(SD + "self_distillation_temperature: 0", "self_distillation_temperature", 0, "number > 0.0"),
    "temperature .inf": y(SD + "self_distillation_temperature: .inf", "self_distillation_temperature", INF, "number > 0.0", "finite"),
    "lambda and weight": y(SD + "self_distillation_lambda: 1\nself_distillation_weight: 1", "self_distillation_weight", 1, "self_distillation_lambda or self_distillation_weight"),
    "weight -1 (alias)": y(SD + "self_distillation_weight: -1", "self_distillation_weight", -1, "number ≥ 0.0"),
    "unknown divergence": y(SD + "self_distillation_divergence: kl", "self_distillation_divergence", "kl", "forward_kl | reverse_kl | generalized_jsd"),
    "beta without jsd": y(SD + "self_distillation_beta: 0.3", "self_distillation_beta", 0.3, "self_distillation_divergence='generalized_jsd'"),
    "teacher names no averager": y(SD + "self_distillation_teacher: emaa", "self_distillation_teacher", "emaa", "did you mean 'ema'?"),
    "distillation without averaging": y("self_distillation: true", "self_distillation", True, METHODS),
    "teacher adapter named ref": y(SD + "self_distillation_adapter_name: ref", "self_distillation_adapter_name", "ref", "other than 'default' and 'ref'"),
    "unknown kernel": y(SD + "self_distillation_kernel: cuda", "self_distillation_kernel", "cuda", "torch | liger"),
    "warmup_steps 1.5": y(SD + "self_distillation_warmup_steps: 1.5", "self_distillation_warmup_steps", 1.5, "integer ≥ 0"),
    "distillation key without switch": y(WA + "self_distillation_lambda: 1", "self_distillation_lambda", 1, "true"),
    "distillation without a PEFT adapter": y(SD, "self_distillation", True, "adapter: lora | qlora", base="full"),
    # ------------------------------------------------------------------ DPO reference
    "unknown rule": y("dpo_reference: bemx", "dpo_reference", "bemx", "did you mean 'bema'?", base="dpo"),
    "decay on a bema reference": y("dpo_reference: bema\ndpo_reference_decay: 0.5", "dpo_reference_decay", 0.5, "dpo_reference_bias_power", base="dpo"),
    "lag with tr_dpo": y("dpo_reference: tr_dpo\ndpo_reference_lag: 2", "dpo_reference_lag", 2, "dpo_reference_ref_model_sync_steps", base="dpo"),
    "mixup alpha 0": y("dpo_reference: tr_dpo\ndpo_reference_ref_model_mixup_alpha: 0", "dpo_reference_ref_model_mixup_alpha", 0, "number > 0.0 and ≤ 1.0", base="dpo"),
    "mixup alpha 1.5": y("dpo_reference: tr_dpo\ndpo_reference_ref_model_mixup_alpha: 1.5", "dpo_reference_ref_model_mixup_alpha", 1.5, "≤ 1.0", base="dpo"),
    "sync steps with bema": y("dpo_reference: bema\ndpo_reference_ref_model_sync_steps: 8", "dpo_reference_ref_model_sync_steps", 8, "dpo_reference_ref_update_every", base="dpo"),
    "reference update_freq 0": y("dpo_reference: ema\ndpo_reference_update_freq: 0", "dpo_reference_update_freq", 0, "integer ≥ 1", base="dpo"),
    "offload with the hard update": y("dpo_reference: tr_dpo\ndpo_reference_ref_model_mixup_alpha: 1.0\ndpo_reference_offload: true", "dpo_reference_offload", True, "dpo_reference_offload=False", base="dpo"),
    "reference in an SFT run": y("dpo_reference: bema", "dpo_reference", "bema", "rl: dpo"),
    "reference with precomputed log-probs": y("dpo_reference: bema\nprecompute_ref_log_probs: true", "dpo_reference", "bema", "precompute_ref_log_probs: false", base="dpo"),
    "reference with trl.sync_ref_model": y("dpo_reference: bema\ntrl: {sync_ref_model: true}", "trl.sync_ref_model", True, "dpo_reference: tr_dpo", base="dpo"),
    # ------------------------------------------------------------------ the power-function EMA, and post-hoc EMA
    "power_ema sigma_rel above 1/√12": y("weight_averaging: power_ema\nweight_averaging_sigma_rel: 0.5", "weight_averaging_sigma_rel", 0.5, "≤ 0.2886"),
    "sigma_rel on ema": y(WA + "weight_averaging_sigma_rel: 0.1", "weight_averaging_sigma_rel", 0.1, "weight_averaging_decay"),
    "post-hoc switch 'yes'": y("posthoc_ema: 'yes'", "posthoc_ema", "yes", "true | false"),
    "post-hoc switch misspelled": y("posthoc_emma: true", "posthoc_emma", True, "did you mean posthoc_ema?"),
    "post-hoc key misspelled": y(PH + "posthoc_ema_evry: 2", "posthoc_ema_evry", 2, "did you mean posthoc_ema_every?"),
    "post-hoc singular sigma_rel": y(PH + "posthoc_ema_sigma_rel: 0.1", "posthoc_ema_sigma_rel", 0.1, "did you mean posthoc_ema_sigma_rels?"),
    "post-hoc key without the switch": y("posthoc_ema_every: 2", "posthoc_ema_every", 2, "with posthoc_ema: true"),
    "post-hoc sigma_rels entry out of range": y(PH + "posthoc_ema_sigma_rels: [0.05, 0.5]", "posthoc_ema_sigma_rels[1]", 0.5, SIGMA_RELS),
    "post-hoc sigma_rels 1e-2 (a YAML string)": y(PH + "posthoc_ema_sigma_rels: [1e-2]", "posthoc_ema_sigma_rels[0]", "1e-2", SIGMA_RELS, "write 1.0e-2"),
    "post-hoc sigma_rels a number": y(PH + "posthoc_ema_sigma_rels: 0.05", "posthoc_ema_sigma_rels", 0.05, SIGMA_RELS),
    "post-hoc sigma_rels repeated": y(PH + "posthoc_ema_sigma_rels: [0.1, 0.1]", "posthoc_ema_sigma_rels", [0.1, 0.1], "distinct numbers"),
    "post-hoc every 0": y(PH + "posthoc_ema_every: 0", "posthoc_ema_every", 0, "integer ≥ 1"),
    "post-hoc dtype fp16": y(PH + "posthoc_ema_dtype: fp16", "posthoc_ema_dtype", "fp16", "float32 | bfloat16 | float16"),
    "post-hoc keep_weights 'no'": y(PH + "posthoc_ema_keep_weights: 'no'", "posthoc_ema_keep_weights", "no", "true | false"),
    # ------------------------------------------------------------------ RLHF reference (neutral keys) and aliases
    "rl_reference unknown rule": y("rl_reference: ppo", "rl_reference", "ppo", "bema | dema | ema | ouema | power_ema | tr_dpo | true | false", base="grpo"),
    "rl_reference misspelled rule": y("rl_reference: tr-dpo", "rl_reference", "tr-dpo", "did you mean 'tr_dpo'?", base="kto"),
    "rl_refrence misspelled switch": y("rl_refrence: bema", "rl_refrence", "bema", "did you mean rl_reference?", base="grpo"),
    "rl_reference key misspelled": y("rl_reference: bema\nrl_reference_lagg: 2", "rl_reference_lagg", 2, "did you mean rl_reference_lag?", base="kto"),
    "rl_reference decay on bema": y("rl_reference: bema\nrl_reference_decay: 0.5", "rl_reference_decay", 0.5, "rl_reference_bias_power", "does not apply to rl_reference='bema'", base="grpo"),
    "rl_reference ref_update_every 0": y("rl_reference: ema\nrl_reference_ref_update_every: 0", "rl_reference_ref_update_every", 0, "integer ≥ 1", base="kto"),
    "rl_reference lag .nan": y("rl_reference: bema\nrl_reference_lag: .nan", "rl_reference_lag", NAN, "number ≥ 0.0", "finite", base="grpo"),
    "rl_reference key without switch": y("rl_reference_lag: 2", "rl_reference_lag", 2, "with rl_reference: ", base="grpo"),
    "switch in both spellings": y("rl_reference: bema\ndpo_reference: bema", "dpo_reference", "bema", "rl_reference or dpo_reference", "dpo_reference is an alias of rl_reference", base="dpo"),
    "key in both spellings": y("rl_reference: bema\nrl_reference_lag: 2\ndpo_reference_lag: 2", "dpo_reference_lag", 2, "rl_reference_lag or dpo_reference_lag", base="dpo"),
    "alias keyword in the other spelling": y("dpo_reference: ema\ndpo_reference_update_every: 1\nrl_reference_update_freq: 2", "rl_reference_update_freq", 2, "rl_reference_update_freq or dpo_reference_update_every", base="kto"),
    "rl_reference in an SFT run": y("rl_reference: bema", "rl_reference", "bema", "rl: dpo | ipo | kto | grpo | gdpo"),
    "rl_reference with rl: orpo": y("rl_reference: bema\nrl: orpo", "rl_reference", "bema", "rl: dpo | ipo | kto | grpo | gdpo", "got rl: orpo", base="dpo"),
    "rl_reference without an adapter": y("rl_reference: bema\nrl: kto", "rl_reference", "bema", "adapter: lora | qlora", base="full"),
    "rl_reference with a separate reference model": y("rl_reference: bema\nrl_adapter_ref_model: true", "rl_adapter_ref_model", True, "rl_adapter_ref_model: false", base="dpo"),
    "kto reference with precomputed log-probs": y("rl_reference: bema\nprecompute_ref_log_probs: true", "precompute_ref_log_probs", True, "precompute_ref_log_probs: false", base="kto"),
    "grpo reference without trl.beta": y("rl_reference: bema\ntrl: {beta: null}", "trl.beta", NO_VALUE, "trl.beta > 0", "never be read", base="grpo"),
    "grpo reference with trl.beta 0": y("rl_reference: bema\ntrl: {beta: 0.0}", "trl.beta", 0.0, "trl.beta > 0", base="grpo"),
    "gdpo reference with trl.beta 0": y("rl_reference: ema\nrl: gdpo\ntrl: {beta: 0}", "trl.beta", 0, "trl.beta > 0", "rl: gdpo", base="grpo"),
    "grpo reference with trl.sync_ref_model": y("rl_reference: bema\ntrl: {beta: 0.04, sync_ref_model: true}", "trl.sync_ref_model", True, "rl_reference: tr_dpo with rl_reference_ref_model_sync_steps", base="grpo"),
    "grpo reference with async prefetch": y("rl_reference: bema\ntrl: {beta: 0.04, async_prefetch: true}", "trl.async_prefetch", True, "trl.async_prefetch: false", "background thread", base="grpo"),
    "grpo reference with the data producer": y("dpo_reference: bema\ntrl: {beta: 0.04, use_data_producer: true}", "trl.use_data_producer", True, "trl.use_data_producer: false", base="grpo"),
    "self-distillation with rl: kto": y(SD, "self_distillation", True, "rl: dpo | ipo | grpo | gdpo", "not on rl: kto", base="kto"),
}  # fmt: skip

#: the Axolotl keys of each base that our checks read (the YAML cases through our args model alone)
MINIMAL_BASES = {
    "sft": {"adapter": "lora"},
    "full": {},
    "dpo": {"adapter": "lora", "rl": "dpo"},
    "grpo": {"adapter": "lora", "rl": "grpo", "trl": {"beta": 0.04}},
    "kto": {"adapter": "lora", "rl": "kto"},
}


def merged(base: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``cfg`` on top; the ``trl:`` sections merge (a case's ``trl`` keys over the base's)."""
    out = {**base, **cfg}
    if isinstance(base.get("trl"), dict) and isinstance(cfg.get("trl"), dict):
        out["trl"] = {**base["trl"], **cfg["trl"]}
    return out


def flat_message(case: YamlBad) -> str | None:
    """The error of our args model (the model Axolotl mixes in) for ``case`` (None: accepted)."""
    return rejection(lambda: TrlEmaPluginArgs.model_validate(merged(MINIMAL_BASES[case.base], case.cfg)))


@pytest.mark.parametrize("case", YAML.values(), ids=YAML.keys())
def test_yaml_bad_setting_is_rejected_by_our_args_model(case):
    assert_complete(case, flat_message(case))


def axolotl_base(name: str) -> dict[str, Any]:
    """A CPU example config without our keys (``full``: without the LoRA adapter)."""
    example = {
        "sft": "sft_lora_bema.yml",
        "full": "sft_lora_bema.yml",
        "dpo": "dpo_bema.yml",
        "grpo": "grpo_bema.yml",
        "kto": "kto_bema.yml",
    }[name]
    cfg = yaml.safe_load((EXAMPLES / example).read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith(OUR_PREFIXES)}
    if name == "full":
        cfg = {k: v for k, v in cfg.items() if k != "adapter" and not k.startswith("lora_")}
    return cfg


def axolotl_message(case: YamlBad) -> str | None:
    """The error of Axolotl's own config validation, with the plugin listed (None: accepted)."""
    pytest.importorskip("axolotl", reason=AXOLOTL_MISSING)
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(merged(axolotl_base(case.base), case.cfg))
    prepare_plugins(cfg)
    message = rejection(lambda: validate_config(cfg))
    assert message is None or "AxolotlInputConfig" in message  # raised by Axolotl's validation, before any load
    return message


@pytest.mark.axolotl
@pytest.mark.parametrize("case", YAML.values(), ids=YAML.keys())
def test_yaml_bad_setting_is_rejected_by_axolotl_validation(case):
    assert_complete(case, axolotl_message(case))  # accepted: Axolotl would train with it


@pytest.mark.axolotl
def test_axolotl_keys_that_look_like_ours_pass():
    """Keys that Axolotl knows are never taken for misspellings of ours: the examples validate (see
    test_axolotl_config), and so does every Axolotl field beside ours."""
    pytest.importorskip("axolotl", reason=AXOLOTL_MISSING)
    from axolotl.utils.schemas.config import AxolotlConfigWCapabilities

    from trl_ema_plugin.config.flat_keys import unknown_keys

    fields = {name: None for name in AxolotlConfigWCapabilities.model_fields}
    assert unknown_keys(fields) == []


# ------------------------------------------------------------------------------------ acceptance rate
def rate(outcomes: dict[str, str | None], cases: dict[str, Bad]) -> tuple[int, int, list[str]]:
    complete = [k for k, m in outcomes.items() if m is not None and not cases[k].missing(m)]
    failing = [k for k in outcomes if k not in complete]
    return len(complete), len(outcomes), failing


def report(capsys, label: str, done: int, total: int, failing: list[str]) -> None:
    with capsys.disabled():
        print(
            f"\n{label}: {done}/{total} bad settings rejected before training with key, value and allowed values "
            f"({100 * done / total:.1f}%)" + (f"; short: {failing}" if failing else "")
        )


def test_acceptance_rate_python_and_yaml(capsys):
    python = rate({k: python_message(c) for k, c in PYTHON.items()}, PYTHON)
    flat = rate({k: flat_message(c) for k, c in YAML.items()}, YAML)
    report(capsys, f"Python ({len(PYTHON)} cases)", *python)
    report(capsys, f"YAML through our args model ({len(YAML)} cases)", *flat)
    done, total = python[0] + flat[0], python[1] + flat[1]
    report(capsys, "all", done, total, [])
    assert len(PYTHON) >= 148 and len(YAML) >= 92
    assert done == total


@pytest.mark.axolotl
def test_acceptance_rate_through_axolotl(capsys):
    axolotl = rate({k: axolotl_message(c) for k, c in YAML.items()}, YAML)
    report(capsys, f"YAML through Axolotl's validation ({len(YAML)} cases)", *axolotl)
    assert axolotl[0] == axolotl[1]
