"""The built-in reasoning task: problems, worked solutions, levels, hold-out, gold."""

from __future__ import annotations

import pytest

from rlhfkit import Prompt
from rlhfkit.plugins.tasks import ReasoningConfig, ReasoningTask
from rlhfkit.plugins.tasks.reasoning import final_answer, parse_prompt, prompt_text, result, solution

PROBLEM = (7, (("add", 5), ("multiply", 2), ("subtract", 9)))


@pytest.fixture(scope="module")
def task():
    return ReasoningTask(ReasoningConfig(sft_size=300, prompts_size=300, eval_size=100, preference_size=100,
                                         ranking_size=50, pretrain_size=50))


def test_a_problem_by_hand():
    text = prompt_text(PROBLEM)
    assert text == "question : start with 7 , add 5 , multiply by 2 , subtract 9 . what is the result ?"
    assert solution(PROBLEM) == "7 plus 5 is 12 . 12 times 2 is 24 . 24 minus 9 is 15 . answer : 15 ."
    assert result(PROBLEM) == 15 and parse_prompt(text) == PROBLEM
    # a slip of +1 at the second step is carried on to the answer
    assert solution(PROBLEM, (1, 1)) == "7 plus 5 is 12 . 12 times 2 is 25 . 25 minus 9 is 16 . answer : 16 ."


def test_gold_is_the_last_answer(task):
    prompt = prompt_text(PROBLEM)
    responses = [solution(PROBLEM), "answer : 15 .", "answer : 3 . no , answer : 15 .", "answer : 16 .",
                 "15", ""]
    assert task.gold_score([prompt] * 6, responses) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert final_answer("answer : 4 . answer : 9 .") == 9 and final_answer("no answer") is None


def test_levels_sft_coverage_and_prompt_fields(task):
    sft_levels = {len(parse_prompt(r.prompt)[1]) for r in task.split("sft")}
    assert sft_levels == {1, 2}
    prompts = task.split("prompts")
    levels = [r.fields["level"] for r in prompts]
    assert set(levels) == {1, 2, 3, 4, 5} and levels.count(5) == 60  # every level, equally
    for row in prompts[:50]:
        assert isinstance(row, Prompt) and row.fields["answer"] == str(result(parse_prompt(row.prompt)))
        assert len(parse_prompt(row.prompt)[1]) == row.fields["level"]


def test_numbers_stay_in_range_and_in_the_vocabulary(task):
    words = set(task.vocabulary())
    for split in task.splits:
        for row in task.split(split)[:100]:
            for text in vars(row).values():
                for word in (text if isinstance(text, str) else " ".join(t for t in text if isinstance(t, str))
                             if isinstance(text, tuple) else "").split():
                    assert word in words, (split, word)


def test_held_out_problems_never_appear_in_training_splits(task):
    train = {r.prompt for s in ("sft", "prompts", "preference", "ranking", "unpaired") for r in task.split(s)}
    held_out = {r.prompt for s in ("sft-eval", "prompts-eval", "preference-eval") for r in task.split(s)}
    assert held_out and not train & held_out
    assert all(task.held_out(parse_prompt(p)) for p in held_out)


def test_pairs_put_a_correct_solution_against_a_slip(task):
    for pair in task.split("preference-gold")[:30]:
        problem = parse_prompt(pair.prompt)
        assert final_answer(pair.chosen) == result(problem) != final_answer(pair.rejected)


def test_evaluate_reports_accuracy_per_level(task):
    easy, hard = (3, (("add", 1),)), PROBLEM
    metrics = task.evaluate([prompt_text(easy), prompt_text(easy), prompt_text(hard)],
                            [solution(easy), "answer : 0 .", "i give up"])
    assert metrics["gold"] == pytest.approx(1 / 3) and metrics["format"] == pytest.approx(2 / 3)
    assert metrics["level1/accuracy"] == 0.5 and metrics["level1/count"] == 2
    assert metrics["level3/accuracy"] == 0.0 and metrics["level3/count"] == 1


def test_the_same_seed_gives_the_same_data():
    a = ReasoningTask(ReasoningConfig(seed=3, prompts_size=20)).split("prompts")
    b = ReasoningTask(ReasoningConfig(seed=3, prompts_size=20)).split("prompts")
    assert a == b and a != ReasoningTask(ReasoningConfig(seed=4, prompts_size=20)).split("prompts")
