"""The ``transformers`` policy: configs, word tokenizer, the four families, LoRA, export."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, PreTrainedTokenizerFast

from rlhfkit import (
    ComponentSpec,
    Policy,
    Registry,
    StageContext,
    UserError,
    load_plugins,
    ref,
)
from rlhfkit.plugins import policy as policy_plugin
from rlhfkit.plugins.policy import (
    TransformersPolicy,
    TransformersPolicyConfig,
    build_word_tokenizer,
    load_tokenizer,
    mask_after_eos,
)

FAMILIES = ["gpt2", "opt", "llama", "qwen2"]
WORDS = ["a", "b", "c", "d", "e", "f", "."]
PROMPT = "a b c"
LONGER_PROMPT = "d e f . a b c d e"


class FakeTaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FakeTask:
    def vocabulary(self) -> list[str]:
        return list(WORDS)


@pytest.fixture(scope="module")
def registry() -> Registry:
    registry = Registry()
    registry.extend(policy_plugin.rlhfkit_components())
    registry.add(ComponentSpec(kind="task", name="fake", config=FakeTaskConfig,
                               factory=lambda config, context: FakeTask(), doc="test words"))
    return registry


@pytest.fixture
def context(registry, tmp_path) -> StageContext:
    return StageContext(registry=registry, stage="t", stage_dir=tmp_path)


def build(context: StageContext, seed: int = 0, **settings) -> TransformersPolicy:
    torch.manual_seed(seed)
    return context.build(ref("policy")(name="transformers", **settings))


def fresh(context: StageContext, family: str = "gpt2", **settings) -> TransformersPolicy:
    return build(context, architecture={"family": family, "layers": 1, "hidden": 32},
                 tokenizer={"task": "fake"}, **settings)


def scramble(model: torch.nn.Module, seed: int = 0) -> None:
    """Larger random weight matrices: a fresh tied-embedding model only repeats its last
    token, so greedy outputs would agree for the wrong reason."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module", params=FAMILIES)
def family_policy(request, registry, tmp_path_factory) -> TransformersPolicy:
    context = StageContext(registry=registry, stage="t", stage_dir=tmp_path_factory.mktemp("p"))
    policy = fresh(context, request.param)
    scramble(policy.model)
    return policy


# ------------------------------------------------------------------ word tokenizer


def test_word_tokenizer_specials_and_decoding():
    tokenizer = build_word_tokenizer(WORDS)
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id,
            tokenizer.eos_token_id] == [0, 1, 2, 3]
    ids = tokenizer("a b c .")["input_ids"]
    assert len(ids) == 4 and tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids + [3, 0, 0], skip_special_tokens=True) == "a b c ."
    # whitespace-only splitting: "a." is one (unknown) word
    assert tokenizer("a. zebra")["input_ids"] == [1, 1]
    for word in ("user", "assistant", "system", ":"):
        assert tokenizer.convert_tokens_to_ids(word) != tokenizer.unk_token_id
    with pytest.raises(ValueError, match="whitespace"):
        build_word_tokenizer(["a b"])


def test_word_tokenizer_chat_template_and_round_trip(tmp_path):
    tokenizer = build_word_tokenizer(WORDS)
    messages = [{"role": "system", "content": "a"}, {"role": "user", "content": "b c"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "system : a user : b c assistant :"
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded("a b c . f")["input_ids"] == tokenizer("a b c . f")["input_ids"]
    assert loaded.decode(tokenizer("a b c .")["input_ids"]) == "a b c ."
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 3)


# ------------------------------------------------------------------ configs


def test_config_needs_exactly_one_source():
    with pytest.raises(ValidationError, match="exactly one model source.*got none"):
        TransformersPolicyConfig()
    with pytest.raises(ValidationError, match="got path and from_stage"):
        TransformersPolicyConfig(path="x", from_stage="sft")
    with pytest.raises(ValidationError, match="needs `tokenizer`"):
        TransformersPolicyConfig(architecture={})
    with pytest.raises(ValidationError, match="exactly one of tokenizer.path"):
        TransformersPolicyConfig(path="x", tokenizer={})
    with pytest.raises(ValidationError, match="kv_heads applies to llama and qwen2"):
        TransformersPolicyConfig(architecture={"kv_heads": 2}, tokenizer={"path": "t"})
    with pytest.raises(ValidationError, match="extra"):
        TransformersPolicyConfig(path="x", trust_remote=True)


def test_defaults_keep_remote_code_off(context, tmp_path, monkeypatch):
    assert TransformersPolicyConfig(path="x").trust_remote_code is False
    fresh(context).export(tmp_path / "m")
    seen = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    build(context, path=str(tmp_path / "m"))
    assert seen == [False]


def test_missing_path_is_a_user_error(context, tmp_path):
    with pytest.raises(UserError, match="never downloads"):
        build(context, path=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="unknown task 'nope'"):
        build(context, architecture={}, tokenizer={"task": "nope"})


def test_discovered_through_entry_point():
    others = [ep.name for ep in importlib.metadata.entry_points(group="rlhfkit")
              if ep.name != "policy"]  # built by other engineers, tested elsewhere
    plugins = load_plugins(block=others)
    assert plugins.registry.get("policy", "transformers").plugin == "policy"


# ------------------------------------------------------------------ families


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_deterministic_and_forwards(context, family):
    first, second = fresh(context, family), fresh(context, family)
    assert isinstance(first, Policy)
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    batch = first.tokenize_pairs(["a b", "c"], ["d e", "f"], max_length=16)
    logits = first.model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (2, 5, len(first.tokenizer))  # "a b" + "d e" + EOS
    assert first.model.config.pad_token_id != first.model.config.eos_token_id


def test_generation_greedy_sampling_and_export(family_policy, context, tmp_path):
    policy = family_policy
    greedy = policy.generate([PROMPT, LONGER_PROMPT], max_new_tokens=6, do_sample=False)
    assert greedy == policy.generate([PROMPT, LONGER_PROMPT], max_new_tokens=6, do_sample=False)
    samples = []
    for _ in range(2):
        torch.manual_seed(7)
        samples.append(policy.generate([PROMPT] * 3, max_new_tokens=6, do_sample=True,
                                       temperature=1.5, top_k=5, top_p=0.9))
    assert samples[0] == samples[1]

    policy.export(tmp_path / "export")
    assert (tmp_path / "export" / "model.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True)
    # transformers 5's AutoTokenizer forces Qwen2Tokenizer on any qwen2 directory (see
    # load_tokenizer); the other families load the word-level tokenizer with it directly.
    if plain.config.model_type == "qwen2":
        tokenizer = load_tokenizer(tmp_path / "export")
    else:
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export", local_files_only=True)
    reloaded = TransformersPolicy(plain, tokenizer, policy.config)
    assert reloaded.generate([PROMPT, LONGER_PROMPT], max_new_tokens=6, do_sample=False) == greedy
    via_path = build(context, path=str(tmp_path / "export"))
    assert via_path.generate([PROMPT, LONGER_PROMPT], max_new_tokens=6, do_sample=False) == greedy


def test_left_padding_matches_generation_alone(family_policy):
    policy, lengths = family_policy, []
    for prompt in ["a b c", "b c d", "c d e f", "f e"]:
        alone = policy.generate_ids(*policy.tokenize_prompts([prompt]), max_new_tokens=8,
                                    do_sample=False)
        batched = policy.generate_ids(*policy.tokenize_prompts([LONGER_PROMPT, prompt]),
                                      max_new_tokens=8, do_sample=False)
        length = int(alone[1].sum())
        assert int(batched[1][1].sum()) == length
        assert batched[0][1, :length].tolist() == alone[0][0, :length].tolist(), prompt
        lengths.append(length)
    assert max(lengths) >= 4  # responses long enough for the comparison to mean something


def test_generate_ids_masks_and_restores_mode(family_policy):
    policy = family_policy
    policy.model.train()
    prompt_ids, prompt_mask = policy.tokenize_prompts([PROMPT, LONGER_PROMPT])
    assert prompt_mask.tolist()[0] == [0] * 6 + [1] * 3  # left padding
    response_ids, response_mask = policy.generate_ids(prompt_ids, prompt_mask, max_new_tokens=5,
                                                      do_sample=True)
    assert policy.model.training
    assert response_ids.shape == response_mask.shape and response_ids.shape[1] <= 5
    assert torch.equal(response_mask, mask_after_eos(response_ids, policy.tokenizer.eos_token_id))
    assert (response_ids[response_mask == 0] == policy.tokenizer.pad_token_id).all()


def test_mask_after_eos():
    ids = torch.tensor([[5, 3, 0, 0], [5, 6, 7, 8], [3, 5, 3, 0]])
    assert mask_after_eos(ids, 3).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_tokenize_pairs_masks_and_truncation(context):
    policy = fresh(context)
    batch = policy.tokenize_pairs(["a b c", "d"], ["e", "f f"], max_length=4)
    ids = policy.tokenizer.convert_tokens_to_ids
    eos, pad = policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id
    # prompt "a b c" loses "a" from the left so that "e <eos>" fits
    assert batch["input_ids"].tolist() == [[ids("b"), ids("c"), ids("e"), eos],
                                           [ids("d"), ids("f"), ids("f"), eos]]
    assert batch["labels_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    batch = policy.tokenize_pairs(["a", "b c"], ["d", "e f d e f"], max_length=5, add_eos=False)
    assert batch["input_ids"].tolist()[0] == [ids("a"), ids("d"), pad, pad, pad]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1] * 5]
    assert batch["labels_mask"].tolist() == [[0, 1, 0, 0, 0], [1] * 5]  # completion fills all


# ------------------------------------------------------------------ sources, dropout


def test_from_stage_and_dropout_override(registry, tmp_path):
    context = StageContext(registry=registry, stage="t", stage_dir=tmp_path)
    built = fresh(context, "opt", dropout=0.0)
    assert built.model.config.dropout == 0.0 and built.model.config.attention_dropout == 0.0
    assert all(m.p == 0.0 for m in built.model.modules() if isinstance(m, torch.nn.Dropout))
    built.export(tmp_path / "sft")
    built.export(tmp_path / "sft")  # replacing an existing export works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]  # no temporary leftovers

    stage = StageContext(registry=registry, stage="ppo", stage_dir=tmp_path / "ppo",
                         exports={"sft": tmp_path / "sft"})
    loaded = build(stage, from_stage="sft", dropout=0.25)
    assert loaded.model.config.dropout == 0.25 and loaded.model.config.attention_dropout == 0.25
    assert loaded.model.config.layerdrop == 0.0
    with pytest.raises(UserError, match="has no exported model"):
        build(stage, from_stage="rm")


def test_loaded_tokenizer_without_pad_gets_one(context, tmp_path):
    vocabulary = {"<unk>": 0, "<eos>": 1, "a": 2, "b": 3}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        eos_token="<eos>", pad_token="<eos>")
    tokenizer.save_pretrained(tmp_path)
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=4, n_embd=16, n_layer=1, n_head=2,
                                                n_positions=32)).save_pretrained(tmp_path)
    policy = build(context, path=str(tmp_path))
    assert policy.tokenizer.pad_token_id == 4 != policy.tokenizer.eos_token_id
    assert policy.model.get_input_embeddings().num_embeddings == 5
    assert policy.generate(["a b"], max_new_tokens=2, do_sample=False) is not None


# ------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_trains_adapters_only_and_export_merges(context, tmp_path, family):
    policy = fresh(context, family, lora={"r": 4}, gradient_checkpointing=True)
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    with torch.no_grad():  # lora_B starts at zero: make the adapters change the output
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)

    batch = policy.tokenize_pairs(["a b", "c"], ["d e", "f"], max_length=16)
    policy.model.eval()
    with torch.no_grad():
        adapted = policy.model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
        with policy.model.disable_adapter():
            base = policy.model(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(adapted, base, atol=1e-4)

    policy.export(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    with torch.no_grad():
        merged = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)
    # the training model keeps its adapters, and they train through checkpointed layers
    policy.model.train()
    logits = policy.model(input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"]).logits
    logits.logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in policy.model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_half_precision_dtype(context):
    policy = fresh(context, "llama", dtype="bfloat16")
    assert {p.dtype for p in policy.model.parameters()} == {torch.bfloat16}
    assert len(policy.generate([PROMPT], max_new_tokens=3, do_sample=True)) == 1


# ------------------------------------------------------------------ fused activations


def test_fused_gelu_computes_the_written_out_formula_and_exports_the_original_name(context, tmp_path):
    """GPT-2's `gelu_new` (eight element-wise ops) runs as torch's fused tanh GELU: the
    same logits to float rounding, the same gradients; the export still says gelu_new
    and loads (fused again) to the same logits."""
    from transformers.activations import GELUTanh, NewGELUActivation

    fused = fresh(context)
    written = fresh(context, fused_activations=False)
    assert isinstance(fused.model.transformer.h[0].mlp.act, GELUTanh)
    assert isinstance(written.model.transformer.h[0].mlp.act, NewGELUActivation)
    for model in (fused.model, written.model):
        scramble(model)
        model.eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])
    a, b = fused.model(input_ids=ids).logits, written.model(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(fused.model.named_parameters(), written.model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)

    fused.export(tmp_path / "export")
    saved = GPT2Config.from_pretrained(tmp_path / "export")
    assert saved.activation_function == "gelu_new"
    assert fused.model.config.activation_function == "gelu_new"   # only the modules were swapped
    again = build(context, path=str(tmp_path / "export"))
    assert isinstance(again.model.transformer.h[0].mlp.act, GELUTanh)
    again.model.eval()
    torch.testing.assert_close(again.model(input_ids=ids).logits, a, rtol=0, atol=0)


def test_activations_without_a_fused_form_are_left_alone(context):
    from transformers.activations import GELUTanh

    from rlhfkit.plugins.policy.build import fuse_activations

    relu = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, activation_function="relu"))
    assert fuse_activations(relu) == 0 and relu.config.activation_function == "relu"
    fast = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, activation_function="gelu_fast"))
    assert fuse_activations(fast) == 2 and isinstance(fast.transformer.h[1].mlp.act, GELUTanh)
    assert fast.config.activation_function == "gelu_fast"
    llama = fresh(context, "llama")
    assert llama.model.config.hidden_act == "silu" and fuse_activations(llama.model) == 0
