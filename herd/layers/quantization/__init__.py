"""Weight formats: a `QuantizationConfig` picks the linear and MoE method of every layer.

The formats live in their own modules (`unquantized`, ...); this package's root holds only the contract,
which the layers themselves import.
"""

from herd.layers.quantization.base import FusedMoEMethodBase, LinearMethodBase, QuantizationConfig

__all__ = ["FusedMoEMethodBase", "LinearMethodBase", "QuantizationConfig"]
