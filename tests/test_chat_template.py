"""The chat rule (rlhfkit.encode_prompts): conversations go through the tokenizer's chat
template with the generation prompt, text is used as it is unless the policy says
``always``; no doubled BOS; the template's turn end ends responses; the setting travels
with exported tokenizers, so a reward model scores with the rule it was trained with."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tokenizers import processors

import rlhfkit
from rlhfkit import (
    UserError,
    encode_pairs,
    encode_prompts,
    render_prompt,
    set_chat_mode,
    tokenize_preferences,
)
from rlhfkit.plugins.policy.build import build_policy
from rlhfkit.plugins.policy.config import TransformersPolicyConfig
from rlhfkit.plugins.policy.tokenizer import load_tokenizer

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "own-chat-model"
spec = importlib.util.spec_from_file_location("own_chat_fixture", EXAMPLE / "make_fixture.py")
fixture = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fixture)

TEXTS = ["You are a helpful assistant.", "What colour is a lemon?", "A lemon is yellow.", "Hello there."] * 3
CHAT = ({"role": "user", "content": "What colour is a lemon?"},)


def template_ids(tokenizer, messages, **kwargs):
    out = tokenizer.apply_chat_template(list(messages), **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture
def qwen():
    return fixture.build_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture
def llama_like():
    """A tokenizer that adds BOS itself and whose template writes BOS too (Llama's way)."""
    tokenizer = fixture.build_tokenizer(TEXTS + ["<s>"], vocab_size=300)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer.chat_template = "{{ bos_token }}" + fixture.QWEN2_TEMPLATE
    return tokenizer


def test_a_conversation_is_the_template_with_the_generation_prompt(qwen):
    (ids,) = encode_prompts(qwen, [CHAT])
    assert ids == template_ids(qwen, CHAT, add_generation_prompt=True)
    assert qwen.decode(ids).endswith("<|im_start|>assistant\n")
    # text is used as it is
    assert encode_prompts(qwen, ["What colour"]) == [qwen("What colour")["input_ids"]]


def test_no_doubled_bos(llama_like):
    bos = llama_like.bos_token_id
    (chat,) = encode_prompts(llama_like, [CHAT])
    (text,) = encode_prompts(llama_like, ["Hello there."])
    assert chat == template_ids(llama_like, CHAT, add_generation_prompt=True)
    assert chat[0] == bos and chat.count(bos) == 1
    assert text[0] == bos and text.count(bos) == 1


def test_always_wraps_text_as_one_user_message_and_never_refuses_conversations(qwen):
    set_chat_mode(qwen, "always")
    assert encode_prompts(qwen, ["What colour is a lemon?"]) == [template_ids(qwen, CHAT, add_generation_prompt=True)]
    assert encode_prompts(qwen, [""]) == [[]]  # a text row for pretraining has no prompt
    set_chat_mode(qwen, "never")
    with pytest.raises(UserError, match="chat_template setting is 'never'"):
        encode_prompts(qwen, [CHAT])


def test_a_conversation_without_a_template_is_an_error(qwen):
    qwen.chat_template = None
    with pytest.raises(UserError, match="need a chat template"):
        render_prompt(qwen, CHAT)


def test_pairs_and_preferences_end_responses_where_the_template_ends_a_turn(qwen):
    full = template_ids(qwen, CHAT + ({"role": "assistant", "content": "A lemon is yellow."},))
    encoded = encode_pairs(qwen, [CHAT], ["A lemon is yellow."], max_length=128)
    ids = [i for i, a in zip(encoded["input_ids"][0], encoded["attention_mask"][0], strict=True) if a]
    assert ids == full[:-1]  # everything the template writes up to and including <|im_end|>, not the newline
    ((prompt, chosen, _rejected),) = tokenize_preferences(qwen, [CHAT], ["A lemon is yellow."], ["Hello there."])
    assert prompt == template_ids(qwen, CHAT, add_generation_prompt=True)
    assert prompt + chosen + [qwen.eos_token_id] == full[:-1]


def _saved_model(directory: Path, eos: str | None = None) -> Path:
    fixture.build_model(directory)
    if eos is not None:  # a base checkpoint: EOS is <|endoftext|>, the template closes turns with <|im_end|>
        settings = json.loads((directory / "tokenizer_config.json").read_text())
        settings["eos_token"] = eos
        (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    return directory


def test_the_templates_turn_end_becomes_eos(tmp_path, capsys):
    directory = _saved_model(tmp_path / "base", eos="<|endoftext|>")
    assert load_tokenizer(directory).eos_token == "<|endoftext|>"
    policy = build_policy(TransformersPolicyConfig(path=str(directory)), None)
    end = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert policy.tokenizer.eos_token_id == end and policy.model.generation_config.eos_token_id == end
    assert policy.tokenizer.pad_token_id not in (end, None)
    assert "responses end with '<|im_end|>'" in capsys.readouterr().out
    # with the template off, EOS stays the tokenizer's
    plain = build_policy(TransformersPolicyConfig(path=str(directory), chat_template="never"), None)
    assert plain.tokenizer.eos_token == "<|endoftext|>"


def test_the_setting_travels_with_the_export_and_the_reward_model(tmp_path):
    directory = _saved_model(tmp_path / "model")
    policy = build_policy(TransformersPolicyConfig(path=str(directory), chat_template="always"), None)
    policy.export(tmp_path / "export")
    assert rlhfkit.chat_mode(load_tokenizer(tmp_path / "export")) == "always"
    again = build_policy(TransformersPolicyConfig(path=str(tmp_path / "export")), None)  # inherits it
    ids, _mask = again.tokenize_prompts(["What colour is a lemon?"])
    assert ids[0].tolist() == template_ids(again.tokenizer, CHAT, add_generation_prompt=True)
    # a reward model exported with the same tokenizer scores text prompts through the template too
    from transformers import PreTrainedTokenizerFast

    from rlhfkit.plugins.reward_model.scoring import RewardModelSource

    # loaded as RewardModelSource.load loads a reward model's tokenizer
    source = RewardModelSource(torch.nn.Identity(), PreTrainedTokenizerFast.from_pretrained(tmp_path / "export"),
                               64, 8, None)
    encoded = encode_pairs(source.tokenizer, ["What colour is a lemon?"], ["A lemon is yellow."], 64)
    assert encoded["input_ids"][0][:len(ids[0])] == ids[0].tolist()


def test_python_rewards_get_trl_shaped_conversations_and_row_columns(tmp_path):
    (tmp_path / "r.py").write_text(
        "seen = {}\n"
        "def score(prompts, completions, answer, **kwargs):\n"
        "    seen.update(prompts=prompts, completions=completions, answer=answer, kwargs=kwargs)\n"
        "    return [float(a in c[0]['content']) for c, a in zip(completions, answer)]\n"
        "def strict(prompts, completions):\n"
        "    return [0.0] * len(prompts)\n"
        "def needs(prompts, completions, answer):\n"
        "    return [0.0] * len(prompts)\n")
    from rlhfkit.plugins.rewards.python import PythonReward, load_function

    function = load_function(tmp_path / "r.py", "score")
    reward = PythonReward(function, tmp_path / "r.py", "score", batch_size=8)
    fields = [{"answer": "yellow", "id": 1}, {"answer": "red", "id": 2}]
    scores = rlhfkit.score_rows(reward, [CHAT, CHAT], ["A lemon is yellow.", "A lemon is blue."], fields)
    assert scores.tolist() == [1.0, 0.0]
    seen = function.__globals__["seen"]
    assert seen["prompts"] == [list(CHAT)] * 2
    assert seen["completions"][0] == [{"role": "assistant", "content": "A lemon is yellow."}]
    assert seen["answer"] == ["yellow", "red"] and seen["kwargs"] == {"id": [1, 2]}
    # a function that takes no columns is called without them; one that needs a missing one is told
    strict = PythonReward(load_function(tmp_path / "r.py", "strict"), tmp_path / "r.py", "strict", 8)
    assert rlhfkit.score_rows(strict, ["a"], ["b"], [{"answer": "x"}]).tolist() == [0.0]
    needs = PythonReward(load_function(tmp_path / "r.py", "needs"), tmp_path / "r.py", "needs", 8)
    with pytest.raises(UserError, match="called with the keywords prompts, completions"):
        rlhfkit.score_rows(needs, ["a"], ["b"], [{"other": 1}])
