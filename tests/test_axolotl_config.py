"""Flat YAML keys <-> WeightAveragingConfig: round trips, generated args model, error messages, examples.

Runs on both stacks; the tests that go through Axolotl's own config validation need Axolotl and
run on the axolotl stack only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from trl_ema_plugin.config import AveragerSpec, WeightAveragingConfig
from trl_ema_plugin.config.distillation import SelfDistillationConfig
from trl_ema_plugin.config.fields import keywords
from trl_ema_plugin.config.flat_keys import (
    DPO_REFERENCE,
    FAMILIES,
    RL_REFERENCE,
    SELF_DISTILLATION,
    WEIGHT_AVERAGING,
    check_flat_keys,
    dpo_reference_config_from_flat,
    flat_args_model,
    flat_from_config,
    flat_from_weight_averaging_config,
    posthoc_ema_config_from_flat,
    reference_config_from_flat,
    self_distillation_config_from_flat,
    weight_averaging_config_from_flat,
)
from trl_ema_plugin.config.flat_table import config_table_markdown
from trl_ema_plugin.config.reference import DPOReferenceConfig, ReferenceConfig
from trl_ema_plugin.integrations.trl import WeightAveragingCallback

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_configs"
GPU_EXAMPLES = [
    "sft_lora_bema.yml",
    "dpo_bema.yml",
    "grpo_bema.yml",
    "kto_bema.yml",
    "zero3_lora_bema.yml",
    "fsdp2_lora_bema.yml",
    "sft_lora_bema_self_distill.yml",
]
POSTHOC_EXAMPLES = ["sft_lora_posthoc_ema.yml", "cpu/sft_lora_posthoc_ema.yml"]  # no online averager: snapshots only
CPU_EXAMPLES = [
    "cpu/sft_lora_bema.yml",
    "cpu/dpo_bema.yml",
    "cpu/grpo_bema.yml",
    "cpu/kto_bema.yml",
    "cpu/zero3_lora_bema.yml",
    "cpu/sft_lora_bema_self_distill.yml",
]
OUR_PREFIXES = ("weight_averaging", "self_distillation", "rl_reference", "dpo_reference", "posthoc_ema")
AXOLOTL_MISSING = "could not import 'axolotl': Axolotl's config validation runs on the axolotl stack only"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------- round trips
ROUND_TRIP_CONFIGS = [
    WeightAveragingConfig.from_kwargs(
        method="bema", update_every=1, update_after=3, lag=2.5, ema_power=0.6, bias_power=0.3
    ),
    WeightAveragingConfig.from_kwargs(method="ema", decay=0.9, update_freq=2, eval=False, offload=True),
    WeightAveragingConfig.from_kwargs(method="dema", name="slow", lag=4, multiplier=2.0, save_checkpoints=False),
    WeightAveragingConfig.from_kwargs(method="ouema", min_ema_multiplier=0.1, export_at_end=False),
    WeightAveragingConfig.from_kwargs(method="ema", use_ema_warmup=True, inv_gamma=2.0, power=0.75),
    WeightAveragingConfig(
        averagers=[
            AveragerSpec(method="bema", update_every=1, lag=2),
            AveragerSpec(method="ema", name="ema_09", decay=0.9),
            AveragerSpec(method="ema", name="ema_99", decay=0.99, update_after=2),
        ],
        eval=False,
    ),
]


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS, ids=lambda c: "+".join(s.label for s in c.averagers))
def test_flat_keys_round_trip_through_yaml_text(config):
    flat = flat_from_weight_averaging_config(config)
    assert all(k == "weight_averaging" or k.startswith("weight_averaging_") for k in flat)
    text = yaml.safe_dump(flat)
    back = weight_averaging_config_from_flat(yaml.safe_load(text))
    assert back == config
    assert flat_from_weight_averaging_config(back) == flat


def test_flat_keys_spell_out_what_the_user_wrote():
    cfg = {
        "weight_averaging": "bema",
        "weight_averaging_update_freq": 3,  # TRL's name, the alias
        "weight_averaging_lag": 2,
        "weight_averaging_eval": False,
        "learning_rate": 0.1,  # other keys of the YAML are not ours
    }
    config = weight_averaging_config_from_flat(cfg)
    spec = config.primary
    assert (spec.method, spec.update_every, spec.lag, spec.bias_power, config.eval) == ("bema", 3, 2.0, 0.2, False)
    assert spec.model_fields_set == {"method", "update_every", "lag"}


def test_bema_presets_fill_the_settings_they_name():
    """``preset="lora"`` is issue 11's recommendation, ``preset="trl"`` TRL's defaults; keys set beside a preset win,
    and Python and YAML build the same spec."""
    lora = AveragerSpec(method="bema", preset="lora")
    assert (lora.cadence, lora.ema_power, lora.bias_power, lora.bias_horizon) == (1, 0.3, 0.2, "max_steps")
    assert AveragerSpec(method="bema", preset="lora", ema_power=0.5, update_freq=4).model_dump() == {
        **lora.model_dump(),
        "ema_power": 0.5,
        "update_every": 4,
    }
    trl = AveragerSpec(method="bema", preset="trl")
    default = AveragerSpec(method="bema")
    assert (trl.hyperparameters(), trl.cadence) == (default.hyperparameters(), default.cadence)
    assert default.cadence == 400 and default.hyperparameters()["ema_power"] == 0.5  # TRL's BEMACallback()
    flat = {"weight_averaging": "bema", "weight_averaging_preset": "lora", "weight_averaging_lag": 2}
    assert weight_averaging_config_from_flat(flat).primary == AveragerSpec(method="bema", preset="lora", lag=2)
    reference = reference_config_from_flat({"rl_reference": "bema", "rl_reference_preset": "lora"})
    assert (reference.averager.cadence, reference.averager.bias_horizon) == (1, "max_steps")


def test_feature_off_when_switch_unset_or_false():
    assert weight_averaging_config_from_flat({"learning_rate": 0.1}) is None
    assert weight_averaging_config_from_flat({"weight_averaging": None}) is None
    with pytest.warns(UserWarning, match="weight_averaging_decay unused"):
        assert weight_averaging_config_from_flat({"weight_averaging": False, "weight_averaging_decay": 0.9}) is None


def test_config_object_is_shared_with_trl_users():
    """The YAML keys build the same config object the TRL callback takes."""
    cfg = load_yaml(EXAMPLES / "cpu" / "sft_lora_bema.yml")
    config = weight_averaging_config_from_flat(cfg)
    callback = WeightAveragingCallback(config=config)
    direct = WeightAveragingCallback(
        method="bema", update_every=1, update_after=1, lag=2, ema_power=0.6, bias_power=0.3, eval=True
    )
    assert callback.config == direct.config


# ------------------------------------------------------------------------ the generated model
def test_every_config_field_has_exactly_one_key():
    keys = WEIGHT_AVERAGING.keys
    for model in (AveragerSpec, WeightAveragingConfig):
        for name in model.model_fields:
            if (model, name) == (AveragerSpec, "method"):
                continue  # the switch: weight_averaging: <method>
            key = f"weight_averaging_{name}"
            assert keys[key].python == name and keys[key].model is model
    assert keys["weight_averaging_update_freq"].alias_of == "weight_averaging_update_every"
    expected = {key for family, _ in FAMILIES.values() for key in family.all_keys}
    args = flat_args_model()
    assert set(args.model_fields) == expected
    assert all(f.default is None for f in args.model_fields.values())  # unset keys stay out of Axolotl's dump


def test_args_model_keeps_the_field_constraints():
    args = flat_args_model()
    ok = args(weight_averaging="ema", weight_averaging_decay=0.5, weight_averaging_update_every=2)
    assert ok.model_dump(exclude_none=True) == {
        "weight_averaging": "ema",
        "weight_averaging_decay": 0.5,
        "weight_averaging_update_every": 2,
    }
    with pytest.raises(
        ValidationError, match=r"weight_averaging_update_every=0: Input should be greater than or equal to 1"
    ):
        args(weight_averaging="ema", weight_averaging_update_every=0)
    with pytest.raises(ValidationError, match=r"weight_averaging_min_ema_multiplier"):
        args.model_validate({"weight_averaging": "bema", "weight_averaging_min_ema_multiplier": 2.0})


# ------------------------------------------------------------------------------ error messages
BAD = {
    "unknown method": (
        {"weight_averaging": "bemax"},
        ["weight_averaging='bemax': not a registered averager", "did you mean 'bema'?", "bema | dema | ema | ouema"],
    ),
    "switch not a string": ({"weight_averaging": 3}, ["weight_averaging=3: not a registered averager, true or false"]),
    "key of another method": (
        {"weight_averaging": "bema", "weight_averaging_decay": 0.9},
        [
            "weight_averaging_decay=0.9: does not apply to weight_averaging='bema'",
            "(allowed: weight_averaging_bias_horizon, weight_averaging_bias_power",
        ],
    ),
    "out of range": (
        {"weight_averaging": "ema", "weight_averaging_decay": 1.5},
        ["weight_averaging_decay=1.5", "allowed: number > 0.0 and < 1.0"],
    ),
    "alias out of range": (
        {"weight_averaging": "bema", "weight_averaging_update_freq": 0},
        ["weight_averaging_update_freq=0: Input should be greater than or equal to 1", "allowed: integer ≥ 1"],
    ),
    "not a bool": (
        {"weight_averaging": "ema", "weight_averaging_eval": "maybe"},
        ["weight_averaging_eval='maybe'", "allowed: true | false"],
    ),
    "zero cadence": (
        {"weight_averaging": "ema", "weight_averaging_update_every": 0},
        ["weight_averaging_update_every=0", "integer ≥ 1"],
    ),
    "bad name": ({"weight_averaging": "ema", "weight_averaging_name": "a b"}, ["weight_averaging_name='a b'"]),
    "misspelled key": (
        {"weight_averaging": "ema", "weight_averaging_dcay": 0.5},
        ["weight_averaging_dcay", "did you mean weight_averaging_decay?"],
    ),
    "key without switch": (
        {"weight_averaging_lag": 2},
        ["weight_averaging_lag=2: set without weight_averaging", "bema | dema | ema | ouema"],
    ),
    "alias beside its key": (
        {"weight_averaging": "ema", "weight_averaging_update_freq": 2, "weight_averaging_update_every": 2},
        ["weight_averaging_update_every=2, weight_averaging_update_freq=2: set one of them"],
    ),
    "true without a list": ({"weight_averaging": True}, ["weight_averaging=True: needs weight_averaging_averagers"]),
    "list without true": (
        {"weight_averaging": "ema", "weight_averaging_averagers": [{"method": "ema"}]},
        ["weight_averaging_averagers=[{'method': 'ema'}]: needs `weight_averaging: true`"],
    ),
    "key beside a list": (
        {"weight_averaging": True, "weight_averaging_averagers": [{"method": "ema"}], "weight_averaging_decay": 0.9},
        ["weight_averaging_decay=0.9: with weight_averaging_averagers, set hyper-parameters inside each list entry"],
    ),
    "list entry out of range": (
        {"weight_averaging": True, "weight_averaging_averagers": [{"method": "ema"}, {"method": "ema", "decay": 2}]},
        ["weight_averaging_averagers[1].decay=2", "allowed: number > 0.0 and < 1.0"],
    ),
    "list entry: key of another method": (
        {"weight_averaging": True, "weight_averaging_averagers": [{"method": "ema"}, {"method": "bema", "decay": 0.9}]},
        ["weight_averaging_averagers[1].decay=0.9: does not apply to method='bema'"],
    ),
    "list entry: misspelled key": (
        {"weight_averaging": True, "weight_averaging_averagers": [{"method": "ema", "decayy": 0.9}]},
        ["weight_averaging_averagers[0].decayy=0.9: unknown key", "did you mean weight_averaging_averagers[0].decay?"],
    ),
    "list: repeated names": (
        {"weight_averaging": True, "weight_averaging_averagers": [{"method": "ema"}, {"method": "ema", "decay": 0.9}]},
        ["weight_averaging_averagers: averager names must be unique; repeated: ema"],
    ),
    "empty list": (
        {"weight_averaging": True, "weight_averaging_averagers": []},
        ["weight_averaging_averagers", "non-empty list"],
    ),
}


@pytest.mark.parametrize(("cfg", "fragments"), BAD.values(), ids=BAD.keys())
def test_bad_values_name_the_yaml_key(cfg, fragments):
    with pytest.raises(ValueError) as info:
        weight_averaging_config_from_flat(cfg)
    for fragment in fragments:
        assert fragment in str(info.value)
    # the same message through the generated pydantic model (what Axolotl runs)
    with pytest.raises(ValidationError) as info:
        flat_args_model().model_validate(cfg)
    assert fragments[0] in str(info.value)


def test_check_flat_keys_ignores_other_keys():
    check_flat_keys({"weight_decay": 0.1, "learning_rate": 1e-4, "weight_averaging": "ema"})
    with pytest.raises(ValueError, match="weight_averaging_offlaod"):
        check_flat_keys({"weight_averaging": "ema", "weight_averaging_offlaod": True})


# ------------------------------------------------------------------------------ docs and examples
def test_config_table_is_generated_from_the_models():
    table = config_table_markdown()
    assert (ROOT / "docs" / "config_table.md").read_text() == table, (
        "docs/config_table.md is stale: python -m trl_ema_plugin.config.flat_table > docs/config_table.md"
    )
    for key in WEIGHT_AVERAGING.all_keys:
        assert f"| `{key}` |" in table


@pytest.mark.parametrize("name", GPU_EXAMPLES + CPU_EXAMPLES)
def test_example_configs_hold_valid_keys(name):
    cfg = load_yaml(EXAMPLES / name)
    assert cfg["plugins"] == ["trl_ema_plugin.integrations.axolotl.WeightAveragingPlugin"]
    config = weight_averaging_config_from_flat(cfg)
    assert config.primary.method == "bema" and config.primary.update_every == 1
    if cfg.get("rl"):  # every RLHF example moves its reference, under the neutral keys
        assert reference_config_from_flat(cfg).method == "bema"
        assert not any(k.startswith("dpo_reference") for k in cfg)


def _axolotl_validate(cfg: dict, gpu: bool):
    pytest.importorskip("axolotl", reason=AXOLOTL_MISSING)
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(cfg)
    prepare_plugins(cfg)
    if not gpu:
        return validate_config(cfg)
    n_gpu = 2 if cfg.get("deepspeed") or cfg.get("fsdp_config") else 1
    capabilities = {"bf16": True, "fp8": True, "tf32": True, "n_gpu": n_gpu, "compute_capability": "sm_90"}
    return validate_config(cfg, capabilities=capabilities, env_capabilities={"torch_version": "2.13.0"})


@pytest.mark.parametrize("name", POSTHOC_EXAMPLES)
def test_posthoc_example_holds_valid_keys(name):
    cfg = load_yaml(EXAMPLES / name)
    config = posthoc_ema_config_from_flat(cfg)
    dtype = "float32" if name.startswith("cpu/") else "bfloat16"  # the CPU twin's tests compare to fp32 rounding
    assert (config.sigma_rels, config.dtype) == ([0.05, 0.10], dtype)
    assert weight_averaging_config_from_flat(cfg) is None


@pytest.mark.axolotl
@pytest.mark.parametrize("name", GPU_EXAMPLES + POSTHOC_EXAMPLES + CPU_EXAMPLES)
def test_example_configs_pass_axolotl_validation(name):
    """The GPU YAMLs are validated offline, as Axolotl would on an H100 (no download, no training)."""
    cfg = load_yaml(EXAMPLES / name)
    validated = _axolotl_validate(cfg, gpu=not name.startswith("cpu/"))
    ours = {k: v for k, v in validated.items() if k.startswith(OUR_PREFIXES)}
    assert ours == {k: v for k, v in cfg.items() if k.startswith(OUR_PREFIXES)}
    assert weight_averaging_config_from_flat(validated) == weight_averaging_config_from_flat(cfg)
    assert self_distillation_config_from_flat(validated) == self_distillation_config_from_flat(cfg)
    assert reference_config_from_flat(validated) == reference_config_from_flat(cfg)
    assert posthoc_ema_config_from_flat(validated) == posthoc_ema_config_from_flat(cfg)


THROUGH_AXOLOTL = [
    "unknown method",
    "key of another method",
    "out of range",
    "misspelled key",
    "list entry out of range",
]


@pytest.mark.axolotl
@pytest.mark.parametrize("case", THROUGH_AXOLOTL)
def test_axolotl_validation_rejects_bad_keys_with_our_message(case):
    cfg, fragments = BAD[case]
    base = load_yaml(EXAMPLES / "cpu" / "sft_lora_bema.yml")
    base = {k: v for k, v in base.items() if not k.startswith(OUR_PREFIXES)}
    with pytest.raises(ValidationError) as info:
        _axolotl_validate({**base, **cfg}, gpu=False)
    assert "AxolotlInputConfig" in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


# ------------------------------------------------------------------------------ self-distillation
AVERAGING = {
    "weight_averaging": True,
    "weight_averaging_averagers": [{"method": "bema"}, {"name": "ema_9", "decay": 0.9}],
}


@pytest.mark.parametrize(
    "config",
    [
        SelfDistillationConfig(lambda_=0.3, temperature=2.0, warmup_steps=5),
        SelfDistillationConfig(weight=0.1, teacher="ema_9", divergence="generalized_jsd", beta=0.25, top_k=8),
        SelfDistillationConfig(divergence="reverse_kl", distill_every=2, adapter_name="teacher"),
    ],
)
def test_self_distillation_round_trip(config):
    flat = flat_from_config(SELF_DISTILLATION, config)
    assert flat["self_distillation"] is True
    assert "self_distillation_lambda" in flat or "lambda_" not in config.model_fields_set
    back = self_distillation_config_from_flat(yaml.safe_load(yaml.safe_dump({**AVERAGING, **flat})))
    assert back == config


def test_self_distillation_alias_and_spelling():
    config = self_distillation_config_from_flat(
        {**AVERAGING, "self_distillation": True, "self_distillation_weight": 0.2}
    )
    assert config.lambda_ == 0.2
    assert self_distillation_config_from_flat(AVERAGING) is None


SELF_DISTILLATION_BAD = {
    "without weight averaging": (
        {"self_distillation": True},
        "self_distillation=True: needs weight_averaging",
    ),
    "teacher names no averager": (
        {**AVERAGING, "self_distillation": True, "self_distillation_teacher": "ema"},
        "self_distillation_teacher='ema': names no averager; did you mean 'bema'? (allowed: bema | ema_9)",
    ),
    "alias beside its key": (
        {**AVERAGING, "self_distillation": True, "self_distillation_lambda": 1, "self_distillation_weight": 1},
        "self_distillation_lambda=1, self_distillation_weight=1: set one of them",
    ),
    "beta without jsd": (
        {**AVERAGING, "self_distillation": True, "self_distillation_beta": 0.3},
        "self_distillation_beta=0.3: applies only to self_distillation_divergence='generalized_jsd'",
    ),
    "unknown divergence": (
        {**AVERAGING, "self_distillation": True, "self_distillation_divergence": "kl"},
        "self_distillation_divergence='kl': Input should be 'forward_kl', 'reverse_kl' or 'generalized_jsd'",
    ),
    "zero temperature": (
        {**AVERAGING, "self_distillation": True, "self_distillation_temperature": 0},
        "allowed: number > 0.0",
    ),
    "alias out of range": (
        {**AVERAGING, "self_distillation": True, "self_distillation_weight": -1},
        "self_distillation_weight=-1: Input should be greater than or equal to 0 (allowed: number ≥ 0.0; "
        "self_distillation_weight is an alias of self_distillation_lambda)",
    ),
    "key without switch": (
        {**AVERAGING, "self_distillation_lambda": 1},
        "self_distillation_lambda=1: set without self_distillation",
    ),
    "misspelled key": (
        {**AVERAGING, "self_distillation": True, "self_distillation_lamda": 1},
        "did you mean self_distillation_lambda?",
    ),
}


@pytest.mark.parametrize(("cfg", "fragment"), SELF_DISTILLATION_BAD.values(), ids=SELF_DISTILLATION_BAD.keys())
def test_self_distillation_errors_name_the_yaml_key(cfg, fragment):
    with pytest.raises(ValueError) as info:
        check_flat_keys(cfg)
    assert fragment in str(info.value)


@pytest.mark.axolotl
def test_axolotl_validation_self_distillation_needs_a_peft_adapter():
    base = load_yaml(EXAMPLES / "cpu" / "sft_lora_bema_self_distill.yml")
    base = {k: v for k, v in base.items() if not k.startswith("lora_") and k != "adapter"}
    with pytest.raises(
        ValidationError, match=r"self_distillation=True: needs a PEFT adapter .* adapter: lora \| qlora"
    ):
        _axolotl_validate(base, gpu=False)


# --------------------------------------------------------------------------------- RLHF reference
@pytest.mark.parametrize(
    "config",
    [
        ReferenceConfig(method="bema", update_every=1, lag=2, ref_update_every=4),
        ReferenceConfig(method="ema", decay=0.9, update_freq=2, offload=True),
        ReferenceConfig(method="tr_dpo", ref_model_sync_steps=8, ref_model_mixup_alpha=1.0),
        ReferenceConfig(),
    ],
    ids=["bema", "ema", "tr_dpo", "default"],
)
def test_reference_round_trip_in_both_spellings(config):
    flat = flat_from_config(RL_REFERENCE, config)
    assert flat["rl_reference"] in (config.method, True)
    assert all(k == "rl_reference" or k.startswith("rl_reference_") for k in flat)
    back = reference_config_from_flat(yaml.safe_load(yaml.safe_dump(flat)))
    assert back == config
    # the earlier spelling (dpo_reference*) is the same family: every key an alias, the same config
    earlier = {"dpo_reference" + k.removeprefix("rl_reference"): v for k, v in flat.items()}
    assert dpo_reference_config_from_flat(earlier) == reference_config_from_flat(earlier) == config
    # the dump a checkpoint holds (reference/averager_state.json): flat, every keyword, loads back
    dumped = json.loads(json.dumps(config.model_dump(mode="json")))
    canonical = [k for k in RL_REFERENCE.keys if k.startswith("rl_reference_") and "freq" not in k]
    assert [f"rl_reference_{k}" for k in dumped if k != "method"] == canonical
    assert ReferenceConfig(**dumped) == config == DPOReferenceConfig(**dumped)


def test_every_reference_key_has_its_earlier_spelling():
    assert DPO_REFERENCE is RL_REFERENCE and DPOReferenceConfig is ReferenceConfig
    canonical = [k for k in RL_REFERENCE.keys if k.startswith("rl_reference_")]
    earlier = [k for k in RL_REFERENCE.keys if k.startswith("dpo_reference_")]
    # all but the switch's method (19 since power_ema brought sigma_rel, 20 since the BEMA preset)
    assert len(canonical) == len(earlier) == len(keywords(ReferenceConfig)) - 1 == 20
    for key in earlier:
        same = "rl_reference" + key.removeprefix("dpo_reference")
        assert RL_REFERENCE.keys[key].alias_of == (RL_REFERENCE.keys[same].alias_of or same)
        assert RL_REFERENCE.keys[key].python == RL_REFERENCE.keys[same].python
    assert RL_REFERENCE.all_keys[:2] == ["rl_reference", "dpo_reference"]


REFERENCE_BAD = {
    "unknown rule (rl_reference)": (
        {"rl_reference": "bemx"},
        "rl_reference='bemx': not a reference update rule, true or false; did you mean 'bema'? "
        "(allowed: bema | dema | ema | ouema | power_ema | tr_dpo",
    ),
    "key of another method (rl_reference)": (
        {"rl_reference": "bema", "rl_reference_decay": 0.5},
        "rl_reference_decay=0.5: does not apply to rl_reference='bema' (allowed: rl_reference_bias_horizon, rl_reference_bias_power",
    ),
    "switch in both spellings": (
        {"rl_reference": "bema", "dpo_reference": "bema"},
        "rl_reference='bema', dpo_reference='bema': set one of them, not both (dpo_reference is an alias of "
        "rl_reference) (allowed: rl_reference or dpo_reference)",
    ),
    "key in both spellings": (
        {"rl_reference": "bema", "rl_reference_lag": 2, "dpo_reference_lag": 3},
        "rl_reference_lag=2, dpo_reference_lag=3: set one of them, not both (dpo_reference_lag is an alias of "
        "rl_reference_lag)",
    ),
    "alias keyword in the other spelling": (
        {"rl_reference": "ema", "rl_reference_update_every": 1, "dpo_reference_update_freq": 2},
        "rl_reference_update_every=1, dpo_reference_update_freq=2: set one of them, not both "
        "(dpo_reference_update_freq is an alias of rl_reference_update_every)",
    ),
    "one keyword in three spellings": (
        {
            "rl_reference": "ema",
            "rl_reference_update_freq": 1,
            "dpo_reference_update_every": 2,
            "dpo_reference_update_freq": 3,
        },
        "set one of them (rl_reference_update_freq is an alias of rl_reference_update_every; "
        "dpo_reference_update_every is an alias of rl_reference_update_every; dpo_reference_update_freq is an alias",
    ),
    "earlier key under the new switch": (
        {"rl_reference": "bema", "dpo_reference_decay": 0.5},
        "dpo_reference_decay=0.5: does not apply to rl_reference='bema' (allowed: rl_reference_bias_horizon, rl_reference_bias_power",
    ),
    "misspelled new key": ({"rl_reference": "ema", "rl_reference_decy": 0.5}, "did you mean rl_reference_decay?"),
    "misspelled new switch": ({"rl_refernce": "ema"}, "did you mean rl_reference?"),
    "key without switch (rl_reference)": ({"rl_reference_lag": 2}, "rl_reference_lag=2: set without rl_reference"),
}

DPO_REFERENCE_BAD = {
    "unknown rule": (
        {"dpo_reference": "bemx"},
        "dpo_reference='bemx': not a reference update rule, true or false; did you mean 'bema'? "
        "(allowed: bema | dema | ema | ouema | power_ema | tr_dpo",
    ),
    "key of another method": (
        {"dpo_reference": "bema", "dpo_reference_decay": 0.5},
        "dpo_reference_decay=0.5: does not apply to dpo_reference='bema'",
    ),
    "averager key with tr_dpo": (
        {"dpo_reference": "tr_dpo", "dpo_reference_lag": 2},
        "dpo_reference_lag=2: does not apply to dpo_reference='tr_dpo' (allowed: dpo_reference_ref_model_sync_steps",
    ),
    "out of range": (
        {"dpo_reference": "tr_dpo", "dpo_reference_ref_model_mixup_alpha": 0},
        "dpo_reference_ref_model_mixup_alpha=0: Input should be greater than 0",
    ),
    "averager key out of range": (
        {"dpo_reference": "bema", "dpo_reference_lag": -1},
        "dpo_reference_lag=-1: Input should be greater than or equal to 0 (allowed: number ≥ 0.0)",
    ),
    "alias out of range": (
        {"dpo_reference": "bema", "dpo_reference_update_freq": 0},
        "dpo_reference_update_freq=0: Input should be greater than or equal to 1",
    ),
    "key without switch": ({"dpo_reference_lag": 2}, "dpo_reference_lag=2: set without dpo_reference"),
    "misspelled key": ({"dpo_reference": "ema", "dpo_reference_decy": 0.5}, "did you mean dpo_reference_decay?"),
}


@pytest.mark.parametrize(
    ("cfg", "fragment"),
    [*REFERENCE_BAD.values(), *DPO_REFERENCE_BAD.values()],
    ids=[*REFERENCE_BAD, *DPO_REFERENCE_BAD],
)
def test_reference_errors_name_the_yaml_key_as_written(cfg, fragment):
    with pytest.raises(ValueError) as info:
        check_flat_keys(cfg)
    assert fragment in str(info.value)


def test_axolotl_only_checks_without_axolotl():
    """The checks against Axolotl's own keys (no Axolotl import needed)."""
    from trl_ema_plugin.integrations.axolotl.args import check_axolotl_keys

    dpo = {"rl": "dpo", "adapter": "lora", "dpo_reference": "bema"}
    grpo = {"rl": "grpo", "adapter": "lora", "rl_reference": "bema", "trl": {"beta": 0.04}}
    for ok in (dpo, grpo, {**dpo, "rl": "ipo"}, {**dpo, "rl": "kto"}, {**grpo, "rl": "gdpo"}):
        check_axolotl_keys(ok)
    check_axolotl_keys({**grpo, "trl": {}, "rl_beta": 0.1})  # Axolotl reads rl_beta when trl.beta is unset
    check_axolotl_keys({**dpo, "rl": "orpo", "dpo_reference": False})  # off
    needs_rl = "moves the reference adapter of an RLHF trainer and needs rl: dpo | ipo | kto | grpo | gdpo"
    cases = [
        ({**dpo, "rl": None}, f"dpo_reference='bema': {needs_rl}; got rl: None"),
        ({**grpo, "rl": "orpo"}, f"rl_reference='bema': {needs_rl}; got rl: orpo"),
        ({**dpo, "adapter": None}, "dpo_reference='bema': needs a PEFT adapter (the reference is the 'ref' adapter"),
        ({**dpo, "precompute_ref_log_probs": True}, "precompute_ref_log_probs: true computes its log-probs once"),
        ({**dpo, "rl": "kto", "precompute_ref_log_probs": True}, "dpo_reference='bema', precompute_ref_log_probs=True"),
        ({**dpo, "rl_adapter_ref_model": True}, "rl_adapter_ref_model: true loads a separate reference model"),
        (
            {**dpo, "trl": {"sync_ref_model": True}},
            "dpo_reference: tr_dpo with dpo_reference_ref_model_sync_steps",
        ),
        (
            {**grpo, "trl": {"sync_ref_model": True, "beta": 0.1}},
            "rl_reference: tr_dpo with rl_reference_ref_model_sync_steps",
        ),
        (
            {**grpo, "trl": {}},
            "rl_reference='bema', trl.beta: rl: grpo computes reference log-probs only for its KL term, and trl.beta "
            "is unset (TRL's default 0.0)",
        ),
        ({**grpo, "rl": "gdpo", "trl": {"beta": 0.0}}, "rl_reference='bema', trl.beta=0.0: rl: gdpo computes"),
        ({**grpo, "trl": {"beta": 0}, "rl_beta": 0.1}, "trl.beta=0"),  # trl.beta wins, as in Axolotl
        (
            {**grpo, "trl": {"beta": 0.04, "async_prefetch": True}},
            "rl_reference='bema', trl.async_prefetch=True: Axolotl's asynchronous GRPO trainer",
        ),
        ({**grpo, "trl": {"beta": 0.04, "use_data_producer": True}}, "(allowed: trl.use_data_producer: false)"),
        (
            {"self_distillation": True, "adapter": "lora", "rl": "kto"},
            "self_distillation=True: distils on SFT and rl: dpo | ipo | grpo | gdpo runs, not on rl: kto (KTO batches",
        ),
        (
            {"self_distillation": True, "adapter": None},
            "self_distillation=True: needs a PEFT adapter (the teacher is a second adapter on the same base model); "
            "got adapter: None (allowed: with adapter: lora | qlora)",
        ),
    ]
    for cfg, fragment in cases:
        with pytest.raises(ValueError) as info:
            check_axolotl_keys(cfg)
        assert fragment in str(info.value)


@pytest.mark.axolotl
def test_axolotl_validation_reference_needs_an_rlhf_trainer():
    base = load_yaml(EXAMPLES / "cpu" / "sft_lora_bema.yml")  # an SFT run
    for key in ("rl_reference", "dpo_reference"):
        with pytest.raises(ValidationError, match=f"{key}='bema': moves the reference adapter of an RLHF trainer"):
            _axolotl_validate({**base, key: "bema"}, gpu=False)
    dpo = load_yaml(EXAMPLES / "cpu" / "dpo_bema.yml")
    with pytest.raises(ValidationError, match="precompute_ref_log_probs: true"):
        _axolotl_validate({**dpo, "precompute_ref_log_probs": True}, gpu=False)


def test_package_imports_without_axolotl():
    """The keys, the args model and the package import on a stack without Axolotl; the plugin class needs it."""
    import importlib.util

    import trl_ema_plugin.integrations.axolotl as package
    from trl_ema_plugin.integrations.axolotl.args import ARGS_PATH, TrlEmaPluginArgs

    assert ARGS_PATH == "trl_ema_plugin.integrations.axolotl.args.TrlEmaPluginArgs"
    assert {"rl_reference_ref_model_sync_steps", "dpo_reference_ref_model_sync_steps"} <= set(
        TrlEmaPluginArgs.model_fields
    )
    if importlib.util.find_spec("axolotl") is None:
        with pytest.raises(ModuleNotFoundError, match="axolotl"):
            _ = package.WeightAveragingPlugin
    else:
        assert package.WeightAveragingPlugin.__name__ == "WeightAveragingPlugin"
