"""The packaged demo model (issue 7).

`MODEL_PATH` is the trained checkpoint shipped inside the package (Hugging Face layout), which `herd serve`
serves when no `--model-path` is given, as `MODEL_NAME`. The code that made it (synthetic data, tokenizer, trainer and
evaluation) lives in scripts/demo, outside the runtime package.

`DRAFT_PATH` is an EAGLE-3 draft for it in the layout SGLang publishes (config.json + model.safetensors, no
embedding: it shares the demo model's), trained by scripts/demo/train_eagle3.py (issue 22).
"""

from pathlib import Path

MODEL_PATH = Path(__file__).parent / "model"
# The name the API lists it under: its folder is the package's "model", which says nothing in a model list.
MODEL_NAME = "herd-demo"
# `herd serve --speculative-demo-draft` drafts with it.
DRAFT_PATH = Path(__file__).parent / "draft"
