"""Named BEMA settings: ``AveragerSpec(method="bema", preset=...)``, YAML ``weight_averaging_preset``.

BEMA outputs θ̂_t = EMA_t + α_t (θ_t − θ_0), β_t = (ρ + γt)^−κ, α_t = (ρ + γt)^−η · max(0, 1 − t/H)
(no fade without H).

* ``trl``: TRL's ``BEMACallback()`` defaults, for parity: κ = 0.5, η = 0.2, ρ = 10, γ = 1, no β floor, no fade,
  an update every 400 steps. These are ``AveragerSpec``'s own defaults, so the preset sets nothing: it names
  ``method="bema"`` alone.
* ``lora``: what issue 11's LoRA study recommends (docs/evidence.md): κ = 0.3, α_t faded to 0 at the run's
  last step (H = ``max_steps``), an update every step. Its export ended level with the raw adapter after 60 and
  240 steps on 5 fresh seeds (+0.0007 and +0.0000 eval loss) where TRL's schedule ended +0.007 and +0.100 behind.

A key set beside ``preset`` wins over the preset's value for that key.
"""

from __future__ import annotations

from typing import Any

#: preset name → the ``AveragerSpec`` fields it sets
BEMA_PRESETS: dict[str, dict[str, Any]] = {
    "trl": {},  # the spec's defaults (config/averaging.py: its fields, TRL_DEFAULT_UPDATE_EVERY)
    "lora": {"update_every": 1, "ema_power": 0.3, "bias_horizon": "max_steps"},
}
#: the methods whose settings the presets name
PRESET_METHODS = frozenset({"bema"})


def preset_fields(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The fields that preset ``name`` adds to the ``given`` ones (a given key, or its alias, wins)."""
    spelled = set(given) | ({"update_every"} if "update_freq" in given else set())
    return {key: value for key, value in BEMA_PRESETS[name].items() if key not in spelled}
