"""The SFT LightningModule: the step, evaluation, samples and export."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from rlhfkit import (
    Conversation,
    PromptCompletion,
    StageContext,
    UserError,
    adamw,
    gradient_sync,
    latest_metrics,
    log_now,
    log_step,
    optimizer_step,
    step_loader,
    total_steps,
    write_samples,
)
from rlhfkit.plugins.sft import SFTConfig
from rlhfkit.plugins.sft.encoding import SFTEncoder, check_layouts, targets_of, token_nll


def as_pair(row: Any) -> PromptCompletion:
    """A demonstration row as (prompt, completion): a conversation is its messages before
    the last (which the chat rule renders with the template) and the last reply's text."""
    if isinstance(row, PromptCompletion):
        return row
    if isinstance(row, Conversation):
        return PromptCompletion(row.prompt, row.completion)
    raise UserError(f"the sft algorithm trains on prompt-completion, messages or text rows, "
                    f"not {type(row).__name__}; point `data:` at such a dataset.")


def sample_prompt(row: PromptCompletion) -> PromptCompletion:
    """A row to sample from: text rows (pretraining) have no prompt, so their first three
    words serve as one."""
    if row.prompt:
        return row
    words = row.completion.split()
    return PromptCompletion(" ".join(words[:3]), " ".join(words[3:]))


class SFT(L.LightningModule):
    # what the console lines and progress bar show (trainer.console_metrics overrides)
    console_metrics = ("train/loss", "eval/perplexity", "train/grad_norm", "train/lr")

    def __init__(self, config: SFTConfig, context: StageContext):
        super().__init__()
        self.automatic_optimization = False
        self.config = config
        self.section = context.trainer
        self.stage_dir = context.stage_dir
        self.seed = context.seed
        self.policy = context.component("policy")
        self.model = self.policy.model
        self.model.train()  # from_pretrained returns eval mode; SFT trains with the policy's dropout
        self.train_rows = [as_pair(r) for r in context.component("data").rows()]
        # every training row tokenized once, now: packing needs the lengths, and a step only lays out ids
        self.encoder = SFTEncoder(self.policy.tokenizer, config.max_length, config.train_on_prompt,
                                  padding_free=config.padding_free)
        self.encoder.tokenize_all(self.train_rows)
        self.items: list[int] | list[list[int]] = (self.encoder.packs() if config.packing
                                                   else list(range(len(self.train_rows))))
        # the LM head, and the last layer's MLP, only where a trained token is predicted: on once
        # check_layouts agrees (at train start; a stage resumed at its last step finalises with full logits)
        self.keep_logits = self.trim = False
        eval_data = context.component("eval_data")
        self.eval_rows = [as_pair(r) for r in eval_data.rows()] if eval_data else []
        shown = self.eval_rows or self.train_rows
        self.sample_rows = [sample_prompt(r) for r in shown[: config.sample_prompts]]
        self.total_steps = total_steps(self.section, len(self.items))
        self.history: dict[str, float] = {}
        self._last_time = time.perf_counter()

    # ------------------------------------------------------------------ data
    def _collate(self, items: list[int] | list[list[int]]) -> list[dict[str, torch.Tensor]]:
        return self.encoder.micro_batches(items, self.section.micro_batch_size)

    def _eval_batch(self, rows: list[PromptCompletion]) -> dict[str, torch.Tensor]:
        batch = self.policy.tokenize_pairs([r.prompt for r in rows], [r.completion for r in rows],
                                           max_length=self.config.max_length)
        if self.config.train_on_prompt:
            batch["labels_mask"] = batch["attention_mask"].clone()
        return batch

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return step_loader(self.items, self._collate, self.section, self.seed, self.total_steps,
                           position=lambda: self.trainer.global_step, rank=self.global_rank)

    def configure_optimizers(self) -> Any:
        return adamw([(self.model.parameters(), self.config)], self.total_steps)

    # ------------------------------------------------------------------ loss
    def _token_nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return token_nll(self.model, batch, keep_logits=self.keep_logits, trim=self.trim)

    def training_step(self, chunks: list[dict[str, torch.Tensor]], batch_idx: int) -> None:
        strategy = self.trainer.strategy
        # 1. the global batch's token count: one all-reduce, so every rank divides by it
        local_tokens = sum(targets_of(chunk).sum() for chunk in chunks).float()
        global_tokens = strategy.reduce(local_tokens, reduce_op="sum")
        world = self.trainer.world_size
        # 2. forward/backward each micro-batch (laid out by the loader); DDP averages grads over ranks, hence * world
        loss_sum = torch.zeros((), device=self.device)
        for i, chunk in enumerate(chunks):
            with gradient_sync(self, last=i == len(chunks) - 1):
                nll, _ = self._token_nll(chunk)
                self.manual_backward(nll / global_tokens * world)
            loss_sum += nll.detach()
        # 3. clip, step, schedule
        grad_norm = optimizer_step(self, self.section.gradient_clip, loss=loss_sum)  # NaN guard (trainer.on_nan)
        # 4. metrics (only on logging steps: reduction across ranks costs a sync)
        step = self.global_step
        if step % self.section.log_every_n_steps == 0 or step == self.total_steps:
            now = time.perf_counter()
            loss = strategy.reduce(loss_sum, reduce_op="sum") / global_tokens
            log_step(self, {
                "train/loss": loss,
                "train/lr": self.lr_schedulers().get_last_lr()[0],
                "train/grad_norm": grad_norm,
                "train/tokens_per_s": global_tokens * self.section.log_every_n_steps / (now - self._last_time),
            })
            self._last_time = now
        if self.section.eval_every_n_steps and step % self.section.eval_every_n_steps == 0:
            self._evaluate("eval")

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def held_out_perplexity(self) -> float | None:
        """exp(mean NLL per completion token) over this rank's share of the eval rows,
        reduced over ranks."""
        if not self.eval_rows:
            return None
        was_training = self.model.training
        self.model.eval()
        nll = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device)
        rows = self.eval_rows[self.global_rank::self.trainer.world_size]
        for i in range(0, len(rows), self.config.eval_batch_size):
            batch = self._eval_batch(rows[i:i + self.config.eval_batch_size])
            part_nll, part_tokens = self._token_nll(batch)
            nll += part_nll
            tokens += part_tokens
        self.model.train(was_training)
        strategy = self.trainer.strategy
        total = strategy.reduce(nll, reduce_op="sum") / strategy.reduce(tokens, reduce_op="sum")
        return float(torch.exp(total))

    def _evaluate(self, key: str) -> None:
        perplexity = self.held_out_perplexity()
        if perplexity is not None:
            self.history[key] = perplexity
            log_now(self, {"eval/perplexity": perplexity})

    def _write_samples(self, when: str) -> None:
        if not self.trainer.is_global_zero or not self.sample_rows:
            return
        with torch.random.fork_rng(devices=[]):
            responses = self.policy.generate([r.prompt for r in self.sample_rows],
                                             max_new_tokens=self.config.sample_max_new_tokens,
                                             do_sample=False)
        write_samples(Path(self.stage_dir) / "samples.jsonl", when,
                      [{"when": when, "step": self.global_step, "prompt": row.prompt, "response": response,
                        "reference": row.completion} for row, response in zip(self.sample_rows, responses, strict=True)])

    def on_train_start(self) -> None:
        # the LM head at trained columns only, and packed rows, checked against full logits over separate rows
        probe = list(range(min(4, len(self.train_rows))))
        if probe:
            self.keep_logits, self.trim = check_layouts(self.encoder, self.model, probe, self.config.packing,
                                                        self.config.trim_last_layer)
        self._last_time = time.perf_counter()
        if self.global_step == 0:
            self._evaluate("eval_before")
            self._write_samples("before")

    def finalize(self) -> None:
        """After the last step (again after a resume at it): final evaluation and samples."""
        self._evaluate("eval")
        self._write_samples("after")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sft_history"] = dict(self.history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = dict(checkpoint.get("sft_history", {}))

    # ---------------------------------------------------------------- output
    def export(self, directory: Path) -> None:
        self.policy.export(directory)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": self.global_step}
        if "eval_before" in self.history:
            out["perplexity_before"] = self.history["eval_before"]
        if "eval" in self.history:
            out["perplexity_after"] = self.history["eval"]
        loss = latest_metrics(self).get("train/loss")
        if loss is not None:
            out["train_loss"] = float(loss)
        return out
