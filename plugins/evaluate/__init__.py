"""The ``evaluate`` algorithm: earlier stages' models side by side on the same prompts.

A stage with ``algorithm: evaluate`` trains nothing. It answers the same held-out
prompts with every model in ``models`` and reports, per model: the gold score (the
built-in task's scorer, i.e. the "human"), the proxy reward (the learned reward model),
the KL to the reference, the response length and the held-out perplexity; per reward
source, its accuracy on held-out pairs. Sample answers to the first prompts are printed
and saved, as in the InstructGPT walkthroughs (one prompt, the answer after each stage).

Settings and registration live here; the code in ``report.py`` is imported when the
stage is built.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from rlhfkit import ComponentSpec, Slot, hookimpl, lazy
from rlhfkit.registry import PROMPTED


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: int = Field(128, ge=1, description="held-out prompts every model answers (the first ones of `prompts`)")
    max_prompt_length: int = Field(64, ge=1, description="prompts are cut to this many tokens on the left")
    max_new_tokens: int = Field(32, ge=1, description="length limit of every answer")
    batch_size: int = Field(64, ge=1, description="prompts (or rows) per forward")
    kl_samples: int = Field(1, ge=0, description="answers sampled at temperature 1 per prompt to estimate "
                                                 "KL(model || reference); 0 leaves KL out")
    max_length: int = Field(128, ge=2, description="prompt + completion tokens of the perplexity rows")
    samples: int = Field(3, ge=0, description="prompts whose answers are printed and saved to samples.jsonl")
    pass_k: int = Field(0, ge=0, description=(
        "also sample k answers per prompt at `pass_temperature`: pass@k is the share of prompts with an answer "
        "whose gold score is above `pass_threshold`, and pass@k/* the gold scorer's task metrics of each "
        "prompt's best answer (e.g. accuracy per level); 0: off"))
    pass_temperature: float = Field(1.0, gt=0, description="sampling temperature of the pass@k answers")
    pass_threshold: float = Field(0.5, description="an answer passes when its gold score is above this")
    title: str = Field("", description="the report table's title (default: the stage's name)")
    labels: list[str] = Field(default_factory=list,
                              description="names of the models in the report and summary, in the order of `models` "
                                          "(default: each one's from_stage, else its path)")


SLOTS = {
    "models": Slot("policy", many=True,
                   doc="the models to compare, e.g. [{name: transformers, from_stage: sft}, "
                       "{name: transformers, from_stage: ppo}]"),
    "prompts": Slot("dataset", rows=PROMPTED, doc="held-out prompts, answered greedily by every model"),
    "reference": Slot("policy", required=False, doc="KL is measured to this model (e.g. the SFT model)"),
    "reward": Slot("reward", required=False, doc="the proxy reward, e.g. {name: reward-model, from_stage: rm}"),
    "gold": Slot("reward", required=False, doc="the gold scorer (a built-in task's), evaluation only"),
    "text": Slot("dataset", required=False, rows=frozenset({"prompt-completion", "text", "messages"}),
                 doc="held-out demonstrations for perplexity (completion tokens)"),
    "pairs": Slot("dataset", required=False, rows=frozenset({"preference"}),
                  doc="held-out preference pairs: the reward's accuracy"),
}


@hookimpl
def rlhfkit_components() -> list[ComponentSpec]:
    return [ComponentSpec(
        kind="algorithm", name="evaluate", config=EvaluateConfig, factory=lazy("rlhfkit.plugins.evaluate.report:Evaluate"),
        slots=SLOTS, doc="compare earlier stages' models on the same held-out prompts (trains nothing)",
    )]
