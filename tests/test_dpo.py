"""DPO-family losses against an independent oracle written from the formulas (spec §G),
the objective components, and the ``dpo`` algorithm end to end (reference on the fly,
precomputed, or as the LoRA adapter switched off)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import RECIPES, TINY_SFT, cli, column, read_metrics

from rlhfkit import PreferenceBatch, StageContext, load_plugins, ref
from rlhfkit.plugins.dpo import losses

# ------------------------------------------------------------------ the oracle (plain floats)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def oracle(name: str, pc: float, pr: float, rc: float, rr: float, beta: float, eps: float = 0.0,
           tokens: tuple[int, int] = (1, 1)) -> float:
    delta = (pc - rc) - (pr - rr)
    if name == "dpo":
        return -log_sigmoid(beta * delta)
    if name == "cdpo":
        return -(1 - eps) * log_sigmoid(beta * delta) - eps * log_sigmoid(-beta * delta)
    if name == "robust":
        return (-(1 - eps) * log_sigmoid(beta * delta) + eps * log_sigmoid(-beta * delta)) / (1 - 2 * eps)
    if name == "hinge":
        return max(0.0, 1 - beta * delta)
    if name == "ipo":
        nw, nl = tokens
        mean_delta = (pc / nw - rc / nw) - (pr / nl - rr / nl)
        return (mean_delta - 1 / (2 * beta)) ** 2
    raise ValueError(name)


CASES = [  # (pc, pr, rc, rr): policy/reference summed log-probs of chosen and rejected
    (-10.0, -12.0, -11.0, -11.5), (-3.2, -2.1, -3.0, -2.5), (-40.0, -20.0, -35.0, -30.0), (-1.0, -1.0, -1.0, -1.0),
    (-0.01, -80.0, -5.0, -5.0),
]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_reference_losses_match_the_oracle(beta):
    pc, pr, rc, rr = (torch.tensor(column_, dtype=torch.float64) for column_ in zip(*CASES, strict=True))
    delta = losses.margin(pc, pr, rc, rr).double()
    got = {"dpo": losses.dpo(delta, beta), "cdpo": losses.cdpo(delta, beta, 0.1),
           "robust": losses.robust_dpo(delta, beta, 0.2), "hinge": losses.hinge(delta, beta)}
    for name, values in got.items():
        eps = {"cdpo": 0.1, "robust": 0.2}.get(name, 0.0)
        for i, case in enumerate(CASES):
            assert float(values[i]) == pytest.approx(oracle(name, *case, beta, eps), abs=1e-6), (name, case)


def test_ipo_uses_per_token_averages():
    plugins = load_plugins()
    ipo = StageContext(registry=plugins.registry).build(ref("objective")(name="ipo", beta=0.5))
    tokens = (torch.tensor([4.0, 2.0]), torch.tensor([8.0, 1.0]))
    batch = PreferenceBatch(torch.tensor([-10.0, -3.2]), torch.tensor([-12.0, -2.1]), tokens[0], tokens[1],
                            torch.tensor([-11.0, -3.0]), torch.tensor([-11.5, -2.5]))
    expected = (oracle("ipo", -10.0, -12.0, -11.0, -11.5, 0.5, tokens=(4, 8))
                + oracle("ipo", -3.2, -2.1, -3.0, -2.5, 0.5, tokens=(2, 1))) / 2
    assert float(ipo(batch).loss) == pytest.approx(expected, abs=1e-6)


def test_simpo_orpo_kto_by_hand():
    # SimPO: mean log-probs -1 and -2, beta 2, gamma 0.5: -log sigmoid(2 * 1 - 0.5)
    got = losses.simpo(torch.tensor([-1.0]), torch.tensor([-2.0]), 2.0, 0.5)
    assert float(got) == pytest.approx(-log_sigmoid(1.5), abs=1e-6)
    # ORPO: logodds(a) = a - log(1 - e^a); NLL_w = 1.0, lambda 0.1
    a, b = -0.5, -1.5
    odds = (a - math.log(1 - math.exp(a))) - (b - math.log(1 - math.exp(b)))
    got = losses.orpo(torch.tensor([a]), torch.tensor([b]), torch.tensor([1.0]), 0.1)
    assert float(got) == pytest.approx(1.0 - 0.1 * log_sigmoid(odds), abs=1e-6)
    # KTO: desirable w_D (1 - sigmoid(beta (delta - z0))), undesirable w_U (1 - sigmoid(beta (z0 - delta)))
    z0 = losses.kto_reference_point(torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -4.0]))
    assert float(z0) == pytest.approx(2.0)  # mean(1, 3), clamped at 0 from below
    assert float(losses.kto_reference_point(torch.tensor([-5.0]), torch.tensor([-4.0]))) == 0.0
    got = losses.kto(torch.tensor([3.0, 3.0]), torch.tensor([True, False]), z0, 0.5, 1.0, 1.5)
    sig = 1 / (1 + math.exp(-0.5))
    assert got.tolist() == pytest.approx([1 - sig, 1.5 * (1 - (1 - sig))], abs=1e-6)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    loss = losses.dpo(losses.margin(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0])), 0.1).sum()
    loss.backward()
    assert float(pc.grad) == pytest.approx(-0.05) and float(pr.grad) == pytest.approx(0.05)  # beta/2 at delta 0


# ------------------------------------------------------------------ end to end

DPO = str(RECIPES / "dpo.yaml")
TINY_DPO = [
    *TINY_SFT, "stages.sft.trainer.max_steps=20", "stages.dpo.trainer.max_steps=6", "stages.dpo.trainer.batch_size=8",
    "stages.dpo.trainer.micro_batch_size=4", "stages.dpo.trainer.log_every_n_steps=1", "stages.dpo.algorithm.lr=1e-3",
    "stages.dpo.eval_data.limit=16", "stages.dpo.eval_prompts.limit=8", "stages.dpo.algorithm.max_new_tokens=8",
]


def test_precomputed_reference_and_separate_rows_give_the_same_run(tmp_path):
    """Reference log-probs precomputed once (and the reference freed) train exactly as
    computing them per batch does (dropout off, deterministic CPU); chosen and rejected as
    two separate rows train as the shared-prompt row does, to float rounding."""
    losses_of = {}
    for mode, share in (("on-the-fly", "true"), ("precompute", "true"), ("on-the-fly", "false")):
        out = tmp_path / f"{mode}-{share}"
        result = cli("run", DPO, *TINY_DPO, f"run.dir={out}", f"stages.dpo.algorithm.reference_logps={mode}",
                     f"stages.dpo.algorithm.share_prompt={share}", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "does not honour" not in result.stderr  # GPT-2 takes the shared-prompt mask
        rows = read_metrics(out / "dpo" / "metrics.csv")
        losses_of[mode, share] = column(rows, "train/dpo/loss")
        assert sorted(losses_of[mode, share]) == list(range(1, 7))
        summary = json.loads((out / "dpo" / "summary.json").read_text())
        assert {"rewards/accuracy", "before_rewards/accuracy", "gold", "before_gold"} <= summary.keys()
        assert summary["before_rewards/margin"] == 0.0  # the policy starts as its reference
    for step, value in losses_of["on-the-fly", "true"].items():
        assert losses_of["precompute", "true"][step] == pytest.approx(value, abs=1e-6), step
        assert losses_of["on-the-fly", "false"][step] == pytest.approx(value, abs=1e-4), step
    assert losses_of["on-the-fly", "true"][1] == pytest.approx(math.log(2), abs=1e-5)  # Δ = 0 at the start


@pytest.mark.parametrize("objective", ["cdpo", "robust-dpo", "ipo", "hinge", "simpo", "orpo", "kto"])
def test_every_objective_trains(tmp_path, objective):
    out = tmp_path / "run"
    result = cli("run", DPO, *TINY_DPO, f"run.dir={out}", f"stages.dpo.objective={{name: {objective}}}",
                 "stages.dpo.trainer.max_steps=2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_metrics(out / "dpo" / "metrics.csv")
    assert len(column(rows, "train/dpo/loss")) == 2


def test_kto_component_by_hand():
    plugins = load_plugins()
    kto = StageContext(registry=plugins.registry).build(ref("objective")(name="kto", beta=1.0,
                                                                        undesirable_weight=2.0))
    batch = PreferenceBatch(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.ones(2), torch.ones(2),
                            torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]),
                            mismatched=torch.tensor([-4.0, -3.0]), ref_mismatched=torch.tensor([-5.0, -5.0]))
    z0 = 1.5  # mean(1, 2), clamped at 0
    sig = lambda x: 1 / (1 + math.exp(-x))
    desirable = [1 - sig(1.0 - z0), 1 - sig(0.0 - z0)]  # Δ = 1, 0
    undesirable = [2 * (1 - sig(z0 - (-1.0))), 2 * (1 - sig(z0 - 1.0))]  # Δ = -1, 1
    term = kto(batch)
    assert float(term.loss) == pytest.approx(sum(desirable + undesirable) / 4, abs=1e-6)
    assert float(term.metrics["kto/z0"]) == pytest.approx(z0)


def test_lora_reference_is_the_adapter_switched_off(tmp_path):
    out = tmp_path / "run"
    result = cli("run", DPO, *TINY_DPO, f"run.dir={out}", "stages.dpo.policy.lora={r: 4}",
                 "stages.dpo.trainer.max_steps=3", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    losses_ = column(read_metrics(out / "dpo" / "metrics.csv"), "train/dpo/loss")
    # a fresh LoRA adapter is a no-op (B = 0): the policy equals its reference at step 1
    assert losses_[1] == pytest.approx(math.log(2), abs=1e-5)


def test_wrong_rows_are_a_clear_error(tmp_path):
    result = cli("run", DPO, *TINY_DPO, f"run.dir={tmp_path / 'run'}", "stages.dpo.data.split=sft", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("stages.dpo.data: dataset 'builtin' gives demonstrations (PromptCompletion), but the dpo algorithm's "
            "'data' takes preference pairs") in " ".join(result.stderr.split())
    assert not (tmp_path / "run" / "sft").exists()  # found before anything trained


def test_online_dpo_samples_labels_and_trains(tmp_path):
    """Online DPO: pairs sampled from the policy each step, labelled by a reward (here the
    gold scorer), trained with the DPO loss; the same command resumes nothing and reruns
    identically (sampling seeded by step)."""
    common = [*TINY_SFT, "stages.sft.trainer.max_steps=20", "stages.dpo.trainer.max_steps=4",
              "stages.dpo.trainer.batch_size=8", "stages.dpo.trainer.micro_batch_size=4",
              "stages.dpo.trainer.log_every_n_steps=1", "stages.dpo.algorithm.lr=1e-3",
              "stages.dpo.algorithm.online={max_new_tokens: 8}", "stages.dpo.data.split=prompts",
              "stages.dpo.reward={name: gold, task: reviews}", "stages.dpo.eval_data=null",
              "stages.dpo.eval_prompts.limit=8", "stages.dpo.algorithm.max_new_tokens=8"]
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = cli("run", DPO, *common, f"run.dir={out}", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        runs.append(read_metrics(out / "dpo" / "metrics.csv"))
    pairs = column(runs[0], "train/online/pairs")
    assert sorted(pairs) == [1, 2, 3, 4] and all(0 < n <= 8 for n in pairs.values())
    assert column(runs[0], "train/dpo/loss") == column(runs[1], "train/dpo/loss")
    missing = cli("run", DPO, *common[:-5], f"run.dir={tmp_path / 'c'}", "stages.dpo.eval_data=null", cwd=tmp_path)
    assert missing.returncode == 2 and "fill the `reward:` slot" in missing.stderr


def test_online_pairs_from_the_reference_do_not_follow_the_policy(tmp_path):
    """online_from: reference samples the pairs from the frozen reference (the SFT model):
    two runs at very different learning rates draw the same pairs at every step, while
    online DPO's own samples move with the policy."""
    common = [*TINY_SFT, "stages.sft.trainer.max_steps=20", "stages.dpo.trainer.max_steps=4",
              "stages.dpo.trainer.batch_size=8", "stages.dpo.trainer.micro_batch_size=8",
              "stages.dpo.trainer.log_every_n_steps=1", "stages.dpo.algorithm.online={max_new_tokens: 8}",
              "stages.dpo.data.split=prompts", "stages.dpo.reward={name: gold, task: reviews}",
              "stages.dpo.eval_data=null", "stages.dpo.eval_prompts.limit=8", "stages.dpo.algorithm.max_new_tokens=8"]
    scores = {}
    for source in ("reference", "policy"):
        for lr in ("1e-4", "3e-2"):
            out = tmp_path / f"{source}-{lr}"
            result = cli("run", DPO, *common, f"stages.dpo.algorithm.online_from={source}",
                         f"stages.dpo.algorithm.lr={lr}", f"run.dir={out}", cwd=tmp_path)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
            scores[source, lr] = column(read_metrics(out / "dpo" / "metrics.csv"), "train/online/score")
    assert len(scores["reference", "1e-4"]) == 4
    assert scores["reference", "1e-4"] == scores["reference", "3e-2"]
    assert scores["policy", "1e-4"] != scores["policy", "3e-2"]


def test_tr_dpo_reference_sync(tmp_path):
    """TR-DPO as the reference-ema constraint: a hard sync (rate 1) every 2 steps makes the
    reference equal the policy, so the loss of the next step is log 2 again."""
    out = tmp_path / "run"
    result = cli("run", DPO, *TINY_DPO, f"run.dir={out}", "stages.dpo.trainer.max_steps=5",
                 "stages.dpo.constraints=[{name: reference-ema, rate: 1.0, every: 2}]", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_metrics(out / "dpo" / "metrics.csv")
    dpo_losses = column(rows, "train/dpo/loss")
    assert dpo_losses[1] == pytest.approx(math.log(2), abs=1e-5)
    assert dpo_losses[2] != pytest.approx(math.log(2), abs=1e-3)  # the policy moved away from its reference
    for step in (3, 5):  # right after a sync (after steps 2 and 4)
        assert dpo_losses[step] == pytest.approx(math.log(2), abs=1e-5), step
    assert sorted(column(rows, "reference_ema/distance")) == [2, 4]
    refused = cli("run", DPO, *TINY_DPO, f"run.dir={tmp_path / 'b'}", "stages.dpo.algorithm.reference_logps=precompute",
                  "stages.dpo.constraints=[reference-ema]", cwd=tmp_path)
    assert refused.returncode == 2 and "need reference log-probs on the fly" in refused.stderr
