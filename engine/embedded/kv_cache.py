"""A slot KV cache for iteration-level batching.

Every running sequence owns one slot (a row) of preallocated key/value tensors, one pair per layer:
values shaped ``[slots, kv_heads, capacity, head_dim]``, keys stored transposed,
``[slots, kv_heads, head_dim, capacity]``, because attention multiplies by K^T: the view
``[:n, :, :, :kv_len]`` is then a plain strided matrix per (slot, head) that batched matmuls read in
place, where a transposed view of row-major keys made them copy (2.5x the time of the whole
scores matmul at 8 rows on this CPU). Running sequences always occupy slots ``0 .. n-1`` (a
finished sequence's slot is filled by moving the last one into it), so a decode step attends over
the first ``n`` slots and ``kv_len`` positions without copying. The object duck-types the part of
transformers' ``Cache`` that the Llama-family attention calls: ``update(k, v, layer_idx, ...)``.

Two modes, set by the runner before each forward:

- prefill: the batch holds new prompts, left padded to one length; each row's real keys/values are
  copied into its slot at positions ``0 .. len-1`` and attention runs on the fresh tensors only;
- decode: one new token per running slot, written at each row's own position, and attention runs
  over the slots' cached keys/values (positions past a row's length are masked by the runner).
"""

from __future__ import annotations

from typing import Any

import torch

# Positions are allocated in chunks so short contexts stay small in memory: 46 KiB per position
# and slot for SmolLM2 (30 layers, 3 kv heads of 64 floats, keys and values).
CAPACITY_STEP = 256


class SlotCache:
    def __init__(self, *, layers: int, slots: int, kv_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype = torch.float32) -> None:
        self.layers = layers
        self.slots = slots
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.dtype = dtype
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.ensure_capacity(min(CAPACITY_STEP, max_len))
        # Per-forward state, set by prefill_mode/decode_mode.
        self._mode = "decode"
        self._rows: list[tuple[int, int, int]] = []  # prefill: (slot, pad, length)
        self._n = 0
        self._positions: torch.Tensor | None = None
        self._kv_len = 0

    # -- capacity ------------------------------------------------------------------------------

    def ensure_capacity(self, length: int) -> None:
        """Grow every layer's tensors to hold ``length`` positions (in CAPACITY_STEP chunks)."""
        if length <= self.capacity:
            return
        new_cap = min(self.max_len, -(-length // CAPACITY_STEP) * CAPACITY_STEP)
        # Zeros, not empty: masked positions still enter the attention matmul with weight 0, and
        # 0 * NaN from uninitialised memory would poison real rows.
        shape = (self.slots, self.kv_heads, new_cap, self.head_dim)
        for i in range(self.layers):
            k = torch.zeros((self.slots, self.kv_heads, self.head_dim, new_cap), dtype=self.dtype)
            v = torch.zeros(shape, dtype=self.dtype)
            if self.capacity:
                k[..., : self.capacity] = self.keys[i]
                v[:, :, : self.capacity] = self.values[i]
                self.keys[i], self.values[i] = k, v
            else:
                self.keys.append(k)
                self.values.append(v)
        self.capacity = new_cap

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions to slot ``dst`` (compaction)."""
        if src == dst or length <= 0:
            return
        for i in range(self.layers):
            self.keys[i][dst, ..., :length] = self.keys[i][src, ..., :length]
            self.values[i][dst, :, :length] = self.values[i][src, :, :length]

    # -- modes ---------------------------------------------------------------------------------

    def prefill_mode(self, rows: list[tuple[int, int, int]]) -> None:
        """``rows``: (slot, left padding, prompt length) per batch row."""
        self._mode = "prefill"
        self._rows = rows
        self.ensure_capacity(max(length for _, _, length in rows))

    def decode_mode(self, n: int, positions: torch.Tensor, kv_len: int) -> None:
        """Rows are slots ``0..n-1``; ``positions[i]`` is where row i's new token goes;
        ``kv_len`` (max position + 1) bounds the attention view."""
        self._mode = "decode"
        self._n = n
        self._positions = positions
        self._kv_len = kv_len
        self.ensure_capacity(kv_len)

    # -- the part of transformers' Cache the model calls ---------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        if self._mode == "prefill":
            for row, (slot, pad, length) in enumerate(self._rows):
                k_cache[slot, ..., :length] = key_states[row, :, pad:].transpose(-1, -2)
                v_cache[slot, :, :length] = value_states[row, :, pad:]
            return key_states, value_states
        rows = torch.arange(self._n)
        k_cache[rows, :, :, self._positions] = key_states[:, :, 0].to(self.dtype)
        v_cache[rows, :, self._positions] = value_states[:, :, 0].to(self.dtype)
        # A model in another dtype (bfloat16 over the float32 cache) gets copies in its own.
        return (k_cache[: self._n, ..., : self._kv_len].transpose(-1, -2).to(key_states.dtype),
                v_cache[: self._n, :, : self._kv_len].to(value_states.dtype))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    @property
    def is_compileable(self) -> bool:
        return False
