"""The in-place KV-cache sampling loop (rlhfkit.plugins.policy.decode) draws the tokens
transformers ``generate`` draws, with the log-probs the trainer's forward gives."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import rlhfkit
from rlhfkit import StageContext, ref
from rlhfkit.plugins.policy.decode import InPlaceLayer, in_place_cache, sample_in_place
from rlhfkit.plugins.ppo.rollout import response_logprobs

PLUGINS = rlhfkit.load_plugins()
PROMPTS = ["the blender was", "i bought this lamp", "worst printer", "my new mattress is", "great"] * 3


def build_policy(family: str, lora: bool = False):
    torch.manual_seed(0)
    settings = {"lora": {"r": 4}} if lora else {}
    policy = StageContext(registry=PLUGINS.registry, stage_dir=None).build(ref("policy")(
        name="transformers", tokenizer={"task": "reviews"}, dropout=0.0,
        architecture={"family": family, "layers": 2, "hidden": 32, "heads": 2}, **settings))
    with torch.no_grad():  # sharper distributions: early EOS on some rows, long tails on others
        for parameter in policy.model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(3)
    return policy


SETTINGS = [{"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
            {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9},
            {"do_sample": True, "temperature": 1.4, "top_k": 0, "top_p": 0.8},
            {"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0}]


@pytest.mark.parametrize("family,lora", [("gpt2", False), ("llama", False), ("qwen2", False), ("opt", False),
                                         ("gpt2", True)])
@pytest.mark.parametrize("settings", SETTINGS, ids=["plain", "top-k-p", "hot-top-p", "greedy"])
def test_in_place_samples_are_generates(family, lora, settings):
    policy = build_policy(family, lora)
    ids, mask = policy.tokenize_prompts(PROMPTS)
    assert (mask == 0).any()  # left padding is exercised
    out = {}
    for cache in ("dynamic", "in-place"):
        torch.manual_seed(7)
        out[cache] = policy.sample(ids, mask, max_new_tokens=12, cache=cache, **settings)
    assert torch.equal(out["in-place"].response_ids, out["dynamic"].response_ids)
    assert torch.equal(out["in-place"].response_mask, out["dynamic"].response_mask)
    torch.testing.assert_close(out["in-place"].logprobs, out["dynamic"].logprobs, atol=0, rtol=0)
    lengths = out["in-place"].response_mask.sum(1)
    if settings is SETTINGS[0]:
        assert lengths.min() < lengths.max()  # rows finish at different steps


def test_in_place_logprobs_are_the_trainers_forward():
    policy = build_policy("qwen2")
    ids, mask = policy.tokenize_prompts(PROMPTS)
    torch.manual_seed(3)
    generation = policy.sample(ids, mask, max_new_tokens=10, do_sample=True, temperature=0.8)
    rollout = type("Rollout", (), {"prompt_ids": ids, "prompt_mask": mask, "response_ids": generation.response_ids,
                                   "response_mask": generation.response_mask})()
    trainer = response_logprobs(policy.model, rollout, 0.8)
    keep = generation.response_mask.bool()
    torch.testing.assert_close(generation.logprobs[keep], trainer[keep], atol=2e-5, rtol=0)
    assert (generation.logprobs[~keep] == 0).all()


def test_the_cache_is_written_in_place_and_refuses_overflow():
    policy = build_policy("llama")
    cache = in_place_cache(policy.model.config, capacity=5)
    assert all(isinstance(layer, InPlaceLayer) for layer in cache.layers) and len(cache.layers) == 2
    keys = torch.randn(2, 2, 3, 16)
    cache.update(keys, keys + 1, 0)
    buffer = cache.layers[0].key_buffer
    k2, _ = cache.update(keys[:, :, :2], keys[:, :, :2], 0)
    assert k2.data_ptr() == buffer.data_ptr() and k2.shape[2] == 5 and cache.get_seq_length(0) == 5
    torch.testing.assert_close(k2[:, :, :3], keys)
    with pytest.raises(RuntimeError, match="KV cache full"):
        cache.update(keys[:, :, :1], keys[:, :, :1], 0)


def test_sampling_stops_once_every_row_has_ended():
    """Rows end at steps 1 and 3: three forwards, PAD after the first row's EOS."""
    eos, pad, vocab = 2, 0, 6
    calls = []

    def model(input_ids, **kwargs):
        calls.append(input_ids.shape)
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], vocab), -30.0)
        step = len(calls)
        logits[0, -1, eos] = 30.0
        logits[1, -1, eos if step == 3 else 4] = 30.0
        return SimpleNamespace(logits=logits)

    sampled = sample_in_place(model, None, torch.tensor([[5, 5], [0, 5]]), torch.tensor([[1, 1], [0, 1]]),
                              max_new_tokens=8, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              eos_token_id=eos, pad_token_id=pad, logprobs=True)
    assert sampled.tokens.tolist() == [[eos, pad, pad], [4, 4, eos]]
    assert calls == [(2, 2), (2, 1), (2, 1)]
    torch.testing.assert_close(sampled.logprobs[1], torch.zeros(3), atol=1e-6, rtol=0)
