"""The ``gae`` estimator and the critic it owns (spec §E, §F, §J).

The critic is a value head on its own transformer backbone. ``V_t`` is read from the
hidden state that predicts response token ``t`` (the state before ``t`` is emitted), the
convention of TRL and OpenRLHF. The head starts at zero (OpenAI) or, when the backbone
is a reward-model export, as that model's score head (MOSS: critic initialised from the
reward model).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from rlhfkit import Advantages, LossTerm, Rollout, StageContext, UserError, masked_mean
from rlhfkit.plugins.ppo import GAEConfig
from rlhfkit.plugins.ppo.functional import explained_variance, gae, value_loss
from rlhfkit.plugins.ppo.rollout import joined


class ValueModel(torch.nn.Module):
    """``values [B, T]`` of a rollout's response tokens: a linear head on a backbone."""

    def __init__(self, causal_lm: Any, score_weight: torch.Tensor | None):
        super().__init__()
        self.backbone = causal_lm.base_model  # the transformer body: no LM head to carry or sync
        # the width of the last hidden state, e.g. 512 for OPT-350m (hidden_size 1024)
        hidden = causal_lm.get_output_embeddings().in_features
        self.head = torch.nn.Linear(hidden, 1, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(score_weight if score_weight is not None else torch.zeros(1, hidden))

    def forward(self, rollout: Rollout) -> torch.Tensor:
        ids, mask, positions = joined(rollout)
        hidden = self.backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                               use_cache=False).last_hidden_state
        p = rollout.prompt_ids.shape[1]
        values = self.head(hidden[:, p - 1:-1]).squeeze(-1).float()
        return values * rollout.response_mask.to(values.dtype)


def reward_model_head(directory: Path | None) -> torch.Tensor | None:
    """The ``score.weight`` ``[1, H]`` of a reward-model export, or None if it has none."""
    if directory is None or not (directory / "model.safetensors").is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return handle.get_tensor("score.weight") if "score.weight" in handle.keys() else None  # noqa: SIM118


class GAE:
    """``δ_t = r_t + γ V_{t+1} − V_t``, ``A_t = δ_t + γλ A_{t+1}``, returns ``A + V``;
    the critic regresses the returns with an (optionally clipped) value loss."""

    needs_reference = needs_old_logprobs = False  # values and rewards only

    def __init__(self, config: GAEConfig, context: StageContext):
        self.config = config
        self.optimizer = config.optimizer
        self.warmup_iterations = config.warmup_iterations
        self.critic: ValueModel | None = None
        self._backbone = context.build(config.critic) if config.critic is not None else None
        self._source: Path | None = None
        if config.critic is not None:
            c = config.critic.config
            self._source = (Path(c.path).expanduser() if getattr(c, "path", None)
                            else context.export_of(c.from_stage) if getattr(c, "from_stage", None) else None)

    def bind(self, algorithm: Any) -> None:
        if self._backbone is not None:
            lm = self._backbone.plain_model()
        else:  # a copy of the initial policy (the SFT model)
            lm = copy.deepcopy(algorithm.policy.plain_model())
        head = None
        if self.config.head_init != "zero":
            head = reward_model_head(self._source)
            if head is None and self.config.head_init == "reward-model":
                raise UserError("estimator.head_init is 'reward-model' but estimator.critic is not a reward-model "
                                "export (no score head found); use from_stage: <your reward-model stage> or "
                                "head_init: zero")
        self.critic = ValueModel(lm, head)
        self.critic.train(False)

    def prepare(self, rollout: Rollout) -> None:
        with torch.no_grad():
            rollout.values = self.critic(rollout)

    def estimate(self, rollout: Rollout) -> Advantages:
        mask = rollout.response_mask.float()
        advantages, returns = gae(rollout.rewards, rollout.values, mask, self.config.gamma, self.config.lam)
        metrics = {"value/mean": float(masked_mean(rollout.values, mask)),
                   "value/explained_variance": float(explained_variance(rollout.values, returns, mask))}
        return Advantages(advantages, returns, metrics)

    def critic_loss(self, minibatch: Rollout) -> LossTerm:
        mask = minibatch.response_mask.float()
        values = self.critic(minibatch)
        loss, metrics = value_loss(values, minibatch.values, minibatch.returns, mask, clip=self.config.value_clip,
                                   aggregation=self.config.aggregation)
        return LossTerm(self.config.value_coef * loss, {"value/loss": loss.detach(), **metrics})
