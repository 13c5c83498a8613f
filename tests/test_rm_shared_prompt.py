"""The reward model's shared-prompt forward: a prompt and its K responses in one row, each
response masked from the others, gives the scores, LM-term NLLs and gradients of one row
per response, for every model family and attention implementation; rows are tokenized
once; a model that ignores the mask falls back to separate rows with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import IgnoresMask, tiny_causal_lm

from rlhfkit import Ranking, encode_pairs, layout_rankings, shared_prompt_mask, tokenize_rankings
from rlhfkit.plugins.policy.tokenizer import build_word_tokenizer
from rlhfkit.plugins.reward_model.encoding import RankingEncoder, group_scores
from rlhfkit.plugins.reward_model.scoring import ScalarHead

WORDS = ["a", "b", "c", "d", "e", "f", "g"]
RANKINGS = [Ranking("a b c", ("d e", "f", "g a b c"), (0, 1, 1)), Ranking("g", ("a b c d", "e f g a b"), (1, 0)),
            Ranking("b c d e f g", ("a", "b c", "d", "e f"), (2, 0, 1, 3))]
FAMILIES = ["gpt2", "opt", "llama", "qwen2"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


def test_the_layout_by_hand(tokenizer):
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in WORDS}
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    groups = tokenize_rankings(tokenizer, ["a b", "c"], [["c", "d e"], ["f"]])
    out = layout_rankings(groups, eos, pad, 16, shared=True)
    a, b, c, d, e, f = (ids[w] for w in "abcdef")
    # every response whole, EOS included: its score is read at its last token
    assert out["input_ids"] == [[a, b, c, eos, d, e, eos], [c, f, eos, pad, pad, pad, pad]]
    assert out["position_ids"] == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 2, 0, 0, 0, 0]]
    assert out["segment"] == [[1, 1, 2, 2, 3, 3, 3], [1, 2, 2, 0, 0, 0, 0]]
    assert out["ends"] == [[3, 6], [2, 0]]  # a missing second response: column 0, marked invalid by the caller
    assert out["labels"][0] == [[c, eos, 0], [d, e, eos]] and out["source"][0] == [[1, 2, 0], [1, 4, 5]]
    assert out["scored"][0] == [[1, 1, 0], [1, 1, 1]] and out["scored"][1] == [[1, 1, 0], [0, 0, 0]]
    # one row per response, a short group filled with copies of its first response: encode_pairs's rows
    separate = layout_rankings(groups, eos, pad, 16, shared=False)
    assert separate == encode_pairs(tokenizer, ["a b", "a b", "c", "c"], ["c", "d e", "f", "f"], 16)
    # over max_length, the prompt is cut to fit the group's longest response, for every response
    cut = layout_rankings(tokenize_rankings(tokenizer, ["a b c d"], [["e", "f g a"]]), eos, pad, 6, shared=False)
    assert [row[:2] for row in cut["input_ids"]] == [[c, d]] * 2
    mask = shared_prompt_mask(torch.tensor(out["segment"][:1]))[0, 0].int()
    assert mask[4].tolist() == [1, 1, 0, 0, 1, 0, 0]  # response 2 sees the prompt and itself, not response 1


def _model(tokenizer, family, attention):
    return tiny_causal_lm(tokenizer, family, attention), ScalarHead(32)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_equals_separate_rows_in_scores_nll_and_gradient(tokenizer, family, attention):
    model, head = _model(tokenizer, family, attention)
    encoder = RankingEncoder(tokenizer, 64, shared=True)
    valid = torch.tensor([[j < len(r.completions) for j in range(4)] for r in RANKINGS])
    weights = torch.arange(1.0, 13.0).view(3, 4) * valid
    results = []
    # the reference last: separate rows, the full last layer; then the shared layout and the trimmed last layer
    for shared, trim in ((True, False), (True, True), (False, True), (False, False)):
        model.zero_grad()
        head.zero_grad()
        scores, nll = group_scores(model, head, encoder(RANKINGS, shared=shared), with_nll=True, trim=trim)
        ((scores * weights).sum() + (nll * weights).sum()).backward()
        grads = [p.grad.clone() for p in [*model.parameters(), *head.parameters()]]
        results.append((scores.detach()[valid], nll.detach()[valid], grads))
    sb, nb, gb = results[-1]
    for sa, na, ga in results[:-1]:
        torch.testing.assert_close(sa, sb, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(na, nb, rtol=1e-5, atol=1e-4)
        for x, y in zip(ga, gb, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * max(1.0, float(y.abs().max())))
    sa = results[0][0]
    # the mask matters: letting every response see the earlier ones changes the later scores
    batch = encoder(RANKINGS, shared=True)
    leaky = dict(batch, segment=torch.where(batch["segment"] > 1, 2, batch["segment"]))
    with torch.no_grad():
        leaked = group_scores(model, head, leaky, with_nll=False)[0][valid]
    assert (leaked - sa).abs().max() > 1e-2


class _Wrapped(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.base_model = IgnoresMask(model.base_model)
        self.config = model.config

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()


def test_a_model_that_ignores_the_mask_falls_back_to_separate_rows(tokenizer):
    model, head = _model(tokenizer, "gpt2", "sdpa")
    model.train()

    def check(candidate):
        encoder = RankingEncoder(tokenizer, 64, shared=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            encoder.check(candidate, head, RANKINGS, torch.device("cpu"))
        return encoder.shared, [str(w.message) for w in caught]

    assert check(model) == (True, [])
    kept, messages = check(_Wrapped(model))
    assert not kept
    assert "does not honour the shared-prompt attention mask" in messages[0] and "share_prompt: false" in messages[0]
    assert model.training  # the check restores the mode


def test_training_rows_are_tokenized_once(tokenizer):
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner
            self.eos_token_id, self.pad_token_id = inner.eos_token_id, inner.pad_token_id

        def __call__(self, texts, **kwargs):
            calls.append(len(texts))
            return self.inner(texts, **kwargs)

    encoder = RankingEncoder(Counting(tokenizer), 64, shared=True)
    encoder.tokenize_all(RANKINGS, chunk=2)
    assert calls == [5, 2, 4, 1]  # per chunk: every response at once, then the prompts
    fresh = RankingEncoder(tokenizer, 64, shared=True)
    for shared in (True, False):
        batch = encoder([RANKINGS[2], RANKINGS[0]], shared=shared, indices=[2, 0])
        expected = fresh([RANKINGS[2], RANKINGS[0]], shared=shared)
        assert batch.keys() == expected.keys() and all(torch.equal(batch[k], expected[k]) for k in batch)
    assert len(calls) == 4


def test_the_trimmed_last_layer_runs_its_mlp_at_the_scored_tokens_only(tokenizer):
    from rlhfkit.plugins.policy.trim import last_mlp
    from rlhfkit.plugins.reward_model.encoding import trim_agrees

    for family, expected in (("gpt2", True), ("llama", True), ("qwen2", True), ("opt", False)):
        model, head = _model(tokenizer, family, "sdpa")
        mlp = last_mlp(model)
        assert (mlp is not None) is expected, family
        batch = RankingEncoder(tokenizer, 64, shared=True)(RANKINGS)
        assert trim_agrees(model, head, batch, with_nll=False) is expected
        if mlp is None:
            continue
        inputs = []
        first = next(m for m in mlp.modules() if m is not mlp and hasattr(m, "weight"))  # the MLP's first matmul
        handle = first.register_forward_hook(lambda module, args, out, seen=inputs: seen.append(tuple(args[0].shape)))
        group_scores(model, head, batch, with_nll=False, trim=True)
        valid = torch.tensor([[j < len(r.completions) for j in range(4)] for r in RANKINGS])
        group_scores(model, head, batch | {"valid": valid}, with_nll=False, trim=True)
        handle.remove()
        # 9 completions, one EOS each (and column 0 of the rows with fewer than 4, unless told which are missing)
        assert inputs == [(11, 32), (9, 32)]  # not [3, L, 32]
        assert "forward" not in mlp.__dict__  # the class's forward again


def test_reward_models_and_critics_get_the_fused_gelu_and_adamw(exports, tmp_path):
    """The policy's fused defaults reach every model the RL pipeline trains or scores with:
    the reward-model stage's backbone, the reward-model reward source
    (``AutoModelForSequenceClassification``) and a critic built on a reward-model export;
    the reward model and the critic train with the fused AdamW."""
    from transformers.activations import GELUTanh, NewGELUActivation

    import rlhfkit
    from rlhfkit import StageContext
    from rlhfkit.plugins.reward_model.scoring import RewardModelSource

    def gelus(model):
        kinds = {type(m) for m in model.modules()}
        return GELUTanh in kinds, NewGELUActivation in kinds

    registry = rlhfkit.load_plugins().registry
    context = StageContext(registry=registry, stage="t", stage_dir=tmp_path)
    source = context.build(rlhfkit.ref("reward")(name="reward-model", path=str(exports["rm"])))
    assert isinstance(source, RewardModelSource)
    assert type(source.model).__name__ == "GPT2ForSequenceClassification" and gelus(source.model) == (True, False)

    estimator = context.build(rlhfkit.ref("estimator")(
        name="gae", critic={"name": "transformers", "path": str(exports["rm"])}, head_init="reward-model"))

    class Algorithm:  # what GAE.bind reads
        policy = None

    estimator.bind(Algorithm())
    assert gelus(estimator.critic) == (True, False)

    stage = tmp_path / "rm.yaml"
    stage.write_text(
        f"run: {{name: rm, dir: {tmp_path / 'run'}}}\n"
        f"stages:\n  rm:\n    algorithm: {{name: reward-model}}\n"
        f"    backbone: {{name: transformers, path: {exports['sft']}}}\n"
        f"    objective: pairwise\n    data: {{name: builtin, task: reviews, split: preference, limit: 8}}\n"
        f"    trainer: {{max_steps: 1, batch_size: 8, micro_batch_size: 8}}\n")
    plugins = rlhfkit.load_plugins()
    recipe = plugins.load_recipe(stage)
    spec = recipe.stages[0]
    module = plugins.registry.build(spec.algorithm, StageContext(
        registry=plugins.registry, stage="rm", stage_dir=tmp_path / "run" / "rm", seed=0, exports={},
        slots=spec.slots, trainer=spec.trainer, recipe_dir=tmp_path))
    assert gelus(module.model) == (True, False)
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] and {id(p) for g in optimizer.param_groups for p in g["params"]} >= {
        id(p) for p in module.head.parameters()}
    # the critic's group, as the ppo module adds it to the policy's AdamW: fused too
    assert rlhfkit.adamw([(estimator.critic.parameters(), estimator.optimizer)], 10)["optimizer"].defaults["fused"]
