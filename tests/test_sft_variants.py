"""SFT variants in-process: chat messages from a local file on a LoRA Llama-style model,
and plain LM pretraining (train_on_prompt) on text rows with an OPT model."""

from __future__ import annotations

import json

import pytest
import torch

import rlhfkit
from rlhfkit.runner import run_recipe

PLUGINS = rlhfkit.load_plugins()

RECIPE = """
run: {{name: variant, dir: {run_dir}}}
stages:
  sft:
    algorithm: {{name: sft, lr: 5.0e-3, warmup_steps: 2, sample_prompts: 1, sample_max_new_tokens: 4,
                 train_on_prompt: {train_on_prompt}}}
    policy:
      name: transformers
      architecture: {{family: {family}, layers: 1, hidden: 32, heads: 2, max_positions: 64}}
      tokenizer: {{task: reviews}}
      {lora}
    data: {{name: file, path: {data}, schema: {schema}}}
    trainer: {{max_steps: 6, batch_size: 4, micro_batch_size: 2, log_every_n_steps: 1}}
"""


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(tmp_path, **fields):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(run_dir=tmp_path / "run", **fields))
    summaries = run_recipe(PLUGINS.load_recipe(recipe), PLUGINS)
    return summaries["sft"], tmp_path / "run" / "sft"


def test_messages_with_lora_on_llama(tmp_path):
    conversation = [{"role": "user", "content": "review the printer :"},
                    {"role": "assistant", "content": "the printer is great ."}]
    data = write_rows(tmp_path / "chat.jsonl", [{"messages": conversation}] * 8)
    summary, stage_dir = run(tmp_path, family="llama", data=data, schema="messages", train_on_prompt="false",
                             lora="lora: {r: 4, alpha: 8, dropout: 0.0}")
    assert summary["steps"] == 6
    metrics = (stage_dir / "metrics.csv").read_text()
    assert "train/loss" in metrics
    # the export is a plain model with the adapters merged in
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stage_dir / "export")
    assert not any("lora" in name for name, _ in model.named_parameters())
    # samples record the prompt as the data gave it: the conversation before the reply
    sample = json.loads((stage_dir / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"] == conversation[:1]


def test_pretraining_on_text_with_opt_trains_on_every_token(tmp_path):
    data = write_rows(tmp_path / "text.jsonl", [{"text": "the printer is great ."}] * 8)
    summary, _ = run(tmp_path, family="opt", data=data, schema="text", train_on_prompt="true", lora="")
    assert summary["steps"] == 6 and summary["train_loss"] > 0


def test_prompt_tokens_are_not_learned_by_default():
    """The SFT loss counts completion tokens (and EOS) only, shifted by one position."""
    from rlhfkit.plugins.policy import build_policy
    from rlhfkit.plugins.sft.module import SFT

    reference = rlhfkit.ref("policy")(name="transformers", architecture={"layers": 1, "hidden": 16, "heads": 2},
                                      tokenizer={"task": "reviews"})
    assert not PLUGINS.registry.resolve(reference)
    context = rlhfkit.StageContext(registry=PLUGINS.registry, stage="t", stage_dir=None)
    policy = build_policy(reference.config, context)
    policy.model.eval()  # no dropout: both forwards must see the same network
    batch = policy.tokenize_pairs(["review the printer :"], ["the printer is great ."], max_length=32)
    logits = policy.model(input_ids=batch["input_ids"]).logits
    labels = batch["input_ids"][0, 1:]
    logp = torch.log_softmax(logits[0, :-1], -1).gather(-1, labels[:, None])[:, 0]
    completion_tokens = 5 + 1  # five words and EOS
    expected = -logp[-completion_tokens:].sum()

    module = SFT.__new__(SFT)
    torch.nn.Module.__init__(module)
    module.model = policy.model
    module.keep_logits, module.trim = True, True  # the LM head and last MLP only where a completion token is predicted
    nll, tokens = module._token_nll(batch)
    assert tokens == completion_tokens
    assert nll.item() == pytest.approx(expected.item(), rel=1e-6)
