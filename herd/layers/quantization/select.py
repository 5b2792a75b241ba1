"""Which weight format a run uses: the checkpoint's own (compressed-tensors), the one --quantization asks for
(made at load from a bf16/fp16/fp32 checkpoint), or the weights as stored."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from herd.layers.quantization.base import FusedMoEMethodBase, LinearMethodBase, QuantizationConfig
from herd.layers.quantization.compressed_tensors import CompressedTensorsConfig, UnsupportedQuantizationError
from herd.layers.quantization.fp8 import Fp8OnlineLinearMethod, Fp8OnlineMoEMethod
from herd.layers.quantization.int4 import Int4OnlineLinearMethod, Int4OnlineMoEMethod
from herd.layers.quantization.int8 import Int8Config
from herd.layers.quantization.w8a8_int8 import W8A8Int8Config


class OnlineConfig(Int8Config):
    """--quantization fp8 | w4a16: the layers w8a16 quantizes (all but the router and the vision tower), in
    another format."""

    def __init__(
        self,
        name: str,
        linear: Callable[[], LinearMethodBase],
        moe: Callable[[], FusedMoEMethodBase],
        base: QuantizationConfig | None,
    ) -> None:
        super().__init__(base)
        self.name, self._linear, self._moe = name, linear, moe  # type: ignore[misc]

    def new_linear_method(self) -> LinearMethodBase:
        return self._linear()

    def new_moe_method(self) -> FusedMoEMethodBase:
        return self._moe()


# Each made with the base config, whose methods the layers left unquantized keep.
ONLINE: dict[str, Callable[[QuantizationConfig], QuantizationConfig]] = {
    "w8a16": Int8Config,
    "w8a8_int8": W8A8Int8Config,
    "fp8": lambda base: OnlineConfig("fp8", Fp8OnlineLinearMethod, Fp8OnlineMoEMethod, base),
    "w4a16": lambda base: OnlineConfig("w4a16", Int4OnlineLinearMethod, Int4OnlineMoEMethod, base),
}


def select_quantization(
    checkpoint_quant: dict[str, Any] | None, weight_prefix: str, flag: str | None, base: QuantizationConfig
) -> QuantizationConfig:
    """checkpoint_quant: config.json's quantization_config (None for a full-precision checkpoint); flag: the
    --quantization value; base: the methods for weights kept as stored."""
    if checkpoint_quant is not None:
        return CompressedTensorsConfig.from_hf(checkpoint_quant, weight_prefix, base, flag)
    if flag is None:
        return base
    if flag not in ONLINE:
        raise UnsupportedQuantizationError(f"--quantization {flag!r} is not supported; supported: {', '.join(ONLINE)}")
    return ONLINE[flag](base)
