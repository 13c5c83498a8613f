"""Constraints for RL algorithms (spec §C, §D, §F, §I): each shapes rewards, adds a loss
term and/or updates state after an iteration, and acts in recipe order.

- ``kl``: a KL penalty to the reference, in the reward (PPO, OpenAI) or in the loss
  (GRPO), with the k1/k2/k3 estimators, clamps, and a fixed or adaptive (Ziegler)
  coefficient.
- ``reward-norm``: reward scaling by a running std (MOSS), or normalise + clip on
  running moments (MOSS PPO-max), or clip only.
- ``missing-eos``: a penalty on responses that hit the length limit without EOS.
- ``overlong-penalty``: DAPO's soft overlong punishment, a penalty growing linearly over
  the last tokens before the length limit.
- ``overlong-filter``: DAPO's overlong filtering, truncated responses left out of the loss.
- ``entropy``: an entropy bonus (or MOSS's pull towards a target entropy).
- ``ptx``: pretraining-loss mixing with its own dataset (InstructGPT PPO-ptx).
- ``reference-ema``: the reference model follows the policy (Xu et al. 2024), or is
  synced to it every n steps (TR-DPO, Gorbatovski et al. 2024).

Settings and registration here; the torch code is in ``components.py``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rlhfkit import ComponentRef, ComponentSpec, Problem, hookimpl, lazy, ref


class AdaptiveKLSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: float = Field(6.0, gt=0, description="target KL per sequence (Ziegler et al.: 6 nats)")
    horizon: int = Field(10000, ge=1, description="adaptation horizon in samples (Ziegler et al.: 10000)")


class KLConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    coef: float = Field(0.05, ge=0, description="beta (fixed), or the initial beta when adaptive "
                                                "(OpenAI 0.2 fixed / 0.15 adaptive; TRL 0.05)")
    estimator: Literal["k1", "k2", "k3"] = Field("k1", description="per-token estimator of KL(pi || ref)")
    placement: Literal["reward", "loss"] = Field(
        "reward", description="subtract beta*k_t from the token rewards (PPO) or add beta*k_t to the loss (GRPO)")
    adaptive: AdaptiveKLSettings | None = Field(None, description="Ziegler's adaptive controller; null: fixed")
    log_ratio_clamp: float | None = Field(None, gt=0, description="clamp log(ref/pi) to ±this (verl/OpenRLHF: 20)")
    value_clamp: float | None = Field(None, gt=0, description="clamp each estimate to ±this (verl/OpenRLHF: 10)")


class RewardNormConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["scale", "normalize", "none"] = Field(
        "normalize", description="scale: r / std_run (MOSS reward scaling); normalize: (r - mean_run) / std_run "
                                 "(MOSS PPO-max); none: clip only")
    clip: float | None = Field(10.0, gt=0, description="clip to ±this after (MOSS code 10; OpenRLHF 10; Xu et al. "
                                                       "20; DeepSpeed-Chat 5); null: no clip")


class MissingEOSConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    penalty: float = Field(1.0, description="subtracted from the score of a response that hit the length limit "
                                            "without EOS (TRL suggests 1.0)")


class OverlongPenaltyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    buffer: int | None = Field(None, ge=1, description=(
        "L_cache: the penalty grows over the last `buffer` tokens before sampling.max_new_tokens; "
        "default: buffer_fraction of max_new_tokens"))
    buffer_fraction: float = Field(0.2, gt=0, lt=1, description=(
        "the buffer as a share of max_new_tokens when `buffer` is unset (DAPO: 4096 of 20480)"))
    penalty: float = Field(1.0, gt=0, description="the penalty at the limit (DAPO: 1.0)")


def overlong_buffer(config: OverlongPenaltyConfig, limit: int) -> int:
    """L_cache in tokens for a length limit of ``limit`` new tokens."""
    return config.buffer if config.buffer is not None else max(1, round(config.buffer_fraction * limit))


class OverlongFilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EntropyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    coef: float = Field(0.01, gt=0, description="c_H (bonus: loss -= c_H * H) or w (target: loss += w*|H - target|)")
    target: float | None = Field(None, ge=0, description="MOSS variant: pull the mean entropy towards this")


class PtxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: ref("dataset") = Field(  # type: ignore[valid-type]
        description="text or demonstrations, e.g. {name: builtin, task: reviews, split: pretrain}")
    coef: float = Field(1.0, gt=0, description="gamma, the weight of the pretraining loss (InstructGPT: 27.8 "
                                                "on its own scale)")
    batch_size: int = Field(8, ge=1, description="pretraining rows per micro-batch of policy loss")
    max_length: int = Field(64, ge=2, description="tokens per pretraining row")


class ReferenceEMAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: float = Field(0.001, gt=0, le=1, description="eta in ref <- eta * policy + (1 - eta) * ref (ReaLHF "
                                                       "example: 0.001; TR-DPO soft update: 0.6)")
    every: int = Field(1, ge=1, description="update every n-th time: PPO calls it after each iteration, DPO after "
                                            "each optimizer step (TR-DPO: every 512 steps)")


@hookimpl
def rlhfkit_components() -> list[ComponentSpec]:
    def spec(name: str, config: type[BaseModel], class_name: str, doc: str, *provides: str) -> ComponentSpec:
        return ComponentSpec(kind="constraint", name=name, config=config, factory=lazy(f"rlhfkit.plugins.constraints.components:{class_name}"),
                             doc=doc, provides=frozenset(provides))

    state = ("state_dict", "load_state_dict")
    return [
        spec("kl", KLConfig, "KLPenalty", "KL to the reference in the reward or the loss; fixed or adaptive beta",
             "shape_rewards", "loss", "after_update", *state),
        spec("reward-norm", RewardNormConfig, "RewardNorm", "reward scaling, or normalise + clip, on running moments",
             "shape_rewards", *state),
        spec("missing-eos", MissingEOSConfig, "MissingEOS", "penalise responses that end without EOS", "shape_rewards"),
        spec("overlong-penalty", OverlongPenaltyConfig, "OverlongPenalty",
             "DAPO's soft overlong punishment: a linear penalty over the last tokens before the limit",
             "bind", "shape_rewards"),
        spec("overlong-filter", OverlongFilterConfig, "OverlongFilter",
             "DAPO's overlong filtering: truncated responses are left out of the loss", "shape_rewards"),
        spec("entropy", EntropyConfig, "EntropyBonus", "entropy bonus (or pull towards a target entropy)", "loss"),
        spec("ptx", PtxConfig, "PretrainMix", "pretraining-loss mixing with its own data (PPO-ptx)", "bind", "loss"),
        spec("reference-ema", ReferenceEMAConfig, "ReferenceEMA", "the reference follows the policy by EMA",
             "bind", "after_update", *state),
    ]


@hookimpl
def rlhfkit_check_recipe(recipe, registry) -> list[Problem]:
    """An ``overlong-penalty`` buffer leaves room below its stage's ``max_new_tokens``
    (checked by ``validate``, as ``run`` would fail on it)."""
    problems = []
    for stage in recipe.stages:
        sampling = getattr(stage.algorithm._config, "sampling", None)
        limit = getattr(sampling, "max_new_tokens", None)
        constraints = stage.slots.get("constraints") or []
        for i, node in enumerate(constraints if isinstance(constraints, list) else [constraints]):
            if limit is None or not isinstance(node, ComponentRef) or node.name != "overlong-penalty" \
                    or node._config is None:
                continue
            buffer = overlong_buffer(node.config, limit)
            if buffer >= limit:
                problems.append(Problem(str(recipe.path), f"stages.{stage.name}.constraints.{i}.buffer",
                                        f"buffer {buffer} must be smaller than sampling.max_new_tokens {limit}",
                                        "a buffer of about a fifth of max_new_tokens (DAPO: 4096 of 20480)"))
    return problems
