"""The frontend: per-request work around the engine core, in the server's (or `LLM`'s) process.

Tokenizers and chat templates, image loading and preprocessing, checking requests and fanning out `n`
(`processor`), detokenizing with stop strings (`output_processor`), tool-call parsing; `LLMEngine` runs it
in step with an in-process core, `AsyncEngine` on an event loop over a core in its own process.
"""
