"""LoRA folded into the base GEMM: one cuBLAS GEMM and one small Triton kernel per LoRA layer.

vLLM (0.26) applies LoRA to a linear layer after its base GEMM with three more launches: a
buffer clear, the *shrink* (``x @ A`` for each token's adapter, split over K with atomics) and
the *expand* (``buffer @ B``, added to the output). At decode batch sizes those kernels are
bound by latency, not work: measured on an H200 for Llama-3.1-8B (4 adapters, r 16, tuned
configs), 1.39 ms per 64-token decode step, a fifth of the step.

Here the A matrices of every adapter slot live as extra output rows of the base weight:
``[W; A_1 .. A_L]`` (one block of ``max_loras x rank`` rows per output slice). One GEMM then
yields the base output and every adapter's shrink for every token, ``G``; its cost grows by
``slices x max_loras x rank / N`` (3 % for q/k/v at 4 adapters of r 16). A Triton kernel then
writes ``out = Y + (G masked to each token's own slot) @ B``: for one token only its slot's
``rank`` columns of ``G`` are kept, so for all slots at once the expand is one dense product
with ``K = max_loras x rank`` (64), with no sorting of tokens by adapter.

The rows of ``A`` are vLLM's own ``lora_a_stacked`` tensors, made views into the folded weight,
and ``lora_b_stacked`` views into one ``[max_loras, N, rank]`` buffer, so vLLM's adapter loading
(``set_lora``, ``reset_lora``) writes where this path reads, unchanged. A batch without adapter
tokens (vLLM's ``no_lora_flag_cpu``, decided when the step's metadata is prepared and baked into
that step's CUDA graph) runs the base rows only, exactly as stock vLLM does.

Only layers where this is exact and cheap are folded (unquantized 16-bit weights, no bias, one
tensor-parallel rank, vLLM's plain linear LoRA classes, ``max_loras x rank <= 128``); any other
layer keeps vLLM's kernels. The kernel and ``fold_layer`` import no vLLM, so they are tested on
CPU with Triton's interpreter; ``install`` patches vLLM's classes (see tunegate_vllm_plugin).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("vllm.tunegate_plugin")

ENABLE_ENV = "TUNEGATE_VLLM_LORA_FOLD"
# Above this many G columns per slice the extra GEMM rows cost more than vLLM's kernels save.
MAX_SLOT_COLUMNS = 128
# vLLM's plain (not fully sharded) linear LoRA layers, whose apply is base GEMM + punica.
FOLDABLE_CLASSES = ("ColumnParallelLinearWithLoRA", "MergedColumnParallelLinearWithLoRA",
                    "MergedQKVParallelLinearWithLoRA", "QKVParallelLinearWithLoRA",
                    "RowParallelLinearWithLoRA", "ReplicatedLinearWithLoRA")

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - vLLM's environments always have Triton
    triton = None


if triton is not None:
    @triton.jit
    def _expand_kernel(y_ptr, y_stride, out_ptr, out_stride, b_ptr, b_stride_slot, slots_ptr,
                       M, N_BASE, OFF1, OFF2,
                       RANK: tl.constexpr, LR: tl.constexpr, LR_P: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """``out[m, n] = y[m, n] + sum_r y[m, N_BASE + s*LR + slot(m)*RANK + r] * B[slot(m), n, r]``
        for the rows of one M tile and the columns of one N tile (``s``: the tile's slice,
        from the slice starts OFF1 and OFF2; tiles never straddle a slice)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_rows = rows < M
        n0 = pid_n * BLOCK_N
        s = (n0 >= OFF1).to(tl.int32) + (n0 >= OFF2).to(tl.int32)
        k = tl.arange(0, LR_P)
        in_k = k < LR
        slot = tl.load(slots_ptr + rows, mask=in_rows, other=-1)
        g = tl.load(y_ptr + rows[:, None] * y_stride + (N_BASE + s * LR + k)[None, :],
                    mask=in_rows[:, None] & in_k[None, :], other=0.0)
        g = tl.where((k // RANK)[None, :] == slot[:, None], g, 0.0)
        b = tl.load(b_ptr + (k // RANK)[:, None] * b_stride_slot + cols[None, :] * RANK
                    + (k % RANK)[:, None], mask=in_k[:, None], other=0.0)
        acc = tl.dot(g, b)
        y = tl.load(y_ptr + rows[:, None] * y_stride + cols[None, :], mask=in_rows[:, None],
                    other=0.0)
        out = y.to(tl.float32) + acc
        tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=in_rows[:, None])


def column_block(slices: tuple[int, ...]) -> int:
    """The widest power-of-two column tile (16 to 128) that divides every slice, or 0."""
    for block in (128, 64, 32, 16):
        if all(width % block == 0 for width in slices):
            return block
    return 0


class Fold:
    """One folded layer: the weight with the slots' A rows under it, and B for all slots."""

    def __init__(self, weight: torch.Tensor, slices: tuple[int, ...], slots: int, rank: int):
        n, k = weight.shape
        self.n_base, self.slices, self.slots, self.rank = n, slices, slots, rank
        self.slot_columns = slots * rank
        self.block_n = column_block(slices)
        rows = n + len(slices) * self.slot_columns
        self.weight = torch.zeros(rows, k, dtype=weight.dtype, device=weight.device)
        self.weight[:n].copy_(weight)
        self.b = torch.zeros(slots, n, rank, dtype=weight.dtype, device=weight.device)
        starts = [0]
        for width in slices[:-1]:
            starts.append(starts[-1] + width)
        # Slice starts 1 and 2 for the kernel; a missing slice starts past the end.
        self.off1 = starts[1] if len(starts) > 1 else n
        self.off2 = starts[2] if len(starts) > 2 else n
        self.starts = starts

    def base_weight(self) -> torch.Tensor:
        return self.weight[:self.n_base]

    def lora_a(self, index: int) -> torch.Tensor:
        """Slice ``index``'s A rows as vLLM's ``[max_loras, 1, rank, K]``."""
        top = self.n_base + index * self.slot_columns
        return self.weight[top:top + self.slot_columns].view(self.slots, 1, self.rank, -1)

    def lora_b(self, index: int) -> torch.Tensor:
        """Slice ``index``'s B as vLLM's ``[max_loras, 1, width, rank]`` (a strided view)."""
        start = self.starts[index]
        return self.b[:, start:start + self.slices[index]].unsqueeze(1)

    def apply(self, x: torch.Tensor, slot_of_row: torch.Tensor, no_lora: bool) -> torch.Tensor:
        """The layer's output for ``x`` (2-D) with each row's adapter slot (-1: none)."""
        if no_lora:
            return F.linear(x, self.base_weight())
        y = F.linear(x, self.weight)
        out = torch.empty(x.shape[0], self.n_base, dtype=x.dtype, device=x.device)
        m = x.shape[0]
        if m == 0:
            return out
        block_m = min(64, max(16, triton.next_power_of_2(m)))
        grid = (triton.cdiv(m, block_m), self.n_base // self.block_n)
        _expand_kernel[grid](y, y.stride(0), out, out.stride(0), self.b, self.b.stride(0),
                             slot_of_row, m, self.n_base, self.off1, self.off2,
                             RANK=self.rank, LR=self.slot_columns,
                             LR_P=max(16, triton.next_power_of_2(self.slot_columns)),
                             BLOCK_M=block_m, BLOCK_N=self.block_n, num_warps=4)
        return out


_REFUSED: set[str] = set()


def why_not_foldable(weight: torch.Tensor, bias: Any, slices: tuple[int, ...], slots: int,
                     rank: int) -> str | None:
    """None when a layer with this weight can be folded, else the reason it cannot."""
    if triton is None:
        return "no Triton"
    if weight.dim() != 2 or weight.dtype not in (torch.float16, torch.bfloat16):
        return f"weight {tuple(weight.shape)} {weight.dtype}"
    if bias is not None:
        return "bias"
    if sum(slices) != weight.shape[0] or len(slices) > 3:
        return f"slices {slices} vs {weight.shape[0]} rows"
    if slots * rank > MAX_SLOT_COLUMNS:
        return f"max_loras x rank = {slots * rank} > {MAX_SLOT_COLUMNS}"
    if not column_block(slices):
        return f"no column tile divides {slices}"
    return None


def fold_layer(layer: Any) -> Fold | None:
    """Fold one vLLM linear LoRA layer right after its ``create_lora_weights``: its base weight
    and ``lora_a_stacked``/``lora_b_stacked`` become views of one ``Fold`` (adapter contents
    already set are kept). Returns None, with the layer untouched, when it does not qualify."""
    base = layer.base_layer
    slices = tuple(int(s) for s in layer.output_slices)
    a0 = layer.lora_a_stacked[0]
    slots, rank = int(a0.shape[0]), int(a0.shape[2])
    reason = why_not_foldable(base.weight, getattr(base, "bias", None), slices, slots, rank)
    shapes_a = {tuple(a.shape) for a in layer.lora_a_stacked}
    if reason is None and (shapes_a != {(slots, 1, rank, base.weight.shape[1])}
                           or a0.dtype != base.weight.dtype
                           or int(layer.lora_b_stacked[0].shape[-1]) != rank):
        reason = f"LoRA buffers {sorted(shapes_a)} {a0.dtype} do not match the weight"
    if reason is not None:
        # Once at info (a model's layers share their reasons), then at debug.
        level = logging.DEBUG if _REFUSED else logging.INFO
        _REFUSED.add(reason)
        log.log(level, "tunegate plugin: %s keeps vLLM's LoRA kernels (%s)",
                type(layer).__name__, reason)
        return None
    fold = Fold(base.weight.data, slices, slots, rank)
    for i in range(len(slices)):
        fold.lora_a(i).copy_(layer.lora_a_stacked[i])
        fold.lora_b(i).copy_(layer.lora_b_stacked[i])
    base.weight.data = fold.base_weight()
    layer.lora_a_stacked = tuple(fold.lora_a(i) for i in range(len(slices)))
    layer.lora_b_stacked = tuple(fold.lora_b(i) for i in range(len(slices)))
    return fold


# -- vLLM side ----------------------------------------------------------------------------------

_FOLDS: list[Fold] = []


def _folded_linear(x: torch.Tensor, fold_id: int, slot_of_row: torch.Tensor,
                   no_lora_flag_cpu: torch.Tensor) -> torch.Tensor:
    return _FOLDS[fold_id].apply(x, slot_of_row[:x.shape[0]], bool(no_lora_flag_cpu.item()))


def _folded_linear_fake(x: torch.Tensor, fold_id: int, slot_of_row: torch.Tensor,
                        no_lora_flag_cpu: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], _FOLDS[fold_id].n_base)


def install() -> bool:
    """Patch vLLM's linear LoRA layers to fold on creation and to apply through the fold.
    Returns False, patching nothing, when this vLLM lacks what the patch relies on."""
    from vllm import envs
    from vllm.lora.layers import base_linear
    from vllm.utils.torch_utils import direct_register_custom_op

    cls = base_linear.BaseLinearLayerWithLoRA
    if getattr(cls.create_lora_weights, "__tunegate__", False):
        return True
    if not all(hasattr(cls, m) for m in ("create_lora_weights", "_apply_sync")):
        log.warning("tunegate plugin: LoRA fold off, this vLLM's LoRA layers differ")
        return False
    direct_register_custom_op(op_name="tunegate_folded_linear", op_func=_folded_linear,
                              fake_impl=_folded_linear_fake)
    op = torch.ops.vllm.tunegate_folded_linear
    stock_create, stock_apply = cls.create_lora_weights, cls._apply_sync

    def folds(layer: Any) -> bool:
        config = layer.lora_config
        # Unquantized weights only (the fold's GEMM is F.linear, as vLLM's unquantized method
        # runs it), one tensor-parallel rank, vLLM's plain layer classes.
        method = getattr(layer.base_layer, "quant_method", None)
        return (type(layer).__name__ in FOLDABLE_CLASSES and layer.tp_size == 1
                and type(method).__name__ == "UnquantizedLinearMethod"
                and not getattr(config, "fully_sharded_loras", False)
                and not getattr(envs, "VLLM_BATCH_INVARIANT", False))

    def patch_create(stock: Any) -> Any:
        def create_lora_weights(self: Any, *args: Any, **kwargs: Any) -> None:
            stock(self, *args, **kwargs)
            # Subclasses call up to this class: fold once, after the outermost returns.
            if type(self).create_lora_weights is create_lora_weights and folds(self):
                fold = fold_layer(self)
                if fold is not None:
                    _FOLDS.append(fold)
                    self._tunegate_fold_id = len(_FOLDS) - 1
                    if len(_FOLDS) == 1:
                        log.info("tunegate plugin: LoRA folded, first layer %s %s + %d rows",
                                 type(self).__name__, fold.slices,
                                 len(fold.slices) * fold.slot_columns)
        create_lora_weights.__tunegate__ = True  # type: ignore[attr-defined]
        return create_lora_weights

    def apply_sync(self: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        fold_id = getattr(self, "_tunegate_fold_id", None)
        if fold_id is None:
            return stock_apply(self, x, bias)
        # A folded layer never goes back to vLLM's kernels: they require contiguous B.
        meta = self.punica_wrapper.token_mapping_meta
        out = op(x.flatten(0, -2), fold_id, meta.token_lora_mapping, meta.no_lora_flag_cpu)
        return out.view(*x.shape[:-1], out.shape[-1])

    cls.create_lora_weights = patch_create(stock_create)
    for sub in _all_subclasses(cls):
        if "create_lora_weights" in vars(sub):
            sub.create_lora_weights = (  # type: ignore[attr-defined]
                patch_create(vars(sub)["create_lora_weights"]))
    cls._apply_sync = apply_sync
    log.info("tunegate plugin: LoRA folded into the base GEMM where it qualifies")
    return True


def _all_subclasses(cls: type) -> list[type]:
    out: list[type] = []
    sub: type
    for sub in cls.__subclasses__():
        out += [sub, *_all_subclasses(sub)]
    return out


def reference(x: torch.Tensor, weight: torch.Tensor, lora_a: list[torch.Tensor],
              lora_b: list[torch.Tensor], slot_of_row: torch.Tensor) -> torch.Tensor:
    """Float32 torch math of a LoRA linear layer: ``x W^T`` plus, per row with a slot,
    ``x A_s^T B_s^T`` of each slice (``lora_a[i]``: ``[slots, 1, rank, K]``, ``lora_b[i]``:
    ``[slots, 1, width, rank]``)."""
    xf = x.float()
    out = xf @ weight.float().T
    start = 0
    for a, b in zip(lora_a, lora_b, strict=True):
        width = b.shape[2]
        for row in range(x.shape[0]):
            s = int(slot_of_row[row])
            if s >= 0:
                out[row, start:start + width] += (xf[row] @ a[s, 0].float().T) @ b[s, 0].float().T
        start += width
    return out


def tolerance(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error over the output's scale, in units of the dtype's rounding."""
    eps = torch.finfo(out.dtype).eps
    return float((out.float() - ref).abs().max() / (ref.abs().max() + 1e-6) / eps)

