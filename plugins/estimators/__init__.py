"""Critic-free advantage estimators for the ``ppo`` algorithm (spec §E), kind ``estimator``.

Each turns the token rewards the algorithm hands it (the shaped score on the last real
token plus any KL-in-reward terms of the ``kl`` constraint) into ``[B, T]`` advantages,
0 on padding, with no critic (``critic = None``, no returns, no value loss). ``R`` is
the sum of a response's token rewards (γ = 1), so a KL-in-reward penalty enters every
estimator the same way (RLOO's sequence-level ``r − β Σ_t k1``).

- ``reinforce``: ``A = R − b``, ``b`` none or the batch mean of ``R``.
- ``rloo``: ``A_i = R_i − mean_{j≠i} R_j`` over the samples of the same prompt (TRL,
  verl); needs ``samples_per_prompt >= 2``.
- ``grpo``: ``A_i = (R_i − mean_G) / (std_G + eps)``, unbiased std, eps 1e-6 (verl;
  TRL 1e-4); ``scale: none`` is Dr.GRPO. A one-sample group takes mean 0, std 1 (verl).
- ``remax``: ``A = R(y) − b``, ``b`` the reward of the greedy response ``ŷ`` to the same
  prompt (Li et al. 2023), scored in ``prepare`` once per prompt. The two sides are not
  alike: ``R(y)`` is the sample's token-reward sum (its score as constraints shaped it,
  plus any KL-in-reward terms, as in the other estimators), while ``b`` is the reward
  source's raw score of ``ŷ``. The paper subtracts the two rewards as they are; here a
  KL-in-reward penalty is charged to the sample only, and a constraint that rescales or
  shifts the score (``reward-norm``, ``missing-eos``) makes ``R(y)`` and ``b``
  incomparable, so leave those out with ``remax``.
- ``reinforce++``: the reward-to-go ``G_t = Σ_{s≥t} γ^{s−t} r_s`` whitened over the
  batch's real tokens (Hu 2025; verl, OpenRLHF); ``baseline: group-mean`` is
  REINFORCE++-baseline (the group mean of ``R`` subtracted at the last real token first).

The ``ppo`` algorithm then applies its own ``advantages.whiten`` (``batch`` by default):
set ``advantages: {whiten: none}`` for the estimator's scale as published (GRPO, RLOO,
ReMax). GRPO as in DeepSeekMath also puts the KL in the loss (``{name: kl, placement:
loss, estimator: k3, coef: 0.04}``); REINFORCE++ puts k1 in the reward (coef 0.01).

Settings and registration here; the tensor functions are in ``functional.py`` and the
components in ``components.py``, imported when one is built.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rlhfkit import ComponentSpec, hookimpl, lazy


class ReinforceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    baseline: Literal["none", "batch-mean"] = Field(
        "batch-mean", description="b in A = R - b: none (b = 0) or batch-mean (the mean of R over the "
                                  "iteration's responses, each one's own R included)")


class RLOOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GRPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: Literal["std", "none"] = Field(
        "std", description="divide R - mean_G by the group's unbiased std + eps (GRPO), or not (none: Dr.GRPO)")
    eps: float = Field(1e-6, gt=0, description="added to the group std (verl 1e-6, TRL 1e-4)")


class ReMaxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReinforcePlusPlusConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gamma: float = Field(1.0, ge=0, le=1, description="discount of the reward-to-go (1.0: verl, OpenRLHF)")
    baseline: Literal["none", "group-mean"] = Field(
        "none", description="group-mean: REINFORCE++-baseline, the group mean of R subtracted at the last real "
                            "token before the returns (a one-sample group subtracts 0)")


@hookimpl
def rlhfkit_components() -> list[ComponentSpec]:
    def estimator(name: str, config: type[BaseModel], class_name: str, doc: str,
                  provides: frozenset[str] = frozenset()) -> ComponentSpec:
        return ComponentSpec(kind="estimator", name=name, config=config, factory=lazy(f"rlhfkit.plugins.estimators.components:{class_name}"),
                             doc=doc, provides=provides)

    return [
        estimator("reinforce", ReinforceConfig, "Reinforce",
                  "REINFORCE: A = R - b on every token, b none or the batch mean of R (no critic)"),
        estimator("rloo", RLOOConfig, "RLOO",
                  "RLOO: A = R minus the mean R of the prompt's other samples (samples_per_prompt >= 2)",
                  frozenset({"bind"})),
        estimator("grpo", GRPOConfig, "GRPO",
                  "GRPO: A = (R - group mean) / (group std + eps); scale: none is Dr.GRPO"),
        estimator("remax", ReMaxConfig, "ReMax",
                  "ReMax: A = R minus the reward of the greedy response to the same prompt",
                  frozenset({"bind", "prepare"})),
        estimator("reinforce++", ReinforcePlusPlusConfig, "ReinforcePlusPlus",
                  "REINFORCE++: reward-to-go whitened over the batch; baseline: group-mean subtracts the group mean"),
    ]
