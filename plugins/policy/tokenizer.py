"""Tokenizers: a word-level one for the built-in tasks, and the PAD rule for loaded ones."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from rlhfkit import UserError

#: Special tokens of the word-level tokenizer, in id order: ``<pad>`` is 0.
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
#: Words the chat template writes; added to every word-level vocabulary.
CHAT_WORDS = ("system", "user", "assistant", ":")
#: Renders ``[{"role": "user", "content": "a b"}, ...]`` as ``user : a b assistant : ...``.
#: Only words of the vocabulary appear, so a word-level tokenizer encodes it without
#: ``<unk>``. EOS is not written: algorithms append it to the reply they train on.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %} {% endif %}"
    "{{ message['role'] }} : {{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} assistant :{% endif %}"
)


def build_word_tokenizer(vocabulary: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``vocabulary`` (plus specials and the chat words).

    Text is split on whitespace only, so ``"."`` is a token of its own only when spaces
    surround it (the built-in tasks write it that way); an unknown word becomes ``<unk>``.
    Ids: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, ``<eos>`` 3, then the words in order.
    Nothing is added automatically on encoding (no BOS/EOS post-processor): algorithms
    append EOS themselves. Decoding joins words with single spaces, so
    ``decode(encode("a b c ."), skip_special_tokens=True) == "a b c ."``.

    PAD differs from EOS: with PAD == EOS a padded position cannot be told from a real
    end of sequence (and masking PAD would mask the EOS the policy must learn to emit).
    """
    for word in vocabulary:
        if not word or any(ch.isspace() for ch in word):
            raise ValueError(f"vocabulary words must be non-empty and contain no whitespace, "
                             f"got {word!r}")
    words = list(dict.fromkeys([*SPECIAL_TOKENS, *vocabulary, *CHAT_WORDS]))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    pad, unk, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, unk_token=unk, bos_token=bos, eos_token=eos,
        # transformers' cleanup would glue "a ." into "a."; words must round-trip exactly.
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def load_tokenizer(directory: str | Path, trust_remote_code: bool = False
                   ) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in ``directory`` (local files only).

    A tokenizer saved as the generic ``TokenizersBackend`` (as the word-level one is) is
    loaded as exactly that. ``AutoTokenizer`` would not always do so: transformers 5 picks
    the tokenizer class from ``config.json``'s model type for some families (qwen2 gets
    ``Qwen2Tokenizer``, a byte-level BPE), which breaks a word-level vocabulary saved next
    to a qwen2 model. Anything else goes through ``AutoTokenizer``.
    """
    config_file = Path(directory) / "tokenizer_config.json"
    declared = (json.loads(config_file.read_text()).get("tokenizer_class")
                if config_file.is_file() else None)
    if declared == "TokenizersBackend":
        return PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
    return AutoTokenizer.from_pretrained(directory, local_files_only=True,
                                         trust_remote_code=trust_remote_code)


def ensure_distinct_pad(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give ``tokenizer`` a PAD token distinct from EOS, adding ``<pad>`` if needed.

    Many checkpoints (GPT-2, ...) have no PAD or reuse EOS as PAD; then the mask of a
    padded batch would also hide real EOS tokens. Returns True when a token was added,
    so the caller resizes the model's embeddings.
    """
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of {tokenizer.name_or_path!r} has no EOS token; the "
                        "policy needs one to end responses. Use a tokenizer that defines "
                        "eos_token.")
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return True
