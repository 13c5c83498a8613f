"""DAPO's dynamic sampling (ExperienceMaker), the ``dapo`` preset and GSPO in a run."""

from __future__ import annotations

import pytest
import torch
from helpers import RECIPES, cli
from test_engines import maker, policy  # noqa: F401 - the module-scoped policy fixture

from rlhfkit.plugins.ppo import schedule
from rlhfkit.plugins.ppo.schedule import ROUND_SEED_STRIDE

PROMPTS = ["the blender was", "i bought this lamp", "worst printer", "my new mattress is", "great",
           "the lamp is", "this printer", "my blender"]
INFORMATIVE = {1, 4, 6}  # prompts whose samples score 0, 1, 0, 1; the others all score 1


class FlagReward:
    def score(self, prompts, responses, fields):
        return torch.tensor([float(i % 2) if f["informative"] else 1.0 for i, f in enumerate(fields)])


def make(m, prompts):
    m.reward = FlagReward()
    fields = [{"informative": i in INFORMATIVE} for i in range(len(prompts))]
    return m.make(0, prompts, fields, rank=0, world=1, batch_size=16, device=torch.device("cpu"),
                  on_nan="stop", step=0)


def drawn_by_round(rounds: int) -> list[list[int]]:
    return [schedule.iteration_prompts(len(PROMPTS), 4, 3 + ROUND_SEED_STRIDE * r, 0) for r in range(rounds)]


def test_dynamic_sampling_keeps_groups_whose_scores_differ(policy):  # noqa: F811
    made = make(maker(policy, dynamic_sampling={"max_rounds": 8}), PROMPTS)
    # by hand: walk the rounds' prompt orders until four informative groups were drawn
    kept, rounds = [], 0
    for order in drawn_by_round(8):
        rounds += 1
        kept += [i for i in order if i in INFORMATIVE]
        if len(kept) >= 4:
            break
    assert made.rollout.prompts == [PROMPTS[i] for i in kept[:4] for _ in range(4)]
    assert made.rollout.group.tolist() == [g for g in range(4) for _ in range(4)]
    assert made.metrics["dynamic/rounds"] == rounds
    assert made.metrics["dynamic/drawn_groups"] == 4 * rounds
    assert made.metrics["dynamic/informative_fraction"] == pytest.approx(len(kept) / (4 * rounds))
    assert made.metrics["dynamic/filled_groups"] == 0
    assert made.metrics["group/zero_std_fraction"] == 0
    assert made.rollout.advantages.abs().sum() > 0
    assert made.metrics["rollout/sampled_tokens"] > float(made.rollout.response_mask.sum())


def test_a_short_batch_is_filled_with_the_latest_uninformative_groups(policy):  # noqa: F811
    made = make(maker(policy, dynamic_sampling={"max_rounds": 1}), PROMPTS)
    (order,) = drawn_by_round(1)
    kept = [i for i in order if i in INFORMATIVE]
    spare = [i for i in order if i not in INFORMATIVE]
    expected = kept + spare[len(spare) - (4 - len(kept)):]
    assert made.rollout.prompts == [PROMPTS[i] for i in expected for _ in range(4)]
    assert made.metrics["dynamic/filled_groups"] == 4 - len(kept)
    assert made.metrics["rollout/sampled_tokens"] == float(made.rollout.response_mask.sum())


def test_dynamic_sampling_runs_the_trainer_forwards_on_kept_rows_only(policy, monkeypatch):  # noqa: F811
    from test_engines import counted

    calls = counted(monkeypatch)
    m = maker(policy, [{"name": "kl", "coef": 0.05}], dynamic_sampling={"max_rounds": 8})
    m.reference._is_reference = True
    made = make(m, PROMPTS)
    assert calls == {"policy": 16, "reference": 16}
    assert made.rollout.ref_logprobs is not None


def test_dynamic_sampling_needs_groups():
    from rlhfkit.plugins.ppo import PPOConfig

    with pytest.raises(ValueError, match="needs samples_per_prompt >= 2"):
        PPOConfig(dynamic_sampling={})


def test_validate_refuses_an_overlong_buffer_that_does_not_fit(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: {RECIPES}/ppo.yaml\nstages:\n  ppo:\n    constraints:\n"
                      "      - {name: overlong-penalty, buffer: 64}\n")
    result = cli("validate", str(recipe), "stages.ppo.algorithm.sampling.max_new_tokens=32", cwd=tmp_path)
    assert result.returncode == 2 and "buffer 64 must be smaller than sampling.max_new_tokens 32" in result.stderr


@pytest.mark.parametrize("objective", ["ppo-clip", "gspo"])
def test_the_dapo_preset_runs_with_either_objective(tmp_path, exports, objective):
    """The dapo preset over a PPO stage (16 prompts x 4 samples, micro-batches of 4 with
    generation in calls of 8), with GSPO as the other objective; the reward model's
    continuous scores keep every group informative, the gold scorer is logged."""
    from test_ppo import KL_ONLY, rows_by_step, write_recipe

    base = write_recipe(tmp_path, exports, KL_ONLY)
    recipe = tmp_path / "dapo.yaml"
    recipe.write_text(f"extends: [{base}, 'preset:dapo']\nstages:\n  ppo:\n    algorithm: {{samples_per_prompt: 4}}\n"
                      f"    objective: {{name: {objective}}}\n")
    out = tmp_path / "run"
    result = cli("run", str(recipe), f"run.dir={out}", "stages.ppo.trainer.max_steps=16", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = rows_by_step(out / "ppo" / "metrics.csv")
    first = rows[0]
    assert first["dynamic/rounds"] >= 1 and first["dynamic/drawn_groups"] >= 16
    assert "overlong/penalty" in first and "kl/coef" not in first
    assert first["rollout/sampled_tokens"] >= first["response/length"] * 64 - 1e-3
    if objective == "gspo":
        assert any("train/policy/sequence_ratio" in r for r in rows.values())
