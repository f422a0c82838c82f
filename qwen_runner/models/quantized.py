"""AutoRound / GPTQ weight-only int4 and int8 checkpoints: unpack once, pack for torch's CPU int4 kernel.

Data path (all at build time, so the ready tier stores the packed layout and loading never repacks):

    checkpoint qweight/qzeros/scales --QuantizedReader--> QWeight (int values [N, K], scales, zero points)
      -> the architecture's mapping fuses (qkv, gate+up: rows of the same format) and stacks experts
      -> pack_for_runtime: int4 -> ``<name>_int4`` (``_convert_weight_to_int4pack_for_cpu`` layout) +
         ``<name>_int4_sz`` ([G, N, 2] scale and float zero, the kernel's form); int8 -> dequantized dense

The kernel, measured on the 2-core Zen 4 box (1024x1024, one row, group 128): bf16 F.linear 139 us,
``_weight_int4pack_mm_for_cpu`` 58 us, auto-round-lib's ark 131 us; with fp32 activations the int4
kernel is ~30x slower, so bf16 models run it with bf16 activations (fp32 models still use it: exact,
slow, for parity tests). int8 is dequantized to the model dtype at pack time: no int8 GEMV beats the
bf16 one here by enough to pay for a second code path.

Formats (checked against auto-round's own exports): ``auto_round:auto_gptq`` and ``gptq`` pack 32//bits
values along the input dimension and store zero points minus 1; ``auto_round:auto_awq`` (auto-round's
asym default) packs along the output dimension in AWQ's interleaved order and stores zero points as is.
Act-order (a non-trivial ``g_idx``) is refused.

``--lm-head int4`` (``int4_lm_head``): the 16-bit lm_head that AutoRound keeps is replaced by an RTN int4
copy (asymmetric min-max per group, ``rtn_int4``) in the same packed layout, so it runs on the same kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from qwen_runner import kernels
from qwen_runner import quant as Q
from qwen_runner.errors import UnsupportedModelError
from qwen_runner.models.layers import DenseMLP, StackedExperts, grouped_by_expert, swiglu

log = logging.getLogger(__name__)

INT4_SUFFIX, SZ_SUFFIX = "_int4", "_int4_sz"
KERNEL = "aten._weight_int4pack_mm_for_cpu"
KERNEL_GROUPS = (32, 64, 128, 256)
KERNEL_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
KERNEL_ROW_BLOCK = 64  # the packed layout's row blocks; our C++ int4 kernels take whole blocks only
BF16_BYTES_PER_INT4_BYTE = 4  # a packed byte holds 2 weights = 4 bytes in bf16 (thread sizing)
KERNEL_DTYPES = (torch.bfloat16, torch.float32)
INNER_K_TILES = 1  # ignored by the CPU packing; the argument is part of the op's signature
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Linears whose weight is read directly (route(), the sigmoid gate): always dense.
DENSE_ONLY_SUFFIXES = ("mlp.gate.weight", "shared_expert_gate.weight")
INT4_MIDPOINT = 8
RUNTIME_BITS = (4, 8)


@dataclass
class QWeight:
    """One quantized [N, K] weight, unpacked: values ``q`` (uint8), ``scales`` and zero points [G, N]."""

    q: torch.Tensor
    scales: torch.Tensor  # fp32
    zeros: torch.Tensor  # fp32 (integer-valued from checkpoints; rtn_int4's are not, see there)
    bits: int
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def same_format(self, other: QWeight) -> bool:
        return (self.bits, self.group) == (other.bits, other.group)

    def rows(self, index: torch.Tensor) -> QWeight:
        return QWeight(self.q.index_select(0, index), self.scales.index_select(1, index),
                       self.zeros.index_select(1, index), self.bits, self.group)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        scales = self.scales.repeat_interleave(self.group, 0)[: self.q.shape[1]].t()
        zeros = self.zeros.repeat_interleave(self.group, 0)[: self.q.shape[1]].t()
        return ((self.q.float() - zeros) * scales).to(dtype)

    def kernel_ok(self, dtype: torch.dtype) -> bool:
        n, k = self.shape
        return (self.bits == 4 and dtype in KERNEL_DTYPES and self.group in KERNEL_GROUPS
                and n % KERNEL_N_MULTIPLE == 0 and k % self.group == 0)

    def pack(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed [N, K/2] uint8, scales_and_zeros [G, N, 2]): ``w = (q - 8) * s + z_float``."""
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.q.to(torch.int32), INNER_K_TILES)
        zero_float = (INT4_MIDPOINT - self.zeros) * self.scales
        return packed, torch.stack((self.scales, zero_float), dim=-1).to(dtype).contiguous()


def cat_rows(parts: list) -> QWeight | torch.Tensor:
    """Concatenate weights along the output rows; parts of different formats are dequantized first."""
    quantized = [p for p in parts if isinstance(p, QWeight)]
    if len(quantized) == len(parts) and all(p.same_format(parts[0]) for p in parts):
        return QWeight(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts], 1),
                       torch.cat([p.zeros for p in parts], 1), parts[0].bits, parts[0].group)
    dtype = next((p.dtype for p in parts if isinstance(p, torch.Tensor)), torch.float32)
    log.debug("fusing linears of different formats: dequantized to %s", dtype)
    return torch.cat([p.dequantize(dtype) if isinstance(p, QWeight) else p for p in parts])


def select_rows(weight, index: torch.Tensor):
    return weight.rows(index) if isinstance(weight, QWeight) else weight.index_select(0, index)


@dataclass
class Stacked:
    """Per-expert weights of one layer, packed into ``[E, ...]`` tensors by ``pack_for_runtime``."""

    experts: list


# --------------------------------------------------------------------------- reading checkpoints

def _unpack(packed: torch.Tensor, bits: int, dim: int, awq: bool = False) -> torch.Tensor:
    """int32 words -> uint8 values, ``32 // bits`` per word along ``dim`` (lowest bits first)."""
    per = Q.PACK_CONTAINER_BITS // bits
    shifts = torch.arange(0, Q.PACK_CONTAINER_BITS, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    if dim == 0:
        values = (packed.unsqueeze(1) >> shifts.view(1, per, 1)) & mask
        return values.reshape(-1, packed.shape[1]).to(torch.uint8)
    values = (packed.unsqueeze(2) >> shifts.view(1, 1, per)) & mask
    if awq:
        values = values[:, :, torch.argsort(torch.tensor(AWQ_ORDER))]
    return values.reshape(packed.shape[0], -1).to(torch.uint8)


class QuantizedReader:
    """A CheckpointReader whose ``get("X.weight")`` returns a QWeight when X is stored packed."""

    def __init__(self, reader, config: Q.QuantConfig):
        self.reader, self.config = reader, config

    def __getattr__(self, name):
        return getattr(self.reader, name)

    def get(self, key: str, dtype: torch.dtype | None = None):
        if key.endswith(".weight") and not self.reader.has(key):
            module = key[: -len(".weight")]
            if self.reader.has(module + ".qweight"):
                return self.read(module)
        return self.reader.get(key, dtype)

    def read(self, module: str) -> QWeight:
        layer = self.config.for_layer(module)
        if layer.bits not in RUNTIME_BITS:
            raise UnsupportedModelError(f"{module}: {layer.bits}-bit weights are not supported",
                                        f"supported: {' and '.join(map(str, RUNTIME_BITS))}-bit AutoRound/GPTQ")
        awq = self.config.awq
        qweight, scales = self.reader.get(module + ".qweight"), self.reader.get(module + ".scales")
        Q.check_packed_linear(module, tuple(qweight.shape), tuple(scales.shape), layer, awq)
        if awq:
            q = _unpack(qweight, layer.bits, 1, awq=True).t().contiguous()
        else:
            q = _unpack(qweight, layer.bits, 0).t().contiguous()
        n, k = q.shape
        group = k if layer.group_size == Q.PER_CHANNEL_GROUP else layer.group_size
        if self.reader.has(module + ".qzeros"):
            zeros = _unpack(self.reader.get(module + ".qzeros"), layer.bits, 1, awq=awq)[:, :n].float()
            if not awq:
                zeros += 1  # GPTQ's (and auto_round:auto_gptq's) stored zero points are off by one
        else:
            zeros = torch.full(scales.shape, float(1 << (layer.bits - 1)))
        if self.reader.has(module + ".g_idx"):
            g_idx = self.reader.get(module + ".g_idx")
            if not torch.equal(g_idx.long(), torch.arange(k) // group):
                raise UnsupportedModelError(
                    f"{module} is quantized with act-order (non-trivial g_idx): not supported",
                    "re-export without act-order (desc_act=false), as AutoRound does by default")
        return QWeight(q, scales.float(), zeros, layer.bits, group)


# --------------------------------------------------------------------------- packing for the runtime

def pack_for_runtime(state: Iterable[tuple[str, object]], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Our parameter stream with QWeights (and Stacked experts) turned into the runtime layout."""
    for name, value in state:
        if isinstance(value, Stacked):
            yield from _pack_stacked(name, value.experts, dtype)
        elif isinstance(value, QWeight):
            if value.kernel_ok(dtype) and not name.endswith(DENSE_ONLY_SUFFIXES):
                packed, sz = value.pack(dtype)
                yield name + INT4_SUFFIX, packed
                yield name + SZ_SUFFIX, sz
            else:
                yield name, value.dequantize(dtype)
        else:
            yield name, value


def _pack_stacked(name: str, experts: list, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    if all(isinstance(e, QWeight) and e.kernel_ok(dtype) for e in experts):
        pairs = [e.pack(dtype) for e in experts]
        yield name + INT4_SUFFIX, torch.stack([p for p, _ in pairs])
        yield name + SZ_SUFFIX, torch.stack([s for _, s in pairs])
        return
    yield name, torch.stack([e.dequantize(dtype) if isinstance(e, QWeight) else e.to(dtype) for e in experts])


def stacked_experts(reader, prefix: str, num_experts: int, dtype: torch.dtype) -> tuple[Stacked, Stacked]:
    """Per-expert ``{gate,up,down}_proj`` of a quantized checkpoint -> (w13, w2) stacks, as QWeights."""
    w13, w2 = [], []
    for e in range(num_experts):
        gate, up = reader.get(f"{prefix}.{e}.gate_proj.weight"), reader.get(f"{prefix}.{e}.up_proj.weight")
        w13.append(cat_rows([gate, up]))
        w2.append(reader.get(f"{prefix}.{e}.down_proj.weight"))
    return Stacked(w13), Stacked(w2)


# --------------------------------------------------------------------------- int4 lm_head (RTN)

LM_HEAD = "lm_head.weight"
_RTN_MIN_SCALE = 1e-10  # a constant group (max == min) still gets a finite, non-zero scale
INT4_MAX = 15


def rtn_int4(weight: torch.Tensor, group: int, dtype: torch.dtype) -> QWeight:
    """Round-to-nearest int4 of a dense ``[N, K]`` weight: asymmetric, min-max per group of ``group`` inputs.

    ``w ~ (q - 8) * s + z`` with ``s = (max - min) / 15`` and ``z = min + 8 s`` (q = 0 is the group's
    minimum, q = 15 its maximum). ``s`` and ``z`` are rounded to ``dtype`` first, as the kernel stores
    them, and ``q`` is rounded against those rounded values. The float zero ``z`` needs no integer zero
    point, so ``QWeight.zeros`` (``8 - z / s``) is not integer-valued here; ``pack`` gives back ``z``.
    """
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / INT4_MAX).clamp(min=_RTN_MIN_SCALE).to(dtype).float()
    zero = (lo + INT4_MIDPOINT * scale).to(dtype).float()
    q = torch.round((w - zero.unsqueeze(-1)) / scale.unsqueeze(-1) + INT4_MIDPOINT).clamp_(0, INT4_MAX)
    zeros = INT4_MIDPOINT - zero / scale
    return QWeight(q.reshape(n, k).to(torch.uint8), scale.t().contiguous(), zeros.t().contiguous(), 4, group)


def lm_head_group(k: int, wanted: int | None = None) -> int | None:
    """The head's group: ``wanted`` (settings.LM_HEAD_INT4_GROUP), else the largest smaller kernel group
    dividing ``k``; None when no kernel group divides it."""
    from qwen_runner import settings as S

    wanted = S.LM_HEAD_INT4_GROUP if wanted is None else wanted
    return next((g for g in sorted(KERNEL_GROUPS, reverse=True) if g <= wanted and k % g == 0), None)


def quantize_lm_head(weight: torch.Tensor, dtype: torch.dtype, group: int | None = None,
                     chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense ``[N, K]`` head -> (``weight_int4``, ``weight_int4_sz``) for ``QuantLinear``, RTN
    (``rtn_int4``), quantized and packed ``chunk_rows`` rows at a time (the packing works in 64-row
    blocks, so chunks that are multiples of 64 concatenate to the whole-matrix packing)."""
    from qwen_runner import settings as S

    n, k = weight.shape
    chunk_rows = S.LM_HEAD_QUANT_CHUNK_ROWS if chunk_rows is None else chunk_rows
    group = lm_head_group(k, group)
    if group is None or n % KERNEL_N_MULTIPLE or dtype not in KERNEL_DTYPES:  # QWeight.kernel_ok's conditions
        raise UnsupportedModelError(
            f"--lm-head int4: the int4 kernel cannot run this lm_head ({n} x {k}, {dtype}); it needs a bf16 or "
            f"fp32 model, outputs a multiple of {KERNEL_N_MULTIPLE} and a hidden size divisible by "
            f"{min(KERNEL_GROUPS)}", "drop --lm-head int4 (the head stays as stored), or use --dtype bf16")
    packed, sz = [], []
    for begin in range(0, n, chunk_rows):
        p, z = rtn_int4(weight[begin:begin + chunk_rows], group, dtype).pack(dtype)
        packed.append(p)
        sz.append(z)
    return torch.cat(packed), torch.cat(sz, 1).contiguous()


def int4_lm_head(state: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Our parameter stream with a dense ``lm_head.weight`` replaced by its RTN int4 copy (``--lm-head int4``).
    A tied head is the embedding's tensor: the embedding itself stays 16-bit, only the head gets a copy."""
    for name, value in state:
        if name == LM_HEAD:
            packed, sz = quantize_lm_head(value, dtype)
            log.info("lm_head %s quantized to int4 (RTN, group %d)", tuple(value.shape),
                     packed.shape[-1] * 2 // sz.shape[0])
            yield LM_HEAD + INT4_SUFFIX, packed
            yield LM_HEAD + SZ_SUFFIX, sz
        else:
            if name == LM_HEAD + INT4_SUFFIX:
                log.info("lm_head is already int4 in the checkpoint: kept as stored")
            yield name, value


# --------------------------------------------------------------------------- runtime modules

def int4_mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for W packed by ``QWeight.pack`` (x: [T, K] in the scales' dtype)."""
    group = packed.shape[-1] * 2 // sz.shape[-3]
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)


def _meta_param(shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)


class _Int4Weights(nn.Module):
    """Holds ``<name>_int4`` / ``<name>_int4_sz`` (int4) or ``<name>`` (dense) for each weight name."""

    def _add(self, name: str, shapes: dict[str, tuple]) -> None:
        if name + INT4_SUFFIX in shapes:
            setattr(self, name + INT4_SUFFIX, _meta_param(*shapes[name + INT4_SUFFIX]))
            setattr(self, name + SZ_SUFFIX, _meta_param(*shapes[name + SZ_SUFFIX]))
        else:
            setattr(self, name, _meta_param(*shapes[name]))

    def _is_int4(self, name: str) -> bool:
        return hasattr(self, name + INT4_SUFFIX)


class QuantLinear(_Int4Weights):
    """nn.Linear with an int4-packed weight (the kernel needs the activation in the scales' dtype)."""

    def __init__(self, shapes: dict[str, tuple], bias: bool):
        super().__init__()
        self._add("weight", shapes)
        self.bias = _meta_param(*shapes["bias"]) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _one_bf16_row(x, self.weight_int4_sz):  # decode: our C++ int4 GEMV (kernels), else ATen's
            y = kernels.linear_int4(x.reshape(1, -1), self.weight_int4, self.weight_int4_sz)
            if y is not None:
                return (y if self.bias is None else y + self.bias).view(*x.shape[:-1], y.shape[-1])
        out = int4_mm(x.reshape(-1, x.shape[-1]), self.weight_int4, self.weight_int4_sz)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])


def _mm(module: _Int4Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    if module._is_int4(name):
        return int4_mm(x, getattr(module, name + INT4_SUFFIX), getattr(module, name + SZ_SUFFIX))
    return torch.nn.functional.linear(x, getattr(module, name))


class QuantDenseMLP(_Int4Weights):
    """DenseMLP (also a shared expert) whose w13 and/or w2 are int4."""

    def __init__(self, shapes: dict[str, tuple]):
        super().__init__()
        self._add("w13", shapes)
        self._add("w2", shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mm(self, "w2", swiglu(_mm(self, "w13", x)))


class QuantExperts(_Int4Weights):
    """StackedExperts with int4 weights ``[E, N, K/2]`` + ``[E, G, N, 2]``: decode touches only the
    chosen experts, prefill groups tokens by expert as the dense path does."""

    def __init__(self, num_experts: int, shapes: dict[str, tuple]):
        super().__init__()
        self.num_experts = num_experts
        self._add("w13", shapes)
        self._add("w2", shapes)
        self._views_of = None
        self._views: dict[str, list] = {}

    def _expert_views(self) -> dict[str, list]:
        """Per-expert (packed, sz) or (dense weight, None) views, cached (no select op per token);
        looked up once per forward, not per expert call."""
        key = tuple(id(p) for p in self.parameters())
        if self._views_of != key:
            self._views = {}
            for n in ("w13", "w2"):
                if self._is_int4(n):
                    self._views[n] = list(zip(getattr(self, n + INT4_SUFFIX).unbind(0),
                                              getattr(self, n + SZ_SUFFIX).unbind(0)))
                else:
                    self._views[n] = [(w, None) for w in getattr(self, n).unbind(0)]
            self._views_of = key
        return self._views

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        views = self._expert_views()
        w13, w2 = views["w13"], views["w2"]

        def mlp(e: int, rows: torch.Tensor) -> torch.Tensor:
            return _apply(w2[e], swiglu(_apply(w13[e], rows)))

        if x.shape[0] == 1:
            if self._is_int4("w13") and self._is_int4("w2") and _one_bf16_row(x, self.w13_int4_sz):
                y = kernels.moe_int4(x, self.w13_int4, self.w13_int4_sz, self.w2_int4, self.w2_int4_sz,
                                     experts[0], weights[0])
                if y is not None:
                    return y
            out = None
            for e, w in zip(experts[0].tolist(), weights[0].unbind(0)):
                y = mlp(e, x).mul_(w)
                out = y if out is None else out.add_(y)
            return out
        return grouped_by_expert(x, weights, experts, self.num_experts, mlp)

    def fused_decode_bytes(self, top_k: int) -> int | None:
        """As ``StackedExperts.fused_decode_bytes`` for the fused C++ int4 MoE call, or None. Counted at the
        weights' bf16 size (4x the packed bytes), as the kernel sizes its threads: unpacking makes an
        int4 weight cost about as much per element as a bf16 one (at 2 threads the 6 MB of packed experts
        had stayed on one thread)."""
        if not (self._is_int4("w13") and self._is_int4("w2")) or not kernels.active():
            return None
        if self.w13_int4_sz.dtype is not torch.bfloat16 or self.w13_int4_sz.shape[-2] % KERNEL_ROW_BLOCK:
            return None
        packed = self.w13_int4.nbytes + self.w2_int4.nbytes
        return packed * BF16_BYTES_PER_INT4_BYTE * top_k // self.num_experts

    @property
    def w13_bytes_per_expert(self) -> int:
        return sum(p.nbytes for n, p in self.named_parameters() if n.startswith("w13")) // self.num_experts


def _one_bf16_row(x: torch.Tensor, sz: torch.Tensor) -> bool:
    """Decode shapes the C++ int4 kernels take: one bf16 row, bf16 scales, rows in the layout's 64-blocks."""
    return (x.dtype is torch.bfloat16 and sz.dtype is torch.bfloat16 and x.numel() == x.shape[-1]
            and sz.shape[-2] % KERNEL_ROW_BLOCK == 0)


def _apply(weight: tuple, x: torch.Tensor) -> torch.Tensor:
    packed, sz = weight
    return torch.nn.functional.linear(x, packed) if sz is None else int4_mm(x, packed, sz)


# --------------------------------------------------------------------------- model surgery

def adapt(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Replace the modules whose weights ``state`` holds int4-packed by their quantized versions
    (on the meta device, before ``load_state_dict``). Returns how many modules were replaced."""
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    owners = sorted({k[: -len(INT4_SUFFIX)].rsplit(".", 1)[0] for k in state if k.endswith(INT4_SUFFIX)})
    for path in owners:
        module = model.get_submodule(path)
        local = {k[len(path) + 1:]: v for k, v in shapes.items() if k.startswith(path + ".")}
        if isinstance(module, nn.Linear):
            new = QuantLinear(local, module.bias is not None)
        elif isinstance(module, DenseMLP):
            new = QuantDenseMLP(local)
        elif isinstance(module, StackedExperts):
            new = QuantExperts(module.num_experts, local)
        else:
            raise UnsupportedModelError(f"{path}: int4 weights for a {type(module).__name__} are not supported")
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    if owners:
        model.quant_kernel = KERNEL
    return len(owners)


def is_quantized_module(module: nn.Module) -> bool:
    return isinstance(module, _Int4Weights)


def describe_kernel(model: nn.Module) -> str | None:
    """The int4 kernels a model runs, None for a dense model (shown by bench): ATen's int4pack for
    prefill, and our C++ ops for one-token decode where they are in use."""
    kernel = getattr(model, "quant_kernel", None)
    decode = kernels.int4_decode() if kernel else None
    return f"prefill {kernel}; decode {decode}" if decode else kernel
