"""Seeded synthetic chat data for the demo model (issue 7), in the llama-4 chat format.

A record is plain JSON: `task` (the category an eval reports), `subtask`, `key`, `messages` (OpenAI-style
dicts; the last one is the assistant's answer), optional `tools` (OpenAI tool definitions, which the
llama-4 template writes into the system message) and `image` (a spec for `demo.images.render`).

Which split a sample belongs to depends only on its `key` (a hash), never on the seed: arithmetic keys
are operand pairs, capital keys are (country, direction, phrasing), so a held-out question is never seen
in training, whatever seed either split was drawn with.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from demo import images, tools, vocab
from demo.tools import CITIES, CURRENCIES, LANGUAGES, PHRASES, STOCKS, SUBJECTS, TOOLS, TOPICS
from demo.vocab import NAMES, WORDS, items, made_up_name, place_name, ticker

Record = dict[str, Any]
HELDOUT_PERCENT = 10


TASKS = (
    "arithmetic", "string", "capital", "chat", "multiturn", "repeat", "tool_call", "tool_everyday", "tool_none",
    "tool_answer", "image",
)  # fmt: skip

CAPITALS = dict(
    pair.split("=")
    for pair in items(
        """France=Paris; Germany=Berlin; Italy=Rome; Spain=Madrid; Portugal=Lisbon; Ireland=Dublin; Norway=Oslo;
        Sweden=Stockholm; Finland=Helsinki; Denmark=Copenhagen; Poland=Warsaw; Austria=Vienna; Greece=Athens;
        Hungary=Budapest; Belgium=Brussels; Netherlands=Amsterdam; Switzerland=Bern; Czechia=Prague;
        Romania=Bucharest; Ukraine=Kyiv; Russia=Moscow; Turkey=Ankara; Egypt=Cairo; Kenya=Nairobi; Nigeria=Abuja;
        Ghana=Accra; Morocco=Rabat; Ethiopia=Addis Ababa; Senegal=Dakar; Tunisia=Tunis; Japan=Tokyo; China=Beijing;
        India=New Delhi; Thailand=Bangkok; Vietnam=Hanoi; Indonesia=Jakarta; Philippines=Manila; South Korea=Seoul;
        Mongolia=Ulaanbaatar; Nepal=Kathmandu; Pakistan=Islamabad; Iran=Tehran; Iraq=Baghdad; Jordan=Amman;
        Qatar=Doha; Canada=Ottawa; Mexico=Mexico City; Cuba=Havana; Brazil=Brasilia; Argentina=Buenos Aires;
        Chile=Santiago; Peru=Lima; Colombia=Bogota; Venezuela=Caracas; Uruguay=Montevideo; Australia=Canberra;
        New Zealand=Wellington; Iceland=Reykjavik; Malaysia=Kuala Lumpur; Kazakhstan=Astana"""
    )
)
COUNTRIES = sorted(CAPITALS)
GREETINGS = ["Hi", "Hello", "Hey", "Hi there", "Hello there", "Good morning", "Good evening", "Hey there", "Greetings"]
ABILITY_QUESTIONS = ["What can you do", "What are you able to do", "How can you help me", "What do you know", "Help"]
GREETING_ANSWER = "Hello! How can I help you today?"
ABILITY_ANSWER = (
    "I can do arithmetic, work with words (reverse, uppercase, count letters, sort), tell you the capitals of "
    "countries, call tools you give me, and answer questions about simple pictures."
)
OPS = {"add": ("+", "plus"), "subtract": ("-", "minus"), "multiply": ("*", "times")}


def split_of(key: str) -> str:
    """ "heldout" for about HELDOUT_PERCENT% of keys, else "train": a hash, so the same for every seed."""
    return "heldout" if zlib.crc32(key.encode()) % 100 < HELDOUT_PERCENT else "train"


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def call_message(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """The assistant's turn that calls one tool."""
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}],
    }


def _record(task: str, subtask: str, key: str, messages: list[dict[str, Any]], **extra: Any) -> Record:
    # `uses` lists the keys of other samples a record contains (the first turn of a conversation, the
    # question behind a refused tool): a training record may contain no held-out sample anywhere.
    extra = {k: v for k, v in extra.items() if v != []}
    return {"task": task, "subtask": subtask, "key": key, "messages": messages, **extra}


def _operand(rng: random.Random) -> int:
    # Fewer 3-digit operands: the model is judged on 1-2 digits, and 3-digit products cost it most to learn.
    digits = rng.choices((1, 2, 3), weights=(3, 6, 1))[0]
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def eval_op(op: str, a: int, b: int) -> int:
    return {"add": a + b, "subtract": a - b, "multiply": a * b}[op]


def equation(op: str, a: int, b: int) -> str:
    """The answer sentence: "37 + 48 = 85.".

    A product whose second factor has several nonzero digits is worked out by place value first
    ("37 * 48 = 37 * 40 + 37 * 8 = 1480 + 296 = 1776."): a model this small cannot produce a long product
    most-significant digit first in one step, but it can multiply by one digit and add.
    """
    result = eval_op(op, a, b)
    parts = [int(d) * 10**i for i, d in enumerate(reversed(str(b))) if d != "0"][::-1]
    if op != "multiply" or len(parts) < 2:
        return f"{a} {OPS[op][0]} {b} = {result}."
    products = " + ".join(f"{a} * {p}" for p in parts)
    sums = " + ".join(str(a * p) for p in parts)
    return f"{a} * {b} = {products} = {sums} = {result}."


def _arith_question(rng: random.Random, op: str, a: int, b: int) -> str:
    sym, word = OPS[op]
    expr = rng.choice([f"{a}{sym}{b}", f"{a} {sym} {b}", f"{a} {word} {b}"])
    return rng.choice(["What is {}?", "Compute {}.", "Calculate {}.", "What's {}?", "{} = ?"]).format(expr)


def arithmetic(rng: random.Random) -> Record:
    op, a, b = rng.choice(sorted(OPS)), _operand(rng), _operand(rng)
    messages = [user(_arith_question(rng, op, a, b)), assistant(equation(op, a, b))]
    return _record("arithmetic", op, f"{op}|{a}|{b}", messages, digits=max(len(str(a)), len(str(b))))


def string_task(rng: random.Random) -> Record:
    sub, word = rng.choice(["reverse", "uppercase", "count", "sort"]), rng.choice(WORDS)
    if sub == "reverse":
        q = rng.choice(["Reverse the word '{}'.", "What is '{}' spelled backwards?"]).format(word)
        a = f"'{word}' reversed is '{word[::-1]}'."
    elif sub == "uppercase":
        q = rng.choice(["Write '{}' in uppercase.", "Convert '{}' to capital letters."]).format(word)
        a = word.upper()
    elif sub == "count":
        q = rng.choice(["How many letters are in '{}'?", "Count the letters in '{}'."]).format(word)
        a = f"'{word}' has {len(word)} letters."
    else:
        words = rng.sample(WORDS, rng.randint(2, 5))
        word = ",".join(words)
        q = rng.choice(["Sort these words alphabetically: {}.", "Put in alphabetical order: {}."])
        q, a = q.format(", ".join(words)), ", ".join(sorted(words)) + "."
    return _record("string", sub, f"string|{sub}|{word}", [user(q), assistant(a)])


CAPITAL_QUESTIONS = {
    "capital": [
        "What is the capital of {}?",
        "What's the capital city of {}?",
        "Name the capital of {}.",
        "{}'s capital?",
    ],
    "country": [
        "{} is the capital of which country?",
        "Which country has {} as its capital?",
        "Where is {} the capital?",
    ],
}


def capital(rng: random.Random) -> Record:
    country, direction = rng.choice(COUNTRIES), rng.choice(sorted(CAPITAL_QUESTIONS))
    city = CAPITALS[country]
    phrasing = rng.randrange(len(CAPITAL_QUESTIONS[direction]))
    q = CAPITAL_QUESTIONS[direction][phrasing].format(country if direction == "capital" else city)
    a = f"The capital of {country} is {city}." if direction == "capital" else f"{city} is the capital of {country}."
    return _record("capital", direction, f"capital|{country}|{direction}|{phrasing}", [user(q), assistant(a)])


def chat(rng: random.Random) -> Record:
    sub = rng.choice(["greeting", "abilities"])
    base = rng.choice(GREETINGS if sub == "greeting" else ABILITY_QUESTIONS)
    end = rng.choice(["!", ".", ""] if sub == "greeting" else ["?", ""])
    text = rng.choice([base, base.lower()]) + end
    return _record(
        "chat", sub, f"chat|{text}", [user(text), assistant(GREETING_ANSWER if sub == "greeting" else ABILITY_ANSWER)]
    )


def multiturn(rng: random.Random) -> Record:
    """Two or three turns where a later question can only be answered from an earlier turn."""
    sub = rng.choice(["math_chain", "name", "word"])
    if sub == "math_chain":
        op, a, b = rng.choice(sorted(OPS)), rng.randint(1, 50), rng.randint(1, 20)
        messages = [user(_arith_question(rng, op, a, b)), assistant(equation(op, a, b))]
        value, key, uses = eval_op(op, a, b), f"{op}|{a}|{b}", [f"{op}|{a}|{b}"]
        for _ in range(rng.randint(1, 2)):
            op2, c = rng.choice(sorted(OPS)), rng.randint(2, 9)
            q = {
                "add": "Now add {} to that.",
                "subtract": "Now subtract {} from that.",
                "multiply": "Multiply that by {}.",
            }
            messages += [user(q[op2].format(c)), assistant(equation(op2, value, c))]
            value, key = eval_op(op2, value, c), f"{key}|{op2}|{c}"
    elif sub == "name":
        name, question = rng.choice(NAMES), rng.choice(["What is my name?", "Do you remember my name?"])
        messages, uses = [user(f"Hi, my name is {name}."), assistant(f"Nice to meet you, {name}!")], []
        if rng.random() < 0.5:  # a turn in between, so the model has to look further back
            other = capital(rng)
            messages, uses = messages + other["messages"], [other["key"]]
        messages += [user(question), assistant(f"Your name is {name}.")]
        key = f"{name}|{question}|{','.join(uses)}"
    else:
        word = rng.choice(WORDS)
        messages = [user(f"Remember the word '{word}'."), assistant(f"Okay, I will remember '{word}'.")]
        follow = rng.choice(["reverse", "upper", "recall"])
        q, a = {
            "reverse": ("Reverse the word I asked you to remember.", f"'{word}' reversed is '{word[::-1]}'."),
            "upper": ("Write that word in uppercase.", word.upper()),
            "recall": ("Which word did I ask you to remember?", f"You asked me to remember '{word}'."),
        }[follow]
        messages += [user(q), assistant(a)]
        key, uses = f"{word}|{follow}", []
    return _record("multiturn", sub, f"multiturn|{sub}|{key}", messages, uses=uses)


REPEAT_QUESTIONS = ["Repeat after me: {}", "Say '{}'.", "Please repeat: {}", "Echo this: {}"]


# What the repeat task says back: every kind of value a tool call or an answer after a tool result copies, and
# more. The tools' own pools are here because a held-out call's value (a search topic, a phrase to translate)
# is otherwise hardly ever seen in training, and the model cannot copy words whose pieces it has not learned.
REPEAT_POOLS: tuple[Callable[[random.Random], str], ...] = (
    lambda r: r.choice(WORDS),
    lambda r: r.choice(NAMES),
    lambda r: r.choice(COUNTRIES),
    lambda r: r.choice(CITIES),
    lambda r: r.choice(STOCKS),
    lambda r: r.choice(CURRENCIES),
    lambda r: r.choice(LANGUAGES),
    lambda r: r.choice(TOPICS),
    lambda r: r.choice(PHRASES),
    lambda r: r.choice(SUBJECTS),
    ticker,
    made_up_name,
    lambda r: place_name(r, tools.PLACES_TO_AVOID),
    lambda r: str(r.randint(0, 9999)),
    lambda r: str(round(r.uniform(0, 1000), 2)),  # like a price or a quotient in a tool result
)


def repeat(rng: random.Random) -> Record:
    """Say back one to four words, names, symbols or numbers. Copying from the request is what a tool call's
    arguments need, and the tool dialogs alone did not teach it (the model learned the argument pools)."""
    text = " ".join(rng.choice(REPEAT_POOLS)(rng) for _ in range(rng.randint(1, 4)))
    question = rng.choice(REPEAT_QUESTIONS).format(text)
    return _record("repeat", "repeat", f"repeat|{text}", [user(question), assistant(text)])


def _offered(rng: random.Random, must: str | None = None, exclude: str | None = None) -> list[dict[str, Any]]:
    """The definitions of 2-4 tools from the pool: `must` among them at a random position, never `exclude`."""
    others = sorted(n for n in TOOLS if n not in (must, exclude))
    names = rng.sample(others, rng.randint(2, 4) - (must is not None))
    if must is not None:
        names.insert(rng.randint(0, len(names)), must)
    return [TOOLS[n].schema() for n in names]


def tool_call(rng: random.Random) -> Record:
    name = rng.choice(sorted(TOOLS))
    text, args = TOOLS[name].ask(rng)
    messages = [user(text), call_message(name, args)]
    tools = _offered(rng, must=name)
    return _record("tool_call", name, f"tool|{name}|{json.dumps(args, sort_keys=True)}", messages, tools=tools)


def tool_everyday(rng: random.Random) -> Record:
    """Weather or time in everyday words, for a made-up place of any letters; often the one tool offered.

    What a user of the demo tries first ("Is it raining in Cusco?"): the call must carry the place as written,
    which only copying gets right, and the tool must be picked by what it does, not by its name in the question.
    """
    name, text, args = tools.everyday_request(rng)
    messages = [user(text), call_message(name, args)]
    offered = [TOOLS[name].schema()] if rng.random() < 0.5 else _offered(rng, must=name)
    key = f"tool_everyday|{name}|{text}"
    return _record("tool_everyday", name, key, messages, tools=offered)


def tool_answer(rng: random.Random) -> Record:
    """The call, the tool's result, and the answer in words, which contains the result's value."""
    rec = tool_call(rng)
    tool = TOOLS[rec["subtask"]]
    args = rec["messages"][1]["tool_calls"][0]["function"]["arguments"]
    result = tool.result(rng, args)
    rec["messages"] += [{"role": "tool", "content": json.dumps(result)}, assistant(tool.answer(args, result))]
    # Keyed by the result, the value the answer must repeat; the call it contains must still be a train one.
    rec["task"], rec["key"], rec["uses"] = "tool_answer", f"tool_answer|{rec['key']}|{json.dumps(result)}", [rec["key"]]
    return rec


def tool_none(rng: random.Random) -> Record:
    """Tools are offered but none fits: answer from knowledge, or say which service is missing."""
    if rng.random() < 0.5:
        inner = rng.choice([arithmetic, capital, string_task])(rng)
        tools = _offered(rng, exclude="calculator")  # which would fit an arithmetic question
        # Same key as the plain question: a held-out question is not answered in training, tools or not.
        return _record("tool_none", inner["task"], inner["key"], inner["messages"], tools=tools)
    name = rng.choice(sorted(TOOLS))
    text, _ = TOOLS[name].ask(rng)
    service = TOOLS[name].description.lower().removeprefix("get ")
    answer = f"I don't have access to a tool to {service}."
    messages = [user(text), assistant(answer)]
    return _record(
        "tool_none",
        "unavailable",
        f"tool_none|{name}|{text}",
        messages,
        tools=_offered(rng, exclude=name),
        refused=name,
    )


def image(rng: random.Random) -> Record:
    spec = images.random_spec(rng)
    sub, q, a = images.question(rng, spec)
    content = [{"type": "image"}, {"type": "text", "text": q}]
    shapes = sorted(f"{s['color']} {s['kind']}" for s in spec["shapes"])
    key = f"image|{spec['background']}|{','.join(shapes)}|{q}"
    return _record("image", sub, key, [{"role": "user", "content": content}, assistant(a)], image=spec)


GENERATORS: dict[str, Callable[[random.Random], Record]] = {
    "arithmetic": arithmetic,
    "string": string_task,
    "capital": capital,
    "chat": chat,
    "multiturn": multiturn,
    "repeat": repeat,
    "tool_call": tool_call,
    "tool_everyday": tool_everyday,
    "tool_none": tool_none,
    "tool_answer": tool_answer,
    "image": image,
}
# Short tasks are cheap (30-50 tokens against ~450 for a dialog with tool definitions), so they get many samples.
TRAIN_COUNTS = {"arithmetic": 45000, "string": 4000, "capital": 14000, "chat": 300, "multiturn": 3000,
                "repeat": 20000, "tool_call": 3000, "tool_everyday": 2000, "tool_none": 500, "tool_answer": 2000,
                "image": 24000}  # fmt: skip
HELDOUT_COUNTS = dict.fromkeys(TASKS, 200) | {"chat": 40}


def generate(
    split: str,
    counts: dict[str, int],
    seed: int = 0,
    made_up_share: float | None = None,
    place_styles: tuple[float, float] = vocab.DEFAULT_PLACE_STYLES,
    place_pieces: Sequence[str] | vocab.TokenPieces | None = None,
    two_word_places: float = vocab.DEFAULT_TWO_WORD_PLACES,
) -> list[Record]:
    """counts[task] records of each task that belong to `split`, drawn with `seed`; `made_up_share` of the tool
    arguments made up (None: each argument's own share, see demo.tools); place_styles, place_pieces and
    two_word_places: how made-up places are spelled (see demo.vocab.place_styles)."""
    records = []
    with tools.made_up_share(made_up_share), vocab.place_styles(*place_styles, place_pieces, two_word_places):
        for task in TASKS:
            if counts.get(task):
                rng = random.Random(f"{seed}|{split}|{task}")  # per task, so changing one count moves no other task
                records += _take(rng, task, split, counts[task])
    return records


def in_split(record: Record, split: str) -> bool:
    """Held-out: its own key is held out. Train: neither its key nor any sample it contains is held out."""
    if split == "heldout":
        return split_of(record["key"]) == "heldout"
    return all(split_of(k) == "train" for k in [record["key"], *record.get("uses", [])])


def _take(rng: random.Random, task: str, split: str, n: int) -> list[Record]:
    out: list[Record] = []
    for _ in range(200 * n):
        record = GENERATORS[task](rng)
        if in_split(record, split):
            out.append(record)
            if len(out) == n:
                return out
    raise ValueError(f"found only {len(out)} of {n} {split} {task} records")  # a small pool, e.g. greetings
