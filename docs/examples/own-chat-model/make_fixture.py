"""Write a small chat model and TRL-style data for docs/examples/own-chat-model/recipe.yaml.

    python docs/examples/own-chat-model/make_fixture.py DIR
    cd DIR && rlhfkit run recipe.yaml

The model is what a user brings, in miniature: a Qwen2 model saved with
``save_pretrained``, with a byte-level BPE tokenizer trained here with ``tokenizers``
(special tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, Qwen2's ChatML chat
template with its default system message, EOS ``<|im_end|>``, PAD ``<|endoftext|>``).
Its weights are random: the recipe's SFT stage teaches it the task.

The data follow TRL's dataset formats, conversational forms:
- ``sft.jsonl``: language modelling, ``{"messages": [...]}``;
- ``preferences.jsonl``: preference with implicit prompt, ``{"chosen": [...], "rejected": [...]}``
  (whole conversations that share all but the last message);
- ``prompts.jsonl`` / ``prompts-eval.jsonl``: prompt-only, ``{"prompt": [...], "thing": ..., "answer": ...}``;
  the other columns are handed to the reward function as keywords, as TRL does.

The task: the colour of a thing ("What colour is a lemon?" -> "A lemon is yellow.").
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

COLOURS = {
    "lemon": "yellow", "banana": "yellow", "sky": "blue", "sea": "blue", "grass": "green",
    "leaf": "green", "cherry": "red", "tomato": "red", "snow": "white", "milk": "white",
    "coal": "black", "crow": "black", "orange": "orange", "carrot": "orange", "plum": "purple",
    "grape": "purple",
}
QUESTIONS = ("What colour is a {thing}?", "Which colour does a {thing} have?", "Tell me the colour of a {thing}.")
HELD_OUT = ("Name the colour of a {thing}.",)

#: Qwen2-Instruct's chat template (ChatML, with a default system message).
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def answer(thing: str) -> str:
    return f"A {thing} is {COLOURS[thing]}."


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_data(directory: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    things = sorted(COLOURS)
    train = [(q.format(thing=t), t) for q in QUESTIONS for t in things]
    write_jsonl(directory / "sft.jsonl", [
        {"messages": user(q) + [{"role": "assistant", "content": answer(t)}]} for q, t in train])
    preferences = []
    for q, t in train:
        wrong = rng.choice(sorted({c for c in COLOURS.values() if c != COLOURS[t]}))
        preferences.append({"chosen": user(q) + [{"role": "assistant", "content": answer(t)}],
                            "rejected": user(q) + [{"role": "assistant", "content": f"A {t} is {wrong}."}]})
    write_jsonl(directory / "preferences.jsonl", preferences)
    write_jsonl(directory / "prompts.jsonl", [{"prompt": user(q), "thing": t, "answer": COLOURS[t]} for q, t in train])
    write_jsonl(directory / "prompts-eval.jsonl", [
        {"prompt": user(q.format(thing=t)), "thing": t, "answer": COLOURS[t]} for q in HELD_OUT for t in things])


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE trained on ``texts``, with Qwen2's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, chat_template=QWEN2_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


def build_model(directory: Path, seed: int = 0) -> None:
    """A 2-layer Qwen2 model and its tokenizer, saved with ``save_pretrained``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    texts = ["You are a helpful assistant.", *(q.format(thing=t) for q in QUESTIONS + HELD_OUT for t in COLOURS),
             *(answer(t) for t in COLOURS), *(f"A {t} is {c}." for t in COLOURS for c in set(COLOURS.values()))]
    tokenizer = build_tokenizer([text for text in texts for _ in range(3)])
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # As a Qwen2 checkpoint names it: transformers then loads it as Qwen2Tokenizer.
    config_file = directory / "tokenizer_config.json"
    settings = json.loads(config_file.read_text())
    settings["tokenizer_class"] = "Qwen2Tokenizer"
    config_file.write_text(json.dumps(settings, indent=2))


def main(directory: Path) -> None:
    here = Path(__file__).resolve().parent
    directory.mkdir(parents=True, exist_ok=True)
    build_model(directory / "model")
    write_data(directory / "data")
    for name in ("recipe.yaml", "rewards.py"):
        shutil.copyfile(here / name, directory / name)
    print(f"wrote {directory}/model, {directory}/data and the recipe; run: cd {directory} && rlhfkit run recipe.yaml")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python make_fixture.py DIR")
    main(Path(sys.argv[1]))
