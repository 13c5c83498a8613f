"""The values a row field may hold, each a validator whose error is one sentence about the
field: non-blank text, a prompt or a response in TRL's standard (text) or conversational
(messages) form, a thumbs-up label; and the split of TRL's implicit-prompt pairs."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator


def not_blank(text: str) -> str:
    # Text is kept verbatim (a leading space can matter to a tokenizer); only rows with
    # nothing to learn from are rejected.
    if not text or text.isspace():  # isspace: no copy of a long text, unlike strip()
        raise ValueError("is empty or only whitespace")
    return text


#: A string with at least one non-whitespace character, kept as it is.
Text = Annotated[str, AfterValidator(not_blank)]

#: The roles a message may have.
ROLES = ("system", "user", "assistant")


def as_messages(value: list[Any]) -> tuple[dict[str, str], ...]:
    """A list of ``{"role", "content"}`` messages, checked; other keys are dropped."""
    if not value:
        raise ValueError("is an empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(  # noqa: TRY004 - pydantic reports ValueError as the row's problem
                f"[{i}] must be a message ({{\"role\": ..., \"content\": ...}}), got {preview(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"[{i}].role must be one of {', '.join(ROLES)}, got {preview(role)}")
        if not isinstance(content, str) or not content or content.isspace():
            raise ValueError(f"[{i}].content must be non-empty text, got {preview(content)}")
        out.append({"role": role, "content": content})
    roles = [m["role"] for m in out]
    if "system" in roles[1:]:
        raise ValueError(f"may have a system message only first, got roles {roles}")
    return tuple(out)


def as_prompt(value: Any) -> str | tuple[dict[str, str], ...]:
    """Text, or a conversation the model answers next (TRL's conversational prompt): ends
    with a user message."""
    if isinstance(value, str):
        return not_blank(value)
    if isinstance(value, list):
        messages = as_messages(value)
        if messages[-1]["role"] != "user":
            raise ValueError(f"must end with a user message (the model answers it), got roles "
                             f"{[m['role'] for m in messages]}")
        return messages
    raise ValueError(f"must be text or a list of messages, got {preview(value)}")


def as_reply(value: Any) -> str:
    """A response: text, or TRL's conversational completion, one assistant message."""
    if isinstance(value, str):
        return not_blank(value)
    if isinstance(value, list):
        messages = as_messages(value)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise ValueError(f"must be text or one assistant message, got roles {[m['role'] for m in messages]}")
        return messages[0]["content"]
    raise ValueError(f"must be text or a list with one assistant message, got {preview(value)}")


#: A prompt: text, or a list of messages ending with the user's (kept as a tuple of dicts).
PromptField = Annotated[Any, AfterValidator(as_prompt)]
#: A response: text, or a list holding one assistant message (read as its text).
ReplyField = Annotated[Any, AfterValidator(as_reply)]


def split_common_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen rest, rejected rest)``: the prompt is the texts' common
    beginning up to the last whitespace before the first character where they differ; the
    whitespace stays with the responses."""
    same = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        same += 1
    if same == len(chosen) == len(rejected):
        raise ValueError("has no prompt field, and chosen and rejected are the same text")
    cut = max((i for i in range(same) if chosen[i].isspace()), default=0)  # a word boundary before they differ
    prompt, rest_chosen, rest_rejected = chosen[:cut], chosen[cut:], rejected[cut:]
    if not prompt.strip():
        raise ValueError("has no prompt field (map the file's prompt column to it with columns: {COLUMN: "
                         "prompt}), and chosen and rejected do not begin with a common prompt (TRL's "
                         "implicit-prompt format)")
    if not rest_chosen.strip() or not rest_rejected.strip():
        raise ValueError("has no prompt field, and after their common beginning chosen or rejected is empty; "
                         "add a prompt field")
    return prompt, rest_chosen, rest_rejected


def split_common_messages(chosen: list[dict[str, str]], rejected: list[dict[str, str]]
                          ) -> tuple[tuple[dict[str, str], ...], str, str]:
    """``(prompt messages, chosen reply, rejected reply)`` of two conversations that share
    every message but their last, an assistant reply each (TRL's conversational implicit
    prompt)."""
    if len(chosen) < 2 or len(chosen) != len(rejected) or chosen[:-1] != rejected[:-1]:
        raise ValueError("has no prompt field, and chosen and rejected are not the same conversation up to "
                         "their last message (TRL's implicit-prompt format); add a prompt field")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ValueError("has no prompt field, and chosen or rejected does not end with an assistant message")
    prompt = tuple(chosen[:-1])
    as_prompt(list(prompt))  # ends with the user's message
    if chosen[-1] == rejected[-1]:
        raise ValueError("has no prompt field, and chosen and rejected are the same conversation")
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


#: How a label may be written, in any case and with surrounding spaces (CSV holds only text).
LABEL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def as_label(value: Any) -> bool:
    """``True`` for a desirable completion: a bool, the number 1 or 0, or a word of
    :data:`LABEL_WORDS`; anything else is an error rather than a guess."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    if value is None:
        raise ValueError("is null; give true (desirable) or false (undesirable)")
    raise ValueError(f"must be true (desirable) or false (undesirable); 1/0 and the strings "
                     f"true/false, 1/0, yes/no are read too, got {preview(value)}")


def preview(value: Any) -> str:
    text = repr(value)
    shown = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {shown}"
