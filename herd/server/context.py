"""What every endpoint needs to know about the server: one object, built once at startup."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd.config.engine import ServerConfig
from herd.frontend.async_engine import AsyncEngine
from herd.frontend.tokenizer import Tokenizer
from herd.server.errors import APIError
from herd.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

# generation_config.json keys that become defaults of a request that does not set them.
_GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class ServerContext:
    config: ServerConfig
    engine: AsyncEngine
    metrics: ServerMetrics
    model_name: str
    generation_defaults: dict[str, Any]
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def build(cls, config: ServerConfig, engine: AsyncEngine) -> ServerContext:
        defaults = load_generation_defaults(Path(config.model_path))
        if defaults:
            logger.info("sampling defaults from generation_config.json: %s", defaults)
        return cls(
            config=config,
            engine=engine,
            metrics=ServerMetrics(lambda: engine.stats),
            model_name=config.served_model_name,
            generation_defaults=defaults,
        )

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    @property
    def tool_parser_name(self) -> str:
        return self.config.tool_call_parser

    @property
    def constrain_auto_tool_calls(self) -> bool:
        return self.config.tool_call_constraint == "on"

    def require_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise APIError(400, f"{what} needs a tokenizer and this model has none: send token ids to /generate")
        return self.tokenizer

    def check_model(self, model: str | None) -> None:
        """Requests may name the served model or leave it out (as SGLang and vLLM allow); others are 404."""
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def load_generation_defaults(folder: Path) -> dict[str, Any]:
    """The checkpoint's recommended sampling values (Llama 4 Instruct: temperature 0.6, top_p 0.9)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable %s: %s", path, e)
        return {}
    if not isinstance(config, dict):
        return {}
    defaults = {k: config[k] for k in _GENERATION_DEFAULTS if isinstance(config.get(k), int | float)}
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0  # transformers' greedy decoding: sampling values are then unused
    return defaults
