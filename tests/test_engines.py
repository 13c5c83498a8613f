"""Generation engines and the forwards around a rollout.

- the ``hf`` engine's log-probs are the trainer's forward's, and adding them changes no
  sample;
- an iteration scores the reference only when something reads it, and computes old
  log-probs at rollout time only for rows the first update's forward cannot give; the
  trained weights are the same as with every forward computed;
- the train/inference mismatch metric and the truncated importance weights, by hand;
- a ``vllm`` engine that cannot start, hangs or dies is a clear error, never a hang
  (fake engine processes: no vLLM needed here; tests/test_vllm.py runs the real one).
"""

from __future__ import annotations

import copy
import math
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import cli
from safetensors.torch import load_file

import rlhfkit
from rlhfkit import EngineError, SamplingSettings, StageContext, ref
from rlhfkit.plugins.engines.sampling import sample
from rlhfkit.plugins.ppo import PPOConfig
from rlhfkit.plugins.ppo import experience as experience_module
from rlhfkit.plugins.ppo.experience import ExperienceMaker, Needs
from rlhfkit.plugins.ppo.functional import policy_loss, tis_weights
from rlhfkit.plugins.ppo.monitor import mismatch_metrics
from rlhfkit.plugins.ppo.rollout import response_logprobs
from rlhfkit.runner import run_recipe

PLUGINS = rlhfkit.load_plugins()
PROMPTS = ["the blender was", "i bought this lamp", "worst printer", "my new mattress is", "great"]


def context(tmp_path: Path | None = None) -> StageContext:
    return StageContext(registry=PLUGINS.registry, stage_dir=tmp_path or Path.cwd())


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return context().build(ref("policy")(name="transformers", tokenizer={"task": "reviews"}, dropout=0.0,
                                         architecture={"layers": 1, "hidden": 32, "heads": 2}))


def hf(policy):
    engine = context().build(ref("engine")(name="hf"))
    engine.start(policy)
    return engine


# ------------------------------------------------------------------ the hf engine
@pytest.mark.parametrize("sampling", [SamplingSettings(max_new_tokens=10, temperature=0.7),
                                      SamplingSettings(max_new_tokens=10, temperature=1.3, top_k=5, top_p=0.9)])
def test_hf_engine_logprobs_are_the_trainer_forwards(policy, sampling):
    rollout = sample(policy, hf(policy), PROMPTS * 2, list(range(10)), sampling)
    trainer = response_logprobs(policy.model, rollout, sampling.temperature)
    mask = rollout.response_mask.bool()
    assert rollout.response_mask.sum() > 20
    # the full distribution on logits / temperature: top-k and top-p do not renormalise it
    torch.testing.assert_close(rollout.engine_logprobs[mask], trainer[mask], atol=2e-5, rtol=0)
    assert (rollout.engine_logprobs[~mask] == 0).all()


def test_hf_engine_samples_what_generate_ids_samples(policy):
    sampling = SamplingSettings(max_new_tokens=8, temperature=1.0)
    ids, mask = policy.tokenize_prompts(PROMPTS)
    torch.manual_seed(123)
    expected, _ = policy.generate_ids(ids, mask, max_new_tokens=8, do_sample=True)
    out = hf(policy).generate(ids, mask, sampling, seeds=[123, 5, 6, 7, 8])
    assert torch.equal(out.response_ids, expected)


# ------------------------------------------------------------------ which forwards run
class LengthReward:
    def score(self, prompts, responses):
        return torch.tensor([float(len(r.split())) for r in responses])


def maker(policy, constraints=(), estimator="grpo", objective="ppo-clip", **config) -> ExperienceMaker:
    ctx = context()
    settings = {"prompts_per_iteration": 4, "samples_per_prompt": 4, "max_prompt_length": 16,
                "sampling": {"max_new_tokens": 8}, **config}
    return ExperienceMaker(policy, hf(policy), copy.deepcopy(policy.model), LengthReward(),
                           ctx.build(ref("estimator")(name=estimator)),
                           [ctx.build(ref("constraint")(**c)) for c in constraints],
                           ctx.build(ref("objective")(name=objective)), None, PPOConfig(**settings), seed=3)


def counted(monkeypatch):
    calls = {"policy": 0, "reference": 0}
    original = experience_module.response_logprobs

    def spy(model, rollout, temperature=1.0):
        calls["reference" if getattr(model, "_is_reference", False) else "policy"] += len(rollout)
        return original(model, rollout, temperature)

    monkeypatch.setattr(experience_module, "response_logprobs", spy)
    return calls


def make(m: ExperienceMaker, batch_size: int):
    m.reference._is_reference = True
    prompts = PROMPTS[:4] * 2
    return m.make(0, prompts, [{}] * len(prompts), rank=0, world=1, batch_size=batch_size,
                  device=torch.device("cpu"), on_nan="stop", step=0)


@pytest.mark.parametrize(("constraints", "config", "batch", "policy_rows", "reference_rows"), [
    # GRPO without KL, one update per iteration: exactly on-policy, no forward at all
    ((), {}, 16, 0, 0),
    # the KL metric asked for: the reference is scored, the old log-probs still come from the update
    ((), {"kl_metric": True}, 16, 0, 16),
    # KL in the loss (GRPO's k3): the reference is read in the loss, old log-probs are not read early
    (({"name": "kl", "coef": 0.04, "placement": "loss", "estimator": "k3"},), {}, 16, 0, 16),
    # KL in the reward (PPO): both, for every row
    (({"name": "kl", "coef": 0.05},), {}, 16, 16, 16),
    # adaptive KL reads the old log-probs after the updates: every row at rollout time
    (({"name": "kl", "coef": 0.05, "placement": "loss", "adaptive": {"target": 1.0, "horizon": 10}},), {}, 16, 16, 16),
    # two minibatches: the second's rows are scored at rollout time, the first's come from its update
    ((), {}, 8, 8, 0),
    # two epochs of one minibatch: the first update gives them all
    ((), {"epochs": 2}, 16, 0, 0),
])
def test_forwards_run_only_where_read(policy, monkeypatch, constraints, config, batch, policy_rows, reference_rows):
    calls = counted(monkeypatch)
    made = make(maker(policy, constraints, **config), batch)
    assert calls == {"policy": policy_rows, "reference": reference_rows}
    assert len(made.deferred) == 16 - policy_rows
    assert (made.rollout.ref_logprobs is not None) == (reference_rows > 0)
    assert ("kl/ref" in made.metrics) == (reference_rows > 0)


def test_a_component_that_does_not_declare_gets_every_forward(policy, monkeypatch):
    class OldStyle:  # a plugin estimator written before the flags existed
        critic = None

        def estimate(self, rollout):
            return rlhfkit.Advantages(rollout.rewards, rollout.rewards)

    m = maker(policy)
    m.estimator = OldStyle()
    m.needs = Needs.of(m.config, [m.estimator], m.objective)
    calls = counted(monkeypatch)
    make(m, 8)
    assert calls == {"policy": 16, "reference": 16}


def test_rows_scored_at_rollout_time_are_the_trainers(policy):
    made = make(maker(policy), 8)
    rollout = made.rollout
    trainer = response_logprobs(policy.model, rollout, 1.0)
    rows = torch.ones(16, dtype=torch.bool)
    rows[made.deferred] = False
    mask = rollout.response_mask.bool()
    torch.testing.assert_close(rollout.logprobs[rows][mask[rows]], trainer[rows][mask[rows]])
    # the deferred rows hold the engine's until the first update writes the trainer's
    torch.testing.assert_close(rollout.logprobs[~rows], rollout.engine_logprobs[~rows])


GRPO = """\
run: {{name: forwards, seed: 0, dir: {run}}}
stages:
  grpo:
    algorithm:
      name: ppo
      lr: 1.0e-3
      prompts_per_iteration: 8
      samples_per_prompt: 4
      epochs: {epochs}
      sampling: {{max_new_tokens: 10}}
      max_prompt_length: 24
      eval_prompts: 8
      sample_prompts: 0
      advantages: {{whiten: none}}
    policy: {{name: transformers, path: {sft}, dropout: 0.0}}
    reward: {{name: reward-model, path: {rm}, max_length: 48}}
    estimator: grpo
    objective: ppo-clip
    constraints: {constraints}
    data: {{name: builtin, task: reviews, split: prompts}}
    eval_data: {{name: builtin, task: reviews, split: prompts-eval}}
    trainer: {{batch_size: {batch}, micro_batch_size: 8, max_steps: {steps}, log_every_n_steps: 1}}
"""


@pytest.mark.slow
@pytest.mark.parametrize(("epochs", "batch", "steps", "constraints"), [
    (1, 32, 3, "[]"),  # exactly on-policy: no old log-probs, no reference
    (2, 16, 8, "[{name: kl, coef: 0.04, placement: loss, estimator: k3}]"),  # first minibatch deferred
])
def test_skipped_forwards_train_the_same_weights(exports, tmp_path, monkeypatch, epochs, batch, steps, constraints):
    def run(name: str) -> dict[str, torch.Tensor]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(GRPO.format(run=tmp_path / name, sft=exports["sft"], rm=exports["rm"], epochs=epochs,
                                    batch=batch, steps=steps, constraints=constraints))
        run_recipe(PLUGINS.load_recipe(path), PLUGINS)
        return load_file(tmp_path / name / "grpo" / "export" / "model.safetensors")

    lean = run("lean")
    monkeypatch.setattr(Needs, "of", classmethod(lambda cls, *args: cls(reference=True, old_logprobs=True)))
    full = run("full")
    for name, tensor in full.items():
        torch.testing.assert_close(lean[name], tensor, atol=1e-5, rtol=1e-4)
    moved = max(float((full[n] - t).abs().max()) for n, t in load_file(exports["sft"] / "model.safetensors").items()
                if n in full)
    assert moved > 1e-4  # the runs trained: the comparison is not between two untouched models


# ------------------------------------------------------------------ mismatch and TIS by hand
def test_mismatch_metrics_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    engine = torch.tensor([[-1.5, -2.0, 7.0], [-0.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = mismatch_metrics([(trainer[:1], mask[:1], engine[:1]), (trainer[1:], mask[1:], engine[1:])])
    log_r = torch.tensor([0.5, 0.0, -0.3])  # trainer − engine on the 3 real tokens
    assert got["mismatch/logprob_abs_mean"] == pytest.approx(0.8 / 3)
    assert got["mismatch/logprob_abs_max"] == pytest.approx(0.5)
    assert got["mismatch/kl_k3"] == pytest.approx(float((log_r.exp() - 1 - log_r).mean()), rel=1e-6)


def test_truncated_importance_weights_by_hand():
    old = torch.tensor([[-1.0, -1.0, -1.0, 0.0]])
    engine = torch.tensor([[-1.0, -2.0, -0.5, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    weights, metrics = tis_weights(old, engine, mask, cap=2.0)
    # exp(old − engine) = 1, e (capped at 2), e^-0.5; padding 1
    torch.testing.assert_close(weights, torch.tensor([[1.0, 2.0, math.exp(-0.5), 1.0]]))
    assert float(metrics["policy/tis_truncated_fraction"]) == pytest.approx(1 / 3)
    assert float(metrics["policy/tis_weight"]) == pytest.approx((3 + math.exp(-0.5)) / 3)
    logp = torch.tensor([[-0.9, -1.2, -1.0, 0.0]])
    adv = torch.tensor([[1.0, -1.0, 0.5, 0.0]])
    plain, _ = policy_loss(logp, old, adv, mask.float(), aggregation="token-sum-norm", constant=1.0)
    weighted, _ = policy_loss(logp, old, adv, mask.float(), aggregation="token-sum-norm", constant=1.0,
                              weights=weights)
    per_token = torch.maximum(-adv * (logp - old).exp(), -adv * (logp - old).exp().clamp(0.8, 1.2))
    assert float(plain) == pytest.approx(float((per_token * mask).sum()), rel=1e-6)
    assert float(weighted) == pytest.approx(float((per_token * weights * mask).sum()), rel=1e-6)


def test_ppo_clip_applies_tis_only_with_engine_logprobs():
    objective = context().build(ref("objective")(name="ppo-clip", tis_cap=2.0))
    old = torch.tensor([[-1.0, -1.0]])
    minibatch = SimpleNamespace(logprobs=old, advantages=torch.tensor([[1.0, 1.0]]), engine_logprobs=None)
    output = rlhfkit.PolicyOutput(old.clone().requires_grad_(), torch.zeros(1, 2), torch.ones(1, 2))
    assert "policy/tis_weight" not in objective(minibatch, output).metrics
    minibatch.engine_logprobs = torch.tensor([[-3.0, -1.0]])
    term = objective(minibatch, output)
    assert float(term.metrics["policy/tis_weight"]) == pytest.approx(1.5)
    assert float(term.loss.detach()) == pytest.approx(-(2.0 + 1.0) / 2)


# ------------------------------------------------------------------ engine slots
def test_offline_dpo_refuses_an_engine(tmp_path):
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        run: {{name: x, dir: {tmp_path / 'run'}}}
        stages:
          dpo:
            algorithm: {{name: dpo}}
            policy: {{name: transformers, tokenizer: {{task: reviews}}, architecture: {{layers: 1, hidden: 32, heads: 2}}}}
            objective: dpo
            engine: vllm
            data: {{name: builtin, task: reviews, split: preference}}
            trainer: {{max_steps: 1}}
        """))
    with pytest.raises(rlhfkit.UserError, match="samples only online"):
        run_recipe(PLUGINS.load_recipe(recipe), PLUGINS)


# ------------------------------------------------------------------ a dead engine is an error
FAKE_SERVER = """\
import json, sys, time
from multiprocessing.connection import Client
setup = json.loads(sys.stdin.readline())
mode = {mode!r}
if mode == "crash":
    print("vllm: ImportError: no CPU backend", flush=True)
    sys.exit(3)
if mode == "hang":
    time.sleep(60)
connection = Client(tuple(setup["address"]), authkey=bytes.fromhex(setup["key"]))
connection.send({{"ok": True, "version": "fake"}})
while True:
    request = connection.recv()
    if request["op"] == "load":
        connection.send({{"ok": True, "seconds": 0.0}})
    elif request["op"] == "generate" and mode == "die":
        print("killed while generating", flush=True)
        sys.exit(9)
    elif request["op"] == "generate":
        connection.send({{"ok": False, "error": "Traceback...\\nRuntimeError: head_dim=16 unsupported"}})
    else:
        connection.send({{"ok": True}})
        break
"""


def fake_python(tmp_path: Path, mode: str) -> str:
    """An 'interpreter' that runs a fake engine server instead of rlhfkit's."""
    server = tmp_path / f"fake_{mode}.py"
    server.write_text(FAKE_SERVER.format(mode=mode))
    launcher = tmp_path / f"python_{mode}"
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} {server}\n")
    launcher.chmod(0o755)
    return str(launcher)


@pytest.mark.parametrize(("mode", "message"), [
    ("crash", "(?s)died while starting .*exit code 3.*no CPU backend"),
    ("hang", "did not answer within 3 s \\(starting\\)"),
    ("die", "(?s)died while generating .*exit code 9.*killed while generating"),
    ("error", "failed while generating: RuntimeError: head_dim=16 unsupported"),
])
def test_a_failing_engine_is_a_clear_error(policy, tmp_path, mode, message):
    engine = context(tmp_path).build(ref("engine")(name="vllm", python=fake_python(tmp_path, mode),
                                                   start_timeout_s=3))
    started = __import__("time").monotonic()
    with pytest.raises(EngineError, match=message):
        engine.start(policy)
        ids, mask = policy.tokenize_prompts(PROMPTS)
        engine.generate(ids, mask, SamplingSettings(), seeds=range(5))
    assert __import__("time").monotonic() - started < 20
    engine.close()
    assert engine.process is None


def test_a_missing_interpreter_is_refused_by_validate(tmp_path):
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        run: {{name: x, dir: {tmp_path / 'run'}}}
        stages:
          grpo:
            algorithm: {{name: ppo}}
            policy: {{name: transformers, tokenizer: {{task: reviews}}, architecture: {{layers: 1}}}}
            engine: {{name: vllm, python: {tmp_path / 'no-such-python'}}}
            reward: {{name: gold, task: reviews}}
            estimator: grpo
            objective: ppo-clip
            data: {{name: builtin, task: reviews, split: prompts}}
        """))
    result = cli("validate", str(recipe))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "stages.grpo.engine.python: no executable interpreter at" in result.stderr


def test_engine_check_stops_on_a_gap_once(tmp_path):
    engine = context(tmp_path).build(ref("engine")(name="vllm", check="first", check_tolerance=1e-3))
    engine.dtype = torch.float32
    engine.check(1e-4, "iteration 1")  # passes, and is not checked again
    engine.check(5.0, "iteration 2")
    engine = context(tmp_path).build(ref("engine")(name="vllm", check="every"))
    engine.dtype = torch.float32
    with pytest.raises(EngineError, match="differ from the trainer's by 0.5"):
        engine.check(0.5, "iteration 1")
