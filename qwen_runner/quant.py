"""Parsing a checkpoint's ``quantization_config``: which linears are quantized, at how many bits.

Only the *description* lives here (what the checkpoint says it contains); unpacking int4 data is the
cache builder's job. The planner needs the description to size tensors and to check that the headers
agree with the config: a config that claims 4 bits over tensors packed at 8 is a broken export, and
we would rather say so in one line than build garbage.

Supported: AutoRound (``quant_method: auto-round``, ``packing_format: auto_round:auto_gptq`` and
friends, with per-layer ``extra_config`` overrides), GPTQ (``quant_method: gptq``) and none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

from qwen_runner.errors import CheckpointError, UnsupportedModelError

AUTOROUND = "auto-round"
GPTQ = "gptq"
SUPPORTED_METHODS = (AUTOROUND, GPTQ)
# Bit widths the packed formats can hold; 16 (and up) means "left in floating point".
PACKED_BITS = (2, 3, 4, 8)
FLOAT_BITS = 16
# AutoRound's and GPTQ's int32 containers hold 32 // bits values each.
PACK_CONTAINER_BITS = 32
# group_size -1 means one group spanning the whole input dimension (per-channel).
PER_CHANNEL_GROUP = -1


@dataclass(frozen=True)
class LayerQuant:
    """How one linear layer is stored."""

    bits: int
    group_size: int
    sym: bool

    @property
    def quantized(self) -> bool:
        return self.bits < FLOAT_BITS


@dataclass(frozen=True)
class QuantConfig:
    method: str
    bits: int
    group_size: int
    sym: bool
    packing_format: str
    # Per-layer overrides: exact module names, or regex patterns as AutoRound writes them.
    extra_config: dict[str, dict] = field(default_factory=dict)

    @property
    def awq(self) -> bool:
        """AWQ packing (AutoRound's asym default ``auto_round:auto_awq``): qweight ``[in, out/8]``, columns
        interleaved, zero points stored as is; GPTQ packing is ``[in/8, out]`` with zero points minus 1."""
        return "awq" in self.packing_format

    @property
    def default(self) -> LayerQuant:
        return LayerQuant(self.bits, self.group_size, self.sym)

    def for_layer(self, module: str) -> LayerQuant:
        """The storage of linear ``module`` (e.g. ``model.layers.0.mlp.gate``): override, else default."""
        override = self.extra_config.get(module)
        if override is None:
            for pattern, cfg in self._patterns:
                if pattern.search(module):
                    override = cfg
                    break
        if override is None:
            return self.default
        return LayerQuant(
            int(override.get("bits", self.bits)),
            int(override.get("group_size", self.group_size)),
            bool(override.get("sym", self.sym)),
        )

    @cached_property
    def _patterns(self) -> list[tuple[re.Pattern, dict]]:
        """The regex keys of extra_config, compiled once (a checkpoint has ~10^5 linears to look up)."""
        out = []
        for pattern, cfg in self.extra_config.items():
            if _is_regex(pattern):
                try:
                    out.append((re.compile(pattern), cfg))
                except re.error:
                    continue
        return out

    def describe(self) -> str:
        kind = "AutoRound" if self.method == AUTOROUND else "GPTQ"
        group = "per-channel" if self.group_size == PER_CHANNEL_GROUP else f"g{self.group_size}"
        sym = "sym" if self.sym else "asym"
        bits = sorted({int(cfg.get("bits", self.bits)) for cfg in self.extra_config.values()} - {self.bits})
        overrides = f", overrides at {'/'.join(map(str, bits))} bits" if bits else ""
        return f"int{self.bits} {kind} {group} {sym}{overrides}"


def _is_regex(pattern: str) -> bool:
    return any(ch in pattern for ch in "*+?[]()|^$\\")


def _bad(message: str) -> CheckpointError:
    return CheckpointError(
        f"inconsistent quantization_config: {message}",
        "the checkpoint's config.json does not describe its own weights; re-export it",
    )


def _check_bits(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{where} bits={value!r} is not an integer")
    if value not in PACKED_BITS and value < FLOAT_BITS:
        raise _bad(f"{where} bits={value} is not one of {PACKED_BITS} (or >= {FLOAT_BITS} for unquantized)")
    return value


def _check_group(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (value <= 0 and value != PER_CHANNEL_GROUP):
        raise _bad(f"{where} group_size={value!r} must be a positive integer or -1")
    return value


def parse_quantization_config(raw: object) -> QuantConfig | None:
    """config.json's ``quantization_config`` -> QuantConfig, None when the model is not quantized.

    Raises CheckpointError for a config that contradicts itself, UnsupportedModelError for a method
    we cannot run (fp8, bitsandbytes, ...).
    """
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad(f"expected an object, got {type(raw).__name__}")
    method = raw.get("quant_method")
    if not isinstance(method, str):
        raise _bad("quant_method is missing")
    method = method.lower().replace("_", "-")
    if method == "autoround":
        method = AUTOROUND
    if method not in SUPPORTED_METHODS:
        raise UnsupportedModelError(
            f"quantization method {raw.get('quant_method')!r} is not supported",
            f"supported: {', '.join(SUPPORTED_METHODS)} int4/int8 checkpoints, or unquantized bf16/fp16/fp32",
        )
    if "bits" not in raw:
        raise _bad("bits is missing")
    bits = _check_bits(raw["bits"], "")
    if bits >= FLOAT_BITS:
        raise _bad(f"bits={bits} with quant_method {method!r}: nothing would be quantized")
    group_size = _check_group(raw.get("group_size", 128), "")
    sym = raw.get("sym", True)
    if not isinstance(sym, bool):
        raise _bad(f"sym={sym!r} is not true/false")
    packing = raw.get("packing_format") or ("auto_round:auto_gptq" if method == AUTOROUND else "gptq")
    if not isinstance(packing, str):
        raise _bad(f"packing_format={packing!r} is not a string")
    if "awq" in packing and bits != 4:
        raise UnsupportedModelError(f"AWQ packing at {bits} bits is not supported", "AWQ packing holds int4 only")
    if raw.get("desc_act") is True:
        raise UnsupportedModelError(
            "act-order (desc_act) quantized checkpoints are not supported",
            "re-export without act-order (desc_act=false), as AutoRound does by default")
    extra = raw.get("extra_config") or {}
    if not isinstance(extra, dict):
        raise _bad("extra_config is not an object")
    for name, cfg in extra.items():
        if not isinstance(cfg, dict):
            raise _bad(f"extra_config[{name!r}] is not an object")
        if "bits" in cfg:
            _check_bits(cfg["bits"], f"extra_config[{name!r}]")
        if "group_size" in cfg:
            _check_group(cfg["group_size"], f"extra_config[{name!r}]")
    return QuantConfig(method, bits, group_size, sym, packing, dict(extra))


def packed_in_features(qweight_rows: int, bits: int) -> int:
    """Input features a qweight [rows, out] int32 holds at ``bits`` (GPTQ packing along the input)."""
    return qweight_rows * PACK_CONTAINER_BITS // bits


def check_packed_linear(module: str, qweight_shape: tuple, scales_shape: tuple, layer: LayerQuant,
                        awq: bool = False) -> None:
    """The headers of a packed linear must agree with the bits and group size the config gives it.

    qweight is [in * bits / 32, out] (AWQ: [in, out * bits / 32]) and scales [ceil(in / group), out]; a
    mismatch means the config and the tensors were written by different exports.
    """
    if not layer.quantized:
        raise _bad(f"{module} has packed qweight but the config leaves it at {layer.bits} bits")
    if len(qweight_shape) != 2 or len(scales_shape) != 2:
        raise _bad(f"{module}: qweight/scales must be 2-D, got {list(qweight_shape)} / {list(scales_shape)}")
    if awq:
        outputs, in_features = packed_in_features(qweight_shape[1], layer.bits), qweight_shape[0]
    else:
        outputs, in_features = qweight_shape[1], packed_in_features(qweight_shape[0], layer.bits)
    if outputs != scales_shape[1]:
        raise _bad(f"{module}: qweight has {outputs} outputs, scales {scales_shape[1]}")
    groups = 1 if layer.group_size == PER_CHANNEL_GROUP else -(-in_features // layer.group_size)
    if groups != scales_shape[0]:
        raise _bad(
            f"{module}: qweight rows {qweight_shape[0]} at {layer.bits} bits mean {in_features} inputs, i.e. "
            f"{groups} groups of {layer.group_size}, but scales has {scales_shape[0]} rows"
        )
