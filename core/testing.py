"""A test kit for component authors: toy batches shaped as the algorithms build them, and
:func:`check_component`, a behavioural contract run over one registered component.

    from rlhfkit.testing import check_component, make_rollout

    def test_my_estimator_keeps_the_contract():
        check_component("estimator", "my-adv")

The builders put what the real pipeline puts in padding positions, and worse: uneven
response lengths (one row of a single token, one truncated at the length limit), NaN in the
padding of every per-token tensor (rollout padding may hold anything: mask with
``torch.where``, never by multiplication), non-contiguous groups with a one-sample group,
and invalid (padded) completions in reward batches. Shapes: ``B`` rows, ``P`` prompt
tokens (left-padded), ``T`` response tokens (right-padded), ``K`` completions per prompt.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from rlhfkit.context import StageContext
from rlhfkit.interfaces import (
    Advantages,
    FeedbackBatch,
    Generation,
    LossTerm,
    PolicyOutput,
    PreferenceBatch,
    RewardBatch,
    Rollout,
    score_rows,
)
from rlhfkit.plugin_manager import Plugins, load_plugins
from rlhfkit.registry import ComponentSpec, provides, ref

__all__ = [
    "ContractError",
    "check_component",
    "make_feedback_batch",
    "make_policy_output",
    "make_preference_batch",
    "make_reward_batch",
    "make_rollout",
    "toy_algorithm",
]

#: The groups of :func:`make_rollout`'s 6 rows: not contiguous, and group 2 has one sample.
GROUPS = (0, 1, 0, 2, 1, 0)


class ContractError(AssertionError):
    """A component broke its kind's contract; the message says which rule, and how."""


def make_rollout(batch: int = 6, prompt_len: int = 4, response_len: int = 6, *, groups: tuple[int, ...] | None = None,
                 vocab: int = 32, seed: int = 0, garbage: float = math.nan, scored: bool = True,
                 device: str | torch.device = "cpu") -> Rollout:
    """A scored rollout as PPO hands it to estimators and constraints.

    Row 0 has a single response token, row 1 is truncated (no EOS, every position real),
    the others random lengths; prompts are left-padded with uneven lengths. ``logprobs``,
    ``ref_logprobs``, ``values`` and ``rewards`` hold ``garbage`` (NaN) in padding;
    ``scores`` ``[B]`` are finite; ``group`` defaults to :data:`GROUPS` (non-contiguous, a
    one-sample group) for 6 rows, else ``i % 3``. Token ids are in ``[4, vocab)``.
    ``rewards`` holds each score on its response's last real token, as the algorithm
    places it before estimating; ``scored=False`` leaves ``rewards`` and ``scores`` unset.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, response_len + 1, (batch,), generator=g)
    lengths[0] = 1
    if batch > 1:
        lengths[1] = response_len
    prompt_lengths = torch.randint(1, prompt_len + 1, (batch,), generator=g)
    columns = torch.arange(response_len)
    response_mask = (columns[None, :] < lengths[:, None]).long()
    prompt_mask = (torch.arange(prompt_len)[None, :] >= (prompt_len - prompt_lengths)[:, None]).long()
    prompt_ids = torch.randint(4, vocab, (batch, prompt_len), generator=g) * prompt_mask
    response_ids = torch.randint(4, vocab, (batch, response_len), generator=g) * response_mask
    real = response_mask.bool()

    def per_token(values: torch.Tensor) -> torch.Tensor:
        return torch.where(real, values, torch.full_like(values, garbage))

    logprobs = per_token(-torch.rand(batch, response_len, generator=g) * 3)
    ref = per_token(logprobs + 0.1 * torch.randn(batch, response_len, generator=g))
    values = per_token(torch.randn(batch, response_len, generator=g))
    if groups is None:
        groups = GROUPS if batch == len(GROUPS) else tuple(i % 3 for i in range(batch))
    truncated = torch.zeros(batch, dtype=torch.bool)
    if batch > 1:
        truncated[1] = True
    rollout = Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=response_mask,
        logprobs=logprobs, prompts=[f"prompt {i}" for i in range(batch)],
        responses=[f"response {i}" for i in range(batch)], group=torch.tensor(groups), truncated=truncated,
        ref_logprobs=ref, values=values, fields=[{"answer": str(i)} for i in range(batch)])
    if scored:  # as estimators get it: the score on each response's last real token
        rollout.scores = torch.randn(batch, generator=g)
        last = (lengths - 1).clamp(min=0)
        rewards = torch.zeros(batch, response_len)
        rewards[torch.arange(batch), last] = rollout.scores
        rollout.rewards = per_token(rewards)
    return _to(rollout, device)


def make_policy_output(rollout: Rollout, *, seed: int = 1, requires_grad: bool = True) -> PolicyOutput:
    """The policy's forward on ``rollout`` as the loss terms get it: ``logprobs`` a leaf
    with grad (near the rollout's, 0 in padding, as the policy writes them), a positive
    ``entropy`` with grad, the float ``mask``, ``global_tokens`` and ``max_tokens``."""
    g = torch.Generator().manual_seed(seed)
    mask = rollout.response_mask.float()
    old = torch.where(mask.bool(), rollout.logprobs, torch.zeros_like(rollout.logprobs))
    new = (old + 0.05 * torch.randn(old.shape, generator=g)) * mask
    entropy = torch.rand(old.shape, generator=g) * mask
    return PolicyOutput(logprobs=new.detach().requires_grad_(requires_grad),
                        entropy=entropy.detach().requires_grad_(requires_grad), mask=mask,
                        global_tokens=float(mask.sum()), max_tokens=rollout.response_ids.shape[1])


def make_preference_batch(batch: int = 5, *, seed: int = 0, reference: bool = True, mismatched: bool = True
                          ) -> PreferenceBatch:
    """Summed log-probs of chosen and rejected responses of uneven lengths (one pair of
    single tokens), with grad on the policy's; the reference's and the mismatched pairs'
    too (``None`` when not asked for, as for reference-free objectives)."""
    g = torch.Generator().manual_seed(seed)
    chosen_tokens = torch.randint(1, 12, (batch,), generator=g)
    rejected_tokens = torch.randint(1, 12, (batch,), generator=g)
    chosen_tokens[0] = rejected_tokens[0] = 1

    def logps(tokens: torch.Tensor) -> torch.Tensor:
        return -tokens * torch.rand(batch, generator=g) * 2

    chosen, rejected = logps(chosen_tokens), logps(rejected_tokens)
    return PreferenceBatch(
        chosen=chosen.requires_grad_(), rejected=rejected.requires_grad_(), chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
        ref_chosen=chosen.detach() + 0.1 * torch.randn(batch, generator=g) if reference else None,
        ref_rejected=rejected.detach() + 0.1 * torch.randn(batch, generator=g) if reference else None,
        mismatched=logps(chosen_tokens) if mismatched else None,
        ref_mismatched=logps(chosen_tokens) if mismatched else None)


def make_feedback_batch(batch: int = 6, *, seed: int = 0, mismatched: int = 9) -> FeedbackBatch:
    """Unpaired completions, desirable and not (both kinds present), log-probs with grad."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 12, (batch,), generator=g)
    logps = -tokens * torch.rand(batch, generator=g) * 2
    desirable = torch.tensor([i % 3 != 1 for i in range(batch)])
    return FeedbackBatch(logps=logps.requires_grad_(), tokens=tokens, desirable=desirable,
                         ref_logps=logps.detach() + 0.1 * torch.randn(batch, generator=g),
                         mismatched=-torch.rand(mismatched, generator=g) * 10,
                         ref_mismatched=-torch.rand(mismatched, generator=g) * 10)


def make_reward_batch(batch: int = 4, k: int = 3, *, seed: int = 0, garbage: float = math.nan,
                      margins: bool = True) -> RewardBatch:
    """Scores of ``k`` completions per prompt with grad; ranks with a tie; the last prompt
    has one completion fewer (``valid`` False there, ``garbage`` in its score); with
    ``k = 2`` a pair per prompt. ``best_nll`` and (``margins=True``) ``margins`` filled."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, k, generator=g)
    ranks = torch.stack([torch.randperm(k, generator=g) for _ in range(batch)])
    valid = torch.ones(batch, k, dtype=torch.bool)
    if k > 2:
        valid[-1, -1] = False
        ranks[0] = torch.tensor([0, 0, *range(1, k - 1)])  # a tie at the top
        ranks[-1] = torch.tensor([*range(k - 1), 0]).clamp(max=k - 2)
        ranks[-1, -1] = 0
    scores = torch.where(valid, scores, torch.full_like(scores, garbage))
    return RewardBatch(scores=scores.requires_grad_(), ranks=ranks, valid=valid,
                       margins=torch.rand(batch, generator=g) if margins else None,
                       best_nll=torch.rand(batch, generator=g).requires_grad_())


def toy_algorithm(plugins: Plugins | None = None, *, samples_per_prompt: int = 3) -> SimpleNamespace:
    """What ``bind(algorithm)`` may read, as the PPO algorithm documents it
    (docs/ppo-details.md): ``config``, ``policy`` (a tiny transformers model with the
    reviews task's tokenizer), ``model``, ``reference``, ``device``, ``seed``,
    ``global_rank``, ``global_step`` and ``greedy_scores(rollout)``."""
    plugins = plugins or load_plugins()
    context = StageContext(registry=plugins.registry, stage="check", stage_dir=Path(tempfile.mkdtemp()))
    policy = context.build(ref("policy")(name="transformers", tokenizer={"task": "reviews"}, dropout=0.0,
                                         architecture={"family": "gpt2", "layers": 1, "hidden": 16, "heads": 2}))
    config = SimpleNamespace(samples_per_prompt=samples_per_prompt,
                             sampling=SimpleNamespace(temperature=1.0, max_new_tokens=6))
    return SimpleNamespace(config=config, policy=policy, model=policy.model,
                           reference=copy.deepcopy(policy.model).eval(), device=torch.device("cpu"), seed=0,
                           global_rank=0, global_step=0,
                           greedy_scores=lambda rollout: torch.zeros(len(rollout)))


# --------------------------------------------------------------------------- the contract run


def check_component(kind: str, name: str, settings: dict[str, Any] | None = None, *,
                    plugins: Plugins | None = None, context: StageContext | None = None) -> Any:
    """Run ``kind``/``name``'s contract on toy batches; raise :class:`ContractError` naming
    the broken rule, else return the built component.

    Every kind: the settings (default: the defaults) validate; the component builds (with
    ``context``, or a scratch :class:`rlhfkit.StageContext`) and matches its declaration.
    Then, by kind:

    - ``estimator``: ``bind`` (a :func:`toy_algorithm`) and ``prepare`` when declared;
      ``estimate`` gives ``[B, T]`` advantages (and returns, with a critic) finite on real
      tokens and the same whatever the padding holds; ``critic_loss`` is a finite scalar
      when declared;
    - ``constraint``: ``shape_rewards`` leaves finite scores and rewards on real tokens and
      returns float metrics; ``loss`` is a finite scalar whose gradient reaches the policy
      output on real tokens only; ``after_update`` returns float metrics or ``None``;
      ``state_dict`` round-trips;
    - ``objective``: by its tags, a policy loss on (rollout, output), a preference loss on
      a :class:`PreferenceBatch` (and a :class:`FeedbackBatch` when tagged ``unpaired``)
      or a reward-model loss on a :class:`RewardBatch`: a finite scalar with finite
      gradients, none on padding;
    - ``reward``: ``score`` gives ``[B]`` finite floats (with ``fields``, each row's
      ``answer`` column, when ``score`` takes them);
    - ``engine``: ``start`` with a tiny policy (hidden 64, 2 heads: head size 32, which
      vLLM's CPU kernels take), then ``generate`` on left-padded prompts: ``[B, T]`` ids and
      mask (1 up to and including the first EOS, PAD after), log-probs ``<= 0`` on real
      tokens and 0 on padding (or ``None``), the same response for the same prompt and
      seed whatever the batch (unless the class declares ``seeds_per_row = False``);
      ``close`` when declared;
    - ``sampler``: ``bind`` (20 prompts with a ``level`` field) when declared; ``draw``
      gives ``count`` distinct indices of the prompts, the same for the same (iteration,
      round); ``observe`` returns float metrics; ``state_dict`` round-trips (a restored
      sampler draws the same prompts).
    """
    plugins = plugins or load_plugins()
    registry = plugins.registry
    if not registry.has(kind, name):
        raise ContractError(registry.unknown_message(kind, name))
    spec = registry.get(kind, name)
    reference = ref(kind)(name=name, **(settings or {}))
    problems = registry.resolve(reference, kind)
    if problems:
        raise ContractError(f"{kind} {name!r}: its settings do not validate: "
                            + "; ".join(f"{p}: {m}" for p, m, _ in problems)
                            + ("" if settings else " (pass the settings it needs: check_component(kind, name, {...}))"))
    context = context or StageContext(registry=registry, stage="check", stage_dir=Path(tempfile.mkdtemp()))
    component = registry.build(reference, context)
    checks = {"estimator": _estimator, "constraint": _constraint, "objective": _objective, "reward": _reward,
              "engine": _engine, "sampler": _sampler}
    if kind in checks:
        checks[kind](spec, component, plugins)
    return component


def _fail(spec: ComponentSpec, rule: str) -> None:
    raise ContractError(f"{spec.kind} {spec.name!r} ({spec.where()}): {rule}")


def _finite_on(spec: ComponentSpec, what: str, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    picked = values[mask.bool()] if mask is not None else values
    if not torch.isfinite(picked).all():
        _fail(spec, f"{what} is not finite{' on real tokens' if mask is not None else ''}: padding holds NaN in "
                    f"rollouts; mask with torch.where, not by multiplication")


def _metrics(spec: ComponentSpec, what: str, metrics: Any) -> None:
    if metrics is None:
        return
    if not isinstance(metrics, dict):
        _fail(spec, f"{what} must return a dict of metrics or None, got {type(metrics).__name__}")
    for key, value in metrics.items():
        number = float(value.detach()) if isinstance(value, torch.Tensor) else value
        if not isinstance(number, int | float) or not math.isfinite(number):
            _fail(spec, f"{what} returned metric {key!r} = {value!r}; metrics are finite numbers")


def _scalar(spec: ComponentSpec, what: str, term: Any) -> torch.Tensor:
    if not isinstance(term, LossTerm):
        _fail(spec, f"{what} must return a rlhfkit.LossTerm, got {type(term).__name__}")
    if not isinstance(term.loss, torch.Tensor) or term.loss.dim() != 0:
        _fail(spec, f"{what} must return a scalar loss tensor, got {getattr(term.loss, 'shape', term.loss)!r}")
    _finite_on(spec, f"{what}'s loss", term.loss)
    _metrics(spec, what, term.metrics)
    return term.loss


def _grads(spec: ComponentSpec, what: str, loss: torch.Tensor, leaves: dict[str, torch.Tensor],
           masks: dict[str, torch.Tensor], required: bool = True) -> None:
    """The loss's gradient reaches a leaf (unless not ``required``), is finite, and is 0
    outside the masks."""
    used = {n: t for n, t in leaves.items() if t.requires_grad}
    if not loss.requires_grad:
        return  # a term with no gradient (a metric-only term, a penalty on data) is allowed
    grads = torch.autograd.grad(loss, list(used.values()), allow_unused=True, retain_graph=True)
    if all(g is None for g in grads) and not required:  # a term from elsewhere (ptx: its own forward)
        return
    if all(g is None for g in grads):
        _fail(spec, f"{what}: the loss has a graph but no gradient reaches {', '.join(used)}")
    for (leaf, _), grad in zip(used.items(), grads, strict=True):
        if grad is None:
            continue
        _finite_on(spec, f"{what}: the gradient of {leaf}", grad)
        if leaf in masks and grad[~masks[leaf].bool()].abs().sum() != 0:
            _fail(spec, f"{what}: the gradient of {leaf} is not 0 on padding; padded positions must not count")


def _estimator(spec: ComponentSpec, estimator: Any, plugins: Plugins) -> None:
    algorithm = toy_algorithm(plugins) if provides(estimator, "bind") or getattr(estimator, "critic", None) else None
    if provides(estimator, "bind"):
        estimator.bind(algorithm)
    results = []
    for garbage in (math.nan, 1e6):
        rollout = make_rollout(garbage=garbage, vocab=len(algorithm.policy.tokenizer) if algorithm else 32)
        if provides(estimator, "prepare"):
            estimator.prepare(rollout)
        out = estimator.estimate(rollout)
        if not isinstance(out, Advantages):
            _fail(spec, f"estimate must return rlhfkit.Advantages, got {type(out).__name__}")
        if out.advantages.shape != rollout.response_mask.shape:
            _fail(spec, f"advantages must be [B, T] = {tuple(rollout.response_mask.shape)}, got "
                        f"{tuple(out.advantages.shape)}")
        _finite_on(spec, "advantages", out.advantages, rollout.response_mask)
        if estimator.critic is not None:
            if out.returns is None or out.returns.shape != rollout.response_mask.shape:
                _fail(spec, "an estimator with a critic returns [B, T] returns (the value targets)")
            _finite_on(spec, "returns", out.returns, rollout.response_mask)
        _metrics(spec, "estimate", out.metrics)
        results.append((out.advantages, rollout))
    (first, rollout), (second, _) = results
    mask = rollout.response_mask.bool()
    if not torch.allclose(first[mask], second[mask]):
        _fail(spec, "advantages on real tokens change with what the padding holds: padding must be ignored")
    if provides(estimator, "critic_loss"):
        rollout.advantages, rollout.returns = first, estimator.estimate(rollout).returns
        _scalar(spec, "critic_loss", estimator.critic_loss(rollout))


def _constraint(spec: ComponentSpec, constraint: Any, plugins: Plugins) -> None:
    if provides(constraint, "bind"):
        constraint.bind(toy_algorithm(plugins))
    rollout = make_rollout()
    mask = rollout.response_mask
    if provides(constraint, "shape_rewards"):
        _metrics(spec, "shape_rewards", constraint.shape_rewards(rollout))
        _finite_on(spec, "scores after shape_rewards", rollout.scores)
        _finite_on(spec, "rewards after shape_rewards", rollout.rewards, mask)
    if provides(constraint, "loss"):
        rollout.advantages = torch.where(mask.bool(), torch.randn(mask.shape), torch.full(mask.shape, math.nan))
        output = make_policy_output(rollout)
        term = constraint.loss(rollout, output)
        if term is not None:
            loss = _scalar(spec, "loss", term)
            _grads(spec, "loss", loss, {"output.logprobs": output.logprobs, "output.entropy": output.entropy},
                   {"output.logprobs": mask, "output.entropy": mask}, required=False)
    if provides(constraint, "after_update"):
        _metrics(spec, "after_update", constraint.after_update(rollout))
    if provides(constraint, "state_dict"):
        state = constraint.state_dict()
        if provides(constraint, "load_state_dict"):
            constraint.load_state_dict(state)
            if repr(constraint.state_dict()) != repr(state):
                _fail(spec, "load_state_dict(state_dict()) does not restore the same state")


def _objective(spec: ComponentSpec, objective: Any, plugins: Plugins) -> None:
    tags = spec.tags
    if "policy-loss" in tags:
        rollout = make_rollout()
        mask = rollout.response_mask
        rollout.advantages = torch.where(mask.bool(), torch.randn(mask.shape), torch.full(mask.shape, math.nan))
        output = make_policy_output(rollout)
        loss = _scalar(spec, "the policy loss", objective(rollout, output))
        _grads(spec, "the policy loss", loss, {"output.logprobs": output.logprobs}, {"output.logprobs": mask})
    elif "preference-loss" in tags:
        batch = make_preference_batch(reference=getattr(objective, "needs_reference", True))
        loss = _scalar(spec, "the preference loss", objective(batch))
        _grads(spec, "the preference loss", loss, {"chosen": batch.chosen, "rejected": batch.rejected}, {})
        if "unpaired" in tags or getattr(objective, "accepts_unpaired", False):
            feedback = make_feedback_batch()
            loss = _scalar(spec, "the loss on unpaired rows", objective(feedback))
            _grads(spec, "the loss on unpaired rows", loss, {"logps": feedback.logps}, {})
    else:  # a reward-model loss or regularizer
        batch = make_reward_batch(k=2 if "pairs" in tags else 3)
        loss = _scalar(spec, "the reward-model loss", objective(batch))
        _grads(spec, "the reward-model loss", loss, {"scores": batch.scores, "best_nll": batch.best_nll},
               {"scores": batch.valid})


def _reward(spec: ComponentSpec, reward: Any, plugins: Plugins) -> None:
    prompts = ["the printer is", "the lamp is", "the desk is"]
    responses = ["great .", "bad . answer : 2", "fine ."]
    # the rows' other columns, for rewards that read them (an answer to check against)
    scores = score_rows(reward, prompts, responses, [{"answer": "3"}, {"answer": "2"}, {"answer": "1"}])
    if not isinstance(scores, torch.Tensor) or scores.shape != (3,):
        _fail(spec, f"score must return a [B] = [3] tensor, got {getattr(scores, 'shape', type(scores).__name__)}")
    _finite_on(spec, "scores", scores.float())
    if provides(reward, "to"):
        reward.to("cpu")


def _sampler(spec: ComponentSpec, sampler: Any, plugins: Plugins) -> None:
    algorithm = SimpleNamespace(prompts=[f"prompt {i}" for i in range(20)],
                                prompt_fields=[{"level": 1 + i % 4} for i in range(20)], seed=0)

    def fresh() -> Any:
        other = copy.deepcopy(sampler)
        if provides(other, "bind"):
            other.bind(algorithm)
        return other

    sampler = fresh()
    for iteration in range(3):
        drawn = list(sampler.draw(iteration, 8))
        if len(drawn) != 8 or len(set(drawn)) != 8 or not all(isinstance(i, int) and 0 <= i < 20 for i in drawn):
            _fail(spec, f"draw(iteration, 8) must give 8 distinct prompt indices in 0..19, got {drawn}")
        if list(copy.deepcopy(sampler).draw(iteration, 8)) != drawn:
            _fail(spec, "draw must give the same prompts for the same iteration and state (every rank draws)")
        metrics = sampler.observe(drawn, torch.tensor([[float((i + j) % 2) for j in range(4)] for i in drawn]))
        if not isinstance(metrics, dict) or not all(isinstance(v, float) for v in metrics.values()):
            _fail(spec, "observe must return a dict of floats (metrics)")
    if provides(sampler, "state_dict"):
        restored = fresh()
        restored.load_state_dict(copy.deepcopy(sampler.state_dict()))
        if list(restored.draw(5, 8, 1)) != list(sampler.draw(5, 8, 1)):
            _fail(spec, "a sampler restored from state_dict must draw what the original draws")


def _engine(spec: ComponentSpec, engine: Any, plugins: Plugins) -> None:
    from rlhfkit.recipe import SamplingSettings

    context = StageContext(registry=plugins.registry, stage="check", stage_dir=Path(tempfile.mkdtemp()))
    torch.manual_seed(0)
    policy = context.build(ref("policy")(name="transformers", tokenizer={"task": "reviews"}, dropout=0.0,
                                         architecture={"family": "gpt2", "layers": 1, "hidden": 64, "heads": 2}))
    if provides(engine, "start"):
        engine.start(policy)
    try:
        prompts = ["how is the lamp ?", "the printer", "my new desk is very"]
        ids, mask = policy.tokenize_prompts(prompts)
        sampling = SamplingSettings(max_new_tokens=8, temperature=1.0)
        out = engine.generate(ids, mask, sampling, seeds=[11, 12, 13])
        if not isinstance(out, Generation):
            _fail(spec, f"generate must return a rlhfkit.Generation, got {type(out).__name__}")
        rows, width = out.response_ids.shape
        if rows != 3 or out.response_mask.shape != out.response_ids.shape or not 1 <= width <= 8:
            _fail(spec, f"generate must give [3, T <= 8] ids and mask, got {tuple(out.response_ids.shape)} and "
                        f"{tuple(out.response_mask.shape)}")
        eos, pad = policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id
        for i in range(rows):
            real = out.response_ids[i][out.response_mask[i].bool()].tolist()
            if not real or (eos in real and real.index(eos) != len(real) - 1):
                _fail(spec, "response_mask must be 1 from the first token up to and including the first EOS")
            if not bool((out.response_ids[i][~out.response_mask[i].bool()] == pad).all()):
                _fail(spec, "response_ids must hold PAD after a response ends")
        if out.logprobs is not None:
            real = out.response_mask.bool()
            if out.logprobs.shape != out.response_ids.shape or not bool((out.logprobs[real] <= 1e-6).all()) \
                    or not bool(torch.isfinite(out.logprobs[real]).all()) or bool(out.logprobs[~real].any()):
                _fail(spec, "logprobs must be [B, T], finite and <= 0 on real tokens, 0 on padding")
        again = engine.generate(ids[1:2], mask[1:2], sampling, seeds=[12])
        first = out.response_ids[1][out.response_mask[1].bool()].tolist()
        per_row = getattr(engine, "seeds_per_row", True)
        if per_row and again.response_ids[0][again.response_mask[0].bool()].tolist() != first:
            _fail(spec, "the same prompt and seed gave another response in another batch: seed each row, or "
                        "declare seeds_per_row = False")
    finally:
        if provides(engine, "close"):
            engine.close()


def _to(rollout: Rollout, device: str | torch.device) -> Rollout:
    for name, value in vars(rollout).items():
        if isinstance(value, torch.Tensor):
            setattr(rollout, name, value.to(device))
    return rollout
