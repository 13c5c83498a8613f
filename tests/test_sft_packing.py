"""SFT packing and the LM head at trained columns only: best-fit-decreasing packs, the
packed layout by hand, the same NLL and gradients as unpacked rows with full logits for
every model family and attention implementation, the fallback for a model that ignores
the mask, and a packed stage end to end."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import RECIPES, TINY_SFT, cli, column, read_metrics
from tiny_models import IgnoresMask, tiny_causal_lm

from rlhfkit import PromptCompletion, layout_packed, pack_by_length, packed_mask
from rlhfkit.plugins.policy.tokenizer import build_word_tokenizer
from rlhfkit.plugins.sft.encoding import SFTEncoder, check_layouts, token_nll

WORDS = ["a", "b", "c", "d", "e", "f", "g"]
ROWS = [PromptCompletion("a b c", "d e"), PromptCompletion("g", "a b c d"), PromptCompletion("b c d e f g", "a"),
        PromptCompletion("", "e f g"), PromptCompletion("f e", "d c b a g")]
FAMILIES = ["gpt2", "opt", "llama", "qwen2"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


def test_best_fit_decreasing_by_hand():
    # longest first: 0 and 3 (5) open bins 0 and 1; 1 (3) opens bin 2; 2 (2) fits bin 2 (room 3);
    # 4 (1) fits bins 0, 1 and 2 exactly: the first of them
    assert pack_by_length([5, 3, 2, 5, 1], 6) == [[0, 4], [3], [1, 2]]
    assert pack_by_length([7, 2, 2], 6) == [[0], [1, 2]]  # too long for any bin: a bin of its own
    assert pack_by_length([], 6) == []
    lengths = [3, 9, 4, 1, 7, 2, 6, 5, 8, 5]
    packs = pack_by_length(lengths, 10)
    assert sorted(i for p in packs for i in p) == list(range(10))
    assert all(sum(lengths[i] for i in p) <= 10 for p in packs) and len(packs) == 5  # 50 tokens in 5 full bins


def test_the_packed_layout_by_hand():
    out = layout_packed([[([1, 2], [3]), ([], [4, 5])], [([6], [7, 8, 9])]], pad=0)
    assert out["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert out["position_ids"] == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert out["segment"] == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]]
    assert out["labels_mask"] == [[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]]
    mask = packed_mask(torch.tensor(out["segment"]))[:, 0].int().tolist()
    assert mask[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert mask[1][4] == [1, 1, 1, 1, 0]  # padding attends to real columns (its output is never read)


def _model(tokenizer, family, attention):
    return tiny_causal_lm(tokenizer, family, attention)


@pytest.mark.parametrize("train_on_prompt", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_and_kept_logits_equal_full_logits_of_separate_rows(tokenizer, family, attention,
                                                                        train_on_prompt):
    model = _model(tokenizer, family, attention)
    encoder = SFTEncoder(tokenizer, 16, train_on_prompt)
    encoder.tokenize_all(ROWS)
    packs = encoder.packs()
    assert len(packs) < len(ROWS)  # some rows share a pack
    separate, packed = encoder.separate_rows(list(range(len(ROWS)))), encoder.packed_rows(packs)
    layouts = {"separate, full logits": (separate, False, False), "separate, kept logits": (separate, True, False),
               "packed, kept logits": (packed, True, False), "packed, full logits": (packed, False, False),
               "separate, trimmed": (separate, True, True), "packed, trimmed": (packed, True, True)}
    results = {}
    for name, (batch, keep, trim) in layouts.items():
        model.zero_grad()
        nll, tokens = token_nll(model, batch, keep_logits=keep, trim=trim)
        nll.backward()
        results[name] = (nll.detach(), int(tokens), [p.grad.clone() for p in model.parameters()])
    # words + EOS, less the first token of a completion with no prompt (nothing predicts it)
    expected_tokens = sum(len(tokenizer(r.completion)["input_ids"]) + 1 - (not r.prompt) for r in ROWS)
    if train_on_prompt:  # every token but each example's first
        expected_tokens = sum(len(tokenizer((r.prompt + " " + r.completion).strip())["input_ids"]) for r in ROWS)
    nll, tokens, grads = results["separate, full logits"]
    assert tokens == expected_tokens
    for name, (other, other_tokens, other_grads) in results.items():
        assert other_tokens == tokens, name
        torch.testing.assert_close(other, nll, rtol=1e-5, atol=1e-4, msg=name)
        for x, y in zip(other_grads, grads, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * max(1.0, float(y.abs().max())), msg=name)
    # the mask matters: one segment for the whole row lets examples see each other
    batch = packed
    leaky = dict(batch, segment=(batch["segment"] > 0).long(),
                 position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))
    with torch.no_grad():
        assert abs(float(token_nll(model, leaky)[0]) - float(nll)) > 1e-2


def test_the_lm_head_runs_only_at_trained_columns(tokenizer):
    model = _model(tokenizer, "llama", "sdpa")
    widths = []
    model.lm_head.register_forward_hook(lambda module, args, out: widths.append(tuple(args[0].shape)))
    encoder = SFTEncoder(tokenizer, 16, False)
    encoder.tokenize_all(ROWS)
    batch = encoder.separate_rows(list(range(len(ROWS))))
    _, tokens = token_nll(model, batch)
    assert widths == [(int(tokens), 32)]  # not [5, L, 32]


def test_a_model_that_ignores_the_mask_trains_packs_as_separate_rows(tokenizer):
    model = _model(tokenizer, "gpt2", "sdpa").train()
    for candidate, packed in ((model, True), (IgnoresMask(model, ignore_positions=True), False)):
        encoder = SFTEncoder(tokenizer, 16, False)
        encoder.tokenize_all(ROWS)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert check_layouts(encoder, candidate, [0, 1, 2, 3], packing=True, trim=True) == (True, True)
        assert encoder.packed is packed
        assert [str(w.message) for w in caught if "packed rows" in str(w.message)] == ([] if packed else [
            next(str(w.message) for w in caught)])
    assert model.training  # the check restores the mode
    # separate rows of the packs' examples: the same loss
    batch = encoder(encoder.packs())
    assert "segment" not in batch and batch["input_ids"].shape[0] == len(ROWS)


def test_a_batch_of_examples_is_laid_out_padding_free_unless_asked_not_to(tokenizer):
    encoder = SFTEncoder(tokenizer, 16, False)
    encoder.tokenize_all(ROWS)
    indices = [4, 0, 2, 1, 3]
    batch = encoder(indices)  # the step's examples, best-fit decreasing into rows of up to 16 tokens
    assert batch.keys() == {"input_ids", "position_ids", "segment", "labels_mask"}
    assert batch["input_ids"].shape[0] == len(encoder.packs(indices)) < len(indices)
    assert int(batch["segment"].max(1).values.sum()) == len(indices)  # every example once
    chunks = encoder.micro_batches(indices, 2)  # micro_batch_size examples per forward (packed where they fit)

    def examples(batch):
        return int(batch["segment"].max(1).values.sum()) if "segment" in batch else batch["input_ids"].shape[0]

    assert [examples(c) for c in chunks] == [2, 2, 1]
    encoder.padding_free = False
    assert encoder(indices).keys() == {"input_ids", "attention_mask", "labels_mask"}
    assert encoder(indices)["input_ids"].shape[0] == len(indices)


def test_padding_free_trains_as_padded_rows(tmp_path):
    """The same examples per step, laid out padding-free or padded: the same losses."""
    losses = {}
    for padding_free in ("true", "false"):
        out = tmp_path / padding_free
        args = ["run", str(RECIPES / "sft.yaml"), *TINY_SFT, f"run.dir={out}", "stages.sft.trainer.max_steps=4",
                f"stages.sft.algorithm.padding_free={padding_free}", "stages.sft.algorithm.sample_prompts=0",
                "stages.sft.policy.architecture.dropout=0.0",
                "stages.sft.trainer.log_every_n_steps=1"]
        result = cli(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        losses[padding_free] = column(read_metrics(out / "sft" / "metrics.csv"), "train/loss")
    assert sorted(losses["true"]) == [1, 2, 3, 4]
    for step, loss in losses["false"].items():
        assert losses["true"][step] == pytest.approx(loss, rel=1e-4)


def test_a_packed_stage_trains_on_packs(tmp_path):
    out = tmp_path / "runs" / "packed"
    args = ["run", str(RECIPES / "sft.yaml"), *TINY_SFT, f"run.dir={out}", "stages.sft.trainer.max_steps=12",
            "stages.sft.algorithm.packing=true", "stages.sft.trainer.batch_size=4",
            "stages.sft.trainer.micro_batch_size=4"]
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "sft" / "summary.json").read_text())
    assert summary["perplexity_after"] < summary["perplexity_before"] / 2
    losses = column(read_metrics(out / "sft" / "metrics.csv"), "train/loss")
    assert sorted(losses) == list(range(1, 13)) and losses[12] < losses[1]


def test_the_last_layer_is_not_trimmed_under_gradient_checkpointing(tokenizer):
    from rlhfkit.plugins.policy.trim import can_trim

    model = _model(tokenizer, "llama", "sdpa")
    assert can_trim(model)
    model.gradient_checkpointing_enable()  # its recomputation would run the untrimmed MLP
    assert not can_trim(model)
