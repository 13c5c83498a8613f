"""The recipes for real checkpoints (recipes/rm-static/): they open with their command,
validate as written without the model and data files, split the training rows as the
seed setting says, and run end to end on tiny stand-ins written where the recipes expect
the real files (OPT models with the real ones' quirks, an rm-static-shaped parquet file).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import OPTConfig, OPTForCausalLM

import rlhfkit
from rlhfkit.recipe import compose
from rlhfkit.runner import run_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes" / "rm-static").glob("*.yaml"))
PIPELINE = REPO / "recipes" / "rm-static" / "opt-1.3b.yaml"
PLUGINS = rlhfkit.load_plugins()
TRAIN_ROWS = 40
WORDS = ("how", "do", "i", "cook", "rice", "bake", "bread", "fix", "a", "bike", "swim", "plant",
         "tree", "write", "poem", "sleep", "tell", "joke", "find", "job", "paint", "wall")


def stage_data(recipe_path: Path) -> dict[str, dict]:
    data, _ = compose(recipe_path, PLUGINS.presets)  # with everything it extends
    return data["stages"]


# ------------------------------------------------------------------- as written


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_opens_with_its_command(path):
    assert path.read_text().splitlines()[0] == f"# rlhfkit run {path.relative_to(REPO).as_posix()}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_without_the_files(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/ or data/ here: files are only looked for at run time
    recipe = PLUGINS.load_recipe(path)
    assert all(stage.trainer.accelerator == "gpu" and stage.trainer.precision == "bf16-mixed"
               for stage in recipe.stages if stage.algorithm.name != "evaluate")  # nothing to train there


def test_pipeline_splits_the_training_rows_20_40_40():
    stages = stage_data(PIPELINE)
    assert list(stages) == ["sft", "rm", "ppo", "report"]
    assert stages["sft"]["policy"]["path"] == "models/opt-1.3b"
    assert stages["rm"]["backbone"]["path"] == "models/opt-350m"
    data = [stages[name]["data"] for name in ("sft", "rm", "ppo")]
    assert [d["portion"] for d in data] == [[0.0, 0.2], [0.2, 0.6], [0.6, 1.0]]
    assert len({(d["path"], d["shuffle_seed"]) for d in data}) == 1  # one file set, one order
    assert [d["schema"] for d in data] == ["prompt-completion", "preference", "prompt"]


# ------------------------------------------------------- tiny stand-ins, run end to end


def rm_static_rows(count: int, tag: str) -> list[dict[str, str]]:
    """Rows in Dahoas/rm-static's layout: the prompt ends with "Assistant:" and the
    answers start with a space."""
    rows = []
    for i in range(count):
        topic = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3))
        answer = " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(5))
        rows.append({"prompt": f"\n\nHuman: {tag} {i} {topic}?\n\nAssistant:",
                     "response": f" {answer}.", "chosen": f" {answer}.",
                     "rejected": f" no {WORDS[i % len(WORDS)]}."})
    return rows


#: OPT's special tokens: ``</s>`` (id 2) begins every encoded text and ends answers.
OPT_SPECIALS = {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "</s>"}


def save_opt_tokenizer(texts: list[str], directory: Path) -> int:
    """Write OPT's tokenizer files (GPT-2's byte-level BPE: vocab.json, merges.txt, and the
    configuration that names ``GPT2Tokenizer``), trained on ``texts``; returns its size."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir(parents=True)
    backend.model.save(str(directory))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_prefix_space": False,
         "errors": "replace", **OPT_SPECIALS}))
    (directory / "special_tokens_map.json").write_text(json.dumps(OPT_SPECIALS))
    return backend.get_vocab_size()


def save_opt(directory: Path, texts: list[str], **shape) -> None:
    """A tiny OPT checkpoint laid out like the hub's: config.json, a pytorch_model.bin of
    the decoder's weights (no ``model.`` prefix) and the tokenizer files. Its embedding
    has a few rows more than the tokenizer has tokens, as OPT's (50272 for 50265)."""
    vocabulary = save_opt_tokenizer(texts, directory)
    config = OPTConfig(vocab_size=vocabulary + 7, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, ffn_dim=32, max_position_embeddings=64,
                       pad_token_id=1, bos_token_id=2, eos_token_id=2, **shape)
    config.save_pretrained(directory)
    torch.manual_seed(0)
    torch.save(OPTForCausalLM(config).model.state_dict(), directory / "pytorch_model.bin")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    """A directory laid out as the recipes expect: models/opt-1.3b, models/opt-350m and
    data/rm-static/data/{train,test}-*.parquet, all tiny."""
    root = tmp_path_factory.mktemp("stand-ins")
    train, test = rm_static_rows(TRAIN_ROWS, "train"), rm_static_rows(8, "test")
    data = root / "data" / "rm-static" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(train), data / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(test), data / "test-00000-of-00001.parquet")
    texts = [text for row in train + test for text in row.values()]
    # opt-1.3b normalises before each layer; opt-350m after, and projects its hidden
    # states (1024) to a narrower embedding width (512) before the LM head.
    save_opt(root / "models" / "opt-1.3b", texts, word_embed_proj_dim=16,
             do_layer_norm_before=True)
    save_opt(root / "models" / "opt-350m", texts, word_embed_proj_dim=8,
             do_layer_norm_before=False)
    return root


#: Settings that make each algorithm's stage tiny, on CPU in fp32.
SHRINK = {
    "sft": ["algorithm.max_length=32", "algorithm.sample_prompts=1",
            "algorithm.sample_max_new_tokens=4", "eval_data.limit=4"],
    "reward-model": ["algorithm.max_length=32", "eval_data.limit=4", "reference_data.limit=4"],
    "ppo": ["algorithm.prompts_per_iteration=4", "algorithm.warmup_steps=1",
            "algorithm.max_prompt_length=16", "algorithm.sampling.max_new_tokens=6",
            "algorithm.eval_prompts=2", "algorithm.sample_prompts=1", "reward.max_length=32",
            "estimator.optimizer.warmup_steps=1"],
    "evaluate": ["algorithm.prompts=2", "algorithm.max_prompt_length=16", "algorithm.max_new_tokens=4",
                 "algorithm.max_length=32", "reward.max_length=32", "text.limit=4", "pairs.limit=4"],
    "dpo": ["algorithm.max_length=32", "algorithm.warmup_steps=1", "algorithm.max_new_tokens=4",
            "eval_data.limit=4", "eval_prompts.limit=2"],
}
TRAINER = ["accelerator=cpu", "precision=32-true", "batch_size=4", "micro_batch_size=4",
           "log_every_n_steps=1", "eval_every_n_steps=null"]


def shrink(recipe_path: Path, run_dir: Path) -> list[str]:
    overrides = [f"run.dir={run_dir}"]
    for name, stage in stage_data(recipe_path).items():
        overrides += [f"stages.{name}.{item}"
                      for item in [*(f"trainer.{t}" for t in TRAINER),
                                   *SHRINK[stage["algorithm"]["name"]]]]
    return overrides


def rows_in(portion: list[float]) -> int:
    start, end = portion
    return round(end * TRAIN_ROWS) - round(start * TRAIN_ROWS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_on_tiny_stand_ins(path, stand_ins, tmp_path, monkeypatch):
    monkeypatch.chdir(stand_ins)  # the recipe's own relative paths find the stand-ins
    recipe = PLUGINS.load_recipe(path, shrink(path, tmp_path / "run"))
    summaries = run_recipe(recipe, PLUGINS)
    assert list(summaries) == [stage.name for stage in recipe.stages]
    for stage in recipe.stages:
        stage_dir = tmp_path / "run" / stage.name
        if stage.algorithm.name == "evaluate":  # SFT and PPO side by side: a report, no model
            assert {"sft/proxy", "ppo/kl", "rm/accuracy"} <= set(summaries[stage.name])
            assert (stage_dir / "report.json").is_file()
            continue
        assert (stage_dir / "export" / "config.json").is_file()
        # One epoch of batch 4 over the stage's portion: the step count shows the rows used
        # (PPO: 4 prompts per iteration, one update each).
        steps = -(-rows_in(stage.raw["data"]["portion"]) // 4)
        assert json.loads((stage_dir / "summary.json").read_text())["steps"] == steps, stage.name


def test_the_three_portions_partition_the_training_rows(stand_ins, monkeypatch):
    monkeypatch.chdir(stand_ins)
    recipe = PLUGINS.load_recipe(PIPELINE)
    prompts = {}
    for stage in recipe.stages[:3]:  # sft, rm, ppo (the report reads the test files)
        rows = PLUGINS.registry.build(stage.slots["data"], None).rows()
        prompts[stage.name] = {row.prompt for row in rows}
        assert len(rows) == len(prompts[stage.name])  # the stand-in prompts are unique
    assert [len(prompts[name]) for name in ("sft", "rm", "ppo")] == [8, 16, 16]
    assert not (prompts["sft"] & prompts["rm"] or prompts["rm"] & prompts["ppo"]
                or prompts["sft"] & prompts["ppo"])
    table = pq.read_table(stand_ins / "data" / "rm-static" / "data" / "train-00000-of-00001.parquet")
    assert set().union(*prompts.values()) == set(table.column("prompt").to_pylist())
