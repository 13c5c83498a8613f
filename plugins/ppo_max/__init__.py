"""PPO-max (MOSS-RLHF, Zheng et al. 2023, spec §H) as presets over PPO's components.

Two presets for a stage named ``ppo``, used with ``extends: [preset:ppo-max]``:

- ``ppo-max``: the method as the paper's §5.4 describes it: reward normalisation and
  clipping on running statistics, a token-level KL penalty, a critic initialised from
  the reward model and pre-trained before PPO (critic warm-up), global gradient
  clipping, a small experience buffer and value-loss clipping. The paper also mixes in
  the pretraining loss; that needs your pretraining data, so add a ``ptx`` constraint
  with it (docs/ppo-details.md shows how) — the preset cannot know the dataset.
- ``ppo-max-script``: what MOSS-RLHF's released training script turns on: reward
  scaling (no mean subtraction), value clipping, policy clipping and the KL penalty,
  with the script's defaults (policy lr 5e-7, critic lr 1.5e-6, AdamW (0.9, 0.95),
  eps 1e-6, T = 0.8, top-p 0.9, gamma 1, lambda 0.95, clip 0.2, grad clip 1.0).

Neither sets the learning-rate scale of the paper for the policy in ``ppo-max`` (it is
model-size dependent); the script preset does, as the script does.
"""

from __future__ import annotations

from typing import Any

from rlhfkit import hookimpl

PAPER: dict[str, Any] = {"stages": {"ppo": {
    # advantages are not whitened: the paper warns against stacking reward, advantage and
    # value re-parameterisations, and PPO-max keeps reward norm + clip and value clipping
    "algorithm": {"name": "ppo", "prompts_per_iteration": 128, "epochs": 1,
                  "advantages": {"whiten": "none", "clip": None}},
    "estimator": {"name": "gae", "gamma": 1.0, "lam": 0.95, "head_init": "reward-model", "warmup_iterations": 2,
                  "value_clip": 0.2, "value_coef": 1.0},
    "objective": {"name": "ppo-clip", "clip_low": 0.2, "clip_high": 0.2},
    "constraints": [{"name": "reward-norm", "mode": "normalize", "clip": 10.0},
                    {"name": "kl", "coef": 0.05, "placement": "reward", "estimator": "k1"}],
    "trainer": {"gradient_clip": 1.0, "batch_size": 32},
}}}

SCRIPT: dict[str, Any] = {"stages": {"ppo": {
    "algorithm": {"name": "ppo", "lr": 5.0e-7, "betas": [0.9, 0.95], "eps": 1.0e-6, "prompts_per_iteration": 128,
                  "epochs": 1, "sampling": {"temperature": 0.8, "top_p": 0.9},
                  "advantages": {"whiten": "none", "clip": None}},
    "estimator": {"name": "gae", "gamma": 1.0, "lam": 0.95, "value_clip": 0.2, "value_coef": 1.0,
                  "optimizer": {"lr": 1.5e-6, "betas": [0.9, 0.95], "eps": 1.0e-6}},
    "objective": {"name": "ppo-clip", "clip_low": 0.2, "clip_high": 0.2},
    "constraints": [{"name": "reward-norm", "mode": "scale", "clip": None},
                    {"name": "kl", "coef": 0.05, "placement": "reward", "estimator": "k1"}],
    "trainer": {"gradient_clip": 1.0, "batch_size": 32},
}}}


@hookimpl
def rlhfkit_presets() -> dict[str, dict[str, Any]]:
    return {"ppo-max": PAPER, "ppo-max-script": SCRIPT}
