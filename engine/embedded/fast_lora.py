"""LoRA for the fast path (:mod:`.fast_llama`): every resident adapter's low-rank weights,
stacked so one batch applies all of its adapters with two small matmuls per fused projection.

peft still loads an adapter (its key mapping, ``rank_pattern``/``alpha_pattern`` and rsLoRA
scaling are the reference); :func:`extract_adapter` then reads the A/B matrices and scalings out
of peft's layers. For a fused projection (q|k|v, gate|up) an adapter's A matrices are stacked and
its scaled B^T matrices laid out block-diagonally, so ``(h @ A^T) @ B^T`` gives each part's delta
in that part's output columns only.

All resident adapters sit side by side in column blocks of one stack per layer and projection.
A step builds one 0/1 mask ``[rows, columns]`` that keeps, for each row, only its own adapter's
block: ``out += ((h @ A_all^T) * mask) @ B_all^T``. A base row's mask is all zeros, so its delta
is exactly zero and its output exactly the base output; a batch with no adapter row skips LoRA.
"""

from __future__ import annotations

import re
from typing import Any

# Fused projection -> its parts, in the order their outputs are concatenated.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
_PART_GROUP = {part: group for group, parts in GROUPS.items() for part in parts}
_LAYER_MODULE = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)")

LayerLora = dict[str, tuple[Any, Any]]  # group -> (A [r, in], scaled B^T [r, out])


class UnsupportedAdapter(ValueError):
    """An adapter the fast path cannot apply (DoRA, LoRA bias, embedding or lm_head targets,
    modules_to_save); the runner serves with the reference path while one is resident."""


def extract_adapter(model: Any, key: str, *, layers: int, part_out: dict[str, int],
                    dtype: Any) -> list[LayerLora]:
    """Per layer, the fused-group LoRA weights of peft adapter ``key`` loaded into ``model``."""
    import torch

    cfg = getattr(model, "peft_config", {}).get(key)
    for field in ("modules_to_save", "trainable_token_indices"):
        if cfg is not None and getattr(cfg, field, None):
            raise UnsupportedAdapter(f"adapter uses {field}")
    found: dict[tuple[int, str], tuple[Any, Any, float]] = {}
    for name, mod in model.named_modules():
        if key in (getattr(mod, "lora_embedding_A", None) or {}):
            raise UnsupportedAdapter(f"LoRA on embedding {name}")
        lora_a = getattr(mod, "lora_A", None)
        if lora_a is None or not hasattr(lora_a, "keys") or key not in lora_a:
            continue
        m = _LAYER_MODULE.fullmatch(name)
        if m is None or m.group(2) not in _PART_GROUP:
            raise UnsupportedAdapter(f"LoRA on {name}")
        if getattr(mod, "use_dora", {}).get(key):
            raise UnsupportedAdapter("DoRA")
        lin_b = mod.lora_B[key]
        if getattr(lin_b, "bias", None) is not None:
            raise UnsupportedAdapter("LoRA bias")
        found[(int(m.group(1)), m.group(2))] = (lora_a[key].weight, lin_b.weight,
                                                float(mod.scaling[key]))
    out: list[LayerLora] = []
    for layer in range(layers):
        per_group: LayerLora = {}
        for group, parts in GROUPS.items():
            present = [p for p in parts if (layer, p) in found]
            if not present:
                continue
            rank = sum(found[(layer, p)][0].shape[0] for p in present)
            cols = sum(part_out[p] for p in parts)
            a = torch.cat([found[(layer, p)][0].float() for p in present])
            b = torch.zeros(rank, cols)
            r0 = 0
            for p in parts:
                c0 = sum(part_out[q] for q in parts[: parts.index(p)])
                if p in present:
                    la, lb, scale = found[(layer, p)]
                    r = la.shape[0]
                    # Scale folded into B in float32 before any downcast.
                    b[r0:r0 + r, c0:c0 + part_out[p]] = lb.float().t() * scale
                    r0 += r
            per_group[group] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
        out.append(per_group)
    return out


class LoraBank:
    """The resident adapters' weights, stacked per layer and group (see the module doc)."""

    def __init__(self, layers: int, dtype: Any) -> None:
        self.layers = layers
        self.dtype = dtype
        self._adapters: dict[str, list[LayerLora]] = {}
        self._offsets: dict[str, tuple[int, int]] = {}  # key -> its column block
        self.columns = 0
        # [layer][group] -> (A_all [columns, in], B_all [columns, out]); None: no adapter there.
        self.stacks: list[dict[str, tuple[Any, Any] | None]] = []

    def __contains__(self, key: object) -> bool:
        return key in self._adapters

    def add(self, key: str, weights: list[LayerLora]) -> None:
        self._adapters[key] = weights
        self._restack()

    def remove(self, key: str) -> None:
        if self._adapters.pop(key, None) is not None:
            self._restack()

    def _restack(self) -> None:
        import torch

        # One block width per adapter for all groups and layers (its widest group), so one mask
        # per step serves every projection; the zero padding costs a few idle columns.
        widths = {k: max((a.shape[0] for lay in w for a, _ in lay.values()), default=0)
                  for k, w in self._adapters.items()}
        self._offsets, start = {}, 0
        for k, width in widths.items():
            self._offsets[k] = (start, start + width)
            start += width
        self.columns = start
        self.stacks = []
        for layer in range(self.layers):
            groups: dict[str, tuple[Any, Any] | None] = {}
            for group in GROUPS:
                have = {k: w[layer][group] for k, w in self._adapters.items() if group in w[layer]}
                if not have:
                    groups[group] = None
                    continue
                a_in = next(iter(have.values()))[0].shape[1]
                b_out = next(iter(have.values()))[1].shape[1]
                a_all = torch.zeros(self.columns, a_in, dtype=self.dtype)
                b_all = torch.zeros(self.columns, b_out, dtype=self.dtype)
                for k, (a, b) in have.items():
                    s = self._offsets[k][0]
                    a_all[s:s + a.shape[0]] = a
                    b_all[s:s + b.shape[0]] = b
                groups[group] = (a_all, b_all)
            self.stacks.append(groups)

    def mask(self, adapters: list[str | None], repeat: int = 1) -> Any:
        """The ``[len(adapters) * repeat, columns]`` 0/1 mask for a batch whose row i uses
        ``adapters[i]`` (each row repeated ``repeat`` times: prefill tokens); None when no row
        uses an adapter of this bank."""
        import torch

        rows = [(i, self._offsets[a]) for i, a in enumerate(adapters) if a in self._offsets]
        if not rows or self.columns == 0:
            return None
        mask = torch.zeros(len(adapters), self.columns, dtype=self.dtype)
        for i, (s, e) in rows:
            mask[i, s:e] = 1
        return mask.repeat_interleave(repeat, dim=0) if repeat > 1 else mask

    def apply(self, layer: int, group: str, x: Any, out: Any, mask: Any) -> None:
        """``out += ((x @ A^T) * mask) @ B`` in place, for ``group`` of ``layer``; the delta is
        computed in the bank's dtype whatever ``x`` and ``out`` are in."""
        import torch.nn.functional as F

        pair = self.stacks[layer][group]
        if pair is None:
            return
        t = F.linear(x.to(self.dtype), pair[0])
        t.mul_(mask)
        if out.dtype == self.dtype:
            out.addmm_(t, pair[1])
        else:
            out.add_(t @ pair[1])
