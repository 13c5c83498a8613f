"""Reward-model objectives (spec §B), components of kind ``objective``.

Ranking losses for the reward-model algorithm's ``objective`` slot: ``pairwise``
(Bradley–Terry), ``kwise`` (InstructGPT), ``best-of-n`` (Ziegler 2019), ``ties``
(Christiano 2017), ``margin`` (Llama-2); and regularisers for its ``regularizers`` slot:
``lm-loss`` (Askell 2021) and ``centering`` (Eisenstein 2023). Each is called with a
:class:`rlhfkit.RewardBatch` and returns a :class:`rlhfkit.LossTerm`.

This module holds only the settings and the registration; the tensor functions live in
``losses.py`` and the components in ``components.py``, imported when one is built, so
listing plugins stays free of torch. Formulas and conventions: docs/reward-objectives.md.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from rlhfkit import ComponentSpec, hookimpl, lazy


class PairwiseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    log_eps: float = Field(0.0, ge=0, lt=1, description=(
        "0 uses logsigmoid (stable); > 0 computes -log(sigmoid(gap) + log_eps) as MOSS-RLHF does (1e-5)"))


class KWiseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BestOfNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TiesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    noise: float = Field(0.0, ge=0, lt=0.5, description=(
        "noise model P = (1 - 2 noise) softmax + noise; Christiano et al. use 0.05 (0.9 softmax + 0.05)"))


class MarginConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(1.0, ge=0, description="multiplies each pair's margin before it is subtracted from the gap")


class LMLossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    coef: float = Field(1.0, gt=0, description=(
        "beta_rm, the weight of the LM loss of the best completion (MOSS's default 0 = leave lm-loss out)"))


class CenteringConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    coef: float = Field(0.01, gt=0, description="c in c * mean((r_w + r_l)^2); Eisenstein et al. recommend 0.01")


@hookimpl
def rlhfkit_components() -> list[ComponentSpec]:
    def objective(name: str, config: type[BaseModel], class_name: str, doc: str,
                  tag: str = "reward-model-loss", *more: str) -> ComponentSpec:
        return ComponentSpec(kind="objective", name=name, config=config, factory=lazy(f"rlhfkit.plugins.rm_objectives.components:{class_name}"),
                             doc=doc, tags=frozenset({tag, *more}))

    return [
        # "pairs": K = 2 only, so the reward model's data slot then takes no rankings
        objective("pairwise", PairwiseConfig, "Pairwise",
                  "Bradley-Terry on pairs: -mean log sigmoid(r_w - r_l); ties left out", "reward-model-loss", "pairs"),
        objective("kwise", KWiseConfig, "KWise",
                  "InstructGPT K-wise: mean over a prompt's C(K,2) ranked pairs of -log sigmoid(r_i - r_j)"),
        objective("best-of-n", BestOfNConfig, "BestOfN",
                  "Ziegler 2019: cross-entropy of softmax over K scores with the best completion as target"),
        objective("ties", TiesConfig, "Ties",
                  "Christiano 2017: soft labels (0.5, 0.5) for ties, optional noise model"),
        objective("margin", MarginConfig, "Margin",
                  "Llama-2: -log sigmoid(r_w - r_l - scale * margin), margin from the data", "reward-model-loss", "pairs"),
        objective("lm-loss", LMLossConfig, "LMLoss",
                  "Askell 2021 regulariser: coef * LM loss of the best completion (needs an LM head)",
                  tag="reward-model-regularizer"),
        objective("centering", CenteringConfig, "Centering",
                  "Eisenstein 2023 regulariser: coef * mean((r_w + r_l)^2) keeps rewards near 0",
                  tag="reward-model-regularizer"),
    ]
