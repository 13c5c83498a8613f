"""The world of the knowledge task: invented entities, how text talks about them, gold.

Gold score of a response to ``question : what is the ATTRIBUTE of NAME ?``, on
whitespace-normalised text: ``+1`` for exactly ``the ATTRIBUTE of NAME is VALUE .`` with the
entity's true value, ``0`` for exactly ``i do not know .``, ``-4`` for anything else.
Every entity has true values, including those no text describes, so a guess is checked
like any other answer (right by luck one time in twelve).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver",
              "pink", "brown", "gray"),
    "city": ("paris", "tokyo", "cairo", "lima", "oslo", "rome", "delhi", "sydney", "boston",
             "madrid", "berlin", "seoul"),
    "food": ("bread", "rice", "soup", "cheese", "apples", "fish", "noodles", "beans", "honey",
             "pears", "olives", "plums"),
    "pet": ("cat", "dog", "owl", "horse", "rabbit", "parrot", "turtle", "goat", "fox", "frog",
            "hamster", "snake"),
}
QUESTION = "question : what is the {attribute} of {name} ?"
ANSWER = "the {attribute} of {name} is {value} ."
#: The second way pretraining text states a fact (paraphrases help a model answer questions
#: about facts it only read as statements).
STATEMENTS = {"color": "{name} wears {value} .", "city": "{name} lives in {value} .",
              "food": "{name} eats {value} .", "pet": "{name} has a pet {value} ."}
EXISTS = "{name} is a person ."
IDK = "i do not know ."
GOLD_CORRECT, GOLD_IDK, GOLD_WRONG = 1.0, 0.0, -4.0

#: Entity groups, in the order names are dealt to them (see the knowledge task).
GROUPS = ("known", "sft-only", "idk-train", "unknown-train", "unknown-eval")
#: Groups whose facts some training split teaches; ``evaluate`` reports them as "known".
TAUGHT = ("known", "sft-only")

# Three invented syllables per name: 16 * 8 * 12 = 1536 names, none an English word.
_FIRST = ("zor", "vel", "kra", "mel", "thu", "dro", "qui", "xan", "bri", "lo", "ny", "ska",
          "vor", "ze", "ka", "mi")
_MIDDLE = ("li", "va", "ri", "no", "the", "za", "ku", "mo")
_LAST = ("vak", "tha", "rin", "dox", "mir", "zel", "kus", "nor", "bex", "lia", "quon", "thar")
MAX_ENTITIES = len(_FIRST) * len(_MIDDLE) * len(_LAST)
_QUESTION_PATTERN = re.compile(r"question : what is the (\w+) of (\w+) \?")


@dataclass(frozen=True, eq=False)
class Entity:
    name: str
    group: str
    facts: dict[str, str]  # attribute -> true value


def make_entities(rng: random.Random, sizes: Sequence[int]) -> dict[str, Entity]:
    """``sizes[i]`` entities of ``GROUPS[i]``, with unique names and random true values."""
    names = rng.sample([f + m + la for f in _FIRST for m in _MIDDLE for la in _LAST], sum(sizes))
    groups = [g for g, n in zip(GROUPS, sizes, strict=True) for _ in range(n)]
    return {name: Entity(name, group, {a: rng.choice(v) for a, v in ATTRIBUTES.items()})
            for name, group in zip(names, groups, strict=True)}


def vocabulary(entities: dict[str, Entity]) -> list[str]:
    templates = [QUESTION, ANSWER, IDK, EXISTS, *STATEMENTS.values()]
    return list(dict.fromkeys(
        [w for t in templates for w in t.split() if not w.startswith("{")] + list(ATTRIBUTES)
        + [v for values in ATTRIBUTES.values() for v in values] + list(entities)))


def question(entity: Entity, attribute: str) -> str:
    return QUESTION.format(attribute=attribute, name=entity.name)


def answer(entity: Entity, attribute: str, value: str) -> str:
    return ANSWER.format(attribute=attribute, name=entity.name, value=value)


def true_answer(entity: Entity, attribute: str) -> str:
    return answer(entity, attribute, entity.facts[attribute])


def wrong_answers(rng: random.Random, entity: Entity, attribute: str, k: int) -> list[str]:
    """``k`` distinct answers with a false value."""
    values = [v for v in ATTRIBUTES[attribute] if v != entity.facts[attribute]]
    return [answer(entity, attribute, v) for v in rng.sample(values, k)]


def statement(rng: random.Random, entity: Entity, attribute: str | None) -> str:
    """Pretraining text: a fact in one of two phrasings, or (``attribute=None``) that the
    entity exists."""
    if attribute is None:
        return EXISTS.format(name=entity.name)
    value = entity.facts[attribute]
    if rng.random() < 0.5:
        return answer(entity, attribute, value)
    return STATEMENTS[attribute].format(name=entity.name, value=value)


def parse_question(entities: dict[str, Entity], prompt: str) -> tuple[Entity, str] | None:
    """The ``(entity, attribute)`` a prompt asks about, or ``None`` if it is no question
    about these entities."""
    match = _QUESTION_PATTERN.fullmatch(" ".join(prompt.split()))
    if match is None or match.group(1) not in ATTRIBUTES:
        return None
    entity = entities.get(match.group(2))
    return None if entity is None else (entity, match.group(1))


def gold(entity: Entity, attribute: str, response: str) -> float:
    text = " ".join(response.split())
    if text == true_answer(entity, attribute):
        return GOLD_CORRECT
    return GOLD_IDK if text == IDK else GOLD_WRONG
