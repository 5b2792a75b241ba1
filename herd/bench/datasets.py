"""Benchmark prompts: `random`, `random-ids`, `sharegpt` and `generated-shared-prefix`, as SGLang builds them.

Every generator takes a `numpy.random.Generator`, so a seed reproduces the same prompts. Lengths follow
SGLang: uniform integers in [max(int(L * range_ratio), 1), L]. Where SGLang decodes random ids and reports
the target length, herd re-encodes the text and nudges it until it has the target number of tokens, and
reports the length the tokenizer actually sees.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from herd.bench.tokenizer import BenchTokenizer

logger = logging.getLogger(__name__)

ASSISTANT_SUFFIX = "Assistant:"  # ShareGPT prompts end with it; --prompt-suffix goes before it (SGLang)


@dataclass(frozen=True)
class DatasetRow:
    """One request to send: its prompt, its expected lengths, and its images as data URLs."""

    prompt: str
    text_prompt_len: int
    output_len: int
    vision_prompt_len: int = 0
    image_data: tuple[str, ...] = ()

    @property
    def prompt_len(self) -> int:
        return self.text_prompt_len + self.vision_prompt_len


def random_lens(rng: np.random.Generator, full_len: int, range_ratio: float, num: int) -> list[int]:
    """`num` lengths uniform in [max(int(full_len * range_ratio), 1), full_len] (SGLang's rule)."""
    low = max(int(full_len * range_ratio), 1)
    if full_len < low:
        raise ValueError(f"length {full_len} must be at least 1")
    return [int(n) for n in rng.integers(low, full_len + 1, size=num)]


def fit_to_length(
    tok: BenchTokenizer, ids: Sequence[int], target: int, rng: np.random.Generator, max_rounds: int = 8
) -> tuple[str, int]:
    """Text whose re-encoding has `target` tokens, starting from `ids`; returns (text, its token count).

    Decoding arbitrary ids and encoding the text again merges or splits tokens, so truncate or pad the
    re-encoded ids and try again; a few rounds almost always land exactly.
    """
    ids = list(ids)
    for _ in range(max_rounds):
        text = tok.decode(ids)
        got = tok.encode(text)
        if len(got) == target:
            return text, target
        pad = _draw(tok, rng, target - len(got)) if len(got) < target else []
        ids = got[:target] + pad
    text = tok.decode(ids)
    return text, tok.count(text)


def _draw(tok: BenchTokenizer, rng: np.random.Generator, n: int) -> list[int]:
    pool = tok.ordinary_ids
    return [pool[int(i)] for i in rng.integers(0, len(pool), size=n)]


def random_prompt(tok: BenchTokenizer, rng: np.random.Generator, n: int) -> tuple[str, int]:
    """A prompt of `n` uniformly random ordinary tokens (SGLang's gen_prompt), fitted to `n` tokens."""
    return fit_to_length(tok, _draw(tok, rng, n), n, rng)


def sample_random(
    tok: BenchTokenizer,
    rng: np.random.Generator,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    random_ids: bool = False,
    source_texts: Sequence[str] = (),
) -> list[DatasetRow]:
    """SGLang's `random` (ShareGPT text repeated or cut to length) and `random-ids` (consecutive ids).

    `random` without ShareGPT text (no --dataset-path) uses uniformly random ids instead: the client never
    downloads a dataset.
    """
    input_lens = random_lens(rng, input_len, range_ratio, num_prompts)
    output_lens = random_lens(rng, output_len, range_ratio, num_prompts)
    sources = _source_ids(tok, rng, [] if random_ids else source_texts, num_prompts)
    pool = tok.ordinary_ids
    rows = []
    for i, (n_in, n_out) in enumerate(zip(input_lens, output_lens, strict=True)):
        if random_ids:
            offset = int(rng.integers(0, len(pool)))
            ids = [pool[(offset + i + j) % len(pool)] for j in range(n_in)]
        elif sources:
            base = sources[i % len(sources)]
            ids = (base * (-(-n_in // len(base))))[:n_in]  # repeat to at least n_in, then cut
        else:
            ids = _draw(tok, rng, n_in)
        text, n = fit_to_length(tok, ids, n_in, rng)
        rows.append(DatasetRow(prompt=text, text_prompt_len=n, output_len=n_out))
    return rows


def _source_ids(tok: BenchTokenizer, rng: np.random.Generator, texts: Sequence[str], n: int) -> list[list[int]]:
    """Token ids of up to n non-empty texts in shuffled order, encoding only those used (ShareGPT is large)."""
    sources = []
    for k in rng.permutation(len(texts)):
        if len(sources) == n:
            break
        if ids := tok.encode(texts[int(k)]):
            sources.append(ids)
    return sources


def load_sharegpt_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(first human turn, first reply) of each conversation with at least two turns in a ShareGPT json file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ShareGPT file not found: {path} (the client never downloads datasets)")
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    pairs = []
    for item in data:
        turns = item.get("conversations", item.get("conversation", [])) if isinstance(item, dict) else []
        if len(turns) >= 2:
            pairs.append((str(turns[0]["value"]), str(turns[1]["value"])))
    return pairs


def sample_sharegpt(
    tok: BenchTokenizer,
    rng: np.random.Generator,
    pairs: Sequence[tuple[str, str]],
    num_prompts: int,
    fixed_output_len: int | None = None,
    context_len: int | None = None,
    prompt_suffix: str = "",
) -> list[DatasetRow]:
    """SGLang's `sharegpt`: shuffled pairs; output length from the reply (or fixed); drops prompts or outputs
    under 2 tokens and, given a context length, pairs that would not fit."""
    if fixed_output_len is not None and fixed_output_len < 4:
        raise ValueError("--sharegpt-output-len must be at least 4")
    order = rng.permutation(len(pairs))
    rows: list[DatasetRow] = []
    for k in order:
        if len(rows) == num_prompts:
            break
        prompt, reply = pairs[int(k)]
        if prompt_suffix:
            prompt = prompt.removesuffix(ASSISTANT_SUFFIX) + prompt_suffix + ASSISTANT_SUFFIX
        prompt_len = tok.count(prompt)
        output_len = tok.count(reply) if fixed_output_len is None else fixed_output_len
        if prompt_len < 2 or output_len < 2:
            continue
        if context_len and prompt_len + output_len > context_len:
            continue
        rows.append(DatasetRow(prompt=prompt, text_prompt_len=prompt_len, output_len=output_len))
    if len(rows) < num_prompts:
        logger.warning("ShareGPT gave %d usable prompts of the %d asked for", len(rows), num_prompts)
    return rows


@dataclass(frozen=True)
class SharedPrefixSpec:
    """SGLang's --gsp-* flags."""

    num_groups: int = 64
    prompts_per_group: int = 16
    system_prompt_len: int = 2048
    question_len: int = 128
    output_len: int = 256
    range_ratio: float = 1.0


def sample_generated_shared_prefix(
    tok: BenchTokenizer, rng: np.random.Generator, spec: SharedPrefixSpec
) -> list[DatasetRow]:
    """`num_groups` random system prompts, each shared by `prompts_per_group` random questions, as
    "{system}\\n\\n{question}", shuffled: a prefix-cache workload. Ignores --num-prompts, like SGLang."""
    n = spec.num_groups * spec.prompts_per_group
    system_lens = random_lens(rng, spec.system_prompt_len, spec.range_ratio, spec.num_groups)
    question_lens = random_lens(rng, spec.question_len, spec.range_ratio, n)
    output_lens = random_lens(rng, spec.output_len, spec.range_ratio, n)
    systems = [random_prompt(tok, rng, length)[0] for length in system_lens]
    rows = []
    for k in range(n):
        question = random_prompt(tok, rng, question_lens[k])[0]
        prompt = f"{systems[k // spec.prompts_per_group]}\n\n{question}"
        rows.append(DatasetRow(prompt=prompt, text_prompt_len=tok.count(prompt), output_len=output_lens[k]))
    order = rng.permutation(n)
    return [rows[int(k)] for k in order]


def with_chat_template(tok: BenchTokenizer, rows: list[DatasetRow]) -> list[DatasetRow]:
    """Rows whose prompts are wrapped in the tokenizer's chat template (for completions endpoints)."""
    out = []
    for row in rows:
        prompt = tok.chat_prompt([{"role": "user", "content": row.prompt}])
        out.append(DatasetRow(prompt, tok.count(prompt), row.output_len, row.vision_prompt_len, row.image_data))
    return out
