"""Workers: one per rank, each owning a model, its KV storage and what a step needs to run on it."""

from herd.worker.plan import NewSequence, ScheduledChunk, StepPlan
from herd.worker.worker import Worker

__all__ = ["NewSequence", "ScheduledChunk", "StepPlan", "Worker"]
