"""Direct preference optimisation: the ``dpo`` algorithm and its loss variants (spec §G).

- algorithm ``dpo``: trains a policy on preference pairs. Chosen and rejected responses go
  through one concatenated forward. Reference log-probs are computed on the fly, or once
  before training (after which the reference model is freed). With a LoRA policy and no
  ``reference:`` the reference is the policy with its adapter switched off.
- online (iterative) DPO with ``online:``: pairs sampled from the current policy each step
  and labelled by any reward source.
- objectives ``dpo``, ``cdpo``, ``robust-dpo``, ``ipo``, ``hinge``, ``simpo``, ``orpo``,
  and ``kto``, which trains on unpaired ``Feedback`` rows (a completion labelled desirable
  or not; batched and stepped in ``unpaired.py``) or on the pairs taken apart.

Formulas, defaults and sources: docs/dpo.md. Settings and registration live here; the
torch code is imported when a stage is built.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rlhfkit import ComponentSpec, OptimizerSettings, SamplingSettings, Slot, hookimpl, lazy
from rlhfkit.registry import PROMPTED, tagged


class DPOConfig(OptimizerSettings):
    """The policy's AdamW settings (:class:`rlhfkit.OptimizerSettings`), then these."""

    lr: float = Field(5e-6, gt=0, description="peak learning rate (AdamW)")
    max_length: int = Field(128, ge=2, description="prompt + response tokens; prompts are cut on the left")
    reference_logps: Literal["on-the-fly", "precompute"] = Field(
        "on-the-fly", description="reference log-probs per batch, or once for every row before training (the "
                                  "reference model is then freed)")
    share_prompt: bool = Field(
        True, description="one forward per pair over prompt, chosen, rejected, the rejected response masked "
                          "from the chosen one, so the prompt is computed once (P + C + R - 2 tokens, "
                          "not 2P + C + R); checked against two separate rows before training, and off with a "
                          "warning for a model that ignores custom attention masks")
    trim_last_layer: bool = Field(
        True, description="run the last layer's MLP only at the columns that predict a response token (as the LM "
                          "head): the same log-probs and gradients, less work where prompts are long; checked before "
                          "training, off for models without a last-layer `mlp` or with gradient checkpointing")
    eval_batch_size: int = Field(64, ge=1, description="pairs per forward when evaluating")
    eval_prompts: int = Field(128, ge=1, description="held-out prompts answered greedily and scored with `gold`")
    max_new_tokens: int = Field(32, ge=1, description="length limit of those answers")
    sample_prompts: int = Field(4, ge=0, description="fixed prompts whose answers are saved before and after")
    online: SamplingSettings | None = Field(
        None, description="online (iterative) DPO: each step samples two responses per prompt of `data` from the "
                          "current policy, labels them with `reward` and trains on the pairs; null: offline pairs")
    online_from: Literal["policy", "reference"] = Field(
        "policy", description=(
            "whose samples make the online pairs: the current policy (online DPO), or the frozen reference (DPO on "
            "pairs of the reference's - e.g. the SFT model's - samples labelled by `reward`: off-policy, as offline "
            "DPO on sampled pairs, with fresh pairs each step)"))


def _pairs(config: DPOConfig, slots: dict[str, Any], registry: Any) -> frozenset[str]:
    """preference pairs, and unpaired rows with an objective tagged unpaired (kto)"""
    return frozenset({"preference"} | ({"unpaired"} if tagged(registry, slots.get("objective"), "unpaired") else set()))


def _data(config: DPOConfig, slots: dict[str, Any], registry: Any) -> frozenset[str]:
    """prompts when online, else preference pairs (and unpaired rows with an objective tagged unpaired)"""
    return PROMPTED if config.online is not None else _pairs(config, slots, registry)


SLOTS = {
    "policy": Slot("policy", doc="the model to train, e.g. {name: transformers, from_stage: sft}"),
    "reference": Slot("policy", required=False,
                      doc="the reference; default: a frozen copy of the initial policy (adapter off with LoRA)"),
    "objective": Slot("objective", tag="preference-loss", doc="dpo, cdpo, robust-dpo, ipo, hinge, simpo, orpo or kto"),
    "data": Slot("dataset", rows=_data,
                 doc="preference pairs (prompt, chosen, rejected), or with kto unpaired rows "
                                "(prompt, completion, desirable); prompts when online"),
    "reward": Slot("reward", required=False, doc="online DPO: labels the sampled pairs (higher score is chosen)"),
    "engine": Slot("engine", required=False, doc="online DPO: what samples the pairs, hf (default) or vllm"),
    "constraints": Slot("constraint", required=False, many=True, uses=frozenset({"after_update"}),
                        doc="after each optimizer step, e.g. TR-DPO's reference sync {name: reference-ema, rate: "
                            "0.6, every: 512}"),
    "eval_data": Slot("dataset", required=False, rows=_pairs, doc="held-out pairs or unpaired rows: how well the implicit "
                                                     "reward separates them"),
    "eval_prompts": Slot("dataset", required=False, rows=PROMPTED,
                         doc="held-out prompts answered greedily, scored with `gold`"),
    "gold": Slot("reward", required=False, doc="an evaluation-only reward (the gold scorer of a built-in task)"),
}


class BetaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0, description="beta, the strength of the implicit KL to the reference")


class CDPOConfig(BetaConfig):
    label_smoothing: float = Field(0.1, ge=0, le=0.5, description="epsilon, the assumed label-flip rate")


class RobustDPOConfig(BetaConfig):
    label_noise: float = Field(0.1, ge=0, lt=0.5, description="epsilon, the label-flip rate corrected for")


class SimPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(2.5, gt=0, description="scale of the length-normalised reward (paper: 2.5)")
    gamma: float = Field(1.375, ge=0, description="target reward margin (paper: 1.375)")


class KTOConfig(BetaConfig):
    desirable_weight: float = Field(1.0, gt=0, description="w_D, the weight of desirable examples")
    undesirable_weight: float = Field(1.0, gt=0, description="w_U, the weight of undesirable examples (the paper "
                                                             "keeps w_D n_D / (w_U n_U) in [1, 4/3])")


class ORPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lam: float = Field(0.1, ge=0, description="lambda, the weight of the odds-ratio term (paper: 0.1)")


@hookimpl
def rlhfkit_components() -> list[ComponentSpec]:
    def objective(name: str, config: type[BaseModel], cls: str, doc: str, *tags: str) -> ComponentSpec:
        return ComponentSpec(kind="objective", name=name, config=config, factory=lazy(f"rlhfkit.plugins.dpo.objectives:{cls}"),
                             doc=doc, tags=frozenset({"preference-loss", *tags}))

    return [
        ComponentSpec(kind="algorithm", name="dpo", config=DPOConfig, factory=lazy("rlhfkit.plugins.dpo.module:DirectPreference"),
                      slots=SLOTS, doc="direct preference optimisation on pairs (any objective of the DPO family)"),
        objective("dpo", BetaConfig, "DPO", "DPO: -log sigmoid(beta * delta)"),
        objective("cdpo", CDPOConfig, "ConservativeDPO", "conservative DPO (label smoothing)"),
        objective("robust-dpo", RobustDPOConfig, "RobustDPO", "robust DPO, unbiased under label noise"),
        objective("ipo", BetaConfig, "IPO", "IPO: (mean-token delta - 1/(2 beta))^2"),
        objective("hinge", BetaConfig, "Hinge", "SLiC hinge: relu(1 - beta * delta)"),
        objective("simpo", SimPOConfig, "SimPO", "SimPO: reference-free, length-normalised, with a margin"),
        objective("orpo", ORPOConfig, "ORPO", "ORPO: NLL of the chosen plus an odds-ratio term, reference-free"),
        # "unpaired": it also trains on unpaired Feedback rows (the data slot then takes them)
        objective("kto", KTOConfig, "KTO", "KTO: prospect-theory loss on desirable and undesirable responses",
                  "unpaired"),
    ]
