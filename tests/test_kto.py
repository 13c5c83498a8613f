"""KTO on unpaired data: the loss against an independent oracle written from spec §G, the
``unpaired`` file schema, the built-in ``unpaired`` splits, and the ``dpo`` algorithm
trained end to end on unpaired rows.

Convention reproduced by the oracle: ``Δ = log π(y|x) − log ref(y|x)`` with summed token
log-probs; ``z0 = max(0, mean(log π(y'|x) − log ref(y'|x)))`` over every mismatched pair
the batch carries (in a run: each row's prompt with its partner row's completion, for
all rows of the optimizer step), detached (no gradient flows into it); the loss is the
mean over the rows of ``w_D (1 − σ(β(Δ − z0)))`` for desirable rows and ``w_U (1 −
σ(β(z0 − Δ)))`` for undesirable ones.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import RECIPES, TINY_SFT, cli, column, read_metrics

import rlhfkit
import rlhfkit.plugins.datasets as file_plugin
from rlhfkit import DataError, Feedback, FeedbackBatch, PreferenceBatch, StageContext, load_plugins, ref
from rlhfkit.plugins.dpo import unpaired
from rlhfkit.plugins.tasks import KnowledgeConfig, KnowledgeTask, ReviewsConfig, ReviewsTask

# ------------------------------------------------------------------ the oracle (plain floats)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def kto_oracle(logps, refs, desirable, mismatched, ref_mismatched, beta, w_d, w_u) -> float:
    z0 = max(0.0, sum(m - r for m, r in zip(mismatched, ref_mismatched, strict=True)) / len(mismatched))
    total = 0.0
    for logp, reference, good in zip(logps, refs, desirable, strict=True):
        delta = logp - reference
        total += w_d * (1 - sigmoid(beta * (delta - z0))) if good else w_u * (1 - sigmoid(beta * (z0 - delta)))
    return total / len(logps)


CASES = {  # logps, refs, desirable, mismatched, ref_mismatched
    "z0 positive, unbalanced": ([-10.0, -3.2, -40.0, -0.5, -7.0], [-11.0, -3.0, -35.0, -2.5, -7.0],
                                [True, True, False, True, False], [-4.0, -3.0, -9.0], [-5.0, -5.0, -8.5]),
    "z0 clamped at 0": ([-12.0, -20.0, -6.0], [-11.5, -30.0, -6.5], [False, False, True],
                        [-9.0, -6.0], [-5.0, -4.0]),
    "only desirable rows": ([-1.0, -80.0], [-5.0, -5.0], [True, True], [-2.0], [-2.0]),
}


def kto(**settings):
    return StageContext(registry=load_plugins().registry).build(ref("objective")(name="kto", **settings))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize(("w_d", "w_u"), [(1.0, 1.0), (1.33, 1.0), (1.0, 2.5)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_unpaired_kto_matches_the_oracle(case, beta, w_d, w_u):
    logps, refs, desirable, mismatched, ref_mismatched = CASES[case]
    t = lambda values: torch.tensor(values, dtype=torch.float64)
    batch = FeedbackBatch(t(logps), torch.ones(len(logps)), torch.tensor(desirable), t(refs), t(mismatched),
                          t(ref_mismatched))
    term = kto(beta=beta, desirable_weight=w_d, undesirable_weight=w_u)(batch)
    expected = kto_oracle(logps, refs, desirable, mismatched, ref_mismatched, beta, w_d, w_u)
    assert float(term.loss) == pytest.approx(expected, abs=1e-6)
    z0 = max(0.0, sum(m - r for m, r in zip(mismatched, ref_mismatched, strict=True)) / len(mismatched))
    assert float(term.metrics["kto/z0"]) == pytest.approx(z0, abs=1e-6)


def test_z0_is_detached_and_the_gradient_has_the_right_signs():
    logps = torch.tensor([-10.0, -10.0], requires_grad=True)
    mismatched = torch.tensor([-4.0, -3.0], requires_grad=True)
    batch = FeedbackBatch(logps, torch.ones(2), torch.tensor([True, False]), torch.tensor([-11.0, -11.0]),
                          mismatched, torch.tensor([-5.0, -5.0]))
    kto()(batch).loss.backward()
    assert mismatched.grad is None  # no gradient through the reference point
    assert logps.grad[0] < 0 < logps.grad[1]  # desirable pushed up, undesirable down
    # d/dΔ of w (1 − σ(β(Δ − z0))) / N is −β σ(1 − σ) / N at Δ = 1, z0 = 1.5
    s = sigmoid(0.1 * (1.0 - 1.5))
    assert float(logps.grad[0]) == pytest.approx(-0.1 * s * (1 - s) / 2, abs=1e-7)


def test_pairs_taken_apart_give_the_unpaired_loss():
    pairs = PreferenceBatch(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.ones(2), torch.ones(2),
                            torch.tensor([-2.0, -2.5]), torch.tensor([-2.0, -2.0]),
                            mismatched=torch.tensor([-4.0, -3.0]), ref_mismatched=torch.tensor([-5.0, -5.0]))
    rows = FeedbackBatch(torch.tensor([-1.0, -2.0, -3.0, -1.0]), torch.ones(4), torch.tensor([True, True, False, False]),
                         torch.tensor([-2.0, -2.5, -2.0, -2.0]), pairs.mismatched, pairs.ref_mismatched)
    objective = kto(beta=0.5)
    assert float(objective(pairs).loss) == pytest.approx(float(objective(rows).loss), abs=1e-7)


def test_separation_is_the_fraction_of_pairs_ranked_right():
    rewards = torch.tensor([0.5, -1.0, 2.0, 0.5, 0.0, 3.0, -2.0])
    desirable = torch.tensor([True, False, True, False, True, False, False])
    good = [r for r, d in zip(rewards.tolist(), desirable.tolist(), strict=True) if d]
    bad = [r for r, d in zip(rewards.tolist(), desirable.tolist(), strict=True) if not d]
    expected = sum(1.0 if g > b else 0.5 if g == b else 0.0 for g in good for b in bad) / (len(good) * len(bad))
    assert float(unpaired.separation(rewards, desirable)) == pytest.approx(expected)
    assert float(unpaired.separation(torch.zeros(4), desirable[:4])) == 0.5  # the policy equals its reference
    assert math.isnan(float(unpaired.separation(rewards[:1], desirable[:1])))  # one kind only


def test_partners_are_other_rows_and_fixed_by_the_seed():
    partner = unpaired.partners(50, seed=3)
    assert sorted(partner) == list(range(50)) and all(p != i for i, p in enumerate(partner))
    assert partner == unpaired.partners(50, seed=3) != unpaired.partners(50, seed=4)


# ------------------------------------------------------------------ the `unpaired` file schema


@pytest.fixture(scope="module")
def registry() -> rlhfkit.Registry:
    reg = rlhfkit.Registry()
    reg.extend(file_plugin.rlhfkit_components())
    return reg


def load(registry, path, **settings):
    return registry.build(ref("dataset")(name="file", path=str(path), schema="unpaired", **settings), None)


def test_unpaired_schema_reads_labels_as_users_write_them(registry, tmp_path):
    records = [{"prompt": "Say hi.", "completion": "Hi!", "label": True},
               {"prompt": "Say hi.", "completion": "Go away.", "label": False},
               {"prompt": "2+2=", "completion": " 4", "label": 1},
               {"prompt": "2+2=", "completion": " 5", "label": 0},
               {"prompt": "Name a colour.", "completion": "Blue.", "label": " Yes"},
               {"prompt": "Name a colour.", "completion": "Seven.", "label": "FALSE", "id": 17}]
    file = tmp_path / "feedback.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = load(registry, file).rows()
    assert rows[0] == Feedback("Say hi.", "Hi!", True)
    assert [r.desirable for r in rows] == [True, False, True, False, True, False]
    csv = tmp_path / "thumbs.csv"
    csv.write_text("question,answer,thumbs_up\nSay hi.,Hi!,true\nSay hi.,Go away.,0\n")
    rows = load(registry, csv, columns={"question": "prompt", "answer": "completion", "thumbs_up": "label"}).rows()
    assert rows == [Feedback("Say hi.", "Hi!", True), Feedback("Say hi.", "Go away.", False)]


@pytest.mark.parametrize("label", ["maybe", 2, 0.5, None])
def test_a_broken_label_names_the_file_row_and_field(registry, tmp_path, label):
    file = tmp_path / "feedback.jsonl"
    file.write_text(json.dumps({"prompt": "p", "completion": "c", "label": True}) + "\n"
                    + json.dumps({"prompt": "p", "completion": "c", "label": label}) + "\n")
    with pytest.raises(DataError) as error:
        load(registry, file).rows()
    message = str(error.value)
    assert "feedback.jsonl line 2: field 'label'" in message
    assert "true (desirable) or false (undesirable)" in message
    skipped = load(registry, file, on_error="skip")
    assert len(skipped.rows()) == 1 and skipped.skipped == 1


def test_a_missing_label_column_is_one_error(registry, tmp_path):
    file = tmp_path / "feedback.jsonl"
    file.write_text(json.dumps({"prompt": "p", "completion": "c", "thumbs": 1}) + "\n")
    with pytest.raises(DataError, match="no column for label: schema 'unpaired' needs prompt, completion, label"):
        load(registry, file).rows()


# ------------------------------------------------------------------ the built-in splits


@pytest.mark.parametrize(("task_class", "config_class"), [(ReviewsTask, ReviewsConfig),
                                                          (KnowledgeTask, KnowledgeConfig)])
def test_builtin_unpaired_splits(task_class, config_class):
    task = task_class(config_class())
    threshold = task.config.desirable_threshold
    rows = task.split("unpaired")
    assert len(rows) == task.config.preference_size and all(isinstance(r, Feedback) for r in rows)
    assert rows == task_class(config_class()).split("unpaired")  # generated, deterministic
    noisy, clean = task.split("unpaired-eval"), task.split("unpaired-gold")
    assert [(r.prompt, r.completion) for r in noisy] == [(r.prompt, r.completion) for r in clean]
    scores = task.gold_score([r.prompt for r in clean], [r.completion for r in clean])
    assert [r.desirable for r in clean] == [s > threshold for s in scores]
    # labels: Bradley-Terry against the threshold, like the preference split's noise
    scores = task.gold_score([r.prompt for r in rows], [r.completion for r in rows])
    expected = sum(sigmoid((s - threshold) / task.config.label_temperature) for s in scores)
    desirable = sum(r.desirable for r in rows)
    assert abs(desirable - expected) < 3 * math.sqrt(len(rows) / 4)
    assert 0.2 * len(rows) < desirable < 0.8 * len(rows)  # unbalanced is fine, one-sided is not


# ------------------------------------------------------------------ end to end

KTO = str(RECIPES / "kto.yaml")
TINY_KTO = [
    *TINY_SFT, "stages.sft.trainer.max_steps=20", "stages.kto.trainer.max_steps=4", "stages.kto.trainer.batch_size=8",
    "stages.kto.trainer.micro_batch_size=4", "stages.kto.trainer.log_every_n_steps=1", "stages.kto.algorithm.lr=1e-3",
    "stages.kto.eval_data.limit=16", "stages.kto.eval_prompts.limit=8", "stages.kto.algorithm.max_new_tokens=8",
    "stages.kto.data.limit=64", "stages.kto.objective.desirable_weight=1.0",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """SFT, then KTO on the reviews task's unpaired split, reference on the fly."""
    root = tmp_path_factory.mktemp("kto")
    result = cli("run", KTO, *TINY_KTO, f"run.dir={root / 'run'}", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def _from_its_sft(tiny_run, name: str):
    """A run directory holding the tiny run's finished SFT stage, so only KTO runs."""
    out = tiny_run / name
    shutil.copytree(tiny_run / "run" / "sft", out / "sft")
    return out


def test_kto_trains_on_unpaired_rows(tiny_run):
    stage = tiny_run / "run" / "kto"
    rows = read_metrics(stage / "metrics.csv")
    losses = column(rows, "train/dpo/loss")
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[1] == pytest.approx(0.5, abs=1e-5)  # Δ = z0 = 0 at the start: 1 − σ(0) for every row
    assert column(rows, "train/kto/z0")[1] == 0.0
    for name in ("rewards/desirable", "rewards/undesirable", "rewards/margin", "kl/implicit"):
        assert len(column(rows, f"train/{name}")) == 4, name
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["before_rewards/auc"] == 0.5 and summary["before_rewards/margin"] == 0.0
    assert {"rewards/auc", "rewards/desirable", "rewards/undesirable", "gold", "before_gold"} <= summary.keys()


def test_precomputed_reference_gives_the_same_run(tiny_run):
    out = _from_its_sft(tiny_run, "precompute")
    result = cli("run", KTO, *TINY_KTO, f"run.dir={out}", "stages.kto.algorithm.reference_logps=precompute",
                 cwd=tiny_run)
    assert result.returncode == 0, result.stdout + result.stderr
    on_the_fly = read_metrics(tiny_run / "run" / "kto" / "metrics.csv")
    precomputed = read_metrics(out / "kto" / "metrics.csv")
    # summed log-probs (~50 nats in float32) differ in their last bits with the batch's padding
    for name, tolerance in (("train/dpo/loss", 1e-6), ("train/kto/z0", 1e-6), ("train/rewards/margin", 1e-5)):
        for step, value in column(on_the_fly, name).items():
            assert column(precomputed, name)[step] == pytest.approx(value, abs=tolerance), (name, step)


def test_a_pair_objective_refuses_unpaired_rows(tiny_run):
    out = _from_its_sft(tiny_run, "refused")
    result = cli("run", KTO, *TINY_KTO, f"run.dir={out}", "stages.kto.objective=ipo", cwd=tiny_run)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # the recipe check refuses it: without an objective tagged "unpaired" the data slot takes pairs only
    assert ("stages.kto.data: dataset 'builtin' gives unpaired labelled completions (Feedback), but the dpo "
            "algorithm's 'data' takes preference pairs") in " ".join(result.stderr.split())
