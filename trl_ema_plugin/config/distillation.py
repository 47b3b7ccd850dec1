"""Validated settings of the EMA-teacher self-distillation loss hook (one model for Python, TRL and Axolotl).

The loss becomes ``L = L_task + λ · τ² · D(student ‖ teacher)``, D averaged over the completion
tokens, with the teacher = the same base model carrying the averaged adapter of a
:class:`~trl_ema_plugin.integrations.trl.WeightAveragingCallback`. Names follow TRL's GKD trainer:
``temperature``, ``beta`` (generalized JSD, 0 = forward KL, 1 = reverse KL); ``lambda_`` (alias
``weight``) is the weight of the term and ``warmup_steps`` the optimizer steps before it is used.
Axolotl reads the same fields as flat keys ``self_distillation_<field>``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from .averaging import averager_name
from .errors import SettingError, SettingsModel

DIVERGENCES = ("forward_kl", "reverse_kl", "generalized_jsd")
DEFAULT_JSD_BETA = 0.5  # TRL GKDConfig.beta
_LAMBDA_ALIASES = ("weight", "lambda")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class SelfDistillationConfig(SettingsModel):
    """λ · τ² · D(student ‖ averaged teacher) on the completion tokens, added to the trainer's loss."""

    teacher: str | None = Field(
        None, description="name of the averager that is the teacher (e.g. ema, bema); default: the primary averager"
    )
    divergence: Literal["forward_kl", "reverse_kl", "generalized_jsd"] = Field(
        "forward_kl",
        description="forward_kl = KL(teacher‖student), reverse_kl = KL(student‖teacher), "
        "generalized_jsd = TRL GKD's generalized Jensen-Shannon divergence with weight beta",
    )
    beta: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="generalized_jsd only: interpolation in [0, 1] (0 = forward KL, 1 = reverse KL); default 0.5",
    )
    temperature: float = Field(
        1.0, gt=0.0, description="τ > 0: both distributions are softmax(logits/τ); the term is scaled by τ²"
    )
    lambda_: float = Field(
        0.5,
        ge=0.0,
        validation_alias=AliasChoices("lambda_", *_LAMBDA_ALIASES),
        description="λ ≥ 0, weight of the distillation term (alias weight)",
    )
    warmup_steps: int = Field(
        0, ge=0, description="optimizer steps before the teacher is used; the term is 0 (no teacher forward) before"
    )
    top_k: int | None = Field(
        None,
        ge=1,
        description="keep the teacher's top-k tokens plus one tail bucket (saves memory on large vocabularies)",
    )
    distill_every: int = Field(
        1, ge=1, description="run the teacher every n-th optimizer step after warm-up (the term is 0 on the others)"
    )
    adapter_name: str = Field("ema_teacher", description="name of the PEFT adapter that holds the teacher weights")
    kernel: Literal["torch", "liger"] = Field(
        "torch",
        description="torch: the divergence in chunks of tokens (any device); liger: Liger kernel's fused linear JSD "
        "(CUDA, pip install liger-kernel>=0.5; a plain bias-free output layer, no top_k)",
    )

    @model_validator(mode="before")
    @classmethod
    def _lambda_once(cls, data: Any) -> Any:
        """``lambda_`` has the aliases ``weight`` and ``lambda``; more than one of them is an error."""
        given = [k for k in ("lambda_", *_LAMBDA_ALIASES) if isinstance(data, dict) and k in data]
        if len(given) > 1:
            raise SettingError(
                "set only one of {first} or its alias {aliases} (each is the weight λ of the term)",
                settings={k: data[k] for k in given},
                allowed="one of them",
                names={"first": given[0], "aliases": given[1:]},
            )
        return data

    @field_validator("teacher")
    @classmethod
    def _teacher_is_an_averager_name(cls, teacher: str | None) -> str | None:
        return averager_name("teacher", teacher, "the name of an averager")

    @model_validator(mode="after")
    def _beta_applies_to_jsd(self) -> SelfDistillationConfig:
        if self.beta is not None and self.divergence != "generalized_jsd":
            raise SettingError(
                f"applies only to {{divergence}}='generalized_jsd' (got {{divergence}}={self.divergence!r}); "
                "forward_kl is {beta}=0 and reverse_kl is {beta}=1",
                field="beta",
                value=self.beta,
                allowed="{beta} unset, or {divergence}='generalized_jsd'",
                names={"beta": "beta", "divergence": "divergence"},
            )
        if self.kernel == "liger" and self.top_k is not None:
            raise SettingError(
                "Liger kernel's fused linear JSD works on the whole vocabulary: {top_k} does not apply",
                field="top_k",
                value=self.top_k,
                allowed="{top_k} unset with {kernel}='liger', or {kernel}='torch'",
                names={"top_k": "top_k", "kernel": "kernel"},
            )
        if not _NAME_PATTERN.match(self.adapter_name) or self.adapter_name in ("default", "ref"):
            raise SettingError(
                "not a teacher adapter name: 'default' is the trained adapter, 'ref' TRL's DPO reference",
                field="adapter_name",
                value=self.adapter_name,
                allowed=f"{_NAME_PATTERN.pattern}, other than 'default' and 'ref'",
            )
        return self

    @property
    def jsd_beta(self) -> float:
        """β of the generalized JSD: 0 for forward KL, 1 for reverse KL, ``beta`` (default 0.5) otherwise."""
        if self.divergence == "forward_kl":
            return 0.0
        if self.divergence == "reverse_kl":
            return 1.0
        return DEFAULT_JSD_BETA if self.beta is None else self.beta

    @property
    def weight(self) -> float:
        return self.lambda_

    def distills_at(self, step: int) -> bool:
        """Whether the optimizer step ``step`` (0-based ``global_step``) uses the teacher."""
        return step >= self.warmup_steps and (step - self.warmup_steps) % self.distill_every == 0
