"""The row schemas a data file can follow, and how a record becomes a typed row.

Each schema is a pydantic model of one record (extra columns are ignored) whose
``to_row`` returns the ``rlhfkit`` row dataclass the algorithms consume. Validation
errors are turned into one sentence per row by :func:`describe_problem`, naming the
field and what is wrong with it, so a user can find and fix the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rlhfkit import Conversation, Feedback, Preference, Prompt, PromptCompletion, Ranking, Row
from rlhfkit.plugins.datasets.fields import (
    PromptField,
    ReplyField,
    Text,
    as_label,
    as_messages,
    as_reply,
    preview,
    split_common_messages,
    split_common_prompt,
)


class _Record(BaseModel):
    """One record of a data file; columns the schema does not name are ignored."""

    model_config = ConfigDict(extra="ignore")

    def to_row(self) -> Row:
        raise NotImplementedError


class PromptCompletionRecord(_Record):
    prompt: PromptField
    completion: ReplyField

    def to_row(self) -> Row:
        return PromptCompletion(prompt=self.prompt, completion=self.completion)


class PreferenceRecord(_Record):
    """A pair with an explicit ``prompt``, or, as in TRL's "implicit prompt" preference
    format, only ``chosen`` and ``rejected`` that begin with the same prompt.

    Text: the prompt is their common beginning, cut at the last whitespace before they
    differ (TRL cuts at the first differing character, which can split a word).
    Conversations: the prompt is their common first messages, and what follows must be
    one assistant message in each."""

    prompt: PromptField | None = None
    chosen: Text | list[Any]
    rejected: Text | list[Any]
    margin: float | None = Field(default=None, allow_inf_nan=False)

    @field_validator("chosen", "rejected", mode="before")
    @classmethod
    def _text_or_messages(cls, value: Any) -> Any:
        if isinstance(value, list):
            return list(as_messages(value))
        if not isinstance(value, str):  # pydantic reports ValueError as the row's problem
            raise ValueError(f"must be text or a list of messages, got {preview(value)}")  # noqa: TRY004
        return value

    @model_validator(mode="after")
    def _implicit_prompt(self) -> PreferenceRecord:
        chosen, rejected = self.chosen, self.rejected
        if self.prompt is not None:
            self.chosen, self.rejected = as_reply(chosen), as_reply(rejected)
        elif isinstance(chosen, str) and isinstance(rejected, str):
            self.prompt, self.chosen, self.rejected = split_common_prompt(chosen, rejected)
        elif isinstance(chosen, list) and isinstance(rejected, list):
            self.prompt, self.chosen, self.rejected = split_common_messages(chosen, rejected)
        else:
            raise ValueError("has no prompt field, and one of chosen and rejected is text while the other is a "
                             "list of messages; give both in one form")
        return self

    def to_row(self) -> Row:
        assert self.prompt is not None  # filled by _implicit_prompt
        return Preference(prompt=self.prompt, chosen=self.chosen, rejected=self.rejected,
                          margin=self.margin)


class FeedbackRecord(_Record):
    prompt: PromptField
    completion: ReplyField
    label: Annotated[bool, BeforeValidator(as_label)]

    def to_row(self) -> Row:
        return Feedback(prompt=self.prompt, completion=self.completion, desirable=self.label)


def ranks_from_scores(scores: list[float]) -> tuple[int, ...]:
    """Rank 0 for the highest score; equal scores share a rank ("min" ranking: a
    completion's rank is how many completions scored strictly higher)."""
    return tuple(sum(other > score for other in scores) for score in scores)


class RankingRecord(_Record):
    prompt: PromptField
    completions: list[ReplyField] = Field(min_length=2)
    # scores before ranks: the ranks check needs to know whether scores were given.
    scores: list[Annotated[float, Field(allow_inf_nan=False)]] | None = None
    ranks: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, validate_default=True)

    @field_validator("scores", "ranks")
    @classmethod
    def _one_per_completion(cls, values: list[Any] | None, info: ValidationInfo) -> Any:
        if values is None:
            if info.field_name == "ranks" and info.data.get("scores", ()) is None:
                raise ValueError("is missing or null and so is 'scores'; give ranks "
                                 "(0 = best) or scores (higher = better)")
            return values
        completions = info.data.get("completions")
        if completions is None:  # completions itself is invalid, and reported
            return values
        if len(values) != len(completions):
            raise ValueError(f"has {len(values)} entries but 'completions' has "
                             f"{len(completions)}; give one per completion")
        if len(set(values)) == 1:
            raise ValueError(f"ties every completion ({values}), so the row says nothing "
                             f"about which is better")
        if info.field_name == "ranks" and min(values) != 0:
            raise ValueError(f"must give rank 0 to the best completion, got {values} "
                             f"(1-based ranks? subtract 1)")
        return values

    def to_row(self) -> Row:
        # A file may carry both: explicit ranks win, scores fill in where ranks are null.
        ranks = (tuple(self.ranks) if self.ranks is not None
                 else ranks_from_scores(self.scores or []))
        return Ranking(prompt=self.prompt, completions=tuple(self.completions), ranks=ranks)


class Message(BaseModel):
    """One chat turn; keys other than role and content (name, ids...) are dropped."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Text


class MessagesRecord(_Record):
    messages: list[Message]

    @field_validator("messages")
    @classmethod
    def _a_conversation(cls, messages: list[Message]) -> list[Message]:
        roles = [m.role for m in messages]
        if not roles or roles[-1] != "assistant":
            raise ValueError(f"must end with an assistant message (the reply to learn), "
                             f"got roles {roles}")
        if "system" in roles[1:]:
            raise ValueError(f"may have a system message only first, got roles {roles}")
        if "user" not in roles:
            raise ValueError(f"needs a user message before the reply, got roles {roles}")
        return messages

    def to_row(self) -> Row:
        return Conversation(messages=tuple({"role": m.role, "content": m.content}
                                           for m in self.messages))


class PromptRecord(_Record):
    """A prompt, and the row's other columns (kept for reward functions)."""

    model_config = ConfigDict(extra="allow")
    prompt: PromptField

    def to_row(self) -> Row:
        return Prompt(prompt=self.prompt, fields=dict(self.model_extra or {}))


class TextRecord(_Record):
    text: Text

    def to_row(self) -> Row:
        # Plain text (pretraining) is a demonstration with no prompt.
        return PromptCompletion(prompt="", completion=self.text)


@dataclass(frozen=True)
class Schema:
    """A named row layout.

    Attributes:
        name: what recipes write in ``schema:``.
        record: the pydantic model of one record.
        required: columns every file of this schema must have.
        one_of: the file must have at least one of these columns as well.
        lists: columns holding lists, which CSV cannot store.
        keeps_other_columns: the row keeps the file's other columns (``Prompt.fields``).
    """

    name: str
    record: type[_Record]
    required: tuple[str, ...]
    one_of: tuple[str, ...] = ()
    lists: tuple[str, ...] = ()
    keeps_other_columns: bool = False

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.record.model_fields)

    def needs(self) -> str:
        """The required columns, in words."""
        text = ", ".join(self.required)
        return text + (f" and one of {', '.join(self.one_of)}" if self.one_of else "")


SCHEMAS: dict[str, Schema] = {schema.name: schema for schema in (
    Schema("prompt-completion", PromptCompletionRecord, ("prompt", "completion")),
    Schema("preference", PreferenceRecord, ("chosen", "rejected")),
    Schema("unpaired", FeedbackRecord, ("prompt", "completion", "label")),
    Schema("ranking", RankingRecord, ("prompt", "completions"), one_of=("ranks", "scores"),
           lists=("completions", "ranks", "scores")),
    Schema("messages", MessagesRecord, ("messages",), lists=("messages",)),
    Schema("prompt", PromptRecord, ("prompt",), keeps_other_columns=True),
    Schema("text", TextRecord, ("text",)),
)}

#: The names recipes may write (kept equal to SCHEMAS' keys; a test checks).
SchemaName = Literal["prompt-completion", "preference", "unpaired", "ranking", "messages", "prompt",
                     "text"]


def describe_problem(error: ValidationError, column_of: dict[str, str]) -> tuple[str, bool]:
    """One sentence for every problem in a record, and whether a field was missing.

    ``column_of`` maps a schema field to the file column it was read from, so the
    message names the column the user sees in the file.
    """
    parts: list[str] = []
    missing = False
    for err in error.errors():
        if not err["loc"]:  # a problem of the whole record (model validator)
            parts.append(str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"])
            continue
        field, *rest = err["loc"]
        column = column_of.get(str(field), str(field))
        label = f"'{column}{_suffix(rest)}'" + (f" (read as '{field}')" if column != field else "")
        value = err.get("input")
        if err["type"] == "value_error":
            parts.append(f"field {label} {err['ctx']['error']}")
        elif err["type"] == "missing":
            missing = True
            parts.append(f"field {label} is missing")
        elif value is None:
            parts.append(f"field {label} is null or empty")
        else:
            # "Input should be a valid string" -> "should be a valid string"
            message = err["msg"].replace(" after validation", "")
            message = message[message.find("should"):] if "should" in message else message
            parts.append(f"field {label} {message}, got {preview(value)}")
    return "; ".join(parts), missing


def _suffix(rest: list[Any]) -> str:
    """The rest of an error location: ``[2, 'role']`` → ``[2].role``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest)
