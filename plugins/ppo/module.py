"""The PPO LightningModule: one optimizer step per ``training_step``.

An iteration is ``updates`` optimizer steps: at its first step the module samples the
experience (every rank its share of the prompts, then gathered so every rank holds the
whole rollout), shapes rewards and estimates advantages; each step then trains on one
global minibatch of it (this rank's slice, in micro-batches). The experience is part of
the checkpoint, so a run resumes exactly, even mid-iteration.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console

from rlhfkit import (
    LOSS_MASK,
    LossTerm,
    PolicyOutput,
    Rollout,
    StageContext,
    UserError,
    adamw,
    gradient_sync,
    log_now,
    log_step,
    masked_mean,
    masked_var,
    optimizer_step,
    provides,
    ref,
    row_fields,
    score_rows,
    write_samples,
)
from rlhfkit.plugins.engines.sampling import EngineHandle, sample
from rlhfkit.plugins.ppo import PPOConfig, schedule
from rlhfkit.plugins.ppo.experience import ExperienceMaker, policy_logprobs, reference_logprobs
from rlhfkit.plugins.ppo.functional import sequence_kl
from rlhfkit.plugins.ppo.monitor import DOCS, mismatch_metrics
from rlhfkit.plugins.ppo.rollout import concat, from_state, policy_forward, to_state


def prompt_of(row: Any) -> Any:
    prompt = getattr(row, "prompt", None)
    if prompt is None:
        raise UserError(f"the ppo algorithm samples from prompts; a {type(row).__name__} row has none. Point "
                        f"`data:` at prompt rows (e.g. the built-in tasks' `prompts` split).")
    return prompt


class PPO(L.LightningModule):
    # what the console lines and progress bar show (trainer.console_metrics overrides)
    console_metrics = ("reward/score", "gold/score", "kl/ref", "response/length", "train/policy/clip_fraction")

    def __init__(self, config: PPOConfig, context: StageContext):
        super().__init__()
        self.automatic_optimization = False
        self.config = config
        self.section = context.trainer
        self.stage_dir = Path(context.stage_dir)
        self.seed = context.seed
        self.policy = context.component("policy")
        self.model = self.policy.model
        reference = context.component("reference")
        self.adapter_reference = reference is None and hasattr(self.model, "disable_adapter")
        self.reference = None if self.adapter_reference else (
            reference.plain_model() if reference is not None else copy.deepcopy(self.policy.plain_model()))
        if self.reference is not None:
            self.reference.requires_grad_(False)
        self.reward = context.component("reward")
        self.gold = context.component("gold")
        self.estimator = context.component("estimator")
        self.objective = context.component("objective")
        self.constraints = context.component("constraints") or []
        self.engine = context.component("engine") or context.build(ref("engine")(name="hf"))
        self.sampler = context.component("sampler")
        rows = context.component("data").rows()
        self.prompts = [prompt_of(r) for r in rows]
        #: each prompt row's other columns, passed to reward sources that read them
        self.prompt_fields = [row_fields(r) for r in rows]
        eval_data = context.component("eval_data")
        eval_rows = eval_data.rows()[: config.eval_prompts] if eval_data else []
        self.eval_prompts = [prompt_of(r) for r in eval_rows]
        self.eval_fields = [row_fields(r) for r in eval_rows]
        self.updates, self.iterations = schedule.plan(config, self.section, len(self.prompts))
        self.total_steps = self.iterations * self.updates
        for part in [self.estimator, *self.constraints, self.sampler]:
            if part is not None and provides(part, "bind"):
                part.bind(self)
        self.critic = self.estimator.critic  # a submodule: trained, checkpointed, moved with the module
        self.critic_warmup = getattr(self.estimator, "warmup_iterations", 0)  # critic-only first iterations
        self.entropy_grad = any(getattr(c, "needs_entropy", False) for c in self.constraints)
        self.maker = ExperienceMaker(self.policy, self.engine, self.reference, self.reward, self.estimator,
                                     self.constraints, self.objective, self.gold, config, self.seed,
                                     sampler=self.sampler)
        self.experience: Rollout | None = None
        self.deferred = torch.zeros(0, dtype=torch.long)  # rows whose old log-probs the first update gives
        self.skip_iteration = False
        self.engine_handle = EngineHandle(self.engine, self.policy)
        self.history: dict[str, Any] = {}
        self.console = Console(stderr=True)
        self._warned: set[str] = set()
        self._clock = {"train": 0.0, "train_tokens": 0}

    # ------------------------------------------------------------------ sizes
    def explain(self) -> str:
        c, s = self.config, self.section
        return (f"{self.iterations} iterations x {self.updates} updates: {c.prompts_per_iteration} prompts x "
                f"{c.samples_per_prompt} samples, {c.epochs} epoch(s) in minibatches of {s.batch_size}")

    # ------------------------------------------------------------------ data
    def train_dataloader(self) -> torch.utils.data.DataLoader:
        module = self

        class Steps(torch.utils.data.IterableDataset):
            def __iter__(self):  # one item per optimizer step, from the current one
                return iter(range(module.global_step, module.total_steps))

        return torch.utils.data.DataLoader(Steps(), batch_size=None)

    def configure_optimizers(self) -> Any:
        groups = [(self.model.parameters(), self.config)]
        if self.critic is not None:
            groups.append((self.critic.parameters(), self.estimator.optimizer))
        return adamw(groups, self.total_steps)

    # ---------------------------------------------------------------- rollout
    def _eval_mode(self) -> None:
        """Dropout off in every model during RL (spec §J); grads still flow."""
        for model in (self.model, self.reference, self.critic, getattr(self.reward, "model", None)):
            if model is not None:
                model.eval()

    def greedy_scores(self, rollout: Rollout) -> torch.Tensor:
        """``[B]`` reward-source scores of greedy responses to ``rollout.prompts`` (the
        ReMax baseline), on the device; call it from an estimator's ``prepare``."""
        return self.maker.greedy_scores(rollout, self.device)

    def close_engine(self) -> None:
        self.engine_handle.close()

    def on_exception(self, exception: BaseException) -> None:
        self.close_engine()

    def _make_experience(self, iteration: int, first_update: bool) -> Rollout:
        self.engine_handle.ready(self.global_step)
        made = self.maker.make(iteration, self.prompts, self.prompt_fields, rank=self.global_rank,
                               world=self.trainer.world_size, batch_size=self.section.batch_size,
                               device=self.device, on_nan=self.on_nan, step=self.global_step,
                               first_update=first_update,
                               prepare=self.estimator.prepare if provides(self.estimator, "prepare") else None)
        self.skip_iteration = made.skip
        self.deferred = made.deferred
        for kind, message in made.warnings:
            self._warn(kind, message)
        self._rollout_log = made.metrics
        return made.rollout

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned and self.trainer.is_global_zero:
            self.console.print(f"[yellow]warning[/] (step {self.global_step}): {message}", soft_wrap=True)
        self._warned.add(kind)

    # ------------------------------------------------------------------ update
    def training_step(self, step: int, batch_idx: int) -> None:
        self._eval_mode()
        iteration, update = divmod(self.global_step, self.updates)
        if update == 0 or self.experience is None:
            self.experience = self._make_experience(iteration, first_update=update == 0)
            log_now(self, {"iteration": float(iteration + 1), **self._rollout_log})
        started = time.perf_counter()
        whole, mine = schedule.minibatch(len(self.experience), self.section.batch_size, self.seed, iteration, update,
                                self.global_rank, self.trainer.world_size)
        minibatch = self.experience.select(mine)
        if self.config.advantages.whiten == "minibatch":  # over the global minibatch (every rank has it)
            mask = self.experience.response_mask[whole].float()
            mean = masked_mean(self.experience.advantages[whole], mask)
            std = masked_var(self.experience.advantages[whole], mask).add(1e-8).rsqrt()
            own = minibatch.response_mask.float()
            minibatch.advantages = (minibatch.advantages - mean) * std * own
            if self.config.advantages.clip is not None:
                minibatch.advantages = minibatch.advantages.clamp(-self.config.advantages.clip,
                                                                  self.config.advantages.clip)
        critic_only = iteration < self.critic_warmup
        sums: dict[str, torch.Tensor] = {}
        spans = [torch.arange(i, min(i + self.section.micro_batch_size, len(minibatch)))
                 for i in range(0, len(minibatch), self.section.micro_batch_size)]
        pieces = [minibatch.select(span) for span in spans]
        # the first update runs on the weights that sampled: its forward gives the deferred
        # rows' old log-probs, and its gap to the engine's log-probs is the mismatch
        first = update == 0
        fill = torch.isin(mine, self.deferred) if first and len(self.deferred) else None
        seen: list[tuple[torch.Tensor, torch.Tensor, Rollout]] = []
        share = self.section.batch_size // self.trainer.world_size
        # a 0-dim tensor: no host sync (only a global-token-mean loss divides by it)
        global_tokens = loss_mask(self.experience, whole).sum().clamp(min=1) / (
            self.trainer.world_size * len(pieces))
        loss_sum = torch.zeros((), device=self.device)
        for i, piece in enumerate(pieces):
            with gradient_sync(self, last=i == len(pieces) - 1):
                terms = self._loss_terms(piece, critic_only, global_tokens,
                                         fill[spans[i]] if fill is not None else None, seen if first else None)
                loss = sum(t.loss for t in terms)
                loss_sum = loss_sum + loss.detach()  # NaN/Inf if any piece's is; checked in optimizer_step
                self.manual_backward(loss * len(piece) / share)
            for term in terms:
                for name, value in term.metrics.items():
                    sums[name] = sums.get(name, 0.0) + torch.as_tensor(value, dtype=torch.float32).detach() * len(piece)
        if first:
            self._first_update_done(mine, whole, spans, seen, fill)
        if self.skip_iteration:  # NaN/Inf scores (on_nan: skip): nothing learns from this rollout
            self.optimizers().zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=self.device)
        elif critic_only:  # the policy's parameters get no gradient: AdamW leaves them (and their state) alone
            for parameter in self.model.parameters():
                parameter.grad = None
        # the core's guard: a NaN/Inf loss or gradient stops (or, on_nan: skip, drops) the update,
        # on every rank together, with the step's one host sync
        grad_norm = optimizer_step(self, self.section.gradient_clip, loss=loss_sum)
        self._clock["train"] += time.perf_counter() - started
        self._clock["train_tokens"] += minibatch.response_mask.sum() * self.trainer.world_size  # no host sync
        last = update == self.updates - 1
        self._log(sums, len(minibatch), grad_norm)
        if last and not self.skip_iteration:
            after = {}
            for constraint in self.constraints:
                if provides(constraint, "after_update"):
                    after.update(constraint.after_update(self.experience) or {})
            if after:
                log_now(self, after)
        if last:
            self.experience = None  # the next step samples a new rollout
            self._maybe_evaluate()

    def _loss_terms(self, piece: Rollout, critic_only: bool, global_tokens: torch.Tensor,
                    fill: torch.Tensor | None = None, seen: list | None = None) -> list[LossTerm]:
        """The piece's loss terms; ``fill`` (bool ``[b]``): rows whose old log-probs are
        this forward's (deferred); ``seen`` collects ``(logprobs, mask, piece)``."""
        terms = []
        logprobs, entropy = policy_forward(self.model, piece, self.config.sampling.temperature, self.entropy_grad)
        if fill is not None and fill.any():
            index = fill.nonzero()[:, 0].to(logprobs.device)
            piece.logprobs = piece.logprobs.clone()
            piece.logprobs[index] = logprobs.detach()[index].to(piece.logprobs.dtype)
        if seen is not None:
            seen.append((logprobs.detach(), piece.response_mask, piece))
        output = PolicyOutput(logprobs, entropy, loss_mask(piece), global_tokens,
                              self.config.sampling.max_new_tokens)
        policy_terms = [self.objective(piece, output)]
        for constraint in self.constraints:
            if provides(constraint, "loss"):
                term = constraint.loss(piece, output)
                if term is not None:
                    policy_terms.append(term)
        if critic_only:  # keep the graph (DDP expects every parameter) but train only the critic
            policy_terms = [LossTerm(sum(t.loss for t in policy_terms) * 0.0,
                                     {k: v for t in policy_terms for k, v in t.metrics.items()})]
        policy_terms[0].metrics["policy/entropy"] = masked_mean(entropy.detach(), output.mask)
        terms += policy_terms
        if self.critic is not None and provides(self.estimator, "critic_loss"):
            terms.append(self.estimator.critic_loss(piece))
        return terms

    def _first_update_done(self, mine: torch.Tensor, whole: torch.Tensor, spans: list[torch.Tensor],
                           seen: list, fill: torch.Tensor | None) -> None:
        """After the first update's forwards: write the deferred rows' old log-probs into
        the experience (on every rank: later epochs may train on them anywhere), log the
        engine-vs-trainer mismatch and let the engine check it."""
        if fill is not None:
            mine_logprobs = torch.cat([piece.logprobs for _, _, piece in seen])
            self.experience.logprobs[mine.to(self.experience.logprobs.device)] = mine_logprobs
            if self.trainer.world_size > 1:
                parts = self.all_gather(mine_logprobs)  # [world, share, T], rank order = whole's order
                self.experience.logprobs[whole.to(parts.device)] = parts.reshape(-1, parts.shape[-1])
            self.deferred = torch.zeros(0, dtype=torch.long)
        with_engine = [(lp, mask, piece.engine_logprobs) for lp, mask, piece in seen
                       if piece.engine_logprobs is not None]
        if not with_engine:
            return
        metrics = mismatch_metrics(with_engine)
        reduce = self.trainer.strategy.reduce
        metrics = {k: float(reduce(torch.tensor(v, device=self.device),
                                   reduce_op="max" if k.endswith("max") else "mean")) for k, v in metrics.items()}
        log_now(self, metrics)
        self.engine_handle.check(metrics["mismatch/logprob_abs_mean"], f"iteration at step {self.global_step + 1}")

    @property
    def on_nan(self) -> str:
        """``algorithm.on_nan`` where a recipe still sets it, else ``trainer.on_nan``; the
        core's guard (:func:`rlhfkit.optimizer_step`) reads it too."""
        return self.config.on_nan or self.section.on_nan

    def _log(self, sums: dict[str, Any], rows: int, grad_norm: torch.Tensor) -> None:
        """Update metrics, on logging steps (rollout metrics are written when sampled)."""
        step = self.global_step
        metrics: dict[str, Any] = {}
        if step % self.section.log_every_n_steps == 0 or step == self.total_steps:
            reduce = self.trainer.strategy.reduce
            metrics.update({f"train/{name}": reduce(value / rows, reduce_op="mean") for name, value in sums.items()})
            metrics.update({"train/grad_norm": grad_norm, "train/lr": self.lr_schedulers().get_last_lr()[0]})
            clock, made = self._clock, self.maker.clock
            if made["rollout"] > 0 and clock["train"] > 0:
                metrics["speed/rollout_tokens_per_s"] = made["rollout_tokens"] / made["rollout"]
                metrics["speed/train_tokens_per_s"] = clock["train_tokens"] / clock["train"]
            if self.engine_handle.sync_seconds > 0:
                metrics["speed/weight_sync_s"] = self.engine_handle.sync_seconds
        if metrics:
            log_step(self, metrics)
        value_loss = metrics.get("train/value/loss")
        if value_loss is not None:
            first = self.history.setdefault("first_value_loss", float(value_loss))
            if float(value_loss) > 100 * max(first, 1e-3):
                self._warn("value-loss", f"the value loss grew from {first:.3g} to {float(value_loss):.3g}: "
                                         f"lower the critic's lr or turn on reward normalisation. See {DOCS}#value-loss.")

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, prompts: list[Any], fields: list[dict[str, Any]] | None = None
                 ) -> tuple[dict[str, float], list[str]]:
        """Gold (and task) metrics, proxy reward, KL and length of responses to ``prompts``
        (``fields``: each prompt row's other columns, for the reward source)."""
        self._eval_mode()
        self.engine_handle.ready(self.global_step)
        per_call = self.config.generation_batch_size or len(prompts)
        temperature = self.config.sampling.temperature
        parts = []
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start:start + per_call]
            part = sample(self.policy, self.engine, chunk, [self.seed + start + i for i in range(len(chunk))],
                          self.config.sampling, self.config.max_prompt_length, greedy=self.config.eval_greedy)
            part.logprobs = policy_logprobs(self.model, part, temperature)
            part.ref_logprobs = reference_logprobs(self.reference, self.model, part, temperature)
            parts.append(part)
        rollout = concat(parts, self.policy.tokenizer.pad_token_id)
        mask = rollout.response_mask.float()
        metrics = {"proxy": float(score_rows(self.reward, rollout.prompts, rollout.responses, fields).float().mean()),
                   "kl": float(sequence_kl(rollout.logprobs, rollout.ref_logprobs, mask).mean()),
                   "length": float(mask.sum(1).mean())}
        if self.gold is not None:
            metrics["gold"] = float(self.gold.score(rollout.prompts, rollout.responses).mean())
            if provides(self.gold, "evaluate"):
                task = self.gold.evaluate(rollout.prompts, rollout.responses)
                metrics.update({f"task/{k}": v for k, v in task.items() if k != "gold"})
        return metrics, rollout.responses

    def _evaluate(self, key: str) -> None:
        if not self.eval_prompts:
            return
        metrics, _ = self.evaluate(self.eval_prompts, self.eval_fields)
        self.history[key] = metrics
        log_now(self, {f"eval/{name}": value for name, value in metrics.items()})

    def _maybe_evaluate(self) -> None:
        every = self.section.eval_every_n_steps
        if every and self.global_step // every > (self.global_step - self.updates) // every \
                and self.global_step < self.total_steps:
            self._evaluate("eval")

    def _samples(self, when: str) -> None:
        prompts, fields = (self.eval_prompts, self.eval_fields) if self.eval_prompts else (self.prompts,
                                                                                            self.prompt_fields)
        prompts, fields = prompts[: self.config.sample_prompts], fields[: self.config.sample_prompts]
        if not prompts or not self.trainer.is_global_zero:
            return
        _, responses = self.evaluate(prompts, fields)
        rows = [{"when": when, "prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
        write_samples(self.stage_dir / "samples.jsonl", when, rows)

    def on_train_start(self) -> None:
        if provides(self.reward, "to"):
            self.reward.to(self.device)
        if self.global_step == 0:
            self._evaluate("eval_before")
            self._samples("before")

    def finalize(self) -> None:
        """After the last step (again after a resume at it): final evaluation and samples."""
        if provides(self.reward, "to"):
            self.reward.to(self.device)
        self._evaluate("eval_after")
        self._samples("after")
        self.close_engine()

    # ------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ppo"] = {
            "experience": to_state(self.experience) if self.experience is not None else None,
            "rollout_log": dict(getattr(self, "_rollout_log", {})),
            "skip_iteration": self.skip_iteration,
            "history": json.dumps(self.history),
            "parts": [p.state_dict() if provides(p, "state_dict") else {} for p in self._stateful()],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["ppo"]
        self.experience = from_state(state["experience"], self.device) if state["experience"] else None
        self._rollout_log = state["rollout_log"]
        self.skip_iteration = state["skip_iteration"]
        self.history = json.loads(state["history"])
        for part, part_state in zip(self._stateful(), state["parts"], strict=True):
            if provides(part, "load_state_dict") and part_state:
                part.load_state_dict(part_state)

    def _stateful(self) -> list[Any]:
        """The parts whose state the checkpoint holds, in a fixed order."""
        return [self.estimator, *self.constraints, *([self.sampler] if self.sampler is not None else [])]

    # ---------------------------------------------------------------- output
    def export(self, directory: Path) -> None:
        self.policy.export(directory)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": self.global_step, "iterations": self.global_step // self.updates}
        for key, prefix in (("eval_before", "before_"), ("eval_after", "")):
            for name, value in (self.history.get(key) or {}).items():
                out[f"{prefix}{name}"] = value
        for name in ("reward/score", "kl/ref", "response/length"):
            if name in getattr(self, "_rollout_log", {}):
                out[f"last_{name.replace('/', '_')}"] = self._rollout_log[name]
        return out


def loss_mask(rollout: Rollout, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]`` float (of ``rows`` only, when given): the response mask, times the
    per-sample weight of :data:`rlhfkit.LOSS_MASK` where a constraint set one."""
    mask = rollout.response_mask.float() if rows is None else rollout.response_mask[rows].float()
    weight = rollout.extras.get(LOSS_MASK)
    if weight is None:
        return mask
    return mask * (weight if rows is None else weight[rows]).to(mask)[:, None]
