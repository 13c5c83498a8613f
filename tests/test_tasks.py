"""The built-in tasks plugin: generation, splits, gold scores, feedback labels, the dataset."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import BaseModel, ConfigDict

import rlhfkit
import rlhfkit.plugins.tasks as tasks_plugin
from rlhfkit import (
    ComponentSpec,
    DataError,
    Feedback,
    Preference,
    Prompt,
    PromptCompletion,
    Ranking,
    Registry,
    StageContext,
    UserError,
)
from rlhfkit.plugins.tasks import (
    BuiltinDataConfig,
    KnowledgeConfig,
    KnowledgeTask,
    ReviewsConfig,
    ReviewsTask,
)
from rlhfkit.plugins.tasks.common import sigmoid
from rlhfkit.plugins.tasks.knowledge_world import (
    ATTRIBUTES,
    EXISTS,
    IDK,
    STATEMENTS,
    TAUGHT,
    answer,
    question,
)
from rlhfkit.plugins.tasks.reviews_text import gold_components

TASKS = {"reviews": (ReviewsTask, ReviewsConfig), "knowledge": (KnowledgeTask, KnowledgeConfig)}


@pytest.fixture(scope="module", params=sorted(TASKS))
def task(request):
    """A freshly generated task with default settings (bypassing the process-wide cache)."""
    task_class, config_class = TASKS[request.param]
    return task_class(config_class())


@pytest.fixture(scope="module")
def knowledge() -> KnowledgeTask:
    return KnowledgeTask(KnowledgeConfig())


@pytest.fixture(scope="module")
def reviews() -> ReviewsTask:
    return ReviewsTask(ReviewsConfig())


def texts(row) -> list[str]:
    if isinstance(row, PromptCompletion | Feedback):
        return [row.prompt, row.completion]
    if isinstance(row, Preference):
        return [row.prompt, row.chosen, row.rejected]
    if isinstance(row, Ranking):
        return [row.prompt, *row.completions]
    assert isinstance(row, Prompt)
    return [row.prompt]


def gold_of(task, prompt: str, response: str) -> float:
    return task.gold_score([prompt], [response])[0]


# ------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", sorted(TASKS))
def test_same_seed_same_data_and_another_seed_other_data(name):
    task_class, config_class = TASKS[name]
    first, again = task_class(config_class()), task_class(config_class())
    other = task_class(config_class(seed=1))
    for split in first.splits:
        assert first.split(split) == again.split(split), split
    assert first.split("sft") != other.split("sft")
    assert first.vocabulary() == again.vocabulary()


def test_splits_have_their_row_types_and_sizes(task):
    assert isinstance(task, rlhfkit.Task)
    c = task.config
    expected = {"sft": (PromptCompletion, c.sft_size), "sft-eval": (PromptCompletion, c.eval_size),
                "pretrain": (PromptCompletion, c.pretrain_size),
                "preference": (Preference, c.preference_size),
                "preference-eval": (Preference, c.eval_size),
                "preference-gold": (Preference, c.eval_size),
                "ranking": (Ranking, c.ranking_size), "prompts": (Prompt, c.prompts_size),
                "prompts-eval": (Prompt, c.eval_size)}
    assert set(expected) <= set(task.splits)
    for split, (row_type, size) in expected.items():
        rows = task.split(split)
        assert len(rows) == size and all(isinstance(r, row_type) for r in rows), split
    assert all(r.prompt == "" for r in task.split("pretrain"))
    assert all(len(r.completions) == c.ranking_k for r in task.split("ranking"))


def test_sizes_follow_the_settings():
    small = ReviewsTask(ReviewsConfig(sft_size=7, eval_size=3, ranking_k=3, ranking_size=5))
    assert len(small.split("sft")) == 7 and len(small.split("prompts-eval")) == 3
    assert all(len(r.completions) == 3 for r in small.split("ranking"))


def test_text_is_short_lowercase_words(task):
    for row in task.split("sft") + task.split("sft-eval"):
        assert 3 <= len(row.prompt.split()) <= 10
        assert 5 <= len(row.completion.split()) <= 20
    for split in task.splits:
        for row in task.split(split):
            for text in texts(row):
                assert text == text.lower() and " ".join(text.split()) == text, text


def test_every_word_is_in_the_vocabulary(task):
    vocabulary = task.vocabulary()
    assert len(vocabulary) == len(set(vocabulary))
    assert 100 <= len(vocabulary) <= 400
    known = set(vocabulary)
    for split in task.splits:
        for row in task.split(split):
            for text in texts(row):
                assert set(text.split()) <= known, (split, text)


def test_sft_eval_is_disjoint_from_sft(task):
    assert not set(task.split("sft")) & set(task.split("sft-eval"))


def test_unknown_split_lists_the_splits(task):
    with pytest.raises(UserError, match="sft-eval") as error:
        task.split("nope")
    assert "nope" in str(error.value)


# ------------------------------------------------------------------- reviews


@pytest.mark.parametrize(("response", "expected"), [
    # sentiment 1.5*tanh(2/2), ending +0.5, relevance +0.5 (names the camera)
    ("this camera is great . i love this camera .", 1.5 * math.tanh(1) + 0.5 + 0.5),
    # sentiment 1.5*tanh(3/2), ending, two camera aspects +0.5 (product not named)
    ("the lens is very sharp and bright . the zoom is excellent .",
     1.5 * math.tanh(1.5) + 0.5 + 0.5),
    # 3 repeats (-1.5), no "." (-0.5), 4 words (2 short: -0.5)
    ("great great great great", 1.5 * math.tanh(2) - 1.5 - 0.5 - 0.5),
    # other product named (-0.5), one camera aspect (+0.25)
    ("the battery is terrible . the phone is awful .", -1.5 * math.tanh(1) + 0.5 - 0.5 + 0.25),
    # one rejected sentence (-0.5), 5 words (-0.25), names the camera (+0.5)
    ("is camera the great .", 1.5 * math.tanh(0.5) - 0.5 + 0.5 - 0.25 + 0.5),
    ("", -0.5 - 1.0),
])
def test_reviews_gold_formula(reviews, response, expected):
    assert gold_of(reviews, "write a review of the camera :", response) == pytest.approx(expected)


def test_reviews_demonstrations_are_fluent_with_balanced_sentiment(reviews):
    rows = reviews.split("sft")
    parts = [gold_components(r.prompt, r.completion) for r in rows]
    assert all(p["grammar"] == 0 and p["repetition"] == 0 and p["ending"] == 0.5 for p in parts)
    sentiment = [p["sentiment"] for p in parts]
    assert abs(sum(sentiment) / len(sentiment)) < 0.2
    assert sum(s > 0 for s in sentiment) > 0.25 * len(rows)
    assert sum(s < 0 for s in sentiment) > 0.25 * len(rows)


def test_reviews_evaluate_reports_mean_gold_and_components(reviews):
    prompts = ["review the lamp :"] * 2
    responses = ["this lamp is great .", "great great"]
    metrics = reviews.evaluate(prompts, responses)
    assert metrics["gold"] == pytest.approx(sum(reviews.gold_score(prompts, responses)) / 2)
    components = [k for k in metrics if k.startswith("gold/")]
    assert len(components) == 6
    assert sum(metrics[k] for k in components) == pytest.approx(metrics["gold"])
    assert metrics["words"] == 3.5  # (5 + 2) / 2


# ------------------------------------------------------------------- knowledge


def test_knowledge_gold_is_plus_one_zero_minus_four(knowledge):
    for entity in knowledge.entities.values():  # unknown entities have hidden true values too
        prompt = question(entity, "pet")
        true = entity.facts["pet"]
        wrong = next(v for v in ATTRIBUTES["pet"] if v != true)
        assert gold_of(knowledge, prompt, answer(entity, "pet", true)) == 1
        spaced = "  " + answer(entity, "pet", true).replace(" ", "  ")
        assert gold_of(knowledge, prompt, spaced) == 1
        assert gold_of(knowledge, prompt, IDK) == 0
        assert gold_of(knowledge, prompt, answer(entity, "pet", wrong)) == -4
        assert gold_of(knowledge, prompt, "i do not know") == -4
        assert gold_of(knowledge, prompt, true) == -4
    with pytest.raises(DataError, match="not a question"):
        knowledge.gold_score(["question : what is the pet of nobody ?"], [IDK])


def test_knowledge_groups_and_names(knowledge):
    c = knowledge.config
    groups = [e.group for e in knowledge.entities.values()]
    sizes = {"known": c.num_known, "sft-only": c.num_sft_only, "idk-train": c.num_idk_train,
             "unknown-train": c.num_unknown_train, "unknown-eval": c.num_unknown_eval}
    assert {g: groups.count(g) for g in sizes} == sizes
    names = set(knowledge.entities)
    other_words = set(knowledge.vocabulary()) - names
    assert not names & other_words
    assert not names & set(ReviewsTask(ReviewsConfig()).vocabulary())
    assert all(len(name) >= 6 for name in names)


def test_unknown_answers_never_appear_anywhere(knowledge):
    every_text = {t for split in knowledge.splits for row in knowledge.split(split)
                  for t in texts(row)}
    for entity in knowledge.entities.values():
        if entity.group in TAUGHT:
            continue
        for attribute, value in entity.facts.items():
            assert answer(entity, attribute, value) not in every_text
            statement = STATEMENTS[attribute].format(name=entity.name, value=value)
            assert statement not in every_text


@pytest.mark.parametrize("introduce", [True, False])
def test_untaught_names_appear_in_training_only_as_existing_or_unknown(introduce):
    task = KnowledgeTask(KnowledgeConfig(introduce_all_entities=introduce))
    training = [r for split in ("sft", "pretrain") for r in task.split(split)]
    mentioned = set()
    for row in training:
        for entity in task.entities.values():
            if entity.group in TAUGHT:
                continue
            if entity.name in row.completion.split():
                assert row.completion == EXISTS.format(name=entity.name)
                mentioned.add(entity.name)
            if entity.name in row.prompt.split():
                assert entity.group == "idk-train" and row.completion == IDK
    untaught = {e.name for e in task.entities.values() if e.group not in TAUGHT}
    assert mentioned == (untaught if introduce else set())


def test_knowledge_held_out_facts_are_taught_only_by_pretraining(knowledge):
    sft_prompts = {r.prompt for r in knowledge.split("sft")}
    pretrain = {r.completion for r in knowledge.split("pretrain")}
    for row in knowledge.split("sft-eval"):
        assert row.prompt not in sft_prompts
        if row.completion != IDK:
            _, attribute, _, name, _, value, _ = row.completion.split()
            paraphrase = STATEMENTS[attribute].format(name=name, value=value)
            assert row.completion in pretrain or paraphrase in pretrain


@pytest.mark.parametrize("num_sft_only", [30, 0])
def test_sft_only_facts_are_taught_by_sft_alone(num_sft_only):
    task = KnowledgeTask(KnowledgeConfig(num_sft_only=num_sft_only))
    sft = {r.completion for r in task.split("sft")}
    pretrain = {r.completion for r in task.split("pretrain")}
    new = [e for e in task.entities.values() if e.group == "sft-only"]
    assert len(new) == num_sft_only
    for entity in new:
        for attribute, value in entity.facts.items():
            assert answer(entity, attribute, value) in sft
        assert not {t for t in pretrain if entity.name in t.split()} - {
            EXISTS.format(name=entity.name)}


def test_knowledge_unknown_pools_are_separate(knowledge):
    def groups(split):
        return {knowledge.entities[t.split()[-2]].group for row in knowledge.split(split)
                for t in [row.prompt]}
    assert groups("preference") == {"known", "unknown-train"}
    assert groups("ranking") == {"known", "unknown-train"}
    assert groups("prompts") == {"known", "unknown-train"}
    assert groups("preference-eval") == {"known", "unknown-eval"}
    assert groups("prompts-eval") == {"known", "unknown-eval"}
    assert groups("prompts-known") == {"known"}
    assert groups("prompts-unknown") == {"unknown-eval"}
    assert groups("sft") == {"known", "sft-only", "idk-train"}
    assert groups("sft-eval") == {"known", "idk-train"}
    idk_rows = sum(r.completion == IDK for r in knowledge.split("sft"))
    assert idk_rows == round(knowledge.config.idk_fraction * knowledge.config.sft_size)


def test_knowledge_evaluate_counts_outcomes_per_group(knowledge):
    known = next(e for e in knowledge.entities.values() if e.group == "known")
    unknown = next(e for e in knowledge.entities.values() if e.group == "unknown-eval")
    wrong = next(v for v in ATTRIBUTES["city"] if v != unknown.facts["city"])
    prompts = [question(known, "city"), question(known, "food"), question(unknown, "city"),
               question(unknown, "food")]
    responses = [answer(known, "city", known.facts["city"]), IDK,
                 answer(unknown, "city", wrong), IDK]
    metrics = knowledge.evaluate(prompts, responses)
    assert metrics["gold"] == pytest.approx((1 + 0 - 4 + 0) / 4)
    assert metrics["known/correct"] == 0.5 and metrics["known/idk"] == 0.5
    assert metrics["unknown/wrong"] == 0.5 and metrics["unknown/idk"] == 0.5
    assert metrics["known/count"] == 2 and metrics["unknown/correct"] == 0


# ------------------------------------------------------------------- feedback


def test_preference_label_noise_matches_bradley_terry(task):
    rows = task.split("preference")
    chosen = task.gold_score([r.prompt for r in rows], [r.chosen for r in rows])
    rejected = task.gold_score([r.prompt for r in rows], [r.rejected for r in rows])
    assert all(c != r for c, r in zip(chosen, rejected, strict=True))  # no exact ties
    flipped = sum(c < r for c, r in zip(chosen, rejected, strict=True)) / len(rows)
    temperature = task.config.label_temperature
    flip_chances = [sigmoid(-abs(c - r) / temperature)
                    for c, r in zip(chosen, rejected, strict=True)]
    expected = sum(flip_chances) / len(rows)
    spread = math.sqrt(max(expected * (1 - expected), 1e-4) / len(rows))
    assert abs(flipped - expected) < 4 * spread + 1e-3
    assert all(r.margin is None for r in rows)


def test_preference_gold_relabels_the_eval_pairs_without_noise(task):
    noisy, gold = task.split("preference-eval"), task.split("preference-gold")
    assert [(r.prompt, {r.chosen, r.rejected}) for r in noisy] == \
        [(r.prompt, {r.chosen, r.rejected}) for r in gold]
    chosen = task.gold_score([r.prompt for r in gold], [r.chosen for r in gold])
    rejected = task.gold_score([r.prompt for r in gold], [r.rejected for r in gold])
    assert all(c > r for c, r in zip(chosen, rejected, strict=True))


def test_margins_when_asked():
    task = ReviewsTask(ReviewsConfig(preference_margins=True, preference_size=50))
    rows = task.split("preference")
    assert all(r.margin is not None and r.margin >= 0 for r in rows)
    assert all(r.margin / 0.25 == pytest.approx(round(r.margin / 0.25)) for r in rows)


def test_ranks_follow_rounded_gold_with_ties(task):
    precision = task.config.tie_precision
    ties = 0
    for row in task.split("ranking"):
        levels = [round(g / precision) for g in
                  task.gold_score([row.prompt] * len(row.completions), row.completions)]
        assert len(set(levels)) > 1 and min(row.ranks) == 0
        assert sorted(set(row.ranks)) == list(range(len(set(levels))))  # dense ranks
        for i in range(len(levels)):
            for j in range(len(levels)):
                assert (levels[i] > levels[j]) == (row.ranks[i] < row.ranks[j])
        ties += len(set(row.ranks)) < len(row.ranks)
    assert ties > 0


# ------------------------------------------------------------------- components


@pytest.fixture(scope="module")
def registry() -> Registry:
    registry = Registry()
    registry.extend(tasks_plugin.rlhfkit_components())
    return registry


def builtin(**settings):
    return rlhfkit.ref("dataset")(name="builtin", **settings)


def test_builtin_dataset_through_a_registry(registry):
    dataset = registry.build(builtin(task="reviews", split="sft"), None)
    assert isinstance(dataset, rlhfkit.Dataset) and isinstance(dataset.task, rlhfkit.Task)
    assert len(dataset.rows()) == 2000
    limited = registry.build(builtin(task={"name": "knowledge", "seed": 2}, split="ranking",
                                     limit=5), None)
    assert len(limited.rows()) == 5 and limited.task.config.seed == 2
    # Generated once per process: equal settings give the same task object.
    assert registry.build(builtin(task="reviews", split="prompts"), None).task is dataset.task


def test_builtin_dataset_rejects_an_unknown_split(registry):
    # Caught when the recipe is validated, with the path to the setting.
    problems = registry.resolve(builtin(task="reviews", split="nope"), "data")
    assert [path for path, _, _ in problems] == ["data.split"]
    assert "preference-gold" in problems[0][1]
    with pytest.raises(UserError, match="prompts-unknown"):
        registry.build(builtin(task={"name": "knowledge", "seed": 1}, split="prompts-unkown"),
                       None)


class _ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _ToyTask:
    splits: ClassVar[dict[str, str]] = {"only": "the one split"}

    def split(self, name):
        return (Prompt("hello"),)


def test_builtin_dataset_serves_tasks_of_other_plugins(tmp_path: Path):
    registry = Registry()
    registry.extend(tasks_plugin.rlhfkit_components())
    registry.add(ComponentSpec(kind="task", name="toy", config=_ToyConfig,
                               factory=lambda config, context: _ToyTask(), doc="a toy"))
    context = StageContext(registry=registry, stage="sft", stage_dir=tmp_path)
    assert registry.build(builtin(task="toy", split="only"), context).rows() == (Prompt("hello"),)
    with pytest.raises(UserError, match="only"):  # checked when built
        registry.build(builtin(task="toy", split="nope"), context)
    with pytest.raises(UserError, match="inside a run"):
        registry.build(builtin(task="toy", split="only"), None)


def test_tasks_are_shared_through_the_stage_context(registry, tmp_path: Path):
    context = StageContext(registry=registry, stage="reward", stage_dir=tmp_path)
    first = registry.build(builtin(task="knowledge", split="preference"), context)
    second = registry.build(builtin(task="knowledge", split="prompts"), context)
    assert first.task is second.task
    assert any(key[:2] == ("task", "knowledge") for key in context.cache)


def test_component_configs_document_every_field_and_forbid_extras():
    for spec in tasks_plugin.rlhfkit_components():
        for name, field in spec.config.model_fields.items():
            assert field.description, f"{spec.name}.{name}"
        assert spec.config.model_config.get("extra") == "forbid"
    ReviewsConfig()
    KnowledgeConfig()
    with pytest.raises(Exception, match="split"):
        BuiltinDataConfig(task="reviews")
