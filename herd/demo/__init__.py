"""The tiny demo model (issue 7): its synthetic data, tokenizer, trainer and evaluation, and the packaged model.

`MODEL_PATH` is the trained checkpoint shipped inside the package (Hugging Face layout), which `herd serve`
serves when no `--model-path` is given.
"""

from pathlib import Path

MODEL_PATH = Path(__file__).parent / "model"
