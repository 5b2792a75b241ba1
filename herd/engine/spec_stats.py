"""Speculative decoding's acceptance figures: tokens per verify step, as SGLang reports them.

A verify step is one decode step of one sequence while speculation is on; its accept length is the number
of tokens it added (accepted drafts + the target's own token), so 1.0 means no draft was ever accepted.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("herd.engine.speculative")

LOG_EVERY = 512  # verify steps between two log lines


class SpecStats:
    def __init__(self) -> None:
        self.verify_steps = 0  # since start
        self.tokens = 0
        self._logged_steps = 0
        self._logged_tokens = 0

    def record(self, num_tokens: int) -> None:
        self.verify_steps += 1
        self.tokens += num_tokens
        if self.verify_steps - self._logged_steps >= LOG_EVERY:
            steps, tokens = self.verify_steps - self._logged_steps, self.tokens - self._logged_tokens
            logger.info("speculative decoding: accept length %.2f over the last %d verify steps", tokens / steps, steps)
            self._logged_steps, self._logged_tokens = self.verify_steps, self.tokens

    @property
    def accept_length(self) -> float:
        """Mean tokens per verify step since start (0.0 before the first)."""
        return self.tokens / self.verify_steps if self.verify_steps else 0.0
