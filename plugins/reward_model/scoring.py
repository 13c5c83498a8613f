"""The scalar head, export to ``AutoModelForSequenceClassification``, and scoring.

Shapes: ``N`` sequences of ``L`` tokens, right-padded (``rlhfkit.encode_pairs``) or
left-padded; the score of a sequence is the head applied to the backbone's last hidden
state at its last real token (EOS), exactly where transformers' sequence classifiers read
it. Position ids follow the attention mask, so both paddings give the same scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhfkit import (
    StageContext,
    UserError,
    atomic_directory,
    encode_pairs,
    last_real_index,
    positions_from_mask,
)

NORMALIZATION_KEY = "rlhfkit_reward_normalization"


def causal_lm(model: torch.nn.Module) -> Any:
    """The transformers causal LM inside ``model`` (unwrapping a peft model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ScalarHead(torch.nn.Module):
    """A bias-free linear map from the hidden size to one score, like the ``score`` layer
    of transformers' sequence classifiers (so it exports as one)."""

    def __init__(self, hidden: int, init_std: float | None = None):
        super().__init__()
        self.score = torch.nn.Linear(hidden, 1, bias=False)
        torch.nn.init.normal_(self.score.weight, std=init_std or 1 / math.sqrt(hidden + 1))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``hidden [N, L, H]``, ``attention_mask [N, L]`` -> scores ``[N]``."""
        last = last_real_index(attention_mask)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.score(picked).squeeze(-1).float()


def score_and_logits(model: torch.nn.Module, head: ScalarHead, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, with_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One backbone forward: scores ``[N]`` and, when asked, LM logits ``[N, L, V]``."""
    lm = causal_lm(model)
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=positions_from_mask(attention_mask), use_cache=False).last_hidden_state
    logits = lm.get_output_embeddings()(hidden) if with_logits else None
    return head(hidden, attention_mask), logits


def export_classifier(plain_causal_lm: Any, head: ScalarHead, tokenizer: Any, directory: Path,
                      normalization: dict[str, float] | None) -> None:
    """Write ``AutoModelForSequenceClassification`` (``num_labels=1``) with the backbone's
    weights, the head as ``score`` and the normalisation in its config, atomically."""
    from transformers import AutoModelForSequenceClassification

    config = plain_causal_lm.config.__class__.from_dict(plain_causal_lm.config.to_dict())
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = None
    setattr(config, NORMALIZATION_KEY, normalization)
    classifier = AutoModelForSequenceClassification.from_config(config)
    classifier.base_model.load_state_dict(plain_causal_lm.base_model.state_dict())
    classifier.score.weight.data.copy_(head.score.weight.data.to(classifier.score.weight.dtype))
    with atomic_directory(directory) as staging:
        classifier.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


class RewardModelSource:
    """The ``reward-model`` reward source: an exported classifier that scores text."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int, batch_size: int,
                 normalization: dict[str, float] | None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.normalization = normalization

    @classmethod
    def load(cls, config: Any, context: StageContext | None) -> RewardModelSource:
        from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

        from rlhfkit.plugins.policy.build import fuse_activations

        if config.from_stage is not None:
            if context is None:
                raise UserError("reward-model with from_stage needs a run; use `path` outside recipes")
            directory = context.export_of(config.from_stage)
        else:
            directory = Path(config.path).expanduser()
        if not (directory / "config.json").is_file():
            raise UserError(f"reward model directory {directory} has no config.json; point `path` at a "
                            f"reward-model stage's export (runs/<run>/<stage>/export).")
        model = AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True)
        fuse_activations(model)  # the same formula as one kernel (policy.fused_activations)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
        normalization = getattr(model.config, NORMALIZATION_KEY, None) if config.normalize else None
        return cls(model, tokenizer, config.max_length, config.batch_size, normalization)

    def to(self, device: torch.device | str) -> RewardModelSource:
        """Move the model (algorithms call this with their device before scoring)."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def raw_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(prompts), self.batch_size):
            encoded = encode_pairs(self.tokenizer, prompts[i:i + self.batch_size],
                                   responses[i:i + self.batch_size], self.max_length)
            mask = torch.tensor(encoded["attention_mask"], device=device)
            logits = self.model(input_ids=torch.tensor(encoded["input_ids"], device=device),
                                attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False).logits
            out.append(logits[:, 0].float())
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """``[B]`` rewards, normalised with the stored mean/std when ``normalize``."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        scores = self.raw_scores(list(prompts), list(responses))
        if self.normalization:
            scores = (scores - self.normalization["mean"]) / self.normalization["std"]
        return scores
