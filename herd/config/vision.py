"""The vision tower's part of a `Llama4ForConditionalGeneration` config.json (HF `Llama4VisionConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from herd.config.fields import ConfigError, read_float, read_int


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower of a `Llama4ForConditionalGeneration` checkpoint (HF `Llama4VisionConfig`)."""

    image_size: int  # side of one square tile, in pixels
    patch_size: int
    num_channels: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    vision_output_dim: int
    rope_theta: float
    norm_eps: float

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def shuffle_factor(self) -> int:
        """Patches merged per side by the pixel shuffle (2 for the ratio 0.5 of Scout and Maverick)."""
        return round(1 / self.pixel_shuffle_ratio)

    @property
    def tokens_per_tile(self) -> int:
        return (self.patches_per_side // self.shuffle_factor) ** 2

    def check_shapes(self, text_hidden_size: int) -> None:
        """The relations between widths that the weights depend on, checked before building the tower.

        Not checked at parse time: a text-only run must not fail on a vision config it never uses.
        """
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise ConfigError(
                f"vision_config.hidden_size ({self.hidden_size}) / num_attention_heads ({self.num_heads}) "
                "must be a multiple of 4 (2D RoPE splits each head into x and y halves of complex pairs)"
            )
        shuffled = self.hidden_size * self.shuffle_factor**2
        if self.intermediate_size != shuffled:
            raise ConfigError(
                f"vision_config.intermediate_size ({self.intermediate_size}) must equal hidden_size x "
                f"{self.shuffle_factor}^2 = {shuffled}: the adapter takes the pixel-shuffled patches"
            )
        if not self.projector_input_dim == self.projector_output_dim == self.vision_output_dim:
            raise ConfigError(
                f"vision_config.projector_input_dim ({self.projector_input_dim}), projector_output_dim "
                f"({self.projector_output_dim}) and vision_output_dim ({self.vision_output_dim}) must be equal"
            )


def vision_config_from(v: dict[str, Any]) -> VisionConfig:
    w = "vision_config"
    act = v.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConfigError(f"{w}.hidden_act {act!r} is not supported; Llama 4 uses 'gelu'")
    image_size, patch_size = read_int(v, "image_size", 448, where=w), read_int(v, "patch_size", 14, where=w)
    if image_size % patch_size:
        raise ConfigError(f"{w}.image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    ratio = read_float(v, "pixel_shuffle_ratio", 0.5, where=w)
    factor = round(1 / ratio) if 0 < ratio <= 1 else 0
    if factor == 0 or abs(factor * ratio - 1) > 1e-6 or (image_size // patch_size) % factor:
        raise ConfigError(
            f"{w}.pixel_shuffle_ratio must be 1/k for a k dividing the {image_size // patch_size} patches per side, "
            f"got {ratio!r}"
        )
    params = v.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{w}.rope_parameters must be an object")
    theta = params.get("rope_theta", v.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0:
        raise ConfigError(f"{w}.rope_theta must be a positive number, got {theta!r}")
    return VisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=read_int(v, "num_channels", 3, where=w),
        hidden_size=read_int(v, "hidden_size", 768, where=w),
        num_layers=read_int(v, "num_hidden_layers", 34, where=w),
        num_heads=read_int(v, "num_attention_heads", 16, where=w),
        intermediate_size=read_int(v, "intermediate_size", 5632, where=w),
        pixel_shuffle_ratio=ratio,
        projector_input_dim=read_int(v, "projector_input_dim", 4096, where=w),
        projector_output_dim=read_int(v, "projector_output_dim", 4096, where=w),
        vision_output_dim=read_int(v, "vision_output_dim", 7680, where=w),
        rope_theta=float(theta),
        norm_eps=read_float(v, "norm_eps", 1e-5, where=w),
    )
