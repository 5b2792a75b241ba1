"""Word pools the demo data draws from in more than one task (string tasks, conversations, tool requests,
repeat-after-me), and random names made of letters, so that tool arguments cannot be learned by heart."""

from __future__ import annotations

import random
import string


def items(text: str) -> list[str]:
    return [item.strip() for item in text.split(";")]


WORDS = items(
    """apple; river; stone; cloud; garden; pencil; window; orange; tiger; planet; silver; candle; forest; bottle;
    rocket; mirror; violin; dragon; pepper; castle; summer; winter; spring; autumn; yellow; purple; button; camera;
    ladder; basket; island; bridge; jungle; lemon; mango; coffee; puzzle; hammer; rabbit; turtle; falcon; wizard;
    ocean; desert; valley; meadow; harbor; engine; marble; copper; velvet; cotton; cherry; banana; kitten; puppy;
    sun; moon; star; tree; book; lamp; door; chair; table; cup; fish; bird; frog; bear; wolf; fox; owl; rain; snow;
    wind; fire; sand; salt; milk; bread; cake"""
)
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar"]


def ticker(rng: random.Random) -> str:
    """A made-up stock symbol: three or four capital letters."""
    return "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 4)))


def phrase(rng: random.Random, low: int, high: int) -> str:
    """low to high distinct words of WORDS."""
    return " ".join(rng.sample(WORDS, rng.randint(low, high)))


SYLLABLES = ["ba", "lo", "ren", "ta", "ki", "mo", "sa", "vi", "dor", "el", "na", "pu", "ri", "zan", "go", "fe", "lu"]


def made_up_name(rng: random.Random) -> str:
    """A capitalized name of two or three syllables ("Kimodor"), for towns and people nobody has heard of."""
    return "".join(rng.choices(SYLLABLES, k=rng.randint(2, 3))).capitalize()
