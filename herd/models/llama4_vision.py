"""The Llama 4 vision tower: image tiles -> one feature vector per image token, in the text model's width.

Parameter names follow the Hugging Face checkpoint (`vision_model.*`, `multi_modal_projector.*`), except
that q, k and v are one fused matmul whose weight_loader fills it from the three HF tensors. The tower is
replicated on every tensor-parallel rank; its linear layers come from the `LayerFactory` all the same, so a
weight format decides their method (checkpoints keep the tower unquantized). All tiles of a step (of
every image) go through the encoder as one batch: tiles are independent, attention is within a tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import VisionConfig
from herd.layers.factory import LayerFactory


def vision_rope_angles(config: VisionConfig) -> torch.Tensor:
    """2D RoPE rotations of one tile's tokens: complex64 [patches + 1, head_dim // 2].

    The first half of each head's pairs turns with the patch's column, the second half with its row,
    both counted from 1; the CLS token (last) is not rotated.
    """
    side = config.patches_per_side
    quarter = config.head_dim // 4
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float32, device="cpu") / (2 * quarter))
    )
    index = torch.arange(side * side, device="cpu")
    cols, rows = (index % side + 1).float(), (index // side + 1).float()
    angles = torch.cat([cols[:, None] * inv_freq, rows[:, None] * inv_freq], dim=-1)  # [patches, head_dim // 2]
    angles = torch.cat([angles, angles.new_zeros(1, angles.shape[1])])  # CLS
    return torch.polar(torch.ones_like(angles), angles)


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Merge each factor x factor square of patches into one token: [B, side^2, C] -> [B, (side/f)^2, f^2 C].

    A merged token's channels are ordered (row in the square, column in the square, channel), as in the
    reference's pair of view/permute steps.
    """
    batch, num, channels = x.shape
    side = int(num**0.5)
    x = x.view(batch, side // factor, factor, side // factor, factor, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, (side // factor) ** 2, factor * factor * channels)


class Llama4VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig, factory: LayerFactory, prefix: str) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        hidden = config.hidden_size
        self.qkv_proj = factory.replicated(
            f"{prefix}.qkv_proj", hidden, [hidden] * 3, bias=True, shard_ids=("q", "k", "v")
        )
        self.o_proj = factory.replicated(f"{prefix}.o_proj", hidden, [hidden], bias=True)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:  # x: [B, L, C], rope: [L, D / 2]
        batch, length, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, length, 3, self.num_heads, self.head_dim)
        qk = torch.view_as_complex(qkv[:, :, :2].float().unflatten(-1, (-1, 2)))  # [B, L, 2, heads, D / 2]
        qk = torch.view_as_real(qk * rope[None, :, None, None, :]).flatten(-2).type_as(x)
        q, k = qk.unbind(2)
        v = qkv[:, :, 2]
        # Every token of a tile sees every other: no mask.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class Llama4VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig, factory: LayerFactory, prefix: str) -> None:
        super().__init__()
        self.fc1 = factory.replicated(f"{prefix}.fc1", config.hidden_size, [config.intermediate_size], bias=True)
        self.fc2 = factory.replicated(f"{prefix}.fc2", config.intermediate_size, [config.hidden_size], bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Llama4VisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig, factory: LayerFactory, prefix: str) -> None:
        super().__init__()
        self.self_attn = Llama4VisionAttention(config, factory, f"{prefix}.self_attn")
        self.mlp = Llama4VisionMLP(config, factory, f"{prefix}.mlp")
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama4VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig, factory: LayerFactory, prefix: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            Llama4VisionEncoderLayer(config, factory, f"{prefix}.layers.{i}") for i in range(config.num_layers)
        )


class Llama4UnfoldConvolution(nn.Module):
    """Non-overlapping patches, flattened (channel, row, column) as `nn.Unfold` does, then one matmul."""

    def __init__(self, config: VisionConfig, factory: LayerFactory, prefix: str) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.linear = factory.replicated(
            f"{prefix}.linear", config.num_channels * config.patch_size**2, [config.hidden_size]
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, channels, S, S] -> [B, (S / p)^2, C]
        batch, channels, size, _ = pixels.shape
        p, side = self.patch_size, size // self.patch_size
        patches = pixels.view(batch, channels, side, p, side, p).permute(0, 2, 4, 1, 3, 5)
        return self.linear(patches.reshape(batch, side * side, channels * p * p))


class Llama4VisionPixelShuffleMLP(nn.Module):
    def __init__(self, config: VisionConfig, factory: LayerFactory, prefix: str) -> None:
        super().__init__()
        self.factor = config.shuffle_factor
        self.mlp = Llama4VisionAdapterMLP(config, factory, f"{prefix}.mlp")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x, self.factor))


class Llama4VisionAdapterMLP(nn.Module):
    def __init__(self, config: VisionConfig, factory: LayerFactory, prefix: str) -> None:
        super().__init__()
        self.fc1 = factory.replicated(f"{prefix}.fc1", config.intermediate_size, [config.projector_input_dim])
        self.fc2 = factory.replicated(f"{prefix}.fc2", config.projector_output_dim, [config.projector_output_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GELU after both layers: the reference's adapter ends on an activation too.
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))


class Llama4VisionModel(nn.Module):
    def __init__(self, config: VisionConfig, factory: LayerFactory, prefix: str = "vision_model") -> None:
        super().__init__()
        self.config = config
        num_tokens = config.patches_per_side**2 + 1  # patches + CLS
        self.patch_embedding = Llama4UnfoldConvolution(config, factory, f"{prefix}.patch_embedding")
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(num_tokens, config.hidden_size))
        self.layernorm_pre = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.layernorm_post = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.model = Llama4VisionEncoder(config, factory, f"{prefix}.model")
        self.vision_adapter = Llama4VisionPixelShuffleMLP(config, factory, f"{prefix}.vision_adapter")
        # Not a buffer: derived from the config, never loaded, and it must survive meta-device init.
        self.rope = vision_rope_angles(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, channels, S, S] -> [tiles, tokens_per_tile, projector_output_dim]."""
        dtype = self.class_embedding.dtype
        x = self.patch_embedding(pixel_values.to(dtype))
        # The CLS token goes last, and is dropped again before the pixel shuffle.
        x = torch.cat([x, self.class_embedding.expand(x.shape[0], 1, -1)], dim=1)
        x = self.layernorm_pre(x + self.positional_embedding_vlm)
        if self.rope.device != x.device:
            self.rope = self.rope.to(x.device)
        for layer in self.model.layers:
            x = layer(x, self.rope)
        x = self.layernorm_post(x)[:, :-1]
        return self.vision_adapter(x)


class Llama4MultiModalProjector(nn.Module):
    def __init__(
        self,
        vision_output_dim: int,
        text_hidden_size: int,
        factory: LayerFactory,
        prefix: str = "multi_modal_projector",
    ) -> None:
        super().__init__()
        self.linear_1 = factory.replicated(f"{prefix}.linear_1", vision_output_dim, [text_hidden_size])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_1(features)
