"""The demo model's tool pool: ten OpenAI tool definitions, each with requests, fake results and answers.

A tool is a schema plus three small functions: `ask` samples a user request and the arguments the right
call carries, `result` invents what the tool returns, `answer` says that result in words. The answer
always contains the result's value, which is what the eval checks.
"""

from __future__ import annotations

import contextlib
import contextvars
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from demo import vocab

# A call's argument is the pool value asked for or, half the time, a made-up one (random words, letters or
# syllables), so that the model has to copy arguments from the request rather than learn the pool by heart
# (held-out calls use argument values never seen in a call to that tool in training). Training data may make up
# more of them (see made_up_share).
CITIES = [
    "Paris", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima", "Oslo", "Seoul", "Sydney", "Toronto", "Delhi",
    "London", "Vienna", "Dublin", "Lisbon", "Prague", "Warsaw", "Athens", "Helsinki", "Nairobi", "Bangkok",
    "Hanoi", "Manila", "Jakarta", "Istanbul", "Chicago", "Boston", "Denver", "Miami", "Havana", "Bogota",
    "Santiago", "Caracas", "Montreal", "Vancouver", "Munich", "Milan", "Zurich", "Geneva", "Stockholm", "Dakar",
    "Copenhagen", "Budapest", "Brussels", "Amsterdam", "Bern", "Bucharest", "Kyiv", "Moscow", "Ankara", "Accra",
    "Rabat", "Tunis", "Beijing", "Kathmandu", "Tehran", "Baghdad", "Amman", "Doha", "Ottawa", "Montevideo",
    "Canberra", "Wellington", "Reykjavik", "Astana", "Osaka", "Seattle", "Dallas", "Hamburg", "Lyon", "Porto",
    "Naples", "Riga", "Sofia", "Zagreb", "Perth", "Quito", "Lagos", "Austin", "Houston", "Kyoto",
]  # fmt: skip
# Real cities in no training pool, never made up either (vocab.place_name avoids them): what
# benchmarks/tool_call_copy.py and the tests ask the demo model about, to see it copy a name it never saw.
UNSEEN_CITIES = [
    "Marrakesh", "Cusco", "Tbilisi", "Ljubljana", "Bratislava", "Vilnius", "Tallinn", "Minsk", "Yerevan", "Baku",
    "Tashkent", "Bishkek", "Dushanbe", "Kabul", "Karachi", "Lahore", "Dhaka", "Colombo", "Yangon", "Vientiane",
    "Phnom Penh", "Taipei", "Busan", "Sapporo", "Nagoya", "Fukuoka", "Shanghai", "Chengdu", "Harbin", "Darwin",
    "Adelaide", "Brisbane", "Hobart", "Auckland", "Suva", "Honolulu", "Anchorage", "Phoenix", "Portland", "Memphis",
    "Nashville", "Detroit", "Winnipeg", "Calgary", "Halifax", "Guadalajara", "Monterrey", "Medellin", "Cali",
    "Valparaiso",
]  # fmt: skip
# ... and the everyday phrasings they are asked in, which no training request uses either.
UNSEEN_WEATHER_QUESTIONS = [
    "Is it raining in {}?", "Should I take a coat in {} today?", "What is the weather like in {}?"
]  # fmt: skip
CURRENCIES = ["USD", "EUR", "JPY", "GBP", "CHF", "CAD", "AUD", "INR", "CNY", "SEK", "NOK", "MXN", "BRL", "KRW"]
UNITS = [("km", "miles"), ("miles", "km"), ("kg", "pounds"), ("pounds", "kg"), ("meters", "feet"), ("feet", "meters")]
TOPICS = [
    "black holes", "the Roman empire", "electric cars", "honey bees", "volcanoes", "jazz music", "the moon",
    "coral reefs", "ancient Egypt", "solar panels", "chess openings", "penguins", "the Alps", "green tea",
    "dinosaurs", "quantum computing", "the Olympics", "rain forests", "Mars", "sourdough bread",
]  # fmt: skip
STOCKS = [
    "AAPL", "MSFT", "NVDA", "AMZN", "TSLA", "META", "GOOG", "NFLX", "INTC", "AMD", "IBM", "ORCL", "SHOP", "UBER",
    "DIS", "NKE", "KO", "PEP", "SBUX", "BABA",
]  # fmt: skip
LANGUAGES = ["French", "German", "Spanish", "Italian", "Japanese", "Portuguese", "Dutch", "Korean"]
PHRASES = [
    "good morning", "thank you", "where is the station", "I like tea", "see you soon", "good night", "how are you",
    "the bill please", "I am lost", "happy birthday",
]  # fmt: skip
EMAIL_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
SUBJECTS = ["lunch", "the report", "tomorrow", "the meeting", "holidays", "the budget", "a new idea", "dinner"]

Args = dict[str, Any]
T = TypeVar("T")

# None: each argument's own share of made-up values (a quarter for cities, half for the rest)
_made_up_share: contextvars.ContextVar[float | None] = contextvars.ContextVar("made_up_share", default=None)


@contextlib.contextmanager
def made_up_share(share: float | None) -> Iterator[None]:
    """Make up this share of every tool argument while generating (None: each argument's own share).

    A pool value held out of training is otherwise often answered with a pool value the model has seen in that
    argument; fewer pool values in training make copying from the request pay more than recalling the pool.
    """
    token = _made_up_share.set(share)
    try:
        yield
    finally:
        _made_up_share.reset(token)


def _pool_or_made_up(rng: random.Random, pool: Sequence[T], make_up: Callable[[random.Random], T], share: float) -> T:
    chosen = _made_up_share.get()
    return rng.choice(pool) if rng.random() < 1 - (share if chosen is None else chosen) else make_up(rng)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    params: dict[str, Any]  # JSON-schema properties
    required: tuple[str, ...]
    ask: Callable[[random.Random], tuple[str, Args]]
    result: Callable[[random.Random, Args], Args]
    answer: Callable[[Args, Args], str]

    def schema(self) -> dict[str, Any]:
        parameters = {"type": "object", "properties": self.params, "required": list(self.required)}
        function = {"name": self.name, "description": self.description, "parameters": parameters}
        return {"type": "function", "function": function}


def _s(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def _i(description: str) -> dict[str, Any]:
    return {"type": "integer", "description": description}


def _n(description: str) -> dict[str, Any]:
    return {"type": "number", "description": description}


def _city(rng: random.Random) -> str:
    return _pool_or_made_up(rng, CITIES, vocab.made_up_name, 0.25)


def _weather(rng: random.Random) -> tuple[str, Args]:
    city, unit = _city(rng), rng.choice(["celsius", "fahrenheit"])
    text = rng.choice(["What's the weather in {c} in {u}?", "How warm is it in {c}? Use {u}.", "Weather in {c}, {u}."])
    return text.format(c=city, u=unit), {"location": city, "unit": unit}


def _time(rng: random.Random) -> tuple[str, Args]:
    city = _city(rng)
    return rng.choice(["What time is it in {}?", "Tell me the current time in {}."]).format(city), {"location": city}


def _currency(rng: random.Random) -> tuple[str, Args]:
    amount = _pool_or_made_up(rng, [10, 20, 50, 100, 250, 1000], lambda r: r.randint(1, 5000), 0.5)
    a, b = rng.sample(CURRENCIES, 2)
    text = rng.choice(["Convert {n} {a} to {b}.", "How much is {n} {a} in {b}?"]).format(n=amount, a=a, b=b)
    return text, {"amount": amount, "from_currency": a, "to_currency": b}


def _units(rng: random.Random) -> tuple[str, Args]:
    value, (a, b) = rng.randint(1, 500), rng.choice(UNITS)
    text = rng.choice(["Convert {v} {a} to {b}.", "How many {b} is {v} {a}?"]).format(v=value, a=a, b=b)
    return text, {"value": value, "from_unit": a, "to_unit": b}


def _search(rng: random.Random) -> tuple[str, Args]:
    topic = _pool_or_made_up(rng, TOPICS, lambda r: vocab.phrase(r, 1, 3), 0.5)
    return rng.choice(["Search the web for {}.", "Look up the latest news about {}."]).format(topic), {"query": topic}


def _calculator(rng: random.Random) -> tuple[str, Args]:
    expr = f"{rng.randint(100, 9999)} / {rng.randint(2, 99)}"
    text = rng.choice(["Use the calculator for {}.", "Calculate {} with the calculator."])
    return text.format(expr), {"expression": expr}


def _stock(rng: random.Random) -> tuple[str, Args]:
    symbol = _pool_or_made_up(rng, STOCKS, vocab.ticker, 0.5)
    text = rng.choice(["What is the stock price of {}?", "How much does {} trade at?"])
    return text.format(symbol), {"symbol": symbol}


def _translate(rng: random.Random) -> tuple[str, Args]:
    phrase = _pool_or_made_up(rng, PHRASES, lambda r: vocab.phrase(r, 2, 3), 0.5)
    language = rng.choice(LANGUAGES)
    text = f'Translate "{phrase}" into {language}.'
    return text, {"text": phrase, "target_language": language}


def _timer(rng: random.Random) -> tuple[str, Args]:
    minutes = rng.randint(1, 90)
    return rng.choice(["Set a timer for {} minutes.", "Start a {} minute timer."]).format(minutes), {"minutes": minutes}


def _email(rng: random.Random) -> tuple[str, Args]:
    name = _pool_or_made_up(rng, EMAIL_NAMES, lambda r: vocab.made_up_name(r).lower(), 0.5)
    subject = _pool_or_made_up(rng, SUBJECTS, lambda r: vocab.phrase(r, 1, 2), 0.5)
    text = f"Send an email to {name}@example.com with the subject {subject!r}."
    return text.replace("'", '"'), {"to": f"{name}@example.com", "subject": subject}


# Weather and time asked the way people ask, not in the tool's own words; the unit, when the question names
# none, is celsius.
EVERYDAY_WEATHER = [
    "Do I need an umbrella in {}?", "Will it be sunny in {} today?", "How hot is it in {} right now?",
    "How cold is it in {}?", "What's the forecast for {}?", "Tell me the weather in {}.", "How's the weather in {}?",
    "What's the temperature in {}?", "Can you check the weather in {} for me?", "Weather for {}?",
    "I'm flying to {} tomorrow. How's the weather there?", "Will I need sunglasses in {}?", "Any snow in {} today?",
    "My sister lives in {}. Is she having nice weather?", "Going for a walk in {}. What's it like outside?",
]  # fmt: skip
EVERYDAY_TIME = [
    "What's the time in {} right now?", "Do you know what time it is in {}?", "What hour is it in {}?",
    "Check the local time in {}, please.", "I need to call a friend in {}. What time is it there?",
    "Is it late in {} now?", "Clock check: {}?",
]  # fmt: skip
WHEN = ["today", "tonight", "tomorrow", "this weekend", "right now", "this morning", "at the moment"]
PLACES_TO_AVOID = frozenset(word for city in UNSEEN_CITIES for word in city.split())


def _when(rng: random.Random, question: str, words: list[str]) -> str:
    """Half the time, a question that ends with its place gets a time after it ("... in {} tonight?"): a name
    the model copies must end at the first word that is not part of it, which a name at the end never teaches."""
    if question.endswith(("{}?", "{}.")) and rng.random() < 0.5:
        return f"{question[:-1]} {rng.choice(words)}{question[-1]}"
    return question


def everyday_request(rng: random.Random) -> tuple[str, str, Args]:
    """(tool name, request, arguments): weather or time in a made-up place of any letters, in everyday words."""
    place = vocab.place_name(rng, PLACES_TO_AVOID)
    if rng.random() < 0.3:
        text = _when(rng, rng.choice(EVERYDAY_TIME), ["now", "right now", "at the moment"]).format(place)
        return "get_time", text, {"location": place}
    text, unit = _when(rng, rng.choice(EVERYDAY_WEATHER), WHEN).format(place), "celsius"
    if rng.random() < 0.3:
        unit = rng.choice(["celsius", "fahrenheit"])
        text += rng.choice([" In {}, please.", " Use {}.", " Give it in {}."]).format(unit)
    return "get_weather", text, {"location": place, "unit": unit}


def _divide(expression: str) -> float:
    a, b = expression.split(" / ")
    return round(int(a) / int(b), 2)


def _money(rng: random.Random) -> float:
    return round(rng.uniform(1, 900), 2)


TOOLS: dict[str, Tool] = {
    t.name: t
    for t in [
        Tool(
            "get_weather",
            "Get the current weather in a city",
            {"location": _s("City name"), "unit": _s("Unit", enum=["celsius", "fahrenheit"])},
            ("location", "unit"),
            _weather,
            lambda r, a: {"temperature": r.randint(-5, 35), "condition": r.choice(["sunny", "cloudy", "rainy"])},
            lambda a, r: f"It is {r['temperature']} degrees {a['unit']} and {r['condition']} in {a['location']}.",
        ),
        Tool(
            "get_time",
            "Get the current local time in a city",
            {"location": _s("City name")},
            ("location",),
            _time,
            lambda r, a: {"time": f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}"},
            lambda a, r: f"It is {r['time']} in {a['location']}.",
        ),
        Tool(
            "convert_currency",
            "Convert an amount of money between currencies",
            {"amount": _n("Amount"), "from_currency": _s("Currency code"), "to_currency": _s("Currency code")},
            ("amount", "from_currency", "to_currency"),
            _currency,
            lambda r, a: {"result": _money(r)},
            lambda a, r: f"{a['amount']} {a['from_currency']} is {r['result']} {a['to_currency']}.",
        ),
        Tool(
            "convert_units",
            "Convert a value between units of length or weight",
            {"value": _n("Value"), "from_unit": _s("Unit"), "to_unit": _s("Unit")},
            ("value", "from_unit", "to_unit"),
            _units,
            lambda r, a: {"result": round(r.uniform(0.5, 1600), 1)},
            lambda a, r: f"{a['value']} {a['from_unit']} is {r['result']} {a['to_unit']}.",
        ),
        Tool(
            "web_search",
            "Search the web",
            {"query": _s("Search query")},
            ("query",),
            _search,
            lambda r, a: {"top_result": f"A short article about {a['query']}"},
            lambda a, r: f"The top result is: {r['top_result']}.",
        ),
        Tool(
            "calculator",
            "Evaluate an arithmetic expression",
            {"expression": _s("Expression")},
            ("expression",),
            _calculator,
            lambda r, a: {"result": _divide(a["expression"])},
            lambda a, r: f"{a['expression']} is {r['result']}.",
        ),
        Tool(
            "get_stock_price",
            "Get the latest price of a stock",
            {"symbol": _s("Ticker symbol")},
            ("symbol",),
            _stock,
            lambda r, a: {"price": _money(r)},
            lambda a, r: f"{a['symbol']} trades at {r['price']} dollars.",
        ),
        Tool(
            "translate",
            "Translate text into another language",
            {"text": _s("Text"), "target_language": _s("Language")},
            ("text", "target_language"),
            _translate,
            lambda r, a: {"translation": f"<{a['text']} in {a['target_language']}>"},
            lambda a, r: f"In {a['target_language']}, that is {r['translation']}.",
        ),
        Tool(
            "set_timer",
            "Start a countdown timer",
            {"minutes": _i("Minutes")},
            ("minutes",),
            _timer,
            lambda r, a: {"status": "started", "timer_id": r.randint(1, 99)},
            lambda a, r: f"Timer {r['timer_id']} for {a['minutes']} minutes is started.",
        ),
        Tool(
            "send_email",
            "Send an email",
            {"to": _s("Address"), "subject": _s("Subject")},
            ("to", "subject"),
            _email,
            lambda r, a: {"status": "sent"},
            lambda a, r: f"The email to {a['to']} has been sent.",
        ),
    ]
}
