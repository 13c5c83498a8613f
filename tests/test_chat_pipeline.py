"""A user's own chat model and TRL-style data, end to end (docs/examples/own-chat-model):
SFT on conversations -> DPO on conversational implicit-prompt pairs -> GRPO with a reward
function from rewards.py -> evaluate, on a Qwen2 model with a byte-level BPE tokenizer and
a ChatML template. Every stage must feed the model the same prompt ids for the same
prompt: what ``apply_chat_template(..., add_generation_prompt=True)`` gives."""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

import rlhfkit
from rlhfkit.plugins.dpo import module as dpo_module
from rlhfkit.plugins.policy.model import TransformersPolicy
from rlhfkit.plugins.sft import module as sft_module
from rlhfkit.runner import run_recipe

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "own-chat-model"
PLUGINS = rlhfkit.load_plugins()


def load_fixture_module():
    spec = importlib.util.spec_from_file_location("own_chat_fixture", EXAMPLE / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _caller() -> str:
    files = [frame.filename.replace("\\", "/") for frame in inspect.stack()]
    for marker, name in (("plugins/ppo/experience.py", "grpo"), ("plugins/evaluate/report.py", "evaluate"),
                         ("plugins/sft/module.py", "sft samples"), ("plugins/dpo/", "dpo samples")):
        if any(marker in f for f in files):
            return name
    return "other"


def test_sft_dpo_grpo_evaluate_feed_the_chat_template_ids(tmp_path, monkeypatch):
    load_fixture_module().main(tmp_path)
    monkeypatch.chdir(tmp_path)
    seen: dict[str, list[list[int]]] = {}
    sft_rows: list[tuple[list[int], list[int]]] = []

    policy_sample = TransformersPolicy.sample  # what every engine-less and hf-engine sampling goes through

    def spy_generate(self, prompt_ids, prompt_mask, **kwargs):
        for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist(), strict=True):
            seen.setdefault(_caller(), []).append([i for i, m in zip(ids, mask, strict=True) if m])
        return policy_sample(self, prompt_ids, prompt_mask, **kwargs)

    sequence_logps = dpo_module.sequence_logps

    def spy_logps(model, batch, *args, **kwargs):
        rows = seen.setdefault("dpo batch", [])
        if "segment" in batch:  # one shared-prompt row per pair
            for ids, segment in zip(batch["input_ids"].tolist(), batch["segment"].tolist(), strict=True):
                rows.append([i for i, s in zip(ids, segment, strict=True) if s == 1])
        else:
            for ids, attention, labels in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                              batch["labels_mask"].tolist(), strict=True):
                rows.append([i for i, a, lab in zip(ids, attention, labels, strict=True) if a and not lab])
        return sequence_logps(model, batch, *args, **kwargs)

    token_nll = sft_module.token_nll

    def spy_nll(model, batch, **kwargs):
        for ids, attention, labels in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                          batch["labels_mask"].tolist(), strict=True):
            sft_rows.append(([i for i, a in zip(ids, attention, strict=True) if a],
                             [i for i, lab in zip(ids, labels, strict=True) if lab]))
        return token_nll(model, batch, **kwargs)

    monkeypatch.setattr(TransformersPolicy, "sample", spy_generate)
    monkeypatch.setattr(dpo_module, "sequence_logps", spy_logps)
    monkeypatch.setattr(sft_module, "token_nll", spy_nll)

    summaries = run_recipe(PLUGINS.load_recipe(tmp_path / "recipe.yaml"), PLUGINS)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")  # as a user would load it
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"

    def template_ids(messages, **kwargs):
        out = tokenizer.apply_chat_template(messages, **kwargs)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def prompts_of(file):
        rows = [json.loads(line) for line in (tmp_path / "data" / file).read_text().splitlines()]
        return [r["prompt"] if "prompt" in r else (r.get("messages") or r["chosen"])[:-1] for r in rows]

    expected = {tuple(template_ids(p, add_generation_prompt=True))
                for file in ("sft.jsonl", "preferences.jsonl", "prompts.jsonl", "prompts-eval.jsonl")
                for p in prompts_of(file)}
    for where in ("dpo batch", "grpo", "evaluate"):
        assert len(seen.get(where, [])) >= 16, (where, sorted(seen))
        wrong = [tokenizer.decode(ids) for ids in seen[where] if tuple(ids) not in expected]
        assert not wrong, (where, wrong[:2])
    eval_prompts = prompts_of("prompts-eval.jsonl")
    assert {tuple(ids) for ids in seen["evaluate"]} == {tuple(template_ids(p, add_generation_prompt=True))
                                                       for p in eval_prompts}

    # SFT trains on the conversation as the template writes it, ending with its turn end
    # <|im_end|> (EOS) and without the newline the template puts after it; no BOS is added.
    conversations = [json.loads(line)["messages"] for line in (tmp_path / "data" / "sft.jsonl").read_text().splitlines()]
    full = {tuple(template_ids(c)[:-1]) for c in conversations}
    assert sft_rows and all(tuple(ids) in full for ids, _ in sft_rows)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(labels[-1] == end and labels.count(end) == 1 for _, labels in sft_rows)

    # the reward function received the rows' other columns; the pipeline learned the task
    assert summaries["grpo"]["steps"] == 40
    report = json.loads((tmp_path / "runs" / "own-chat" / "report" / "summary.json").read_text())
    assert report["sft/proxy"] >= 0.5 and report["grpo/proxy"] >= 0.5
    assert torch.isfinite(torch.tensor(report["grpo/kl"]))
