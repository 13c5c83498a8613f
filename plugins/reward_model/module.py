"""The reward-model LightningModule: the step, evaluation, normalisation and export."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from rlhfkit import (
    Preference,
    Ranking,
    RewardBatch,
    StageContext,
    UserError,
    adamw,
    encode_pairs,
    gradient_sync,
    latest_metrics,
    log_now,
    log_step,
    micro_batches,
    optimizer_step,
    step_loader,
    total_steps,
)
from rlhfkit.plugins.reward_model import RewardModelConfig
from rlhfkit.plugins.reward_model.encoding import RankingEncoder, group_scores, trim_agrees
from rlhfkit.plugins.reward_model.report import evaluate_pairs, write_report
from rlhfkit.plugins.reward_model.scoring import ScalarHead, causal_lm, export_classifier, score_and_logits


def as_ranking(row: Any) -> tuple[Ranking, float]:
    """A training row as a ranking (pairs: chosen first) and its margin (NaN if none)."""
    if isinstance(row, Ranking):
        return row, float("nan")
    if isinstance(row, Preference):
        margin = float("nan") if row.margin is None else row.margin
        return Ranking(row.prompt, (row.chosen, row.rejected), (0, 1)), margin
    raise UserError(f"the reward-model algorithm trains on preference or ranking rows, not "
                    f"{type(row).__name__}; point `data:` at such a dataset.")


class RewardModelTraining(L.LightningModule):
    # what the console lines and progress bar show (trainer.console_metrics overrides)
    console_metrics = ("train/loss", "train/rm/accuracy", "eval/accuracy", "train/grad_norm")

    def __init__(self, config: RewardModelConfig, context: StageContext):
        super().__init__()
        self.automatic_optimization = False
        self.config = config
        self.section = context.trainer
        self.stage_dir = Path(context.stage_dir)
        self.seed = context.seed
        self.backbone = context.component("backbone")
        self.model = self.backbone.model
        self.model.train()
        # The width of the last hidden state (what the LM head reads), which is not always
        # hidden_size: OPT-350m projects its 1024-wide states down to 512.
        hidden = causal_lm(self.model).get_output_embeddings().in_features
        self.head = ScalarHead(hidden)
        self.objective = context.component("objective")
        self.regularizers = context.component("regularizers") or []
        self.needs_lm = any(getattr(term, "needs_lm", False) for term in [self.objective, *self.regularizers])
        self.rows = [as_ranking(r) for r in context.component("data").rows()]
        self.encode = RankingEncoder(self.backbone.tokenizer, config.max_length, config.share_prompt)
        self.trim = False  # the last layer's MLP only where read: on after _prepare's check
        self._check_objectives(context.stage)
        eval_data = context.component("eval_data")
        self.eval_rows = list(eval_data.rows()) if eval_data else []
        if any(not isinstance(r, Preference) for r in self.eval_rows):
            kind = next(type(r).__name__ for r in self.eval_rows if not isinstance(r, Preference))
            raise UserError(f"the reward-model algorithm evaluates on preference pairs; eval_data holds {kind} rows. "
                            f"Point eval_data at a pair split (e.g. the built-in tasks' preference-gold).")
        reference = context.component("reference_data")
        self.reference_rows = list(reference.rows()) if reference else []
        self.total_steps = total_steps(self.section, len(self.rows))
        self.history: dict[str, Any] = {}
        self._last_time = time.perf_counter()

    def _check_objectives(self, stage: str) -> None:
        """Run the objective and regularizers once on the labels of every training row
        (scores 0) before anything trains, so an objective that cannot train on this data
        (pairs vs K-wise rankings, margins it needs) is one clear error now rather than a
        traceback at the first step."""
        if not self.rows:
            return
        k = max(len(r.completions) for r, _ in self.rows)
        ranks = torch.tensor([list(r.ranks) + [0] * (k - len(r.completions)) for r, _ in self.rows])
        valid = torch.tensor([[True] * len(r.completions) + [False] * (k - len(r.completions)) for r, _ in self.rows])
        margins = torch.tensor([margin for _, margin in self.rows])
        batch = RewardBatch(scores=torch.zeros(len(self.rows), k), ranks=ranks, valid=valid,
                            margins=None if margins.isnan().all() else margins.nan_to_num(0.0))
        if self.needs_lm:
            batch.best_nll = torch.zeros(len(self.rows))
        for term, where in [(self.objective, "objective"), *((r, "regularizers") for r in self.regularizers)]:
            try:
                term(batch)
            except ValueError as exc:
                raise UserError(f"stage {stage!r}: its {where} cannot train on its data ({len(self.rows)} rows of "
                                f"up to {k} completions per prompt): {exc}") from None

    # ------------------------------------------------------------------ data
    def _collate(self, items: list[tuple[int, tuple[Ranking, float]]]) -> dict[str, torch.Tensor]:
        """Token tensors of every completion of every prompt (:class:`RankingEncoder`: one
        shared-prompt row per prompt, or ``[B, K, L]`` rows padded to the batch's largest K
        with copies of the first completion) and the labels ``ranks, valid [B, K]`` (K:
        the batch's largest ranking), ``margins [B]`` (NaN where the data has none)."""
        rows = [row for _, (row, _) in items]
        k = max(len(r.completions) for r in rows)
        batch = self.encode(rows, indices=[i for i, _ in items])
        return batch | {"ranks": torch.tensor([list(r.ranks) + [0] * (k - len(r.completions)) for r in rows]),
                        "valid": torch.tensor([[j < len(r.completions) for j in range(k)] for r in rows]),
                        "margins": torch.tensor([margin for _, (_, margin) in items])}

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return step_loader(list(enumerate(self.rows)), self._collate, self.section, self.seed, self.total_steps,
                           position=lambda: self.trainer.global_step, rank=self.global_rank)

    def configure_optimizers(self) -> Any:
        return adamw([([*self.model.parameters(), *self.head.parameters()], self.config)], self.total_steps)

    # ------------------------------------------------------------------ loss
    def _loss(self, chunk: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        scores, nll = group_scores(self.model, self.head, chunk, with_nll=self.needs_lm, trim=self.trim)
        batch = RewardBatch(scores=scores, ranks=chunk["ranks"], valid=chunk["valid"],
                            # a pair without a margin counts as margin 0 when others in the batch have one
                            margins=None if chunk["margins"].isnan().all() else chunk["margins"].nan_to_num(0.0))
        if nll is not None:  # the Askell LM term: each prompt's best completion's mean token NLL
            ranks = chunk["ranks"].masked_fill(~chunk["valid"], torch.iinfo(chunk["ranks"].dtype).max)
            batch.best_nll = nll.gather(1, ranks.argmin(1, keepdim=True)).squeeze(1)
        terms = [self.objective(batch), *(term(batch) for term in self.regularizers)]
        metrics = {name: value for term in terms for name, value in term.metrics.items()}
        return sum(term.loss for term in terms), metrics

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # 1. forward/backward micro-batches of whole prompts; each prompt weighs the same
        rows = batch["ranks"].shape[0]
        world = self.trainer.world_size
        chunks = micro_batches(batch, self.section.micro_batch_size)
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for i, chunk in enumerate(chunks):
            n = chunk["ranks"].shape[0]
            with gradient_sync(self, last=i == len(chunks) - 1):
                loss, metrics = self._loss(chunk)
                self.manual_backward(loss * n / self.section.batch_size * world)
            loss_sum += loss.detach() * n
            for name, value in metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + torch.as_tensor(value).detach() * n  # no host sync
        # 2. clip, step, schedule
        grad_norm = optimizer_step(self, self.section.gradient_clip, loss=loss_sum)  # NaN guard (trainer.on_nan)
        # 3. metrics on logging steps (this rank's rows; the loss is reduced over ranks)
        step = self.global_step
        if step % self.section.log_every_n_steps == 0 or step == self.total_steps:
            now = time.perf_counter()
            loss = self.trainer.strategy.reduce(loss_sum / rows, reduce_op="mean")
            log_step(self, {"train/loss": loss, "train/grad_norm": grad_norm,
                            "train/lr": self.lr_schedulers().get_last_lr()[0],
                            "train/rows_per_s": rows * world * self.section.log_every_n_steps / (now - self._last_time),
                            **{f"train/{name}": value / rows for name, value in metric_sums.items()}})
            self._last_time = now
        if self.section.eval_every_n_steps and step % self.section.eval_every_n_steps == 0:
            self._evaluate("eval")

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def scores(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        """Raw scores ``[N]`` of (prompt, completion) pairs, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        out = []
        for i in range(0, len(prompts), self.config.eval_batch_size):
            encoded = encode_pairs(self.backbone.tokenizer, prompts[i:i + self.config.eval_batch_size],
                                   completions[i:i + self.config.eval_batch_size], self.config.max_length)
            ids, mask = (torch.tensor(encoded[n], device=self.device) for n in ("input_ids", "attention_mask"))
            out.append(score_and_logits(self.model, self.head, ids, mask, with_logits=False)[0])
        self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, device=self.device)

    def _evaluate(self, key: str) -> dict[str, Any] | None:
        if not self.eval_rows:
            return None
        rank, world = self.global_rank, self.trainer.world_size
        rows = self.eval_rows[rank::world]
        chosen = self.scores([r.prompt for r in rows], [r.chosen for r in rows])
        rejected = self.scores([r.prompt for r in rows], [r.rejected for r in rows])
        result = evaluate_pairs(chosen, rejected, self.trainer.strategy,
                                index=torch.arange(rank, len(self.eval_rows), world))
        self.history[key] = {k: v for k, v in result.items() if k != "bins"}
        log_now(self, {f"eval/{name}": value for name, value in self.history[key].items()})
        if key == "eval" and self.trainer.is_global_zero:
            examples = rows[: self.config.report_examples]  # rank 0's pairs, with their own scores
            shown = list(zip(examples, chosen[: len(examples)].tolist(), rejected[: len(examples)].tolist(),
                             strict=True))
            write_report(self.stage_dir / "eval", result, shown)
        return result

    def normalization(self) -> dict[str, float] | None:
        """Mean (and std) of the raw scores of the reference completions."""
        if not self.reference_rows:
            return None
        prompts = [getattr(r, "prompt", "") for r in self.reference_rows]
        completions = [getattr(r, "completion", None) or getattr(r, "chosen", None) for r in self.reference_rows]
        if any(c is None for c in completions):
            raise UserError("reference_data must hold prompt-completion, messages or preference rows (their "
                            "completions, last replies or chosen responses are scored to mean 0)")
        scores = self.scores(prompts, completions)
        std = float(scores.std()) if self.config.normalize_std and len(scores) > 1 else 1.0
        return {"mean": float(scores.mean()), "std": std}

    def _prepare(self) -> None:
        """Rows tokenized and the shared-prompt check, before the first step."""
        self.encode.tokenize_all([row for row, _ in self.rows])
        probe = [row for row, _ in self.rows[:4]]
        self.encode.check(self.model, self.head, probe, self.device)
        if self.config.trim_last_layer and probe:
            batch = {k: v.to(self.device) for k, v in self.encode(probe).items()}
            self.trim = trim_agrees(self.model, self.head, batch, self.needs_lm)

    def on_train_start(self) -> None:
        self._prepare()
        self._last_time = time.perf_counter()
        if self.global_step == 0:
            self._evaluate("eval_before")

    def finalize(self) -> None:
        """After the last step (again after a resume at it): final evaluation and the
        normalisation the export carries."""
        self._evaluate("eval")
        self.history["normalization"] = self.normalization()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["reward_model_history"] = json.dumps(self.history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = json.loads(checkpoint.get("reward_model_history", "{}"))

    # ---------------------------------------------------------------- output
    def export(self, directory: Path) -> None:
        export_classifier(causal_lm(self.backbone.plain_model()), self.head, self.backbone.tokenizer,
                          directory, self.history.get("normalization"))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": self.global_step}
        for key, prefix in (("eval_before", "before_"), ("eval", "")):
            for name, value in (self.history.get(key) or {}).items():
                out[f"{prefix}{name}"] = value
        if self.history.get("normalization"):
            out["reward_mean_removed"] = self.history["normalization"]["mean"]
        loss = latest_metrics(self).get("train/loss")
        if loss is not None:
            out["train_loss"] = float(loss)
        return out
