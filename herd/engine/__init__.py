"""The engine core (scheduler, KV blocks, prefix cache, stop tokens) and the clients that run it in a
thread or in a process of its own."""

from herd.engine.core import EngineCore
from herd.engine.protocol import CoreInfo, CoreMessage, EngineCoreOutput, EngineCoreRequest, EngineStats

__all__ = ["CoreInfo", "CoreMessage", "EngineCore", "EngineCoreOutput", "EngineCoreRequest", "EngineStats"]
