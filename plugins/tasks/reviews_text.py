"""The language of the reviews task: lexicon, grammar, generator, corruptions and gold score.

Grammar (``ADJP`` is an adjective phrase: ``[INT] ADJ [(and|but) [INT] ADJ]``)::

    the ASPECT|PRODUCT is ADJP [but the ASPECT|PRODUCT is ADJP] .
    this PRODUCT is ADJP .
    it is ADJP .
    i VERB this PRODUCT .

Gold score of a response (words = whitespace-separated tokens) to a prompt naming a
product; it is the sum of six components, in ``(-6, 3)``:

* ``sentiment  = 1.5 * tanh((#positive - #negative) / 2)`` counting every occurrence of a
  positive/negative adjective or verb; saturates, so a fourth positive word adds ~nothing;
* ``grammar    = -0.5 * min(#complete sentences the grammar rejects, 2)`` (a complete
  sentence ends with ".");
* ``ending     = +0.5`` if the last word is ".", else ``-0.5``;
* ``repetition = -0.5 * min(#content words (adjective, intensifier, aspect, verb) that
  already occurred earlier in the response, 3)``;
* ``length     = -0.25 * min(words outside the comfortable range 6..16, 4)``;
* ``relevance  = +0.5`` if the prompt's product is named, ``-0.5`` if another product is
  named, ``+0.25`` per distinct aspect specific to the prompt's product (at most 2).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable

PRODUCT_ASPECTS: dict[str, tuple[str, ...]] = {
    "camera": ("lens", "zoom", "flash", "battery"),
    "phone": ("screen", "battery", "charger", "case"),
    "laptop": ("keyboard", "screen", "battery", "fan"),
    "blender": ("motor", "blade", "lid"),
    "kettle": ("handle", "lid", "spout"),
    "toaster": ("slot", "lever", "timer"),
    "headset": ("sound", "cushion", "cable", "battery"),
    "backpack": ("strap", "zipper", "pocket"),
    "lamp": ("bulb", "switch", "shade"),
    "chair": ("seat", "cushion", "frame"),
    "watch": ("strap", "dial", "battery"),
    "printer": ("ink", "tray", "cable"),
    "jacket": ("zipper", "hood", "pocket", "collar"),
    "bicycle": ("brake", "chain", "saddle", "frame"),
    "tent": ("pole", "zipper", "floor"),
    "mattress": ("foam", "cover", "spring"),
}
PRODUCTS: tuple[str, ...] = tuple(PRODUCT_ASPECTS)
GENERIC_ASPECTS = ("price", "design", "quality", "size", "delivery", "packaging", "material")
ASPECTS: tuple[str, ...] = tuple(dict.fromkeys(
    [a for aspects in PRODUCT_ASPECTS.values() for a in aspects] + list(GENERIC_ASPECTS)))

POSITIVE_ADJECTIVES = ("great", "excellent", "good", "lovely", "solid", "sturdy", "reliable",
                       "comfortable", "sharp", "bright", "quiet", "fast", "beautiful", "perfect",
                       "smooth", "strong", "affordable", "durable")
NEGATIVE_ADJECTIVES = ("bad", "terrible", "awful", "poor", "weak", "flimsy", "noisy", "slow",
                       "ugly", "broken", "useless", "disappointing", "loose", "dull", "fragile",
                       "expensive", "uncomfortable", "leaky")
NEUTRAL_ADJECTIVES = ("okay", "average", "fine", "normal", "standard", "simple", "plain",
                      "small", "large", "heavy", "light", "usual")
INTENSIFIERS = ("very", "really", "extremely", "quite", "rather", "truly")
POSITIVE_VERBS = ("love", "like", "recommend", "enjoy")
NEGATIVE_VERBS = ("hate", "dislike", "regret", "returned")

POSITIVE = frozenset(POSITIVE_ADJECTIVES + POSITIVE_VERBS)
NEGATIVE = frozenset(NEGATIVE_ADJECTIVES + NEGATIVE_VERBS)
ADJECTIVES = POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES + NEUTRAL_ADJECTIVES
#: Words whose reuse within one response counts as repetition (function words and product
#: names do not: "this camera ... i love this camera" is fluent).
CONTENT_WORDS = frozenset(ADJECTIVES + INTENSIFIERS + ASPECTS + POSITIVE_VERBS + NEGATIVE_VERBS)
FUNCTION_WORDS = ("the", "this", "it", "i", "is", "and", "but", ".")

PROMPT_TEMPLATES = (
    "write a review of the {product} :",
    "review the {product} :",
    "what do you think of the {product} ?",
    "describe the {product} :",
    "how is the {product} ?",
    "share your opinion of the {product} :",
)

COMFORTABLE_LENGTH = (6, 16)
MAX_CANDIDATE_WORDS = 24

# ------------------------------------------------------------------------ grammar

_TAGS: dict[str, str] = {
    **{w: "A" for w in ASPECTS}, **{w: "P" for w in PRODUCTS}, **{w: "J" for w in ADJECTIVES},
    **{w: "N" for w in INTENSIFIERS}, **{w: "V" for w in POSITIVE_VERBS + NEGATIVE_VERBS},
    **{w: w for w in FUNCTION_WORDS},
}
_ADJP = r"(?:N )?J(?: (?:and|but) (?:N )?J)?"
_SENTENCE = re.compile(
    rf"the [AP] is {_ADJP}(?: but the [AP] is {_ADJP})?|this P is {_ADJP}|it is {_ADJP}"
    r"|i V this P"
)


def grammatical(sentence: list[str]) -> bool:
    """Whether the grammar accepts ``sentence`` (its words, without the final ".")."""
    tags = " ".join(_TAGS.get(w, "?") for w in sentence)
    return _SENTENCE.fullmatch(tags) is not None


# --------------------------------------------------------------------- gold score


def product_of(prompt: str) -> str | None:
    """The product a prompt asks about (``None`` when it names none)."""
    return next((w for w in prompt.split() if w in PRODUCT_ASPECTS), None)


def gold_components(prompt: str, response: str) -> dict[str, float]:
    """The six gold components of one response (see the module docstring)."""
    words = response.split()
    product = product_of(prompt)
    balance = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)

    sentences, current = [], []
    for w in words:
        if w == ".":
            sentences.append(current)
            current = []
        else:
            current.append(w)
    rejected = sum(not grammatical(s) for s in sentences)

    seen: set[str] = set()
    repeats = 0
    for w in words:
        if w in CONTENT_WORDS:
            repeats += w in seen
            seen.add(w)

    low, high = COMFORTABLE_LENGTH
    outside = max(0, low - len(words), len(words) - high)

    relevant = set(PRODUCT_ASPECTS.get(product, ())) & set(words)
    others = set(PRODUCTS).difference([product]) & set(words)
    relevance = (0.5 * (product in words) - 0.5 * bool(others)
                 + 0.25 * min(len(relevant), 2))
    return {
        "sentiment": 1.5 * math.tanh(balance / 2),
        "grammar": -0.5 * min(rejected, 2),
        "ending": 0.5 if words and words[-1] == "." else -0.5,
        "repetition": -0.5 * min(repeats, 3),
        "length": -0.25 * min(outside, 4),
        "relevance": relevance,
    }


def gold(prompt: str, response: str) -> float:
    return sum(gold_components(prompt, response).values())


# ---------------------------------------------------------------------- generator

TONES = ("positive", "negative", "neutral", "mixed")
_ADJECTIVES_BY_POLARITY = {"positive": POSITIVE_ADJECTIVES, "negative": NEGATIVE_ADJECTIVES,
                           "neutral": NEUTRAL_ADJECTIVES}
_VERBS_BY_POLARITY = {"positive": POSITIVE_VERBS, "negative": NEGATIVE_VERBS}


class _Writer:
    """Writes fluent sentences for one review, never reusing a content word (fluent
    writers vary their wording; repetition is a corruption)."""

    def __init__(self, rng: random.Random, product: str):
        self.rng = rng
        self.product = product
        self.used: set[str] = set()

    def pick(self, pool: tuple[str, ...]) -> str:
        word = self.rng.choice([w for w in pool if w not in self.used] or list(pool))
        self.used.add(word)
        return word

    def adjp(self, polarity: str, contrast: str | None = None, pair: bool = True) -> list[str]:
        words = [self.pick(INTENSIFIERS)] if self.rng.random() < 0.3 else []
        words.append(self.pick(_ADJECTIVES_BY_POLARITY[polarity]))
        if contrast is not None:
            words += ["but", self.pick(_ADJECTIVES_BY_POLARITY[contrast])]
        elif pair and self.rng.random() < 0.25:
            words += ["and", self.pick(_ADJECTIVES_BY_POLARITY[polarity])]
        return words

    def aspect(self) -> str:
        specific = PRODUCT_ASPECTS[self.product]
        return self.pick(specific if self.rng.random() < 0.65 else GENERIC_ASPECTS)

    def sentence(self, polarity: str, first: bool) -> list[str]:
        kinds = ["aspect", "aspect", "product"]
        kinds += ["verb"] if polarity != "neutral" else []
        kinds += [] if first else ["it"]
        kind = self.rng.choice(kinds)
        if kind == "aspect":
            return ["the", self.aspect(), "is", *self.adjp(polarity), "."]
        if kind == "product":
            return [self.rng.choice(("the", "this")), self.product, "is", *self.adjp(polarity), "."]
        if kind == "verb":
            return ["i", self.pick(_VERBS_BY_POLARITY[polarity]), "this", self.product, "."]
        return ["it", "is", *self.adjp(polarity), "."]

    def contrast(self, first: str, second: str) -> list[str]:
        if self.rng.random() < 0.5:  # "the lens is sharp but the battery is weak ."
            # Single adjectives keep a two-sentence review within 20 words.
            return ["the", self.aspect(), "is", *self.adjp(first, pair=False), "but",
                    "the", self.aspect(), "is", *self.adjp(second, pair=False), "."]
        return ["the", self.aspect(), "is", *self.adjp(first, contrast=second), "."]


def fluent_review(rng: random.Random, product: str, tone: str, sentences: int) -> list[str]:
    """A grammatical, repetition-free review of ``product`` in ``tone`` (see :data:`TONES`)."""
    writer = _Writer(rng, product)
    if tone == "mixed":
        first, second = rng.sample(["positive", "negative"], 2)
        if sentences == 1 or rng.random() < 0.5:
            words = writer.contrast(first, second)
            return words if sentences == 1 else words + writer.sentence(second, first=False)
        return writer.sentence(first, first=True) + writer.sentence(second, first=False)
    words: list[str] = []
    for i in range(sentences):
        words += writer.sentence(tone, first=i == 0)
    return words


# --------------------------------------------------------------------- corruptions


def _repeat(rng: random.Random, words: list[str], product: str) -> list[str]:
    content = [i for i, w in enumerate(words) if w in CONTENT_WORDS]
    if rng.random() < 0.5 and content:  # stutter: "sharp sharp sharp"
        i = rng.choice(content)
        return words[: i + 1] + [words[i]] * rng.randint(1, 3) + words[i + 1:]
    return words + words[-6:]  # the last phrase again


def _truncate(rng: random.Random, words: list[str], product: str) -> list[str]:
    return words[: rng.randint(2, max(2, len(words) - 1))]


def _off_topic(rng: random.Random, words: list[str], product: str) -> list[str]:
    other = rng.choice([p for p in PRODUCTS if p != product])
    return fluent_review(rng, other, rng.choice(TONES), rng.randint(1, 2))


def _stuff(rng: random.Random, words: list[str], product: str) -> list[str]:
    # A pile of sentiment words: the kind of text a proxy reward model may over-value.
    pool = POSITIVE_ADJECTIVES if rng.random() < 0.7 else NEGATIVE_ADJECTIVES
    pile = [rng.choice(pool) for _ in range(rng.randint(2, 5))]
    cut = len(words) - 1 if words and words[-1] == "." else len(words)
    return words[:cut] + pile + words[cut:]


def _swap(rng: random.Random, words: list[str], product: str) -> list[str]:
    if len(words) < 3:
        return words
    i = rng.randrange(len(words) - 2)
    return words[:i] + [words[i + 1], words[i]] + words[i + 2:]


def _ramble(rng: random.Random, words: list[str], product: str) -> list[str]:
    return words + fluent_review(rng, product, rng.choice(TONES), rng.randint(1, 2))


CORRUPTIONS: dict[str, Callable[[random.Random, list[str], str], list[str]]] = {
    "repeat": _repeat, "truncate": _truncate, "off-topic": _off_topic, "stuff": _stuff,
    "swap": _swap, "ramble": _ramble,
}


def candidate(rng: random.Random, product: str) -> str:
    """A response of varied quality: fluent in 40% of draws, else with 1-2 corruptions;
    2 to 24 words (redrawn when longer, so it fits the small models' context)."""
    while True:
        words = fluent_review(rng, product, rng.choice(TONES), rng.randint(1, 2))
        if rng.random() >= 0.4:
            for name in rng.sample(sorted(CORRUPTIONS), rng.randint(1, 2)):
                words = CORRUPTIONS[name](rng, words, product)
        if len(words) <= MAX_CANDIDATE_WORDS:
            return " ".join(words)
