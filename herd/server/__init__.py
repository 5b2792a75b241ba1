"""The HTTP server: OpenAI-compatible and SGLang-native endpoints over an `AsyncEngine`."""

from herd.server.app import build_app

__all__ = ["build_app"]
