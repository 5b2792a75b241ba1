"""compressed-tensors checkpoints (`quantization_config.quant_method == "compressed-tensors"`).

The config is parsed by the `compressed-tensors` package's own pydantic model; each of its `config_groups`
gives a scheme to the Linear layers its `targets` name, except those its `ignore` list names (exact module
names, or `re:` regular expressions, matched as compressed-tensors matches them: `re.match` on the module's
checkpoint name). herd fuses q/k/v and gate/up: such a layer is quantized when its parts are, and the parts
must agree.

Published layouts (looked up 2026-12-05; no weights downloaded):
- Meta's `Llama-4-Maverick-17B-128E-Instruct-FP8` and RedHatAI's `...-FP8-dynamic`: llm-compressor's
  FP8_DYNAMIC preset, format `float-quantized`: `weight` float8_e4m3fn [out, in] and `weight_scale` [out, 1]
  (strategy channel), activations dynamic per token (no `input_scale` stored). Meta's ignore list
  (re:.*lm_head, re:.*self_attn, re:.*router, re:.*vision_model, re:.*multi_modal_projector,
  re:.*shared_expert, re:.*feed_forward.{gate,up,down}_proj) leaves only the routed experts quantized.
  Sources: the Llama 4 FP8 quantization script with that list (code search: `FP8_DYNAMIC` recipe over
  `Llama4ForCausalLM`), and vllm-project/tpu-inference's Llama 4 loader tests, which read
  `language_model.model.layers.0.feed_forward.experts.0.gate_proj.weight_scale`.
- RedHatAI's `Llama-4-Scout-17B-16E-Instruct-quantized.w4a16`: the W4A16 preset (INT4, symmetric, group 128),
  format `pack-quantized`: `weight_packed` int32 [out, in / 8], `weight_scale` [out, in / 128], `weight_shape`
  [2] (compressed-tensors' PackedQuantizationCompressor). Its ignore list is assumed, not read: any list
  works, since it is honoured as written.
- W8A8 INT8 (RedHatAI's `...-quantized.w8a8` models, e.g. Meta-Llama-3.1-8B-Instruct's; looked up 2026-12-06, no
  Llama 4 one found published): llm-compressor's W8A8 preset, format `int-quantized`: `weight` int8 [out, in] and
  `weight_scale` [out, 1] (strategy channel, symmetric), activations int8, symmetric, dynamic per token (no
  `input_scale` stored; compressed-tensors' IntQuantizationCompressor). Runs on herd's W8A8 kernel
  (herd.layers.quantization.w8a8_int8); asymmetric activations are refused.
- Experts: llm-compressor unfuses Llama 4's experts for good before quantizing (`SequentialLlama4TextMoe` in
  llm-compressor's src/llmcompressor/modeling/llama4.py, kept "for vLLM compatibility"), so expert e is stored
  as `feed_forward.experts.<e>.{gate,up,down}_proj.<tensor>`, each in nn.Linear's [out, in]; vLLM's Llama 4
  loader reads that same per-expert layout for these checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

from herd.layers.quantization.base import FusedMoEMethodBase, LinearMethodBase, QuantizationConfig
from herd.layers.quantization.fp8 import (
    Fp8AsInt8LinearMethod,
    Fp8AsInt8MoEMethod,
    Fp8CheckpointLinearMethod,
    Fp8CheckpointMoEMethod,
)
from herd.layers.quantization.int4 import Int4CheckpointLinearMethod, Int4CheckpointMoEMethod
from herd.layers.quantization.w8a8_int8 import W8A8Int8CheckpointLinearMethod, W8A8Int8CheckpointMoEMethod

# herd's fused layers and the checkpoint modules each stands for.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
UNPREFIXED = ("vision_model.", "multi_modal_projector.")
SUPPORTED = (
    "FP8 weights with a scale per output channel (float-quantized; activations dynamic FP8 per token, or none), "
    "symmetric INT8 weights with a scale per output channel and symmetric dynamic INT8 activations per token "
    "(int-quantized W8A8) and symmetric INT4 weights with group scales (pack-quantized W4A16)"
)


class UnsupportedQuantizationError(ValueError):
    """A quantized checkpoint herd cannot run; the message names the scheme and the layers it covers."""


@dataclass(frozen=True)
class Scheme:
    kind: str  # "fp8", "w8a8_int8" or "int4"
    group_size: int | None = None


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"

    def __init__(
        self,
        groups: list[tuple[list[str], Scheme]],
        ignore: list[str],
        weight_prefix: str,
        base: QuantizationConfig,
        fp8_as_int8: bool = False,
    ) -> None:
        self.groups, self.ignore, self.weight_prefix, self.base = groups, ignore, weight_prefix, base
        self.fp8_as_int8 = fp8_as_int8  # --quantization w8a16 on an FP8 checkpoint (herd.layers.quantization.fp8)

    @classmethod
    def from_hf(
        cls, quant: dict, weight_prefix: str, base: QuantizationConfig, flag: str | None = None
    ) -> CompressedTensorsConfig:
        """`quant` is config.json's quantization_config; `base` gives the methods of the layers left as stored;
        `flag` is --quantization: only w8a16, on an FP8 checkpoint, which then runs as INT8."""
        from compressed_tensors.quantization import QuantizationConfig as CTConfig

        method = quant.get("quant_method")
        if method != "compressed-tensors":
            raise UnsupportedQuantizationError(
                f"quantization_config.quant_method {method!r} is not supported; herd reads compressed-tensors "
                "checkpoints (or a bf16 checkpoint with --quantization fp8 | w8a16 | w8a8_int8 | w4a16)"
            )
        try:
            parsed = CTConfig.model_validate(quant)
        except ValueError as e:
            raise UnsupportedQuantizationError(f"unreadable compressed-tensors quantization_config: {e}") from e
        if parsed.kv_cache_scheme is not None:
            raise UnsupportedQuantizationError(
                "compressed-tensors kv_cache_scheme (quantized KV cache) is not supported"
            )
        if parsed.quantization_status not in (None, "compressed"):
            raise UnsupportedQuantizationError(
                f"quantization_status {parsed.quantization_status!r}: herd reads compressed checkpoints only"
            )
        groups = [
            (list(group.targets), _scheme(name, group, group.format or parsed.format))
            for name, group in parsed.config_groups.items()
        ]
        if flag is not None and (flag != "w8a16" or any(scheme.kind != "fp8" for _, scheme in groups)):
            raise UnsupportedQuantizationError(
                f"--quantization {flag}: the checkpoint is already quantized (compressed-tensors); drop the flag "
                "(only w8a16 applies, to an FP8 checkpoint, which it runs as INT8 on PyTorch's INT8 GEMM)"
            )
        return cls(groups, list(parsed.ignore or []), weight_prefix, base, fp8_as_int8=flag == "w8a16")

    def linear_method(self, prefix: str) -> LinearMethodBase:
        scheme = self._scheme_of(self._checkpoint_names(prefix))
        if scheme is None:
            return self.base.linear_method(prefix)
        if scheme.kind == "fp8":
            return Fp8AsInt8LinearMethod() if self.fp8_as_int8 else Fp8CheckpointLinearMethod()
        if scheme.kind == "w8a8_int8":
            return W8A8Int8CheckpointLinearMethod()
        assert scheme.group_size is not None
        return Int4CheckpointLinearMethod(scheme.group_size)

    def moe_method(self, prefix: str) -> FusedMoEMethodBase:
        # Expert 0 stands for all: ignore lists name experts by layer or by pattern, never one by one.
        names = [
            f"{n}.0.{proj}" for n in self._checkpoint_names(prefix) for proj in ("gate_proj", "up_proj", "down_proj")
        ]
        scheme = self._scheme_of(names)
        if scheme is None:
            return self.base.moe_method(prefix)
        if scheme.kind == "fp8":
            return Fp8AsInt8MoEMethod() if self.fp8_as_int8 else Fp8CheckpointMoEMethod()
        if scheme.kind == "w8a8_int8":
            return W8A8Int8CheckpointMoEMethod()
        assert scheme.group_size is not None
        return Int4CheckpointMoEMethod(scheme.group_size)

    def _checkpoint_names(self, prefix: str) -> list[str]:
        """The checkpoint modules that herd's layer `prefix` stands for (with the checkpoint's prefix)."""
        name = prefix if prefix.startswith((self.weight_prefix, *UNPREFIXED)) else self.weight_prefix + prefix
        base, _, leaf = name.rpartition(".")
        if leaf in FUSED:
            return [f"{base}.{part}" if base else part for part in FUSED[leaf]]
        return [name]

    def _scheme_of(self, names: list[str]) -> Scheme | None:
        schemes = {self._match(name) for name in names}
        if len(schemes) > 1:
            raise UnsupportedQuantizationError(
                f"{', '.join(names)} run as one fused layer but are quantized differently"
            )
        return schemes.pop()

    def _match(self, name: str) -> Scheme | None:
        from compressed_tensors.utils.match import match_name

        if any(match_name(name, ignored) for ignored in self.ignore):
            return None
        for targets, scheme in self.groups:
            # A class-name target: every layer herd quantizes is a Linear in the checkpoint's model.
            if any(target == "Linear" or match_name(name, target) for target in targets):
                return scheme
        return None


def _scheme(name: str, group: object, fmt: str | None) -> Scheme:
    w, a = group.weights, group.input_activations  # type: ignore[attr-defined]
    if w is None:
        raise UnsupportedQuantizationError(
            f"compressed-tensors group {name}: activation-only quantization is not supported"
        )
    acts = "none" if a is None else f"{a.type} {a.num_bits}-bit {a.strategy}{' dynamic' if a.dynamic else ' static'}"
    described = (
        f"weights {w.type} {w.num_bits}-bit {w.strategy}{f' group {w.group_size}' if w.group_size else ''}"
        f"{'' if w.symmetric else ' asymmetric'}, activations {acts}, format {fmt}"
    )
    fp8_acts = a is None or (a.type == "float" and a.num_bits == 8 and a.dynamic is True and a.strategy == "token")
    fp8 = w.type == "float" and w.num_bits == 8 and w.strategy == "channel" and w.symmetric and fp8_acts
    if fp8 and fmt in ("float-quantized", "naive-quantized"):
        return Scheme("fp8")
    int8_acts = a is not None and a.type == "int" and a.num_bits == 8 and a.dynamic is True and a.symmetric
    w8a8 = w.type == "int" and w.num_bits == 8 and w.strategy == "channel" and w.symmetric
    if w8a8 and int8_acts and a.strategy == "token" and fmt == "int-quantized":
        return Scheme("w8a8_int8")
    int4 = w.type == "int" and w.num_bits == 4 and w.strategy == "group" and w.symmetric and a is None
    if int4 and fmt == "pack-quantized" and w.group_size:
        return Scheme("int4", int(w.group_size))
    targets = ", ".join(group.targets)  # type: ignore[attr-defined]
    raise UnsupportedQuantizationError(
        f"compressed-tensors group {name} (targets {targets}): {described} is not supported; herd runs {SUPPORTED}"
    )
