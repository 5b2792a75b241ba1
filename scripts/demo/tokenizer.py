"""The demo model's tokenizer: a small byte-level BPE with Llama 4's special tokens, split for a tiny model.

The vocabulary is trained on the demo data with `tokenizers`; the folder it is saved to (tokenizer.json +
tokenizer_config.json) loads in herd (`herd.frontend.tokenizer.load_tokenizer`) and in transformers alike. Its jinja
chat template renders exactly what herd's built-in llama-4 template renders, so a server that uses the
checkpoint's template and one that uses `--chat-template llama-4` feed the model the same ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from herd.frontend.chat.llama4 import TOOL_INSTRUCTIONS, Llama4ChatTemplate

# Llama 4's named special tokens, in Meta's order (its reserved tokens are left out to keep the vocab small).
SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>", "<|python_start|>", "<|python_end|>",
    "<|finetune_right_pad|>", "<|image_start|>", "<|image_end|>", "<|tile_x_separator|>", "<|tile_y_separator|>",
    "<|image|>", "<|patch|>", "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>",
]  # fmt: skip
DEFAULT_VOCAB_SIZE = 4096
# Words never carry the space before them, and numbers split into single digits. Llama 4's pattern glues the
# space on, so " Paris" and "Paris" are two unrelated ids; a model this small, trained on this little text,
# never learns that they are one word, and could not copy a name from a question into a call
# (`location="Paris"`) or into the start of an answer. Single digits make column-wise arithmetic learnable.
SPLIT_PATTERN = r"\p{L}+|\p{N}|[^\s\p{L}\p{N}]+|\s+"

_PREFIX, _SUFFIX = TOOL_INSTRUCTIONS.split("{functions}")
# The fixed tool instructions of the llama-4 template (~900 tokens before the function list and ~40 after
# it) are one added token each: the model learns nothing from reading them word by word, and they would be
# most of its training compute. They stay ordinary text: encode and decode round-trip them.
TOOL_TEXT_TOKENS = (_PREFIX, _SUFFIX)
_UNSPLIT = re.compile("|".join(re.escape(t) for t in [*SPECIAL_TOKENS, *TOOL_TEXT_TOKENS]))

# Every line is a tag with whitespace control on both sides, and all text is written by {{ }} expressions,
# so jinja's trim_blocks/lstrip_blocks cannot change the output. The macros mirror herd/frontend/chat/llama4.py:
# json_block is _json_block (Meta's JSON layout), literal is python_literal.
LLAMA4_CHAT_TEMPLATE = """\
{%- macro json_block(value, depth) -%}
    {%- set pad = "    " * (depth + 1) -%}
    {%- set ns = namespace(nested=false) -%}
    {%- if value is sequence and value is not string and value is not mapping -%}
        {%- for v in value -%}
            {%- if v is mapping or (v is sequence and v is not string) -%}{%- set ns.nested = true -%}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {%- if value is mapping and value -%}
        {{- "{\\n" -}}
        {%- for k, v in value.items() -%}
            {{- pad ~ (k | tojson) ~ ": " ~ json_block(v, depth + 1) ~ (",\\n" if not loop.last else "") -}}
        {%- endfor -%}
        {{- "\\n" ~ "    " * depth ~ "}" -}}
    {%- elif ns.nested -%}
        {{- "[\\n" -}}
        {%- for v in value -%}
            {{- pad ~ json_block(v, depth + 1) ~ (",\\n" if not loop.last else "") -}}
        {%- endfor -%}
        {{- "\\n" ~ "    " * depth ~ "]" -}}
    {%- else -%}
        {{- value | tojson -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro literal(value) -%}
    {%- if value is string -%}{{- value | tojson -}}
    {%- elif value is none -%}{{- "None" -}}
    {%- elif value is boolean -%}{{- "True" if value else "False" -}}
    {%- elif value is number -%}{{- value | string -}}
    {%- elif value is mapping -%}
        {{- "{" -}}
        {%- for k, v in value.items() -%}
            {{- ((k | string) | tojson) ~ ": " ~ literal(v) ~ (", " if not loop.last else "") -}}
        {%- endfor -%}
        {{- "}" -}}
    {%- elif value is sequence -%}
        {{- "[" -}}
        {%- for v in value -%}{{- literal(v) ~ (", " if not loop.last else "") -}}{%- endfor -%}
        {{- "]" -}}
    {%- else -%}{{- raise_exception("cannot write a tool-call argument") -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro text_of(content) -%}
    {%- if content is string -%}{{- content -}}
    {%- elif content is mapping -%}{{- content | tojson -}}
    {%- elif content is defined and content is not none -%}
        {%- for part in content -%}
            {%- if part.type == "text" -%}{{- part.text -}}
            {%- elif part.type in ["image", "image_url"] -%}{{- "<|image|>" -}}
            {%- else -%}{{- raise_exception("unsupported content part") -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- macro function_entry(tool) -%}
    {%- set fn = tool.function if tool.function is mapping else tool -%}
    {{- "{\\n        \\"name\\": " ~ (fn.name | tojson) -}}
    {%- if fn.description is defined and fn.description is not none -%}
        {{- ",\\n        \\"description\\": " ~ (fn.description | tojson) -}}
    {%- endif -%}
    {{- ",\\n        \\"parameters\\": " ~ json_block(fn.parameters or {}, 2) ~ "\\n    }" -}}
{%- endmacro -%}
{{- "<|begin_of_text|>" -}}
{%- set ns = namespace(rest=messages) -%}
{%- if tools -%}
    {%- set ns.system = "" -%}
    {%- if messages and messages[0].role == "system" -%}
        {%- set first = messages[0].content if messages[0].content is defined else none -%}
        {%- if first is string -%}{%- set ns.system = first -%}
        {%- elif first is not none -%}
            {%- set ns.system = first | selectattr("type", "equalto", "text") | map(attribute="text") | join("\\n") -%}
        {%- endif -%}
        {%- set ns.rest = messages[1:] -%}
    {%- endif -%}
    {{- "<|header_start|>system<|header_end|>\\n\\n" ~ TOOL_PREFIX ~ "[\\n" -}}
    {%- for tool in tools -%}{{- "    " ~ function_entry(tool) ~ (",\\n" if not loop.last else "") -}}{%- endfor -%}
    {{- "\\n]" ~ TOOL_SUFFIX ~ ("\\n" ~ ns.system if ns.system else "") ~ "<|eot|>" -}}
{%- endif -%}
{%- for message in ns.rest -%}
    {%- set is_tool = message.role in ["tool", "ipython"] -%}
    {%- set calls = message.tool_calls if message.role == "assistant" and message.tool_calls is defined else none -%}
    {{- "<|header_start|>" ~ ("ipython" if is_tool else message.role) ~ "<|header_end|>\\n\\n" -}}
    {{- text_of(message.content) -}}
    {%- if calls -%}
        {{- "[" -}}
        {%- for call in calls -%}
            {%- set fn = call.function if call.function is mapping else call -%}
            {%- set args = fn.arguments or {} -%}
            {%- if args is string -%}{{- raise_exception("tool-call arguments must be a mapping") -}}{%- endif -%}
            {{- fn.name ~ "(" -}}
            {%- for k, v in args.items() -%}{{- k ~ "=" ~ literal(v) ~ (", " if not loop.last else "") -}}{%- endfor -%}
            {{- ")" ~ (", " if not loop.last else "") -}}
        {%- endfor -%}
        {{- "]" -}}
    {%- endif -%}
    {{- "<|eom|>" if is_tool or calls else "<|eot|>" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<|header_start|>assistant<|header_end|>\\n\\n" -}}{%- endif -%}
"""
# The tool instructions go in as jinja string literals (json.dumps escapes are jinja escapes too).
LLAMA4_CHAT_TEMPLATE = (
    f"{{%- set TOOL_PREFIX = {json.dumps(_PREFIX)} -%}}\n{{%- set TOOL_SUFFIX = {json.dumps(_SUFFIX)} -%}}\n"
    + LLAMA4_CHAT_TEMPLATE
)


def training_texts(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The text BPE sees: each rendered dialog cut at its special tokens and tool instructions (whole tokens)."""
    template = Llama4ChatTemplate()
    for record in records:
        text = template.render_text(record["messages"], tools=record.get("tools"), add_generation_prompt=False)
        yield from (part for part in _UNSPLIT.split(text) if part)


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE over `texts`: special tokens first (ids 0..20), then the merges, then TOOL_TEXT_TOKENS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so any text encodes
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in TOOL_TEXT_TOKENS])
    # Like Hugging Face's Llama 4 tokenizer.json: add_special_tokens puts <|begin_of_text|> first.
    bos = ("<|begin_of_text|>", tokenizer.token_to_id("<|begin_of_text|>"))
    tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[bos])
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, folder: str | Path, model_max_length: int = 4096) -> Path:
    """Write tokenizer.json and tokenizer_config.json (named special tokens, chat template) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot|>",
        "pad_token": "<|finetune_right_pad|>",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": LLAMA4_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return folder
