"""Bad settings fail with a ValueError that names the key and the allowed values."""

from __future__ import annotations

import pytest

from trl_ema_plugin import AveragerSpec, WeightAveragingCallback, WeightAveragingConfig


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"method": "swa"}, r"method='swa'.*allowed values: bema, dema, ema, ouema"),
        ({"method": "ema", "decay": 1.5}, r"decay"),
        ({"method": "ema", "decay": 0.0}, r"decay"),
        ({"method": "ema", "update_after": -1}, r"update_after"),
        ({"method": "bema", "update_every": 0}, r"update_every"),
        ({"method": "bema", "update_freq": 0}, r"update_every"),
        ({"method": "bema", "lag": -1}, r"lag"),
        ({"method": "bema", "multiplier": 0}, r"multiplier"),
        ({"method": "bema", "min_ema_multiplier": 2}, r"min_ema_multiplier"),
        ({"method": "ema", "inv_gamma": 0, "use_ema_warmup": True}, r"inv_gamma"),
        ({"method": "bema", "update_every": 2, "update_freq": 2}, r"update_every or its alias update_freq"),
        ({"method": "bema", "decay": 0.9}, r"decay do\(es\) not apply to method='bema'"),
        ({"method": "ema", "ema_power": 0.5}, r"ema_power do\(es\) not apply to method='ema'"),
        ({"method": "ema", "name": "has space"}, r"name='has space'"),
        ({"method": "ema", "unknown_key": 1}, r"unknown_key"),
        ({"method": "ema", "options": {"decay": 5.0}}, r"options sets decay: set them as keys of their own"),
        ({"method": "ema", "options": {"foo": 1}}, r"options foo are not arguments of method='ema'"),
        ({"method": "ema", "power": 0.75}, r"power shape\(s\) the EMA warm-up: set use_ema_warmup=True"),
        ({"method": "ema", "inv_gamma": 2.0}, r"inv_gamma shape\(s\) the EMA warm-up"),
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
