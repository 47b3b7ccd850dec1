"""Bad settings fail with a ValueError that names the key and the allowed values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trl_ema_plugin import AveragerSpec, DPOReferenceConfig, WeightAveragingCallback, WeightAveragingConfig
from trl_ema_plugin.config.distillation import SelfDistillationConfig


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"method": "swa"}, r"method='swa'.*allowed: bema \| dema \| ema \| ouema"),
        ({"method": "ema", "decay": 1.5}, r"decay"),
        ({"method": "ema", "decay": 0.0}, r"decay"),
        ({"method": "ema", "update_after": -1}, r"update_after"),
        ({"method": "bema", "update_every": 0}, r"update_every"),
        ({"method": "bema", "update_freq": 0}, r"update_every"),
        ({"method": "bema", "lag": -1}, r"lag"),
        ({"method": "bema", "multiplier": 0}, r"multiplier"),
        ({"method": "bema", "min_ema_multiplier": 2}, r"min_ema_multiplier"),
        ({"method": "ema", "inv_gamma": 0, "use_ema_warmup": True}, r"inv_gamma"),
        ({"method": "bema", "update_every": 2, "update_freq": 2}, r"update_every=2, update_freq=2: .* not both"),
        (
            {"method": "bema", "decay": 0.9},
            r"decay=0.9: does not apply to method='bema' \(allowed: bias_horizon, bias_power",
        ),
        ({"method": "ema", "ema_power": 0.5}, r"ema_power=0.5: does not apply to method='ema'"),
        ({"method": "ema", "name": "has space"}, r"name='has space'"),
        ({"method": "ema", "unknown_key": 1}, r"unknown_key"),
        (
            {"method": "ema", "options": {"decay": 5.0}},
            r"options={'decay': 5.0}: sets decay: set them as keys of their own",
        ),
        ({"method": "ema", "options": {"foo": 1}}, r"options={'foo': 1}: foo is not an argument of method='ema'"),
        ({"method": "ema", "power": 0.75}, r"power=0.75: shapes the EMA warm-up, which is off .*use_ema_warmup=True"),
        ({"method": "ema", "inv_gamma": 2.0}, r"inv_gamma=2.0: shapes the EMA warm-up"),
    ],
)
def test_bad_averager_settings(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        AveragerSpec(**kwargs)


def test_update_freq_is_an_alias_of_update_every():
    assert AveragerSpec(method="bema", update_freq=7).cadence == 7
    assert AveragerSpec(method="bema").cadence == 400  # TRL's BEMACallback default
    assert AveragerSpec(method="ema").cadence == 1


def test_duplicate_averager_names():
    with pytest.raises(ValueError, match="repeated: ema"):
        WeightAveragingConfig(averagers=[{"method": "ema"}, {"method": "ema", "decay": 0.9}])


def test_empty_averager_list():
    with pytest.raises(ValueError, match="averagers"):
        WeightAveragingConfig(averagers=[])


def test_callback_rejects_mixed_arguments():
    with pytest.raises(ValueError, match="not both"):
        WeightAveragingCallback(method="ema", averagers=[{"method": "bema"}])
    with pytest.raises(ValueError, match="not both"):
        WeightAveragingCallback(method="ema", config=WeightAveragingConfig(averagers=[{"method": "ema"}]))


def test_trl_bemacallback_kwargs_port_unchanged():
    trl_kwargs = dict(
        update_freq=400, ema_power=0.5, bias_power=0.2, lag=10, update_after=0, multiplier=1.0, min_ema_multiplier=0.0
    )
    callback = WeightAveragingCallback(method="bema", **trl_kwargs, device="cpu")
    assert callback.config.primary.cadence == 400
    assert callback.config.offload


# ------------------------------------------------------------- messages: key as spelled, value, allowed values
PYTHON_MESSAGES = {
    "out of range": (
        AveragerSpec,
        {"method": "ema", "decay": 1.5},
        "decay=1.5: Input should be less than 1 (allowed: number > 0.0 and < 1.0)",
    ),
    "misspelled keyword": (
        AveragerSpec,
        {"method": "ema", "decayy": 0.5},
        "decayy=0.5: unknown key (did you mean decay?)",
    ),
    "alias as spelled": (
        AveragerSpec,
        {"method": "bema", "update_freq": 0},
        "update_freq=0: Input should be greater than or equal to 1 "
        "(allowed: integer ≥ 1, or unset; update_freq is an alias of update_every)",
    ),
    "list entry": (
        WeightAveragingConfig,
        {"averagers": [{"method": "ema"}, {"method": "ema", "name": "slow", "decay": 2}]},
        "averagers[1].decay=2: Input should be less than 1 (allowed: number > 0.0 and < 1.0)",
    ),
    "misspelled keyword in a list entry": (
        WeightAveragingConfig,
        {"averagers": [{"method": "ema", "decayy": 0.5}]},
        "averagers[0].decayy=0.5: unknown key (did you mean averagers[0].decay?)",
    ),
    "method of a list entry": (
        WeightAveragingConfig,
        {"averagers": [{"method": "ema"}, {"method": "swa"}]},
        "averagers[1].method='swa': not a registered averager (allowed: bema | dema | ema | ouema | power_ema)",
    ),
    "reference: averager keyword": (
        DPOReferenceConfig,
        {"method": "bema", "lag": -1},
        "lag=-1: Input should be greater than or equal to 0 (allowed: number ≥ 0.0)",
    ),
    "reference: misspelled averager keyword": (
        DPOReferenceConfig,
        {"method": "bema", "lagg": 2},
        "lagg=2: unknown key (did you mean lag?)",
    ),
    "reference: averager alias": (
        DPOReferenceConfig,
        {"method": "ema", "update_freq": 0},
        "update_freq=0: Input should be greater than or equal to 1",
    ),
    "distillation: alias": (
        SelfDistillationConfig,
        {"weight": -1},
        "weight=-1: Input should be greater than or equal to 0 (allowed: number ≥ 0.0; weight is an alias of lambda_)",
    ),
}


@pytest.mark.parametrize(("model", "kwargs", "line"), PYTHON_MESSAGES.values(), ids=PYTHON_MESSAGES.keys())
def test_python_errors_name_the_keyword_value_and_allowed_values(model, kwargs, line):
    with pytest.raises(ValidationError) as info:
        model(**kwargs)
    message = str(info.value)
    assert line in message
    assert "[type=invalid_setting]" in message and "input_value" not in message  # no raw pydantic text


def test_callback_and_assignment_errors_use_the_same_format():
    with pytest.raises(ValueError, match=r"decayy=0\.5: unknown key \(did you mean decay\?\)"):
        WeightAveragingCallback(method="ema", decayy=0.5)
    spec = AveragerSpec(method="bema")
    with pytest.raises(
        ValueError, match=r"lag=-2: Input should be greater than or equal to 0 \(allowed: number ≥ 0.0\)"
    ):
        spec.lag = -2
    with pytest.raises(ValueError, match=r"decay=0.5: does not apply to method='bema'"):
        spec.decay = 0.5
    assert spec.lag == 10 and "decay" not in spec.model_fields_set


# ----------------------------------------------------------------------- the reference nests an AveragerSpec
def test_reference_config_nests_the_averager_spec_from_flat_keywords():
    config = DPOReferenceConfig(method="bema", update_every=1, ref_update_every=4, lag=2)
    assert config.averager == AveragerSpec(method="bema", name="reference", update_every=1, lag=2)
    assert config.averager_spec() is config.averager
    assert config.averager.model_fields_set == {"method", "name", "update_every", "lag"}
    assert (config.lag, config.decay, config.sync_every) == (2.0, None, 4)  # read as the flat fields were
    assert DPOReferenceConfig(method="tr_dpo").averager is None
    config.method = "dema"  # the averager follows, its settings checked for the new method
    assert config.averager == AveragerSpec(method="dema", name="reference", update_every=1, lag=2)
    with pytest.raises(ValueError, match=r"lag=2.0: does not apply to method='ema'"):
        config.method = "ema"
    assert config.method == config.averager.method == "dema"
    with pytest.raises(ValueError, match=r"pass either averager=AveragerSpec\(\.\.\.\) or its fields \(lag\)"):
        DPOReferenceConfig(method="bema", lag=2, averager=AveragerSpec(method="bema"))


#: what the flat DPOReferenceConfig of 0.1.0 wrote into checkpoint-N/dpo_reference/averager_state.json
OLD_REFERENCE_DUMP = {
    "method": "bema",
    "ref_update_every": 4,
    "update_every": 1,
    "update_after": None,
    "decay": None,
    "use_ema_warmup": None,
    "inv_gamma": None,
    "power": None,
    "ema_power": None,
    "bias_power": None,
    "lag": 2.0,
    "multiplier": None,
    "min_ema_multiplier": None,
    "options": None,
    "ref_model_sync_steps": None,
    "ref_model_mixup_alpha": None,
    "offload": False,
}


def test_reference_config_of_an_old_checkpoint_loads_with_the_same_averager():
    """A dump keeps the flat layout (new dumps load back: ``test_axolotl_config.test_dpo_reference_round_trip``)."""
    old = DPOReferenceConfig(**OLD_REFERENCE_DUMP)
    dumped = old.model_dump(mode="json")
    added = {k: v for k, v in dumped.items() if k not in OLD_REFERENCE_DUMP}  # settings of averagers added since
    assert dumped == {**OLD_REFERENCE_DUMP, **added} and set(added.values()) <= {None}
    # what the resume path compares: the averager state's spec, dumped with exclude_unset
    spec = old.averager_spec().model_dump(mode="json", exclude_unset=True)
    assert spec == {"method": "bema", "name": "reference", "update_every": 1, "lag": 2.0}
    assert AveragerSpec(**spec) == old.averager_spec()
