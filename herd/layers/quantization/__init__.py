"""Weight formats: a `QuantizationConfig` picks the linear and MoE method of every layer.

The formats live in their own modules: `unquantized` (as stored, oneDNN-packed on the CPU), `int8` (w8a16), `w8a8_int8`,
`fp8`, `int4` (w4a16), `compressed_tensors` (checkpoints quantized by llm-compressor); `select` picks the
config of a run. This package's root holds only the contract, which the layers themselves import.
"""

from herd.layers.quantization.base import FusedMoEMethodBase, LinearMethodBase, QuantizationConfig

__all__ = ["FusedMoEMethodBase", "LinearMethodBase", "QuantizationConfig"]
