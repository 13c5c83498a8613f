"""The constraint components on hand-made rollouts (spec §C, §D, §F, §I)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlhfkit import PolicyOutput, Rollout, StageContext, UserError, load_plugins, ref

PLUGINS = load_plugins()


def build(name: str, **settings):
    return StageContext(registry=PLUGINS.registry).build(ref("constraint")(name=name, **settings))


def rollout(scores=(1.0, -2.0, 3.0, 0.5)) -> Rollout:
    """Four responses of up to 3 tokens; the second has 2 real tokens, the fourth none
    past its first; the third hit the length limit without EOS."""
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.1, 9.0], [-1.0, -1.0, -1.0], [-2.0, 9.0, 9.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -0.6, 9.0], [-2.0, -1.0, -0.5], [-1.0, 9.0, 9.0]])
    n = len(scores)
    return Rollout(prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
                   response_ids=torch.zeros(n, 3, dtype=torch.long), response_mask=mask, logprobs=logprobs,
                   prompts=["p"] * n, responses=["r"] * n, group=torch.arange(n),
                   truncated=torch.tensor([False, False, True, False]), ref_logprobs=ref_logprobs,
                   scores=torch.tensor(scores), rewards=torch.zeros(n, 3))


def test_kl_in_reward_k1_fixed():
    r = rollout()
    metrics = build("kl", coef=0.1).shape_rewards(r)
    # k1 = logp - ref on real tokens, 0 on padding whatever the log-probs hold there
    expected = -0.1 * torch.tensor([[0.5, -1.0, 0.0], [0.0, 0.5, 0.0], [1.0, 0.0, -0.5], [-1.0, 0.0, 0.0]])
    torch.testing.assert_close(r.rewards, expected)
    assert metrics["kl/coef"] == 0.1
    assert metrics["kl/penalty"] == pytest.approx(0.1 * (-0.5 + 0.5 + 0.5 - 1.0) / 4)


def test_kl_in_reward_k3_and_clamps():
    r = rollout()
    build("kl", coef=1.0, estimator="k3", log_ratio_clamp=0.5).shape_rewards(r)
    # log r = ref - logp, clamped to ±0.5; k3 = e^{log r} - 1 - log r
    log_r = torch.tensor([-0.5, 0.5, 0.0, 0.0, -0.5, -0.5, 0.0, 0.5, 0.5])
    k3 = torch.expm1(log_r) - log_r
    real = r.response_mask.bool()
    torch.testing.assert_close(-r.rewards[real], k3)


def test_kl_in_the_loss_is_beta_times_the_token_mean():
    r = rollout()
    kl = build("kl", coef=0.5, placement="loss", estimator="k2")
    assert kl.shape_rewards(r) is None
    mask = r.response_mask.float()
    term = kl.loss(r, PolicyOutput(r.logprobs, torch.zeros(4, 3), mask))
    k2 = 0.5 * (r.ref_logprobs - r.logprobs) ** 2
    assert float(term.loss) == pytest.approx(0.5 * float((k2 * mask).sum() / mask.sum()))


def test_adaptive_kl_follows_ziegler():
    r = rollout()
    kl = build("kl", coef=0.1, adaptive={"target": 0.1, "horizon": 100})
    metrics = kl.after_update(r)
    # mean sequence KL = (-0.5 + 0.5 + 0.5 - 1.0) / 4 = -0.125; e = clip(-0.125/0.1 - 1, ±0.2) = -0.2
    assert metrics["kl/coef_next"] == pytest.approx(0.1 * (1 - 0.2 * 4 / 100))
    state = kl.state_dict()
    again = build("kl", coef=0.1, adaptive={"target": 0.1, "horizon": 100})
    again.load_state_dict(state)
    assert again.controller.value == kl.controller.value
    assert build("kl", coef=0.1).after_update(r) is None  # fixed: nothing to adapt


def test_reward_norm_normalize_scale_and_clip():
    scores = (1.0, -2.0, 3.0, 0.5)
    r = rollout(scores)
    norm = build("reward-norm", mode="normalize", clip=1.0)
    norm.shape_rewards(r)
    # running moments start at mean 0, var 1, count ~0: after one batch they are the batch's
    x = torch.tensor(scores)
    expected = ((x - x.mean()) / x.std()).clamp(-1, 1)
    torch.testing.assert_close(r.scores, expected)
    r = rollout(scores)
    build("reward-norm", mode="scale", clip=None).shape_rewards(r)
    torch.testing.assert_close(r.scores, x / x.std())  # no mean subtraction (MOSS reward scaling)
    r = rollout(scores)
    build("reward-norm", mode="none", clip=0.7).shape_rewards(r)
    torch.testing.assert_close(r.scores, x.clamp(-0.7, 0.7))
    # the state round-trips (resume)
    again = build("reward-norm")
    again.load_state_dict(norm.state_dict())
    assert again.moments.state_dict() == norm.moments.state_dict()


def test_missing_eos_penalty():
    r = rollout()
    assert build("missing-eos", penalty=0.5).shape_rewards(r) == {"missing_eos/rate": 0.25}
    torch.testing.assert_close(r.scores, torch.tensor([1.0, -2.0, 2.5, 0.5]))


def test_entropy_bonus_and_target():
    r = rollout()
    mask = r.response_mask.float()
    entropy = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 50.0], [0.0, 0.0, 0.0], [2.0, 50.0, 50.0]],
                           requires_grad=True)
    bonus = build("entropy", coef=0.1)
    assert bonus.needs_entropy
    term = bonus.loss(r, PolicyOutput(r.logprobs, entropy, mask))
    mean = (1 + 2 + 3 + 1 + 1 + 0 + 0 + 0 + 2) / 9
    assert float(term.loss.detach()) == pytest.approx(-0.1 * mean)
    term.loss.backward()  # the entropy is trained
    assert entropy.grad is not None and float(entropy.grad[1, 2]) == 0.0
    target = build("entropy", coef=2.0, target=2.0).loss(r, PolicyOutput(r.logprobs, entropy, mask))
    assert float(target.loss.detach()) == pytest.approx(2.0 * abs(mean - 2.0))


def tiny_algorithm():
    policy = StageContext(registry=PLUGINS.registry).build(ref("policy")(
        name="transformers", architecture={"layers": 1, "hidden": 16, "heads": 2}, tokenizer={"task": "reviews"},
        dropout=0.0))
    return SimpleNamespace(policy=policy, model=policy.model, reference=None, device=torch.device("cpu"),
                           global_step=3, seed=0, global_rank=0)


def test_ptx_is_the_nll_of_its_own_data():
    algorithm = tiny_algorithm()
    ptx = build("ptx", coef=2.0, batch_size=4, data={"name": "builtin", "task": "reviews", "split": "pretrain"})
    ptx.bind(algorithm)
    r = rollout()
    first = ptx.loss(r, None)
    nll = float(first.metrics["ptx/nll"])
    vocabulary = len(algorithm.policy.tokenizer)
    assert float(first.loss.detach()) == pytest.approx(2.0 * nll)
    assert abs(nll - math.log(vocabulary)) < 1.0  # an untrained model is near uniform
    first.loss.backward()
    assert algorithm.model.get_input_embeddings().weight.grad is not None
    # a second micro-batch of the same step draws other rows; the same step and call draw the same
    second = ptx.loss(r, None)
    assert float(second.metrics["ptx/nll"]) != nll
    ptx.calls = (-1, 0)
    assert float(ptx.loss(r, None).metrics["ptx/nll"]) == nll
    with pytest.raises(UserError, match="no prompt-completion or text rows"):
        build("ptx", data={"name": "builtin", "task": "reviews", "split": "prompts"})


def test_reference_ema_moves_the_reference_towards_the_policy():
    algorithm = tiny_algorithm()
    ema = build("reference-ema", rate=0.25)
    with pytest.raises(UserError, match="needs a reference model of its own"):
        ema.bind(algorithm)
    import copy

    algorithm.reference = copy.deepcopy(algorithm.model)
    before = [p.clone() for p in algorithm.reference.parameters()]
    with torch.no_grad():
        for p in algorithm.model.parameters():
            p.add_(1.0)
    ema.bind(algorithm)
    ema.after_update(rollout())
    for old, new in zip(before, algorithm.reference.parameters(), strict=True):
        torch.testing.assert_close(new, old + 0.25)


# ------------------------------------------------------------------ DAPO's overlong handling
def bound(constraint, max_new_tokens: int):
    constraint.bind(SimpleNamespace(config=SimpleNamespace(sampling=SimpleNamespace(max_new_tokens=max_new_tokens))))
    return constraint


def test_soft_overlong_punishment_by_hand():
    """L_max 10, L_cache 4: no penalty up to 6 tokens, then (|y| - 6) / 4, 1 at the limit."""
    lengths = [5, 6, 7, 9, 10]
    r = rollout(scores=(1.0,) * 5)
    r.response_mask = torch.tensor([[1] * n + [0] * (10 - n) for n in lengths])
    metrics = bound(build("overlong-penalty", buffer=4, penalty=0.5), 10).shape_rewards(r)
    over = torch.tensor([0.0, 0.0, 0.25, 0.75, 1.0])
    torch.testing.assert_close(r.scores, 1.0 - 0.5 * over)
    assert metrics["overlong/rate"] == pytest.approx(3 / 5)
    assert metrics["overlong/penalty"] == pytest.approx(0.5 * 2.0 / 5)


def test_overlong_buffer_defaults_to_a_share_of_the_limit_and_must_fit():
    assert bound(build("overlong-penalty"), 20).buffer == 4  # 0.2 x 20
    assert bound(build("overlong-penalty", buffer_fraction=0.01), 20).buffer == 1
    with pytest.raises(UserError, match="buffer 10 must be smaller than sampling.max_new_tokens 10"):
        bound(build("overlong-penalty", buffer=10), 10)


def test_overlong_filter_leaves_truncated_responses_out_of_the_loss():
    from rlhfkit import LOSS_MASK
    from rlhfkit.plugins.ppo.module import loss_mask

    r = rollout()
    metrics = build("overlong-filter").shape_rewards(r)
    assert r.extras[LOSS_MASK].tolist() == [1.0, 1.0, 0.0, 1.0] and metrics["overlong/filtered"] == 0.25
    expected = torch.tensor([[1.0, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    torch.testing.assert_close(loss_mask(r), expected)
    torch.testing.assert_close(loss_mask(r, torch.tensor([2, 3])), expected[2:])
    torch.testing.assert_close(r.scores, torch.tensor([1.0, -2.0, 3.0, 0.5]))  # scores untouched
