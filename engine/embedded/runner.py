"""The model runner: a transformers causal LM (plus peft LoRA adapters) driven step by step over a
:class:`~engine.embedded.kv_cache.SlotCache`.

The scheduler owns which sequence sits in which slot; the runner only runs forwards:
``prefill`` for new prompts (written into their slots) and ``decode`` for one token of every
running slot. Adapters are per row.

Two implementations of the forwards (``impl``, setting ``TUNEGATE_ENGINE_IMPL``):

- ``hf``, the reference: the transformers model (with peft's mixed-batch forward,
  ``adapter_names``, once an adapter is loaded: each row gets its adapter, ``"__base__"`` rows the
  pure base weights);
- ``fast``, the default: our own loop over the same weights (:mod:`.fast_llama`), about
  twice the decode throughput of ``hf`` at 8 streams on a 2-core CPU. Models it cannot run (not
  Llama-architecture, biases, dynamic RoPE) use ``hf``; so do forwards while an adapter it
  cannot apply (DoRA, embedding or lm_head targets, ...) is resident. Both write the same KV
  cache layout, so they can alternate.

Adapters are always loaded through peft (the reference for their key mapping and scaling); the
fast path then copies their A/B matrices into its own stacks.

Only the engine thread calls a runner (forwards and adapter changes alike), so no locking.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
ATTENTION = "tunegate_decode"  # our attention function's name in transformers' registry


def decode_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                     scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[Any, None]:
    """Attention for one query token per row as two small matmuls (grouped-query heads kept
    grouped, no copies of the cache); torch's fused CPU kernel costs far more per call at this
    size. Prompts (several query tokens) go to transformers' SDPA path."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q_len, dim = query.shape
    if q_len != 1 or attention_mask is None or attention_mask.dtype == torch.bool:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    kv_heads = key.shape[1]
    q = query.reshape(b, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(-1, -2))
    scores = scores * (scaling if scaling is not None else dim**-0.5) + attention_mask
    out = torch.matmul(torch.softmax(scores, dim=-1), value)  # [b, kv_heads, groups, dim]
    return out.reshape(b, 1, heads, dim), None


class Runner(Protocol):
    """What the scheduler needs from a runner; the unit tests give a fake one."""

    eos_token_ids: set[int]

    def prefill(self, rows: list[tuple[int, list[int], str | None]]) -> Any: ...

    def decode(self, tokens: list[int], positions: list[int],
               adapters: list[str | None]) -> Any: ...

    def move_slot(self, src: int, dst: int, length: int) -> None: ...


class ModelRunner:
    def __init__(self, model_dir: Path, *, max_num_seqs: int, max_model_len: int,
                 dtype: str = "float32", impl: str = "fast") -> None:
        import torch
        from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

        from engine.embedded.kv_cache import SlotCache

        self.torch = torch
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        AttentionInterface.register(ATTENTION, decode_attention)
        model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=getattr(torch, dtype), attn_implementation=ATTENTION
        )
        model.eval()
        self.base_model = model
        self.model: Any = model  # becomes the PeftModel once an adapter is loaded
        self.peft = False
        self.adapter_keys: set[str] = set()
        self._next_key = 0
        cfg = model.config
        self.config = cfg
        self.max_model_len = max_model_len
        eos = cfg.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.eos_token_id is not None:
            g = gen.eos_token_id
            ids |= set(g if isinstance(g, list) else [g])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = ids
        self.vocab_size = int(cfg.vocab_size)
        self.pad_id = int(self.tokenizer.pad_token_id or next(iter(ids), 0))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # The cache is float32 whatever the weights: bfloat16 keys and values made attention
        # both slower and lossier on CPU (see engine.embedded.fast_llama).
        self.cache = SlotCache(
            layers=cfg.num_hidden_layers, slots=max_num_seqs, kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim, max_len=max_model_len, dtype=torch.float32,
        )
        self.module_names = {name for name, _ in model.named_modules()}
        self.fast: Any = None
        self._hf_only: set[str] = set()  # resident adapters the fast path cannot apply
        if impl == "fast":
            from engine.embedded.fast_llama import FastLlama, unsupported_reason

            reason = unsupported_reason(model)
            if reason is None:
                self.fast = FastLlama(model, self.cache, max_model_len)
            else:
                log.warning("fast path unavailable (%s): using the transformers path", reason)
        elif impl != "hf":
            raise ValueError(f"unknown engine impl {impl!r} (hf or fast)")

    @property
    def impl(self) -> str:
        """The implementation the next forward uses."""
        return "fast" if self.fast is not None and not self._hf_only else "hf"

    # -- forwards ------------------------------------------------------------------------------

    def _adapter_kwargs(self, adapters: list[str | None]) -> dict[str, Any]:
        if not self.peft:
            return {}
        return {"adapter_names": [a or BASE for a in adapters]}

    def prefill(self, rows: list[tuple[int, list[int], str | None]]) -> Any:
        """``rows``: (slot, prompt token ids, adapter) per new sequence. Returns the logits of
        each prompt's last token, ``[len(rows), vocab]``."""
        torch = self.torch
        width = max(len(ids) for _, ids, _ in rows)
        m = len(rows)
        input_ids = torch.full((m, width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((m, width), dtype=torch.long)
        key_ok = torch.zeros((m, width), dtype=torch.bool)
        cache_rows = []
        for i, (slot, ids, _) in enumerate(rows):
            pad = width - len(ids)
            input_ids[i, pad:] = torch.tensor(ids, dtype=torch.long)
            positions[i, pad:] = torch.arange(len(ids))
            key_ok[i, pad:] = True
            cache_rows.append((slot, pad, len(ids)))
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        # Padding queries attend to themselves only, so no row of the mask is empty (an empty row
        # gives NaN, which would flow into padded keys and from there into real rows).
        mask = (causal[None] & key_ok[:, None, :]) | torch.eye(width, dtype=torch.bool)[None]
        self.cache.prefill_mode(cache_rows)
        adapters = [a for _, _, a in rows]
        with torch.inference_mode():
            if self.impl == "fast":
                return self.fast.prefill(input_ids, positions, key_ok, mask[:, None],
                                         [slot for slot, _, _ in rows], adapters)
            out = self.model(
                input_ids=input_ids, attention_mask=mask[:, None], position_ids=positions,
                cache=self.cache, use_cache=True, logits_to_keep=1,
                **self._adapter_kwargs(adapters),
            )
        return out.logits[:, -1, :]

    def decode(self, tokens: list[int], positions: list[int],
               adapters: list[str | None]) -> Any:
        """One token for each of slots ``0..n-1``: ``tokens[i]`` goes at ``positions[i]``.
        Returns the next-token logits ``[n, vocab]``."""
        torch = self.torch
        n = len(tokens)
        pos = torch.tensor(positions, dtype=torch.long)
        kv_len = int(max(positions)) + 1
        if self.impl == "fast":
            self.cache.decode_mode(n, pos, kv_len)
            with torch.inference_mode():
                return self.fast.decode(torch.tensor(tokens, dtype=torch.long), pos, kv_len,
                                        adapters)
        # Additive mask (0 or -inf), made once per step for all layers.
        mask = torch.zeros((n, kv_len), dtype=self.base_model.dtype).masked_fill_(
            torch.arange(kv_len)[None, :] > pos[:, None], float("-inf"))
        self.cache.decode_mode(n, pos, kv_len)
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor(tokens, dtype=torch.long)[:, None],
                attention_mask=mask[:, None, None, :], position_ids=pos[:, None],
                cache=self.cache, use_cache=True, logits_to_keep=1,
                **self._adapter_kwargs(adapters),
            )
        return out.logits[:, -1, :]

    def move_slot(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)

    # -- adapters ------------------------------------------------------------------------------

    def load_adapter(self, path: Path) -> str:
        """Load a (validated) peft LoRA adapter; returns its key, which requests then name.

        Keys are never reused, so an adapter unloaded late (after its last request) can never
        be confused with a newer one loaded under the same public name."""
        key = f"a{self._next_key}"  # peft keys are module-dict keys: no dots or odd characters
        self._next_key += 1
        if not self.peft:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.base_model, str(path), adapter_name=key)
            self.model.eval()
            self.peft = True
        else:
            self.model.load_adapter(str(path), adapter_name=key)
        self.adapter_keys.add(key)
        if self.fast is not None:
            self._fast_adapter(key)
        return key

    def _fast_adapter(self, key: str) -> None:
        from engine.embedded.fast_lora import UnsupportedAdapter, extract_adapter

        try:
            weights = extract_adapter(self.model, key, layers=len(self.fast.layers),
                                      part_out=self.fast.part_out, dtype=self.fast.act)
        except UnsupportedAdapter as exc:
            log.warning("adapter %s: %s; the transformers path serves while it is loaded",
                        key, exc)
            self._hf_only.add(key)
            return
        self.fast.lora.add(key, weights)

    def unload_adapter(self, key: str) -> None:
        self.adapter_keys.discard(key)
        self._hf_only.discard(key)
        if self.fast is not None:
            self.fast.lora.remove(key)
        if self.adapter_keys:
            self.model.delete_adapter(key)
            return
        # The last one: take the LoRA layers out altogether (peft cannot run a mixed batch
        # with no adapter left), back to the plain base model.
        self.base_model = self.model.unload()
        self.model = self.base_model
        self.peft = False
