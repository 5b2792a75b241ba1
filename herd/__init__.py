"""herd: a Llama 4 inference and serving engine on PyTorch."""

__version__ = "0.1.0"
