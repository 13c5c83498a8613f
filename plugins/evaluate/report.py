"""The ``evaluate`` stage: every listed model answers the same held-out prompts.

Per model (greedy answers unless said otherwise):

- ``gold``: mean gold score of the answers (the built-in task's scorer);
- ``proxy``: mean score of the answers under ``reward`` (the learned reward model);
- ``kl``: KL(model || reference) in nats per answer, estimated as the mean over answers
  *sampled* from the model at temperature 1 of sum_t [log pi(y_t) - log pi_ref(y_t)]
  (the k1 estimator, unbiased; greedy answers would not be samples of the model);
- ``length``: mean answer length in tokens (EOS included);
- ``perplexity``: exp(mean NLL per completion token) on ``text`` (EOS included), as the
  sft stage measures it.

Per reward source: ``accuracy``, the share of ``pairs`` whose chosen answer scores above
the rejected one (ties count as wrong).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rlhfkit import (
    StageContext,
    UserError,
    logprobs_from_logits,
    prompt_display,
    provides,
    row_fields,
    score_rows,
)
from rlhfkit.files import atomic_write_text
from rlhfkit.plugins.evaluate import EvaluateConfig
from rlhfkit.plugins.ppo.rollout import response_logits
from rlhfkit.plugins.sft.module import token_nll

REPORT_NAME = "report.json"


def _rows(dataset: Any, slot: str, need: str) -> list[Any]:
    rows = list(dataset.rows())
    wrong = next((r for r in rows if not hasattr(r, need)), None)
    if wrong is not None:
        raise UserError(f"the evaluate stage reads `{need}` from `{slot}:` rows; {type(wrong).__name__} rows have "
                        f"none. Point `{slot}:` at a dataset of such rows.")
    return rows


def _label(reference: Any, index: int) -> str:
    config = getattr(reference, "config", None)
    return (getattr(config, "from_stage", None) or getattr(config, "path", None) or f"model {index}")


class Evaluate:
    """Trains nothing: :meth:`run` measures, :meth:`summary` returns ``{model/metric: value}``."""

    evaluation_only = True

    def __init__(self, config: EvaluateConfig, context: StageContext):
        self.config = config
        self.stage = context.stage
        self.stage_dir = Path(context.stage_dir)
        self.seed = context.seed
        self.stage_order = list(context.exports)
        refs = context.slots["models"]
        self.labels = [_label(ref, i) for i, ref in enumerate(refs)]
        if config.labels:
            if len(config.labels) != len(refs) or len(set(config.labels)) != len(refs):
                raise UserError(f"stage {self.stage!r}: `labels` names {len(config.labels)} models but `models` lists "
                                f"{len(refs)}; give one distinct label per model, in the same order.")
            self.labels = list(config.labels)
        self.models = context.component("models")
        self.reference = context.component("reference")
        self.reward = context.component("reward")
        self.reward_label = _label(context.slots.get("reward"), len(refs)) if self.reward is not None else ""
        self.gold = context.component("gold")
        prompt_rows = _rows(context.component("prompts"), "prompts", "prompt")[: config.prompts]
        self.prompts = [r.prompt for r in prompt_rows]
        #: each prompt row's other columns, for reward sources that read them
        self.fields = [row_fields(r) for r in prompt_rows]
        text = context.component("text")
        self.text = _rows(text, "text", "completion") if text is not None else []
        pairs = context.component("pairs")
        self.pairs = _rows(pairs, "pairs", "rejected") if pairs is not None else []
        device = "cuda" if context.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.results: dict[str, dict[str, float]] = {}
        self.sample_rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ measuring
    def run(self) -> None:
        for policy in [*self.models, self.reference]:
            if policy is not None:
                policy.model.to(self.device).eval()
        if provides(self.reward, "to"):
            self.reward.to(self.device)
        shown = self.prompts[: self.config.samples]
        answers: dict[str, list[str]] = {}
        scores: dict[str, dict[str, torch.Tensor]] = {}  # model -> {gold|proxy: [prompts] scores}
        for label, policy in zip(self.labels, self.models, strict=True):
            self.results[label], answers[label], scores[label] = self._measure(policy)
        if self.reward is not None and self.pairs:
            chosen = self._score(self.reward, [p.prompt for p in self.pairs], [p.chosen for p in self.pairs])
            rejected = self._score(self.reward, [p.prompt for p in self.pairs], [p.rejected for p in self.pairs])
            self.results.setdefault(self.reward_label, {})["accuracy"] = float((chosen > rejected).float().mean())
        for i, prompt in enumerate(shown):
            for label in self.labels:
                response = answers[label][i]
                row = {"prompt": prompt, "model": label, "response": response}
                self.sample_rows.append(row | {name: float(values[i]) for name, values in scores[label].items()})

    @torch.no_grad()
    def _measure(self, policy: Any) -> tuple[dict[str, float], list[str], dict[str, torch.Tensor]]:
        """The model's metrics, its greedy answers and their ``gold`` / ``proxy`` scores."""
        c = self.config
        torch.manual_seed(self.seed)
        answers: list[str] = []
        lengths: list[torch.Tensor] = []
        kls: list[torch.Tensor] = []
        for start in range(0, len(self.prompts), c.batch_size):
            chunk = self.prompts[start:start + c.batch_size]
            ids, mask = policy.tokenize_prompts(chunk)
            ids, mask = ids[:, -c.max_prompt_length:], mask[:, -c.max_prompt_length:]
            response, response_mask = policy.generate_ids(ids, mask, max_new_tokens=c.max_new_tokens, do_sample=False)
            answers += policy.decode_responses(response, response_mask)
            lengths.append(response_mask.sum(1).float())
            if self.reference is not None:
                for _ in range(c.kl_samples):
                    sampled, sampled_mask = policy.generate_ids(ids, mask, max_new_tokens=c.max_new_tokens,
                                                                do_sample=True, temperature=1.0)
                    own = _response_logprobs(policy.model, ids, mask, sampled, sampled_mask)
                    ref = _response_logprobs(self.reference.model, ids, mask, sampled, sampled_mask)
                    kls.append((own - ref).sum(1))
        scores = {name: self._score(source, self.prompts, answers, self.fields)
                  for name, source in (("gold", self.gold), ("proxy", self.reward)) if source is not None}
        metrics = {name: float(values.mean()) for name, values in scores.items()}
        if provides(self.gold, "evaluate"):  # the task's own metrics of the greedy answers (per level...)
            metrics.update({f"task/{k}": float(v) for k, v in self.gold.evaluate(self.prompts, answers).items()})
        if c.pass_k and self.gold is not None:
            metrics.update(self._pass_at_k(policy))
        if kls:
            metrics["kl"] = float(torch.cat(kls).mean())
        metrics["length"] = float(torch.cat(lengths).mean())
        if self.text:
            metrics["perplexity"] = self._perplexity(policy)
        return metrics, answers, scores

    @torch.no_grad()
    def _pass_at_k(self, policy: Any) -> dict[str, float]:
        """pass@k over the prompts: ``k`` sampled answers each, the best by gold kept."""
        c = self.config
        best: list[str] = []
        best_scores: list[float] = []
        for start in range(0, len(self.prompts), c.batch_size):
            chunk = self.prompts[start:start + c.batch_size]
            fields = self.fields[start:start + c.batch_size]
            ids, mask = policy.tokenize_prompts(chunk)
            ids, mask = ids[:, -c.max_prompt_length:], mask[:, -c.max_prompt_length:]
            tries: list[list[str]] = []
            tried: list[torch.Tensor] = []
            for _ in range(c.pass_k):
                sampled, sampled_mask = policy.generate_ids(ids, mask, max_new_tokens=c.max_new_tokens,
                                                            do_sample=True, temperature=c.pass_temperature)
                tries.append(policy.decode_responses(sampled, sampled_mask))
                tried.append(self._score(self.gold, chunk, tries[-1], fields))
            scores = torch.stack(tried, dim=1)  # [prompts, k]
            top = scores.argmax(dim=1).tolist()
            best += [tries[j][i] for i, j in enumerate(top)]
            best_scores += scores.max(dim=1).values.tolist()
        k = c.pass_k
        metrics = {f"pass@{k}": sum(s > c.pass_threshold for s in best_scores) / len(best_scores)}
        if provides(self.gold, "evaluate"):
            metrics.update({f"pass@{k}/{name}": float(v) for name, v in self.gold.evaluate(self.prompts, best).items()})
        return metrics

    def _score(self, source: Any, prompts: list[Any], responses: list[str],
               fields: list[dict[str, Any]] | None = None) -> torch.Tensor:
        size = self.config.batch_size
        parts = [score_rows(source, prompts[i:i + size], responses[i:i + size],
                            fields[i:i + size] if fields is not None else None).float().cpu()
                 for i in range(0, len(prompts), size)]
        return torch.cat(parts)

    @torch.no_grad()
    def _perplexity(self, policy: Any) -> float:
        """As the sft stage measures held-out perplexity (its ``token_nll``)."""
        nll = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device)
        for start in range(0, len(self.text), self.config.batch_size):
            rows = self.text[start:start + self.config.batch_size]
            batch = policy.tokenize_pairs([r.prompt for r in rows], [r.completion for r in rows],
                                          self.config.max_length)
            part_nll, part_tokens = token_nll(policy.model, batch, keep_logits=False)
            nll += part_nll
            tokens += part_tokens
        return float(torch.exp(nll / tokens))

    # ------------------------------------------------------------------ output
    def export(self, directory: Path) -> None:
        """Write the report (tables the runner prints at the end of a run) and the samples."""
        atomic_write_text(self.stage_dir / REPORT_NAME, json.dumps({"tables": self.tables()}, indent=2))
        atomic_write_text(self.stage_dir / "samples.jsonl",
                          "".join(json.dumps(row) + "\n" for row in self.sample_rows))

    def tables(self) -> list[dict[str, Any]]:
        names = {"gold": "gold ↑", "proxy": "proxy (RM)", "kl": "KL to reference", "length": "length",
                 "perplexity": "perplexity", "accuracy": "RM pair accuracy"}
        present = [m for m in names if any(m in r for r in self.results.values())]
        order = {name: i for i, name in enumerate(self.stage_order)}
        labels = sorted(self.results, key=lambda label: order.get(label, len(order)))
        rows = [[label, *(f"{self.results[label][m]:.3f}" if m in self.results[label] else "—" for m in present)]
                for label in labels]
        parts = [f"{len(self.prompts)} held-out prompts, greedy answers of at most {self.config.max_new_tokens} tokens"]
        if self.reference is not None:
            parts.append("KL sampled at temperature 1")
        if self.text:
            parts.append(f"perplexity on {len(self.text)} held-out demonstrations")
        caption = "; ".join(parts)
        tables = [{"title": self.config.title or f"{self.stage}: every model on the same prompts",
                   "columns": ["model", *(names[m] for m in present)], "rows": rows, "caption": caption}]
        if self.sample_rows:
            scored = [k for k in ("gold", "proxy") if k in self.sample_rows[0]]
            tables.append({
                "title": "the same prompts after each stage",
                "columns": ["prompt", "model", "answer", *scored],
                "rows": [[prompt_display(row["prompt"]) if i % len(self.labels) == 0 else "", row["model"], row["response"],
                          *(f"{row[k]:.2f}" for k in scored)] for i, row in enumerate(self.sample_rows)],
                "caption": "", "sections": len(self.labels)})
        return tables

    def summary(self) -> dict[str, Any]:
        return {f"{label}/{name}": value for label, metrics in self.results.items() for name, value in metrics.items()}


@torch.no_grad()
def _response_logprobs(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                       response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` log-probs of the response tokens (0 where the mask is 0)."""
    logits = response_logits(model, prompt_ids, prompt_mask, response_ids, response_mask)
    return logprobs_from_logits(logits, response_ids) * response_mask
