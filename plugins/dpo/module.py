"""The ``dpo`` LightningModule: one forward of chosen and rejected per micro-batch (the
prompt computed once, or the two rows concatenated), reference log-probs on the fly or
precomputed, any DPO-family objective. Unpaired rows (KTO) are batched and stepped in
``unpaired.py``."""

from __future__ import annotations

import copy
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch

from rlhfkit import (
    Feedback,
    Preference,
    PreferenceBatch,
    StageContext,
    UserError,
    adamw,
    encode_pairs,
    gradient_sync,
    log_now,
    log_step,
    optimizer_step,
    provides,
    ref,
    row_fields,
    score_rows,
    step_loader,
    total_steps,
)
from rlhfkit.plugins.dpo import DPOConfig, evaluation, unpaired
from rlhfkit.plugins.dpo.logps import PairEncoder, pair_slice, sequence_logps
from rlhfkit.plugins.engines.sampling import EngineHandle, sample
from rlhfkit.plugins.policy.model import TransformersPolicy


def _pairs(rows: Any, slot: str) -> list[Preference] | list[Feedback]:
    """Preference pairs, or unpaired Feedback rows (KTO): one kind per slot."""
    rows = list(rows)
    kind = Feedback if rows and isinstance(rows[0], Feedback) else Preference
    wrong = next((r for r in rows if not isinstance(r, kind)), None)
    if isinstance(wrong, Preference | Feedback):
        raise UserError(f"`{slot}:` mixes preference pairs and unpaired Feedback rows; give the dpo algorithm "
                        f"one kind per slot.")
    if wrong is not None:
        raise UserError(f"the dpo algorithm trains on preference pairs; `{slot}:` holds {type(wrong).__name__} rows. "
                        f"Point it at a pair split (e.g. the built-in tasks' `preference`), or, with the kto "
                        f"objective, at unpaired rows (the `unpaired` split, or a file with schema: unpaired).")
    return rows


class _Holder:
    """Keeps a model out of the LightningModule's submodules (not checkpointed or moved)."""

    def __init__(self, model: torch.nn.Module | None):
        self.model = model


class DirectPreference(L.LightningModule):
    # what the console lines and progress bar show (trainer.console_metrics overrides)
    console_metrics = ("train/dpo/loss", "train/rewards/accuracy", "train/rewards/margin", "train/kl/implicit")

    def __init__(self, config: DPOConfig, context: StageContext):
        super().__init__()
        self.automatic_optimization = False
        self.config = config
        self.section = context.trainer
        self.stage_dir = Path(context.stage_dir)
        self.seed = context.seed
        self.policy = context.component("policy")
        self.encode = PairEncoder(self.policy.tokenizer, config.max_length, config.share_prompt,
                                  trim=config.trim_last_layer)
        self.model = self.policy.model
        self.objective = context.component("objective")
        self.needs_reference = getattr(self.objective, "needs_reference", True)
        self.needs_mismatched = getattr(self.objective, "needs_mismatched", False)
        reference = context.component("reference")
        self.adapter_reference = self.needs_reference and reference is None and hasattr(self.model, "disable_adapter")
        ref_model = None
        if self.needs_reference and not self.adapter_reference:
            ref_model = reference.plain_model() if reference is not None else copy.deepcopy(self.policy.plain_model())
            ref_model.requires_grad_(False).eval()
        self._frozen = _Holder(ref_model)
        self.constraints = context.component("constraints") or []
        if self.constraints:
            if config.reference_logps == "precompute":
                raise UserError("constraints that move the reference (reference-ema, TR-DPO) need reference "
                                "log-probs on the fly; set algorithm.reference_logps: on-the-fly")
            # a reference that changes is state: a submodule is checkpointed and moved with the module
            self.moving_reference = ref_model
        for constraint in self.constraints:
            if provides(constraint, "bind"):
                constraint.bind(self)
        self.reward = context.component("reward")
        engine = context.component("engine")
        if engine is not None and config.online is None:
            raise UserError("the dpo algorithm samples only online (algorithm.online); remove `engine:` from this "
                            "offline stage, or turn on online DPO")
        self.engine = EngineHandle(engine or context.build(ref("engine")(name="hf")), self._sampler(ref_model)) \
            if config.online is not None else None
        if config.online is not None:
            if self.reward is None:
                raise UserError("online DPO (algorithm.online) labels its samples with a reward: fill the `reward:` "
                                "slot, e.g. {name: reward-model, from_stage: rm}")
            if config.reference_logps == "precompute":
                raise UserError("online DPO samples new pairs every step, so reference log-probs cannot be "
                                "precomputed; set algorithm.reference_logps: on-the-fly")
            prompt_rows = context.component("data").rows()
            self.rows: list[Any] = [self._prompt_of(r) for r in prompt_rows]  # prompts
            self.prompt_fields = [row_fields(r) for r in prompt_rows]
        else:
            self.rows = _pairs(context.component("data").rows(), "data")
        self.unpaired = bool(self.rows) and isinstance(self.rows[0], Feedback)  # KTO on Feedback rows: unpaired.py
        if self.unpaired:
            unpaired.check_objective(self.objective, context.slots["objective"].name)
        elif self.needs_mismatched and (config.online is not None or config.reference_logps == "precompute"):
            raise UserError("the kto objective on preference pairs scores mismatched pairs with the reference at "
                            "every step: use it offline with algorithm.reference_logps: on-the-fly (on unpaired "
                            "rows it can precompute them)")
        self.partners = unpaired.partners(len(self.rows), self.seed) if self.unpaired else []
        eval_data = context.component("eval_data")
        self.eval_rows = _pairs(eval_data.rows(), "eval_data") if eval_data else []
        prompts = context.component("eval_prompts")
        self.eval_prompts = [r.prompt for r in prompts.rows()][: config.eval_prompts] if prompts else []
        self.gold = context.component("gold")
        self.total_steps = total_steps(self.section, len(self.rows))
        # [N, 2] reference log-probs of chosen, rejected (unpaired rows: completion, mismatched pair)
        self.precomputed: torch.Tensor | None = None
        self.precomputed_eval: torch.Tensor | None = None
        self.history: dict[str, Any] = {}
        self._prepared = False  # models on the device, rows tokenized, the shared-prompt check (_prepare)
        self._last_time = time.perf_counter()

    def _sampler(self, ref_model: torch.nn.Module | None) -> Any:
        """The policy whose samples make the online pairs (``online_from``)."""
        if self.config.online_from == "policy" or self.adapter_reference:
            return self.policy  # the reference of a LoRA policy: its adapter off while sampling
        if ref_model is None:
            raise UserError("algorithm.online_from: reference samples from the reference model, and this objective "
                            "has none (it needs no reference log-probs); use online_from: policy, or an objective "
                            "with a reference such as dpo")
        return TransformersPolicy(ref_model, self.policy.tokenizer, self.policy.config)

    @property
    def reference(self) -> torch.nn.Module | None:
        """The reference model (``None`` when it is the LoRA adapter switched off, or freed
        after precomputing)."""
        return self._frozen.model

    # ------------------------------------------------------------------ data
    @staticmethod
    def _prompt_of(row: Any) -> Any:
        prompt = getattr(row, "prompt", None)
        if prompt is None:
            raise UserError(f"online DPO samples from prompts; a {type(row).__name__} row has none. Point `data:` "
                            f"at prompt rows (e.g. the built-in tasks' `prompts` split).")
        return prompt

    def _collate(self, items: list[tuple[int, Any]]) -> dict[str, Any]:
        if self.config.online is not None:  # pairs are sampled in the step, on the device
            return {"index": torch.tensor([i for i, _ in items]), "prompts": [prompt for _, prompt in items],
                    "fields": [self.prompt_fields[i] for i, _ in items]}
        if self.unpaired:
            return unpaired.encode(self, items)
        indices = [i for i, _ in items]
        return self.encode([row for _, row in items], indices=indices) | {"index": torch.tensor(indices)}

    @torch.no_grad()
    def _online_pairs(self, prompts: list[Any], fields: list[dict[str, Any]]) -> dict[str, Any]:
        """Two sampled responses per prompt, labelled by the reward (ties are dropped: they
        carry no preference). Sampling is seeded by (seed, step, rank): resume is exact."""
        base = self.seed * 1_000_003 + self.global_step * 1009 + self.global_rank
        from_reference = self.config.online_from == "reference"
        # the reference's weights do not follow the updates: an engine of its own takes them once
        engine = self.engine.ready(0 if from_reference else self.global_step)
        adapter_off = self.model.disable_adapter() if from_reference and self.adapter_reference else nullcontext()
        with adapter_off:
            responses = sample(self.engine.policy, engine, prompts * 2, [base + i for i in range(2 * len(prompts))],
                               self.config.online).responses
        first, second = responses[: len(prompts)], responses[len(prompts):]
        scores = score_rows(self.reward, prompts * 2, responses, fields * 2).float().cpu()
        a, b = scores[: len(prompts)], scores[len(prompts):]
        rows = [Preference(p, x, y) if sa > sb else Preference(p, y, x)
                for p, x, y, sa, sb in zip(prompts, first, second, a.tolist(), b.tolist(), strict=True) if sa != sb]
        self._online_log = {"online/score": float(scores.mean()), "online/pairs": float(len(rows)),
                            "online/score_gap": float((a - b).abs().mean())}
        batch = {k: v.to(self.device) for k, v in self.encode(rows).items()} if rows else None
        return {"batch": batch, "rows": len(rows)}

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return step_loader(list(enumerate(self.rows)), self._collate, self.section, self.seed, self.total_steps,
                           position=lambda: self.trainer.global_step, rank=self.global_rank)

    def configure_optimizers(self) -> Any:
        return adamw([(self.model.parameters(), self.config)], self.total_steps)

    # ------------------------------------------------------------------ log-probs
    @torch.no_grad()
    def _reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.adapter_reference:
            with self.model.disable_adapter():
                return sequence_logps(self.model, batch, trim=self.encode.trim)[0]
        self.reference.eval()  # no dropout in the reference, whatever mode Lightning set
        return sequence_logps(self.reference, batch, trim=self.encode.trim)[0]

    @torch.no_grad()
    def _mismatched(self, rows: list[Preference]) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy and reference log-probs of prompt i with pair i+1's chosen response."""
        shifted = [Preference(r.prompt, rows[(i + 1) % len(rows)].chosen, "") for i, r in enumerate(rows)]
        encoded = encode_pairs(self.policy.tokenizer, [r.prompt for r in shifted], [r.chosen for r in shifted],
                               self.config.max_length)
        batch = {k: torch.tensor(v, device=self.device) for k, v in encoded.items()}
        return sequence_logps(self.model, batch)[0], self._reference_logps(batch)

    def _preference_batch(self, chunk: dict[str, torch.Tensor]) -> PreferenceBatch:
        logps, tokens = sequence_logps(self.model, chunk, trim=self.encode.trim)
        b = logps.shape[0] // 2
        batch = PreferenceBatch(logps[:b], logps[b:], tokens[:b], tokens[b:])
        if self.needs_mismatched:
            rows = [self.rows[i] for i in chunk["index"].tolist()]
            batch.mismatched, batch.ref_mismatched = self._mismatched(rows)
        if self.needs_reference:
            if self.precomputed is not None:
                ref = self.precomputed[chunk["index"].cpu()].to(self.device)
                batch.ref_chosen, batch.ref_rejected = ref[:, 0], ref[:, 1]
            else:
                ref = self._reference_logps(chunk)
                batch.ref_chosen, batch.ref_rejected = ref[:b], ref[b:]
        return batch

    # ------------------------------------------------------------------ step
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.config.online is not None:
            sampled = self._online_pairs(batch["prompts"], batch["fields"])
            if sampled["batch"] is None:  # every pair tied: nothing to learn this step
                self.optimizers().zero_grad(set_to_none=True)
                optimizer_step(self, self.section.gradient_clip)
                return
            batch = sampled["batch"] | {"index": torch.arange(sampled["rows"])}
        if self.unpaired:
            self._finish_step(unpaired.backward(self, batch), batch["index"].shape[0])
            return
        pairs = batch["index"].shape[0]
        world = self.trainer.world_size
        per_chunk = self.section.micro_batch_size
        chunks = [pair_slice(batch, i, min(i + per_chunk, pairs)) for i in range(0, pairs, per_chunk)]
        sums: dict[str, torch.Tensor] = {}
        for i, chunk in enumerate(chunks):
            n = chunk["index"].shape[0]
            with gradient_sync(self, last=i == len(chunks) - 1):
                preference = self._preference_batch(chunk)
                term = self.objective(preference)
                # offline: every pair of the global batch weighs the same; online: ties are dropped, so
                # this rank's pairs are averaged (and DDP averages the ranks)
                share = pairs if self.config.online is not None else self.section.batch_size / world
                self.manual_backward(term.loss * n / share)
            for name, value in {**term.metrics, **evaluation.pair_metrics(preference),
                                unpaired.LOSS_KEY: term.loss.detach()}.items():
                sums[name] = sums.get(name, 0.0) + torch.as_tensor(value).float() * n
        self._finish_step({name: value / pairs for name, value in sums.items()}, pairs)

    def _finish_step(self, means: dict[str, torch.Tensor], rows: int) -> None:
        """After a step's backward passes: the optimizer step, constraints, logs, evaluation."""
        # the objective's own loss, whatever metrics it reports, reaches the NaN guard (trainer.on_nan)
        loss = means.pop(unpaired.LOSS_KEY, None)
        grad_norm = optimizer_step(self, self.section.gradient_clip, loss=loss if isinstance(loss, torch.Tensor) else None)
        after: dict[str, float] = {}
        for constraint in self.constraints:
            if provides(constraint, "after_update"):
                after.update(constraint.after_update(None) or {})
        if after:
            log_now(self, after)
        step = self.global_step
        if step % self.section.log_every_n_steps == 0 or step == self.total_steps:
            now = time.perf_counter()
            reduce = self.trainer.strategy.reduce
            log_step(self, {**{f"train/{k}": reduce(v, reduce_op="mean") for k, v in means.items()},
                            **{f"train/{k}": v for k, v in getattr(self, "_online_log", {}).items()},
                            "train/grad_norm": grad_norm, "train/lr": self.lr_schedulers().get_last_lr()[0],
                            "train/pairs_per_s": rows * self.trainer.world_size * self.section.log_every_n_steps
                            / (now - self._last_time)})
            self._last_time = now
        if self.section.eval_every_n_steps and step % self.section.eval_every_n_steps == 0:
            self._evaluate("eval")

    # ------------------------------------------------------------ reference
    def _reference_table(self, rows: list[Preference] | list[Feedback], training: bool = False) -> torch.Tensor:
        """``[N, 2]`` reference log-probs of the chosen and rejected response of each row
        (unpaired rows: see ``unpaired.reference_table``). ``training``: ``rows`` are the
        training rows, whose tokens are cached and, unpaired, whose mismatched pairs count."""
        if rows and isinstance(rows[0], Feedback):
            return unpaired.reference_table(self, rows, mismatched=training)
        out = []
        size = self.config.eval_batch_size
        for start in range(0, len(rows), size):
            cached = list(range(start, min(start + size, len(rows)))) if training else None
            batch = {k: v.to(self.device) for k, v in self.encode(rows[start:start + size], indices=cached).items()}
            out.append(self._reference_logps(batch).view(2, -1).T.cpu())
        return torch.cat(out) if out else torch.zeros(0, 2)

    def _precompute(self) -> None:
        """Reference log-probs of every training and evaluation row, then the reference
        model is freed (its memory goes back before the first step)."""
        if self.precomputed is None:
            self.precomputed = self._reference_table(self.rows, training=True)
            self.precomputed_eval = self._reference_table(self.eval_rows)
        self._frozen.model = None

    # ------------------------------------------------------------ evaluation
    def _evaluate(self, key: str) -> None:
        metrics = evaluation.evaluate(self)
        if metrics:
            self.history[key] = metrics
            log_now(self, {f"eval/{name}": value for name, value in metrics.items()})

    def _prepare(self) -> None:
        """Models on the device, rows tokenized, the shared-prompt check: before the first
        step, or before finalising a stage resumed at its last step."""
        if self.reference is not None:
            self.reference.to(self.device)
        if provides(self.reward, "to"):
            self.reward.to(self.device)
        if not self.unpaired:
            if self.config.online is None:
                self.encode.tokenize_all(self.rows)
            models = [self.model] + ([self.reference] if self.reference is not None else [])
            self.encode.check(models, self._check_rows(), self.device)
        self._prepared = True

    def on_train_start(self) -> None:
        self._prepare()
        if self.global_step == 0:
            self._evaluate("eval_before")
            evaluation.write_samples(self, "before")
        if self.needs_reference and self.config.reference_logps == "precompute":
            self._precompute()
        self._last_time = time.perf_counter()

    def _check_rows(self) -> list[Preference]:
        """Two pairs for the shared-prompt check: training pairs, or (online) the first
        prompts with their own words as responses, one forwards and one reversed."""
        if self.config.online is None:
            return list(self.rows[:2])
        return [Preference(p, p, " ".join(reversed(p.split()))) for p in self.rows[:2]]

    def finalize(self) -> None:
        """After the last step (again after a resume at it): final evaluation and samples."""
        if not self._prepared:  # resumed at the last step: on_train_start did not run
            self._prepare()
        self._evaluate("eval_after")
        evaluation.write_samples(self, "after")
        if self.engine is not None:
            self.engine.close()

    def on_exception(self, exception: BaseException) -> None:
        if self.engine is not None:
            self.engine.close()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dpo"] = {"history": json.dumps(self.history), "precomputed": self.precomputed,
                             "precomputed_eval": self.precomputed_eval,
                             "constraints": [c.state_dict() if provides(c, "state_dict") else {}
                                             for c in self.constraints]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = json.loads(checkpoint["dpo"]["history"])
        self.precomputed = checkpoint["dpo"]["precomputed"]
        self.precomputed_eval = checkpoint["dpo"]["precomputed_eval"]
        for constraint, state in zip(self.constraints, checkpoint["dpo"]["constraints"], strict=True):
            if provides(constraint, "load_state_dict") and state:
                constraint.load_state_dict(state)

    # ---------------------------------------------------------------- output
    def export(self, directory: Path) -> None:
        self.policy.export(directory)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": self.global_step}
        if self.unpaired:  # what KTO's desirable_weight and undesirable_weight balance (docs/dpo.md)
            desirable = sum(row.desirable for row in self.rows)
            out |= {"desirable_rows": desirable, "undesirable_rows": len(self.rows) - desirable}
        for key, prefix in (("eval_before", "before_"), ("eval_after", "")):
            for name, value in (self.history.get(key) or {}).items():
                out[f"{prefix}{name}"] = value
        return out
