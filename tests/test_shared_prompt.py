"""DPO's shared-prompt forward: prompt, chosen and rejected in one row, the rejected
response masked from the chosen one, gives the log-probs and gradients of two separate
rows, for every model family and attention implementation."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import IgnoresMask, tiny_causal_lm
from transformers import AutoModelForCausalLM

from rlhfkit import Preference, encode_pairs, encode_preferences, shared_prompt_mask
from rlhfkit.plugins.dpo.logps import PairEncoder, sequence_logps, shared_logps
from rlhfkit.plugins.policy.build import architecture_config
from rlhfkit.plugins.policy.config import ArchitectureConfig
from rlhfkit.plugins.policy.tokenizer import build_word_tokenizer

WORDS = ["a", "b", "c", "d", "e", "f", "g"]
PAIRS = [Preference("a b c", "d e", "f"), Preference("g", "a b c d", "e f g a b"),
         Preference("b c d e f g", "a", "b c")]
# prompts long enough that the response columns are fewer than the row's: the LM head runs on those only
LONG_PAIRS = [Preference("a b c d e f g a b", "d e", "f"), Preference("g f e d c b a g", "a b c", "e f")]
TOKENS = {"short": [3, 5, 2, 2, 6, 3], "long": [3, 4, 2, 3]}


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


def encode(tokenizer, rows, shared, max_length=64):
    encoded = encode_preferences(tokenizer, [r.prompt for r in rows], [r.chosen for r in rows],
                                 [r.rejected for r in rows], max_length, shared=shared)
    return {name: torch.tensor(values) for name, values in encoded.items()}


def test_the_layout_by_hand(tokenizer):
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in WORDS}
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out = encode_preferences(tokenizer, ["a b"], ["c"], ["d e"], 16, shared=True)
    # each response's last token (here both EOS) is a target only, not an input column
    assert out["input_ids"] == [[ids["a"], ids["b"], ids["c"], ids["d"], ids["e"]]]
    assert out["position_ids"] == [[0, 1, 2, 2, 3]]
    assert out["segment"] == [[1, 1, 2, 3, 3]]
    assert out["chosen_labels"] == [[ids["c"], eos]] and out["chosen_source"] == [[1, 2]]
    assert out["rejected_labels"] == [[ids["d"], ids["e"], eos]] and out["rejected_source"] == [[1, 3, 4]]
    assert out["chosen_scored"] == [[1, 1]] and out["rejected_scored"] == [[1, 1, 1]]
    # two pairs: right padding of the row and of the shorter label lists
    two = encode_preferences(tokenizer, ["a b", "a"], ["c", "b c d"], ["d e", "e f"], 16, shared=True)
    assert two["input_ids"][1] == [ids["a"], ids["b"], ids["c"], ids["d"], ids["e"], ids["f"]]
    assert two["input_ids"][0] == out["input_ids"][0] + [pad] and two["segment"][0][-1] == 0
    assert two["chosen_labels"][0] == [ids["c"], eos, 0, 0] and two["chosen_scored"][0] == [1, 1, 0, 0]
    assert two["rejected_labels"][1] == [ids["e"], ids["f"], eos] and two["rejected_source"][1] == [0, 4, 5]
    # separate rows, no cut: encode_pairs's layout
    separate = encode_preferences(tokenizer, ["a b", "a"], ["c", "b c d"], ["d e", "e f"], 16, shared=False)
    assert separate == encode_pairs(tokenizer, ["a b", "a"] * 2, ["c", "b c d", "d e", "e f"], 16)


def test_both_responses_of_a_pair_see_the_same_cut_prompt(tokenizer):
    """Over max_length, the prompt is cut so it fits with the longer response, for both."""
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in WORDS}
    out = encode_preferences(tokenizer, ["a b c d"], ["e"], ["f g a"], 6, shared=False)
    # rejected + EOS = 4 tokens, so 2 prompt tokens for both rows (encode_pairs would give chosen 4)
    assert [row[:2] for row in out["input_ids"]] == [[ids["c"], ids["d"]]] * 2
    assert [sum(row) for row in out["labels_mask"]] == [2, 4]
    shared = encode_preferences(tokenizer, ["a b c d"], ["e"], ["f g a"], 6, shared=True)
    assert shared["segment"] == [[1, 1, 2, 3, 3, 3]]  # less each response's last token
    # a response longer than max_length leaves no prompt: its first token has no predictor
    empty = encode_preferences(tokenizer, ["a"], ["b c d"], ["e"], 3, shared=True)
    assert empty["segment"] == [[2, 2, 3]]
    assert empty["chosen_scored"] == [[0, 1, 1]] and empty["rejected_scored"] == [[0, 1]]


def test_the_mask_by_hand():
    segment = torch.tensor([[1, 2, 3, 3, 0]])
    allowed = shared_prompt_mask(segment)[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 0, 1, 0, 0],   # rejected: the prompt and itself, not the chosen token
                       [1, 0, 1, 1, 0],
                       [1, 1, 1, 1, 0]]   # padding: to real tokens only (its outputs are never read)
    additive = shared_prompt_mask(segment, torch.float32)[0, 0]
    assert additive[2, 1] == torch.finfo(torch.float32).min and additive[2, 2] == 0


FAMILIES = ["gpt2", "opt", "llama", "qwen2"]


@pytest.mark.parametrize("rows", ["short", "long"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_equals_separate_rows_in_value_and_gradient(tokenizer, family, attention, rows):
    pairs = PAIRS if rows == "short" else LONG_PAIRS
    model = tiny_causal_lm(tokenizer, family, attention)
    results = []
    # shared rows, and the last layer's MLP only at the columns read (trim), against separate full rows (last)
    for shared, trim in ((True, False), (True, True), (False, True), (False, False)):
        model.zero_grad()
        logps, tokens = sequence_logps(model, encode(tokenizer, pairs, shared), trim=trim)
        (logps * torch.arange(1.0, 2 * len(pairs) + 1)).sum().backward()
        results.append((logps.detach(), tokens, [p.grad.clone() for p in model.parameters()]))
    b, tb, gb = results[-1]
    # equal to float rounding (oneDNN may pick kernels by memory alignment: last bits differ between runs).
    # The shared path sums each gradient over fewer, differently ordered terms (its LM head sees only the
    # response columns), so the absolute tolerance scales with the tensor's largest entry (up to ~30 here)
    for a, ta, ga in results[:-1]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
        assert ta.tolist() == tb.tolist() == TOKENS[rows]
        for x, y in zip(ga, gb, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * max(1.0, float(y.abs().max())))
    a = results[0][0]
    # the mask matters: letting the rejected response see the chosen one changes its log-probs
    batch = encode(tokenizer, pairs, True)
    leaky = dict(batch, segment=torch.where(batch["segment"] == 3, 2, batch["segment"]))
    with torch.no_grad():
        c = shared_logps(model, leaky)[0]
    assert (c[3:] - a[3:]).abs().max() > 1e-2


def test_a_model_that_ignores_the_mask_falls_back_to_separate_rows(tokenizer):
    model = tiny_causal_lm(tokenizer, "gpt2").train()

    def check(candidate):
        encoder = PairEncoder(tokenizer, 64, shared=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            encoder.check([candidate], PAIRS, torch.device("cpu"))
        return encoder.shared, [str(w.message) for w in caught]

    assert check(model) == (True, [])
    kept, messages = check(IgnoresMask(model))
    assert not kept
    assert "does not honour the shared-prompt attention mask" in messages[0]
    assert "share_prompt: false" in messages[0]
    assert model.training  # the check restores the mode


def test_training_rows_are_tokenized_once_before_the_steps(tokenizer):
    """PairEncoder.tokenize_all fills the token cache; a step's batch then calls no
    tokenizer and equals a freshly tokenized one, in both layouts."""
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner
            self.eos_token_id, self.pad_token_id = inner.eos_token_id, inner.pad_token_id

        def __call__(self, texts, **kwargs):
            calls.append(len(texts))
            return self.inner(texts, **kwargs)

    encoder = PairEncoder(Counting(tokenizer), 64, shared=True)
    encoder.tokenize_all(PAIRS, chunk=2)
    assert calls == [2, 2, 2, 1, 1, 1]  # prompts, chosen, rejected per chunk of 2 rows
    for shared in (True, False):
        batch = encoder([PAIRS[2], PAIRS[0]], shared=shared, indices=[2, 0])
        expected = encode(tokenizer, [PAIRS[2], PAIRS[0]], shared)
        assert batch.keys() == expected.keys()
        assert all(torch.equal(batch[k], expected[k]) for k in batch)
    assert len(calls) == 6


def test_the_lm_head_runs_only_where_a_response_token_is_predicted(tokenizer):
    """DPO's shared rows and PPO's policy forward ask the model for logits at the columns
    they read (``logits_to_keep``), and get the values full logits would give."""
    from rlhfkit import Rollout, logprobs_from_logits, positions_from_mask
    from rlhfkit.plugins.ppo.rollout import policy_forward

    torch.manual_seed(0)
    config = architecture_config(ArchitectureConfig(family="llama", layers=2, hidden=32, dropout=0.0), tokenizer)
    model = AutoModelForCausalLM.from_config(config).eval()
    widths = []
    model.lm_head.register_forward_hook(lambda module, args, out: widths.append(args[0].shape[1]))
    batch = encode(tokenizer, LONG_PAIRS, True)
    shared_logps(model, batch)
    assert widths == [batch["chosen_source"].shape[1] + batch["rejected_source"].shape[1]] == [7]
    assert batch["input_ids"].shape[1] == 13
    widths.clear()  # short prompts: more response columns than the row's, so full logits
    batch = encode(tokenizer, PAIRS, True)
    shared_logps(model, batch)
    assert widths == [batch["input_ids"].shape[1]]

    prompt = torch.tensor([[0, 4, 5], [6, 7, 8]])   # left-padded (pad id 0 here is only masked)
    rollout = Rollout(prompt_ids=prompt, prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
                      response_ids=torch.tensor([[9, 10], [11, 0]]), response_mask=torch.tensor([[1, 1], [1, 0]]),
                      logprobs=torch.zeros(2, 2), prompts=["", ""], responses=["", ""], group=torch.arange(2),
                      truncated=torch.zeros(2, dtype=torch.bool))
    widths.clear()
    logprobs, _ = policy_forward(model, rollout, temperature=1.0, entropy_grad=False)
    assert widths == [3]   # T + 1 columns: the prompt's last and the response's
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.response_mask], 1)
    full = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, 2:-1]
    expected = logprobs_from_logits(full, rollout.response_ids) * rollout.response_mask
    torch.testing.assert_close(logprobs, expected)
