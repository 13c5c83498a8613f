"""A user's own jsonl of math questions with answers, through SFT then GRPO scored by the
``verifier`` reward (+ ``format``), on a Qwen2 model with a byte-level BPE tokenizer and a
chat template saved as a user's model would be."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from helpers import cli, read_metrics

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "own-chat-model"


def fixture_module():
    spec = importlib.util.spec_from_file_location("own_chat_fixture", EXAMPLE / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def answer_forms(value: int, rng: random.Random) -> str:
    """The answer column as users' data write it: plain, decimal, a fraction, GSM8K's '####'."""
    return rng.choice([str(value), f"{value}.0", f"\\frac{{{2 * value}}}{{2}}", f"so it is {value}.\n#### {value}"])


def write_user_files(directory: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    rng = random.Random(0)
    problems = [(a, b) for a in range(1, 7) for b in range(1, 7)]
    question = "What is {a} + {b}? Put the answer in \\boxed{{}}."
    (directory / "data").mkdir(parents=True)
    sft = [{"messages": [{"role": "user", "content": question.format(a=a, b=b)},
                         {"role": "assistant", "content": f"{a} + {b} = \\boxed{{{a + b}}}"}]} for a, b in problems]
    prompts = [{"prompt": [{"role": "user", "content": question.format(a=a, b=b)}],
                "answer": answer_forms(a + b, rng)} for a, b in problems]
    for name, rows in (("sft.jsonl", sft), ("math.jsonl", prompts)):
        (directory / "data" / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    texts = [question.format(a=a, b=b) + f" {a} + {b} = \\boxed{{{a + b}}}" for a, b in problems] * 3
    tokenizer = fixture_module().build_tokenizer(["You are a helpful assistant.", *texts], vocab_size=300)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")


RECIPE = """\
run: {name: math, seed: 0}
stages:
  sft:
    algorithm: {name: sft, lr: 3.0e-3, warmup_steps: 10, max_length: 64, sample_prompts: 0}
    policy: {name: transformers, path: model, dropout: 0.0}
    data: {name: file, path: data/sft.jsonl, schema: messages}
    trainer: {max_steps: 400, batch_size: 12, micro_batch_size: 12, log_every_n_steps: 50}
  grpo:
    algorithm:
      name: ppo
      lr: 1.0e-4
      prompts_per_iteration: 6
      samples_per_prompt: 4
      sampling: {max_new_tokens: 16, temperature: 1.0}
      max_prompt_length: 48
      eval_prompts: 12
      sample_prompts: 0
      advantages: {whiten: none}
    policy: {name: transformers, from_stage: sft, dropout: 0.0}
    reward:
      name: composite
      terms:
        - {reward: {name: verifier, match: symbolic}, weight: 1.0}
        - {reward: format, weight: 0.1}
    estimator: grpo
    objective: ppo-clip
    data: {name: file, path: data/math.jsonl, schema: prompt}
    eval_data: {name: file, path: data/math.jsonl, schema: prompt}
    trainer: {max_steps: 6, batch_size: 24, micro_batch_size: 24, log_every_n_steps: 1}
"""


def test_a_users_math_jsonl_trains_with_grpo_and_the_verifier(tmp_path):
    write_user_files(tmp_path)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    assert cli("validate", "recipe.yaml", cwd=tmp_path).returncode == 0
    result = cli("run", "recipe.yaml", "run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_metrics(tmp_path / "run" / "grpo" / "metrics.csv")
    scores = [float(r["reward/score"]) for r in rows if r.get("reward/score")]
    assert len(scores) == 6
    # The SFT model has learnt its sums in the boxed format: 1 (verifier) + 0.1 (format) on
    # nearly every sample, so the verifier read every answer form of the column (7, 7.0,
    # \frac{14}{2}, '... #### 7') as the number.
    assert max(scores) > 1.0 and all(0.0 <= s <= 1.1 + 1e-6 for s in scores), scores
