"""The verifier rewards (rlhfkit.plugins.rewards.verify, verifier): answer extraction,
numeric / symbolic / exact / regex comparison, timeouts, format checks, bad settings."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

import rlhfkit
from rlhfkit import StageContext, UserError, ref
from rlhfkit.plugins.rewards.verify import extract, numeric, same

PLUGINS = rlhfkit.load_plugins()
RULES = ["boxed", "answer-line", "hash", "last-number"]


def build(kind_name: str, **settings):
    return StageContext(registry=PLUGINS.registry, stage_dir=None).build(ref("reward")(name=kind_name, **settings))


@pytest.mark.parametrize("text,expected", [
    ("so the total is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} at first, then \\boxed{2}", "2"),                 # the last box
    ("\\boxed{x^{2}+1}", "x^{2}+1"),                                # nested braces
    ("\\boxed{unbalanced and 7", "7"),                              # an unbalanced box: the next rule
    ("The answer is 42.", "42"),
    ("Final answer: $\\frac{3}{4}$", "\\frac{3}{4}"),
    ("answer: \\boxed{5} apples", "5"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("3 apples and then 7 pears", "7"),
    ("-3.5 degrees", "-3.5"),
    ("no digits here", None),
    ("", None),
])
def test_extraction(text, expected):
    assert extract(text, RULES) == expected


def test_extraction_by_a_users_pattern():
    assert extract("<answer> 12 </answer> <answer>13</answer>", ["regex:<answer>\\s*(.*?)\\s*</answer>"]) == "13"
    assert extract("nothing", ["regex:<answer>(.*)</answer>", "whole"]) == "nothing"


@pytest.mark.parametrize("answer,gold,match,expected", [
    # equivalent forms
    ("1/2", "0.5", "numeric", True),
    ("\\frac{1}{2}", "0.5", "numeric", True),
    ("-\\dfrac{3}{4}", "-0.75", "numeric", True),
    ("1,000", "1000", "numeric", True),
    ("1e3", "1000", "numeric", True),
    ("72.0", "72", "numeric", True),
    # units, currency, percent
    ("5 cm", "5", "numeric", True),
    ("$5", "5", "numeric", True),
    ("\\$18", "18", "numeric", True),
    ("12%", "12", "numeric", True),
    ("12%", "0.12", "numeric", True),
    ("90^\\circ", "90", "numeric", False),     # not a number form numeric knows; symbolic does below
    # wrong but close, malformed
    ("41.9", "42", "numeric", False),
    ("42.0000001", "42", "numeric", True),    # within the 1e-6 relative tolerance
    ("42.001", "42", "numeric", False),
    ("1,00", "100", "numeric", False),        # not a thousands separator
    ("abc", "3", "numeric", False),
    ("", "3", "numeric", False),
    (None, "3", "numeric", False),
    ("3/0", "3", "numeric", False),
    # symbolic
    ("2\\sqrt{2}", "\\sqrt{8}", "symbolic", True),
    ("(x+1)^2", "x^2+2x+1", "symbolic", True),
    ("x = 3", "3", "symbolic", True),
    ("\\frac{\\sqrt{3}}{2}", "sqrt(3)/2", "symbolic", True),
    ("\\pi/2", "1.5707963267948966", "symbolic", True),
    ("2x", "x \\cdot 2", "symbolic", True),
    ("3.14", "\\pi", "symbolic", False),
    ("x+1", "x+2", "symbolic", False),
    ("\\frac{1}{", "1", "symbolic", False),
    ("1,000", "1000", "symbolic", True),
    # exact and regex
    ("The Cat.", "the cat", "exact", True),
    ("\\text{Paris}", "paris", "exact", True),
    ("Paris, France", "paris", "exact", False),
    ("42", "4[0-9]", "regex", True),
    ("420", "4[0-9]", "regex", False),
])
def test_comparison_table(answer, gold, match, expected):
    assert same(answer, gold, match) is expected


def test_numeric_reads_the_percent_sign():
    assert numeric("12%") == (12.0, True) and numeric("12") == (12.0, False) and numeric("twelve") is None


def test_the_reward_scores_batches_with_the_rows_answers():
    reward = build("verifier", correct=1.0, wrong=-0.5, no_answer=-1.0)
    responses = ["so \\boxed{2\\sqrt{2}}", "The answer is 41.", "I do not know", "#### 1,000",
                 "x is \\boxed{(x+1)^2}"]
    golds = ["\\sqrt{8}", "42", "3", "Thus 1000 in all.\n#### 1000", "x^2 + 2x + 1"]
    scores = rlhfkit.score_rows(reward, ["q"] * 5, responses, [{"answer": g} for g in golds])
    assert scores.tolist() == [1.0, -0.5, -1.0, 1.0, 1.0]
    reward.close()


def test_a_pathological_answer_times_out_as_wrong_and_the_batch_goes_on(capsys):
    reward = build("verifier", timeout_s=1.0)
    responses = ["answer: 9^9^9^9^9", "answer: 2\\sqrt{2}"]
    started = time.perf_counter()
    scores = reward.score(["q", "q"], responses, [{"answer": "x"}, {"answer": "\\sqrt{8}"}])
    assert time.perf_counter() - started < 30
    assert scores.tolist() == [0.0, 1.0] and reward.timeouts == 1
    assert "took over 1.0 s; scored as wrong" in capsys.readouterr().out
    reward.close()


def test_a_row_without_the_answer_column_is_a_clear_error():
    reward = build("verifier", match="numeric")
    with pytest.raises(UserError, match="has no 'answer' column .*columns: solution.*answer_field"):
        reward.score(["q"], ["\\boxed{1}"], [{"solution": "1"}])


@pytest.mark.parametrize("settings,message", [
    ({"extract": ["box"]}, "unknown extraction rule 'box'"),
    ({"extract": ["regex:("]}, "not a valid regular expression"),
    ({"match": "fuzzy"}, "match"),
    ({"timeout_s": 0}, "timeout_s"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(UserError, match=message):
        build("verifier", **settings)


@pytest.mark.skipif(importlib.util.find_spec("math_verify") is None, reason="the math extra is not installed")
def test_math_verify_backend():
    reward = build("verifier", match="math-verify")
    scores = reward.score(["q"] * 3, ["\\boxed{\\frac{1}{2}}", "\\boxed{0.3}", "The answer is 10%"],
                          [{"answer": "0.5"}, {"answer": "\\frac{1}{3}"}, {"answer": "0.1"}])
    assert scores.tolist() == [1.0, 0.0, 1.0]
    reward.close()


def test_format_reward():
    reward = build("format")
    assert reward.score(["q"] * 3, ["so \\boxed{3}", "3", "\\boxed{}"]).tolist() == [1.0, 0.0, 0.0]
    strict = build("format", pattern=r"<think>.*</think>\s*<answer>.*</answer>", whole=True, penalty=-1.0)
    assert strict.score(["q"] * 2, ["<think>a\nb</think> <answer>3</answer>", "<answer>3</answer>"]).tolist() \
        == [1.0, -1.0]


def test_verifier_and_format_compose():
    reward = build("composite", terms=[{"reward": {"name": "verifier", "match": "numeric"}, "weight": 1.0},
                                       {"reward": "format", "weight": 0.1}])
    scores = rlhfkit.score_rows(reward, ["q"] * 2, ["\\boxed{4}", "4"], [{"answer": "4"}] * 2)
    torch.testing.assert_close(scores, torch.tensor([1.1, 1.0]))
