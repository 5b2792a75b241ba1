"""A serving benchmark client compatible with `sglang.bench_serving` (flags, metrics, printed block).

It speaks HTTP only (OpenAI completions / chat, SGLang's /generate), so it measures herd or any other
server. Modules, one job each: `args` (command line), `datasets` and `images` (prompts), `tokenizer`
(adapter), `request` and `backends` (one timed request), `runner` (a run), `metrics`, `report`, `probe`.
The command is `python -m herd.bench_serving` (herd/bench_serving.py).
"""
