"""PPO (InstructGPT step 3) as composable components.

- algorithm ``ppo``: sample -> reference log-probs -> reward -> constraints shape rewards
  (recipe order) -> estimator -> epochs x minibatches of clipped updates -> constraints'
  after-update. Any estimator (``gae`` with its critic, or a critic-free one) and any
  policy objective plug into it.
- estimator ``gae``: generalised advantage estimation with a critic of its own (a value
  head on its own backbone, from the reward model, the SFT model or a path).
- objective ``ppo-clip``: the clipped surrogate (asymmetric epsilon, dual clip, the
  loss-aggregation choices of spec §F).
- samplers ``shuffle`` and ``curriculum`` (slot ``sampler``): which prompts an
  iteration samples.
- objective ``gspo``: GSPO's sequence-level, length-normalised ratio with sequence-level
  clipping (Zheng et al. 2025).

Every detail, its recipe field and its source: docs/ppo-details.md. Settings and
registration live here; the torch code is imported when a stage is built.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rlhfkit import ComponentSpec, OptimizerSettings, SamplingSettings, Slot, hookimpl, lazy, ref
from rlhfkit.registry import PROMPTED

Aggregation = Literal["token-mean", "sequence-mean", "token-sum-norm", "global-token-mean"]


class AdvantageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    whiten: Literal["batch", "minibatch", "none"] = Field(
        "batch", description="whiten advantages over the rollout (TRL, verl) or per minibatch (OpenAI)")
    clip: float | None = Field(None, gt=0, description="clip whitened advantages to ±clip (MOSS: 0.5)")


class DynamicSampling(BaseModel):
    """DAPO's dynamic sampling: keep only groups whose scores are not all equal."""

    model_config = ConfigDict(extra="forbid")
    max_rounds: int = Field(3, ge=1, description=(
        "rounds of prompts_per_iteration prompts drawn at most per iteration (DAPO's max_num_gen_batches); a "
        "batch still short after the last round is filled with groups whose scores are all equal"))
    tolerance: float = Field(1e-6, ge=0, description="a group whose scores span no more than this is uninformative")


class PPOConfig(OptimizerSettings):
    """The policy's AdamW settings (:class:`rlhfkit.OptimizerSettings`), then these.

    Batch sizes: an iteration samples ``prompts_per_iteration x samples_per_prompt``
    responses (global, over all devices), then runs ``epochs`` passes over them in
    minibatches of ``trainer.batch_size`` sequences (one optimizer step each, split into
    forwards of ``trainer.micro_batch_size`` per device).
    """

    lr: float = Field(1e-5, gt=0, description="policy peak learning rate (AdamW)")
    iterations: int | None = Field(None, ge=1, description=(
        "PPO iterations (rollout + updates); default: trainer.max_epochs passes over the prompts, "
        "or trainer.max_steps optimizer steps"))
    prompts_per_iteration: int = Field(64, ge=1, description="prompts sampled per iteration, over all devices")
    samples_per_prompt: int = Field(1, ge=1, description="responses per prompt (group sampling: GRPO, RLOO)")
    epochs: int = Field(1, ge=1, description="passes over each iteration's experience (PPO epochs)")
    generation_batch_size: int | None = Field(None, ge=1, description=(
        "prompts per generate call per device; default: all of the device's prompts in one call. Samples are "
        "seeded by (seed, iteration, prompt, sample) - with the hf engine by each call's first row - so "
        "rollouts do not depend on the number of devices when this divides each device's share"))
    max_prompt_length: int = Field(64, ge=1, description="prompt tokens kept (cut on the left)")
    dynamic_sampling: DynamicSampling | None = Field(None, description=(
        "DAPO's dynamic sampling: draw more prompts until the iteration has prompts_per_iteration groups whose "
        "scores (the reward source's, before constraints) are not all equal; needs samples_per_prompt >= 2"))
    sampling: SamplingSettings = Field(default_factory=SamplingSettings, description="how responses are sampled")
    score_position: Literal["last", "after-eos"] = Field(
        "last", description="token that receives the sequence score: the last real one (OpenRLHF, MOSS) or one "
                            "past EOS where it fits (old TRL)")
    advantages: AdvantageSettings = Field(default_factory=AdvantageSettings,
                                          description="whitening and clipping of the estimator's advantages")
    on_nan: Literal["stop", "skip"] | None = Field(
        None, description="a NaN/Inf reward or loss stops the run (last checkpoint intact) or skips the update; "
                          "unset: trainer.on_nan (where this setting now lives)")
    kl_metric: bool = Field(False, description=(
        "score the reference every iteration for the kl/ref metric even when no component reads it (one "
        "reference forward over the rollout: ~15 % of a GRPO iteration of benchmarks/grpo_iteration.py); "
        "with a kl constraint it is logged anyway"))
    eval_prompts: int = Field(64, ge=1, description="held-out prompts evaluated at start, end and every "
                                                    "trainer.eval_every_n_steps")
    eval_greedy: bool = Field(True, description="evaluate greedy responses (else sample with `sampling`)")
    sample_prompts: int = Field(4, ge=0, description="fixed prompts whose responses are saved before and after")


    @model_validator(mode="after")
    def _groups_for_dynamic_sampling(self) -> PPOConfig:
        if self.dynamic_sampling is not None and self.samples_per_prompt < 2:
            raise ValueError("dynamic_sampling keeps groups whose scores differ: it needs samples_per_prompt >= 2, "
                             f"got {self.samples_per_prompt}")
        return self


class GAEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gamma: float = Field(1.0, ge=0, le=1, description="discount (1.0: OpenAI, MOSS)")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (0.95; MOSS PPO-max uses 0.9)")
    critic: ref("policy") | None = Field(  # type: ignore[valid-type]
        None, description="the critic's backbone, e.g. {name: transformers, from_stage: rm}; "
                          "default: a copy of the policy's initial weights")
    head_init: Literal["auto", "zero", "reward-model"] = Field(
        "auto", description="value head: zero (OpenAI) or the reward model's score head; auto uses the "
                            "reward model's when the backbone is a reward-model export")
    optimizer: OptimizerSettings = Field(default_factory=lambda: OptimizerSettings(lr=5e-6),
                                         description="the critic's AdamW settings and schedule")
    value_clip: float | None = Field(0.2, gt=0, description="clip values to old ± this (0.2 OpenAI/TRL/MOSS, "
                                                            "0.5 OpenRLHF); null: no clipping")
    value_coef: float = Field(1.0, gt=0, description="weight of the value loss (MOSS 1.0; OpenAI/TRL 0.1)")
    warmup_iterations: int = Field(0, ge=0, description="first iterations train only the critic (policy frozen)")
    aggregation: Literal["token-mean", "sequence-mean"] = Field(
        "token-mean", description="how the value loss averages over tokens")


class PPOClipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clip_low: float = Field(0.2, gt=0, lt=1, description="epsilon below 1 (ratio >= 1 - clip_low)")
    clip_high: float = Field(0.2, gt=0, description="epsilon above 1 (ratio <= 1 + clip_high)")
    dual_clip: float | None = Field(None, gt=1, description="dual clip c for negative advantages (verl: 3)")
    aggregation: Aggregation = Field("token-mean", description="token-mean | sequence-mean (GRPO paper) | "
                                                               "token-sum-norm (Dr.GRPO) | global-token-mean")
    tis_cap: float | None = Field(None, gt=0, description=(
        "truncated importance sampling on the engine's log-probs: weight each token's loss by "
        "min(exp(old - engine), tis_cap) (verl/TRL use 2); null: off"))


class GSPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clip_low: float = Field(3e-4, gt=0, lt=1, description=(
        "epsilon below 1 of the sequence ratio (the paper's 3e-4: a length-normalised ratio moves little)"))
    clip_high: float = Field(4e-4, gt=0, description="epsilon above 1 of the sequence ratio (the paper's 4e-4)")


class ShuffleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CurriculumConfig(BaseModel):
    """Prompts whose recent pass rate lies inside a band (docs/ppo-details.md, "Curriculum")."""

    model_config = ConfigDict(extra="forbid")
    band: tuple[float, float] = Field((0.0, 1.0), description=(
        "draw prompts whose estimated pass rate p has low < p < high (default: neither never nor always solved)"))
    pass_threshold: float = Field(0.5, description="a sample passes when its score is above this")
    warmup_iterations: int = Field(1, ge=0, description="first iterations drawn uniformly (nothing is known yet)")
    exploration: float = Field(0.25, ge=0, le=1, description=(
        "share of each draw taken uniformly from all prompts outside the band choice (rates go stale)"))
    decay: float = Field(0.5, ge=0, lt=1, description=(
        "pass rates are exponential averages: rate <- (1 - decay) * new + decay * rate"))
    level_field: str | None = Field("level", description=(
        "the prompt rows' difficulty column: an unseen prompt takes its level's rate (null: none)"))

    @model_validator(mode="after")
    def _band(self) -> CurriculumConfig:
        low, high = self.band
        if not 0 <= low < high <= 1:
            raise ValueError(f"band must be 0 <= low < high <= 1, got {list(self.band)}")
        return self


SLOTS = {
    "policy": Slot("policy", doc="the model to optimise, e.g. {name: transformers, from_stage: sft}"),
    "engine": Slot("engine", required=False, doc="what samples the rollouts: hf (default) or vllm"),
    "reference": Slot("policy", required=False,
                      doc="the KL reference; default: a frozen copy of the initial policy (adapter off with LoRA)"),
    "reward": Slot("reward", doc="the reward optimised, e.g. {name: reward-model, from_stage: rm}"),
    "estimator": Slot("estimator", doc="advantages: gae (with a critic) or a critic-free estimator"),
    "objective": Slot("objective", tag="policy-loss", doc="the policy loss, e.g. ppo-clip"),
    "constraints": Slot("constraint", required=False, many=True,
                        doc="kl, reward-norm, missing-eos, entropy, ptx, reference-ema, in the order they act"),
    "data": Slot("dataset", rows=PROMPTED, doc="prompts (prompt rows, or any row with a prompt)"),
    "sampler": Slot("sampler", required=False, doc="which prompts each iteration samples: shuffle (the default) "
                                                   "or curriculum"),
    "eval_data": Slot("dataset", required=False, rows=PROMPTED,
                      doc="held-out prompts evaluated with `gold` and the reward"),
    "gold": Slot("reward", required=False, doc="an evaluation-only reward (the gold scorer of a built-in task)"),
}


@hookimpl
def rlhfkit_components() -> list[ComponentSpec]:
    return [
        ComponentSpec(kind="algorithm", name="ppo", config=PPOConfig, factory=lazy("rlhfkit.plugins.ppo.module:PPO"), slots=SLOTS,
                      doc="PPO: rollouts, reward, constraints, any estimator, clipped updates (InstructGPT step 3)"),
        ComponentSpec(kind="estimator", name="gae", config=GAEConfig, factory=lazy("rlhfkit.plugins.ppo.critic:GAE"),
                      doc="generalised advantage estimation with a critic (value head on its own backbone)",
                      provides=frozenset({"bind", "prepare", "critic_loss"})),
        ComponentSpec(kind="objective", name="ppo-clip", config=PPOClipConfig, factory=lazy("rlhfkit.plugins.ppo.objective:PPOClip"),
                      doc="clipped surrogate policy loss (asymmetric epsilon, dual clip, loss aggregation)",
                      tags=frozenset({"policy-loss"})),
        ComponentSpec(kind="sampler", name="shuffle", config=ShuffleConfig,
                      factory=lazy("rlhfkit.plugins.ppo.samplers:ShuffleSampler"),
                      doc="seeded passes over the prompts (what ppo does with no sampler)",
                      provides=frozenset({"bind"})),
        ComponentSpec(kind="sampler", name="curriculum", config=CurriculumConfig,
                      factory=lazy("rlhfkit.plugins.ppo.samplers:CurriculumSampler"),
                      doc="prompts whose recent pass rate (or their level's) is inside a band, plus exploration",
                      provides=frozenset({"bind", "state_dict", "load_state_dict"})),
        ComponentSpec(kind="objective", name="gspo", config=GSPOConfig, factory=lazy("rlhfkit.plugins.ppo.objective:GSPO"),
                      doc="GSPO: a length-normalised sequence ratio, clipped per sequence (Zheng et al. 2025)",
                      tags=frozenset({"policy-loss"})),
    ]


#: DAPO (Yu et al. 2025) over a stage named ``ppo``: GRPO's group-normalised advantages, no
#: KL, clip-higher (ε_low 0.2, ε_high 0.28), the token-level loss over the whole batch,
#: dynamic sampling and the soft overlong punishment (a fifth of max_new_tokens, penalty 1).
#: The group size is the paper's 16; prompts per iteration, batch sizes and lengths are
#: the recipe's. Overlong filtering (``overlong-filter``) is the paper's earlier step, off.
DAPO: dict[str, Any] = {"stages": {"ppo": {
    "algorithm": {"name": "ppo", "samples_per_prompt": 16, "advantages": {"whiten": "none", "clip": None},
                  "dynamic_sampling": {"max_rounds": 3}},
    "estimator": {"name": "grpo", "scale": "std"},
    "objective": {"name": "ppo-clip", "clip_low": 0.2, "clip_high": 0.28, "aggregation": "global-token-mean"},
    "constraints": [{"name": "overlong-penalty", "buffer_fraction": 0.2, "penalty": 1.0}],
}}}


@hookimpl
def rlhfkit_presets() -> dict[str, dict[str, Any]]:
    return {"dapo": DAPO}
