"""The fast path: our own prefill and decode loop for Llama-architecture models, over the weights
of the transformers model the runner loaded.

Why: at 8 rows per decode step on a 2-core CPU, transformers' module tree, peft's wrappers and
the attention hook cost about as much as the matmuls themselves. Here one layer is a handful of
ops: RMSNorm, one q|k|v matmul, RoPE, two cache writes, three attention ops, an o-projection
matmul that also adds the residual, one gate|up matmul, SiLU-and-multiply and a down-projection
matmul that adds the residual; LoRA adds three small ops per projection when a batch uses
adapters (:mod:`engine.embedded.fast_lora`).

Precision: the weights (and so the matmuls) are in the model's dtype; with bfloat16 weights the
residual stream, the norms, RoPE, the KV cache, attention and LoRA stay float32 (bfloat16 there
was both lossy and slower on this CPU: a one-row bfloat16 attention matmul took 46 us against
about 5 in float32), and only the matmul inputs are cast down. With float32 weights every cast
is a no-op.

The fused q|k|v and gate|up matrices are built once; the transformers modules' weights are then
re-pointed at row slices of them (views, no second copy), so the reference path (transformers +
peft) keeps working on the same memory. Keys and values go into the :class:`SlotCache` in the
same layout transformers writes, so the two paths can take turns on the same sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.embedded.fast_lora import LoraBank
from engine.embedded.kv_cache import SlotCache

# RoPE kinds whose frequencies change with the sequence length: one table cannot serve them.
_DYNAMIC_ROPE = {"dynamic", "longrope"}


def unsupported_reason(model: Any) -> str | None:
    """Why the fast path cannot run ``model`` (None when it can)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not llama"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "projection biases"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    rope = getattr(getattr(model.model, "rotary_emb", None), "rope_type", None)
    if rope is None or rope in _DYNAMIC_ROPE:
        return f"RoPE type {rope!r}"
    return None


# Packed matmul weights (oneDNN's blocked layout, reordered once at load) against plain ones,
# 30 layers + lm_head of SmolLM2 on this 2-core AMX Xeon, 2 threads, ms per step:
#   float32  1 row 24.6 vs 29.8 packed, 2 rows 29.5 vs 34.9, 4 rows 51.8 vs 39.0, 8 rows 69 vs 42;
#   bfloat16 1 row 22.2 vs 22.9 packed, 2 rows 31.6 vs 23.2, 8 rows 30.0 vs 21.6.
# So packed weights serve batches from this many rows up; smaller ones use the plain weights.
PACK_MIN_ROWS = {"float32": 4, "bfloat16": 1}
# The packed copies add the matmul weights' bytes once more (the plain ones stay, shared with the
# reference path); above this size (big models) packing is skipped.
PACK_MAX_BYTES = 4 << 30


@dataclass
class _Weight:
    """A matmul weight ``[out, in]``: the plain tensor (shared with the transformers module) and
    a oneDNN-packed copy (None when packing is off)."""

    plain: Any
    packed: Any = None


@dataclass
class _Layer:
    in_norm: Any  # [hidden]
    qkv: _Weight  # [(heads + 2 kv_heads) * head_dim, hidden]
    o: _Weight  # [hidden, heads * head_dim]
    post_norm: Any  # [hidden]
    gate_up: _Weight  # [2 * intermediate, hidden]
    down: _Weight  # [hidden, intermediate]


def pack_min_rows(model: Any) -> int | None:
    """From how many rows packed matmuls run (None: no packing for this model or CPU)."""
    import torch

    dtype = str(model.dtype).removeprefix("torch.")
    if dtype not in PACK_MIN_ROWS or not torch.backends.mkldnn.is_available():
        return None
    if dtype == "bfloat16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    size = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if n.endswith("proj.weight") or n.startswith("lm_head"))
    return PACK_MIN_ROWS[dtype] if size <= PACK_MAX_BYTES else None


def _fuse(linears: list[Any]) -> Any:
    """Concatenate the weights of ``linears`` by rows and point each at its slice."""
    import torch

    fused = torch.cat([lin.weight.detach() for lin in linears]).contiguous()
    row = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = fused[row:row + rows]
        row += rows
    return fused


class FastLlama:
    def __init__(self, model: Any, cache: SlotCache, max_len: int, *,
                 pack: bool = True) -> None:
        import torch

        cfg = model.config
        inner = model.model
        self.cache = cache
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None)
                            or cfg.hidden_size // cfg.num_attention_heads)
        self.hidden = int(cfg.hidden_size)
        self.inter = int(cfg.intermediate_size)
        self.eps = float(cfg.rms_norm_eps)
        self.scale = self.head_dim ** -0.5
        self.embed = inner.embed_tokens.weight
        self.dtype = self.embed.dtype  # the weights' (matmul inputs and outputs)
        self.act = torch.float32  # residual stream, norms, RoPE, attention, KV cache, LoRA
        self.norm = inner.norm.weight.detach().to(self.act)
        self.pack_rows = pack_min_rows(model) if pack else None
        self.layers = []
        for layer in inner.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                in_norm=layer.input_layernorm.weight.detach().to(self.act),
                qkv=self._prep(_fuse([att.q_proj, att.k_proj, att.v_proj])),
                o=self._prep(att.o_proj.weight.detach()),
                post_norm=layer.post_attention_layernorm.weight.detach().to(self.act),
                gate_up=self._prep(_fuse([mlp.gate_proj, mlp.up_proj])),
                down=self._prep(mlp.down_proj.weight.detach()),
            ))
        self.lm_head = self._prep(model.lm_head.weight.detach())
        # RoPE tables from the model's own rotary module (so every static RoPE kind, llama3
        # scaling included, matches it): cos [max_len, head_dim] and sin with its first half
        # negated, so rotate_half(x) * sin == x.roll(head_dim / 2) * sin_signed.
        with torch.inference_mode():
            cos, sin = inner.rotary_emb(self.embed[:1], torch.arange(max_len)[None])
        half = self.head_dim // 2
        self.cos = cos[0].to(self.act).contiguous()
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).to(self.act)
        self.lora = LoraBank(len(self.layers), self.act)
        self.part_out = {
            "q_proj": self.heads * self.head_dim, "k_proj": self.kv_heads * self.head_dim,
            "v_proj": self.kv_heads * self.head_dim, "o_proj": self.hidden,
            "gate_proj": self.inter, "up_proj": self.inter, "down_proj": self.hidden,
        }

    # -- matmuls -----------------------------------------------------------------------------------

    def _prep(self, w: Any) -> _Weight:
        import torch

        if self.pack_rows is None:
            return _Weight(w)
        # The batch-size hint (rows) only tunes the blocking; any row count runs on the pack.
        return _Weight(w, torch.ops.mkldnn._reorder_linear_weight(w, 8))

    def _linear(self, x: Any, w: _Weight) -> Any:
        import torch
        import torch.nn.functional as F

        if w.packed is not None and x.shape[0] >= self.pack_rows:
            return torch.ops.mkldnn._linear_pointwise(x, w.packed, None, "none", [], "")
        return F.linear(x, w.plain)

    def _linear_add(self, x: Any, w: _Weight, residual: Any) -> Any:
        """``residual + x @ w^T`` (in one op where the residual is in the weights' dtype)."""
        import torch

        if residual.dtype != self.dtype:
            return residual + self._linear(x, w)
        if w.packed is not None and x.shape[0] >= self.pack_rows:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w.packed, None, "add")
        return torch.addmm(residual, x, w.plain.t())

    # -- shared pieces ---------------------------------------------------------------------------

    def _rms(self, x: Any, w: Any) -> Any:
        """RMSNorm of the float32 residual ``x``, in float32."""
        import torch.nn.functional as F

        return F.rms_norm(x, (self.hidden,), w, self.eps)

    def _qkv(self, i: int, lay: _Layer, x: Any, cos: Any, sin: Any, mask: Any
             ) -> tuple[Any, Any, Any]:
        """Norm, q|k|v projection (+ LoRA) and RoPE for ``x`` ``[t, hidden]``: q ``[t, heads,
        dim]``, k and v ``[t, kv_heads, dim]``, all float32."""
        import torch

        h = self._rms(x, lay.in_norm)
        qkv = self._linear(h.to(self.dtype), lay.qkv).to(self.act)
        if mask is not None:
            self.lora.apply(i, "qkv", h, qkv, mask)
        t, d, qk_heads = x.shape[0], self.head_dim, self.heads + self.kv_heads
        qk = qkv[:, : qk_heads * d].view(t, qk_heads, d)
        qk = torch.addcmul(qk * cos, qk.roll(d // 2, dims=-1), sin)
        v = qkv[:, qk_heads * d:].view(t, self.kv_heads, d)
        return qk[:, : self.heads], qk[:, self.heads:], v

    def _out_and_mlp(self, i: int, lay: _Layer, x: Any, att: Any, mask: Any) -> Any:
        """o-projection plus residual, then the MLP block plus residual; returns the new ``x``
        (``x`` and ``att`` float32)."""
        import torch.nn.functional as F

        x = self._linear_add(att.to(self.dtype), lay.o, x)
        if mask is not None:
            self.lora.apply(i, "o", att, x, mask)
        h = self._rms(x, lay.post_norm)
        gu = self._linear(h.to(self.dtype), lay.gate_up)
        if mask is not None:
            # Added in the weights' dtype, so a base row (delta exactly 0) stays bit for bit
            # what a batch without adapters gives it.
            self.lora.apply(i, "gate_up", h, gu, mask)
        act = F.silu(gu[:, : self.inter]) * gu[:, self.inter:]
        x = self._linear_add(act, lay.down, x)
        if mask is not None:
            self.lora.apply(i, "down", act, x, mask)
        return x

    def _logits(self, x: Any) -> Any:
        return self._linear(self._rms(x, self.norm).to(self.dtype), self.lm_head)

    # -- forwards --------------------------------------------------------------------------------

    def decode(self, tokens: Any, positions: Any, kv_len: int,
               adapters: list[str | None]) -> Any:
        """One token per slot ``0..n-1`` (``tokens[i]`` at ``positions[i]``, both ``[n]`` long
        tensors); the cache must be in decode mode for ``kv_len``. Returns logits ``[n, vocab]``."""
        import torch
        import torch.nn.functional as F

        n, kvh, d = tokens.shape[0], self.kv_heads, self.head_dim
        groups = self.heads // kvh
        cap = self.cache.capacity
        x = F.embedding(tokens, self.embed).to(self.act)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        # Additive mask over the cached positions, one row per (slot, kv head): 0 up to each
        # row's own position, -inf past it (stale or zero-filled cache entries).
        past = torch.arange(kv_len)[None, :] > positions[:, None]
        att_mask = torch.zeros((n, kv_len), dtype=self.act).masked_fill_(past, float("-inf"))
        att_mask = att_mask.repeat_interleave(kvh, dim=0)[:, None]  # [n * kvh, 1, kv_len]
        # Where each (slot, kv head) writes its new value, and each (slot, kv head, dim) its new
        # key, in a layer's flat cache (keys are stored transposed, see engine.embedded.kv_cache).
        heads = torch.arange(n)[:, None] * kvh + torch.arange(kvh)[None]  # [n, kvh]
        pos = positions[:, None]
        v_dst = (heads * cap + pos).reshape(-1)
        k_dst = ((heads[:, :, None] * d + torch.arange(d)) * cap + pos[:, :, None]).reshape(-1)
        mask = self.lora.mask(adapters)
        for i, lay in enumerate(self.layers):
            q, k, v = self._qkv(i, lay, x, cos, sin, mask)
            k_cache, v_cache = self.cache.keys[i], self.cache.values[i]
            k_cache.view(-1).index_copy_(0, k_dst, k.reshape(-1))
            v_cache.view(-1, d).index_copy_(0, v_dst, v.reshape(-1, d))
            # Grouped-query attention as batched matmuls over (slot, kv head), reading the cache
            # in place: [:n, ..., :kv_len] merges to [n * kvh, dim, kv_len] (keys) and
            # [n * kvh, kv_len, dim] (values) without copies.
            keys_t = k_cache[:n, ..., :kv_len].reshape(n * kvh, d, kv_len)
            values = v_cache[:n, :, :kv_len].reshape(n * kvh, kv_len, d)
            scores = torch.bmm(q.reshape(n * kvh, groups, d), keys_t)
            scores.mul_(self.scale).add_(att_mask)
            probs = torch.softmax(scores, dim=-1)
            att = torch.bmm(probs, values).view(n, self.heads * d)
            x = self._out_and_mlp(i, lay, x, att, mask)
        return self._logits(x)

    def prefill(self, input_ids: Any, positions: Any, key_ok: Any, att_mask: Any,
                slots: list[int], adapters: list[str | None]) -> Any:
        """New prompts, left padded to one width: ``input_ids``, ``positions`` and ``key_ok``
        (real token or padding) ``[m, w]``, ``att_mask`` bool ``[m, 1, w, w]``; row r's real
        keys/values go to slot ``slots[r]``. Returns the last token's logits ``[m, vocab]``."""
        import torch
        import torch.nn.functional as F

        m, w = input_ids.shape
        kvh, d = self.kv_heads, self.head_dim
        x = F.embedding(input_ids.reshape(-1), self.embed).to(self.act)  # [m * w, hidden]
        flat_pos = positions.reshape(-1)
        cos, sin = self.cos[flat_pos][:, None], self.sin[flat_pos][:, None]
        real = key_ok.reshape(-1).nonzero().squeeze(1)  # token rows that go into the cache
        slot_of = torch.tensor(slots, dtype=torch.long).repeat_interleave(w)[real]
        cap = self.cache.capacity
        heads = slot_of[:, None] * kvh + torch.arange(kvh)[None]  # [real tokens, kvh]
        pos = flat_pos[real][:, None]
        v_dst = (heads * cap + pos).reshape(-1)
        k_dst = ((heads[:, :, None] * d + torch.arange(d)) * cap + pos[:, :, None]).reshape(-1)
        mask = self.lora.mask(adapters, repeat=w)
        for i, lay in enumerate(self.layers):
            q, k, v = self._qkv(i, lay, x, cos, sin, mask)
            self.cache.keys[i].view(-1).index_copy_(0, k_dst, k[real].reshape(-1))
            self.cache.values[i].view(-1, d).index_copy_(0, v_dst, v[real].reshape(-1, d))
            att = F.scaled_dot_product_attention(
                q.view(m, w, self.heads, d).transpose(1, 2),
                k.view(m, w, kvh, d).transpose(1, 2), v.view(m, w, kvh, d).transpose(1, 2),
                attn_mask=att_mask, scale=self.scale, enable_gqa=True)
            att = att.transpose(1, 2).reshape(m * w, self.heads * d)
            x = self._out_and_mlp(i, lay, x, att, mask)
        return self._logits(x.view(m, w, self.hidden)[:, -1])
