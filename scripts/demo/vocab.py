"""Word pools the demo data draws from in more than one task (string tasks, conversations, tool requests,
repeat-after-me), and random names made of letters, so that tool arguments cannot be learned by heart."""

from __future__ import annotations

import contextlib
import contextvars
import random
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer


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


# Letter clusters for place names: most of the alphabet in most positions, so that a name's BPE pieces are as
# varied as real names' are (the 17 SYLLABLES above make a few dozen pieces, and a model trained to copy those
# copied the first piece of a real name and went on in syllables: "Cusco" -> "Cusavi").
ONSETS = items(
    """; b; bl; br; c; ch; d; dr; f; g; gh; gr; h; j; k; kh; l; m; n; p; ph; pr; qu; r; s; sh; sk; st; t; th; tr;
    ts; v; w; y; z; zh"""
)
VOWELS = items("a; e; i; o; u; y; ai; au; ea; ee; ia; io; oo; ou; ua; ei")
CODAS = items("b; ck; d; g; k; l; ll; m; n; nd; ng; nh; nk; nt; r; rd; rk; s; sh; sk; st; t; tt; x; z")


@dataclass(frozen=True)
class TokenPieces:
    """A tokenizer's own letter tokens to glue place words from: a capitalized one starts a word, lowercase ones go
    on, and `split` (the tokenizer's) keeps only words that split back into the tokens they were glued from."""

    first: Sequence[str]
    rest: Sequence[str]
    split: Callable[[str], list[str]]

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> TokenPieces:
        """The tokenizer's tokens of up to five letters that it also gives for themselves alone: capitalized ones
        to start a word, lowercase ones of two letters or more to go on."""

        def split(word: str) -> list[str]:
            return tokenizer.encode(word, add_special_tokens=False).tokens

        letters = [t for t in tokenizer.get_vocab() if t.isascii() and t.isalpha() and len(t) <= 5 and split(t) == [t]]
        first = sorted(t for t in letters if t[0].isupper() and (len(t) == 1 or t[1:].islower()))
        rest = sorted(t for t in letters if t.islower() and len(t) >= 2)
        return cls(first, rest, split)


# Shares of place words made of random letters and of glued pieces when nothing sets them (the shipped stages' data).
DEFAULT_PLACE_STYLES = (0.1, 0.0)
# Share of made-up places of two words ("Phuong Darik") when nothing sets it.
DEFAULT_TWO_WORD_PLACES = 0.15


@dataclass(frozen=True)
class _PlaceStyles:
    random_letters: float
    glued: float
    pieces: Sequence[str] | TokenPieces | None  # None: cut from the pools' words
    two_words: float


_DEFAULT_STYLES = _PlaceStyles(*DEFAULT_PLACE_STYLES, None, DEFAULT_TWO_WORD_PLACES)  # frozen: safe to share
_place_styles: contextvars.ContextVar[_PlaceStyles] = contextvars.ContextVar("place_styles", default=_DEFAULT_STYLES)
_PIECE_WORDS = [word.lower() for word in WORDS + NAMES]


@contextlib.contextmanager
def place_styles(
    random_letters: float,
    glued: float,
    pieces: Sequence[str] | TokenPieces | None = None,
    two_words: float = DEFAULT_TWO_WORD_PLACES,
) -> Iterator[None]:
    """Make that share of place words of random letters, and that share of two or three glued pieces, while
    generating (the default: a tenth of random letters, nothing glued). The pieces are drawn evenly from
    `pieces`, or (None) cut from the pools' words.

    A model that copies "Tallinn" as "Taltren" let its own guess of the next piece win over the piece in the
    question. Names glued from pieces it knows well ("Malardsun": Mallory, garden, sun) are where such guesses
    are strongest; but a model trained on them learns which pieces such names use and guesses those ("Auckland"
    -> "Auckpl"). Pieces drawn evenly from the tokenizer's own leave nothing to guess, only to copy.

    Glued lowercase pieces still split into other tokens once glued and capitalized ("bel" + "gar" is "B", "el",
    "gar"), so capitalized tokens ("Port", "Colo") start almost none of them: a model seeing a token a few times
    as an answer cannot copy it ("Portland" -> "Sever"). TokenPieces words are made of the tokens they were drawn as,
    so every letter token of the tokenizer is copied as often as any other.

    `two_words` is the share of places of two words. Glued words are of up to three tokens, so a model that saw
    many two-word places guesses a second word after a longer city ("Fukuoka Coco").
    """
    token = _place_styles.set(_PlaceStyles(random_letters, glued, pieces, two_words))
    try:
        yield
    finally:
        _place_styles.reset(token)


def _word_piece(rng: random.Random) -> str:
    word = rng.choice(_PIECE_WORDS)
    size = rng.randint(2, min(4, len(word)))
    start = rng.randint(0, len(word) - size)
    return word[start : start + size]


def _place_word(rng: random.Random) -> str:
    styles = _place_styles.get()
    letters, glued, pieces = styles.random_letters, styles.glued, styles.pieces
    draw = rng.random()
    if draw < letters:  # no structure at all: only copying gets these right
        return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8))).capitalize()
    if draw < letters + glued and isinstance(pieces, TokenPieces):
        return _token_word(rng, pieces)
    if draw < letters + glued:
        parts = rng.randint(2, 3)
        return "".join(rng.choice(pieces) if pieces else _word_piece(rng) for _ in range(parts)).capitalize()
    parts = rng.choices((1, 2, 3), weights=(3, 5, 2))[0]
    return "".join(_syllable(rng) for _ in range(parts)).capitalize()


def _token_word(rng: random.Random, pieces: TokenPieces) -> str:
    while True:
        drawn = [rng.choice(pieces.first), *rng.choices(pieces.rest, k=rng.randint(1, 2))]
        if pieces.split("".join(drawn)) == drawn:
            return "".join(drawn)


def _syllable(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + (rng.choice(CODAS) if rng.random() < 0.4 else "")


def place_name(rng: random.Random, avoid: frozenset[str] = frozenset()) -> str:
    """A made-up place of one word or, now and then, two ("Tbesk", "Phuong Darik"), no word of it in `avoid`."""
    two_words = _place_styles.get().two_words
    while True:
        words = [_place_word(rng) for _ in range(1 if rng.random() < 1 - two_words else 2)]
        name = " ".join(words)
        if len(name) > 2 and not avoid.intersection(words):
            return name
