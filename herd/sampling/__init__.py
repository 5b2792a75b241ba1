"""Sampling: request parameters (`SamplingParams`), per-sequence state (`SamplingState`), the `Sampler`."""

from herd.sampling.params import SamplingParams
from herd.sampling.sampler import Sampler, SampleResult
from herd.sampling.state import SamplingState

__all__ = ["SampleResult", "Sampler", "SamplingParams", "SamplingState"]
