"""Configuration: the checkpoint's config.json (`ModelConfig`), every flag (`ServerArgs`), and the frozen
per-concern configs that the entry points build from the flags and hand down (`EngineConfig` and its parts).

Nothing below the entry points (cli, launch_server, LLM) reads `ServerArgs`.
"""

from herd.config.fields import ArgumentError, ConfigError
from herd.config.model import LayerSpec, ModelConfig, RopeScaling
from herd.config.vision import VisionConfig

__all__ = ["ArgumentError", "ConfigError", "LayerSpec", "ModelConfig", "RopeScaling", "VisionConfig"]
