"""tunegate's vLLM plugin: LoRA kernel metadata prepared on the host, without a device sync,
and (tunegate_lora_fold.py, beside this file) LoRA folded into the base layers' GEMMs.

vLLM (0.26) rebuilds the metadata of its LoRA kernels before every forward pass, in
``LoRAKernelMeta.prepare_tensors``. It does so on the GPU, from the slot mapping it has just
copied there: ``torch.all(mapping == -1)`` read into a CPU flag, then ``torch.unique``, whose
output size the host must know. Both wait for the GPU. With async scheduling (vLLM's default),
the host prepares step N+1 while the GPU runs step N, so each such wait stalls the host until
step N is done, and the rest of step N+1's preparation then runs while the GPU idles.

The host already holds that mapping (``LoRAMapping.index_mapping`` and ``prompt_mapping``, the
LoRA id of every token and of every sampled row). This plugin computes the same metadata from it
with numpy (stable sort, unique ids and counts, their prefix sums), copies it up in one
non-blocking transfer from pinned memory, and sets the host-side flags directly. The device
tensors hold exactly what vLLM's own code would write; ``meta_matches_stock`` checks that.

vLLM loads it through its ``vllm.general_plugins`` entry point (the ``*.dist-info`` folder
beside this file; tunegate's launcher puts this folder on vLLM's PYTHONPATH). It imports only
vLLM, torch, numpy and (the fold) Triton, which vLLM brings: vLLM's environment need not have
tunegate installed. It patches nothing unless the platform is CUDA and vLLM's classes have the
members it relies on; otherwise it logs why and leaves vLLM as it is.
``TUNEGATE_VLLM_HOST_LORA_META=0`` turns the metadata part off, ``TUNEGATE_VLLM_LORA_FOLD=0``
the fold.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

# A child of vLLM's logger, so that its lines land in vLLM's log with vLLM's format.
log = logging.getLogger("vllm.tunegate_plugin")

# For A/B measurements in one server (bench/lora_meta_device.py): while this file exists, the
# patched method takes vLLM's own path.
AB_FILE_ENV = "TUNEGATE_VLLM_HOST_LORA_META_AB_FILE"
ENABLE_ENV = "TUNEGATE_VLLM_HOST_LORA_META"
FOLD_ENV = "TUNEGATE_VLLM_LORA_FOLD"


def slots_of(lora_ids: Sequence[int], lora_index_to_id: Sequence[int | None]) -> np.ndarray:
    """The LoRA slot of every row (-1 for the base model), as vLLM's ``convert_mapping`` maps
    them: an id > 0 goes to its index in ``lora_index_to_id``."""
    ids = np.asarray(lora_ids, dtype=np.int64)
    slots = np.full(ids.shape[0], -1, dtype=np.int32)
    for index, lora_id in enumerate(lora_index_to_id):
        if lora_id is not None and lora_id > 0:
            slots[ids == lora_id] = index
    return slots


def host_meta(slots: np.ndarray, max_loras: int,
              captured_lora_counts: Sequence[int]) -> tuple[bool, np.ndarray, int]:
    """What ``LoRAKernelMeta.prepare_tensors`` computes, from host data.

    Returns ``(no_lora, packed, num_active)``. ``packed`` (int32) holds, in order: the row
    indices sorted by slot (stable), the active slot ids (``max_loras + 1`` entries, -1 padded),
    the rows per active slot (``max_loras + 1``, 0 padded) and the start of each slot's rows
    (``max_loras + 2``, a leading 0, 0 padded), the lengths of vLLM's device tensors."""
    n = slots.shape[0]
    width = max_loras + 1
    active = np.full(width, -1, dtype=np.int32)
    counts = np.zeros(width, dtype=np.int32)
    starts = np.zeros(width + 1, dtype=np.int32)
    no_lora = bool((slots == -1).all())
    if no_lora:
        return True, np.concatenate([np.empty(0, np.int32), active, counts, starts]), 0
    order = np.argsort(slots, kind="stable").astype(np.int32)
    ids, per_id = np.unique(slots, return_counts=True)
    k = ids.shape[0]
    active[:k] = ids
    counts[:k] = per_id
    starts[1:k + 1] = np.cumsum(per_id)
    num_active = k
    if captured_lora_counts:  # rounded up to a captured CUDA graph's count, as vLLM does
        i = bisect.bisect_left(captured_lora_counts, k)
        if i < len(captured_lora_counts):
            num_active = captured_lora_counts[i]
    assert order.shape[0] == n
    return False, np.concatenate([order, active, counts, starts]), num_active


def prepare_from_host(meta: Any, device_mapping: Any, slots: np.ndarray) -> None:
    """Fill a vLLM ``LoRAKernelMeta`` as its ``prepare_tensors(device_mapping)`` would, from
    ``slots`` (the same mapping, on the host), without waiting for the device."""
    import torch

    width = meta.active_lora_ids.shape[0]
    no_lora, packed, num_active = host_meta(slots, width - 1, meta.captured_lora_counts)
    meta.no_lora_flag_cpu[0] = no_lora
    meta.num_active_loras_cpu[0] = num_active
    n = 0 if no_lora else slots.shape[0]
    host = torch.from_numpy(packed)
    device = meta.active_lora_ids.device
    if device.type == "cuda":
        # Pinned, so the copy is asynchronous; the caching host allocator keeps the block
        # until the copy has run.
        host = host.pin_memory()
    up = host.to(device, non_blocking=True)
    if not no_lora:
        meta.token_lora_mapping[:n].copy_(device_mapping[:n], non_blocking=True)
        meta.token_indices_sorted_by_lora_ids[:n].copy_(up[:n], non_blocking=True)
    meta.active_lora_ids.copy_(up[n:n + width], non_blocking=True)
    meta.num_tokens_per_lora.copy_(up[n + width:n + 2 * width], non_blocking=True)
    meta.lora_token_start_loc.copy_(up[n + 2 * width:], non_blocking=True)


def meta_matches_stock(meta_cls: Any, slots: np.ndarray, max_loras: int, device: str,
                       captured_lora_counts: Sequence[int] | None = None) -> list[str]:
    """Fill two fresh ``meta_cls`` (vLLM's LoRAKernelMeta) from the same mapping, one by vLLM's
    ``prepare_tensors`` and one by ``prepare_from_host``; returns the fields that differ."""
    import torch

    n = slots.shape[0]
    metas = [meta_cls.make(max_loras, max(n, 1), device=device,
                           captured_lora_counts=list(captured_lora_counts or []))
             for _ in range(2)]
    mapping = torch.from_numpy(slots).to(device)
    metas[0].prepare_tensors(mapping)
    prepare_from_host(metas[1], mapping, slots)
    if device != "cpu":
        torch.cuda.synchronize()
    diffs = []
    for name in ("no_lora_flag_cpu", "num_active_loras_cpu", "active_lora_ids",
                 "num_tokens_per_lora", "lora_token_start_loc"):
        if not torch.equal(getattr(metas[0], name).cpu(), getattr(metas[1], name).cpu()):
            diffs.append(name)
    if not bool(metas[0].no_lora_flag_cpu[0]):
        for name in ("token_lora_mapping", "token_indices_sorted_by_lora_ids"):
            if not torch.equal(getattr(metas[0], name)[:n].cpu(),
                               getattr(metas[1], name)[:n].cpu()):
                diffs.append(name)
    return diffs


def check_random_mappings(meta_cls: Any, device: str, cases: int, max_tokens: int,
                          seed: int) -> list[dict[str, Any]]:
    """:func:`meta_matches_stock` over ``cases`` random mappings of 1 to ``max_tokens`` rows
    and 1 to 8 LoRA slots (some base-only, some one adapter only, some with CUDA graph
    counts); returns the cases that differ."""
    rng = np.random.default_rng(seed)
    failures = []
    for case in range(cases):
        n = int(rng.integers(1, max_tokens))
        max_loras = int(rng.integers(1, 9))
        slots = rng.integers(-1, max_loras, n).astype(np.int32)
        if case % 5 == 0:
            slots[:] = -1  # base model only
        if case % 7 == 0:
            slots[:] = rng.integers(0, max_loras)  # one adapter only
        captured = [1, 2, 4, 8][:max_loras.bit_length()] if case % 3 == 0 else []
        diffs = meta_matches_stock(meta_cls, slots, max_loras, device, captured)
        if diffs:
            failures.append({"case": case, "n": n, "max_loras": max_loras, "fields": diffs})
    return failures


def _patched_update_metadata(stock: Any) -> Any:
    ab_file = os.environ.get(AB_FILE_ENV)

    def update_metadata(self: Any, mapping: Any, lora_index_to_id: list[int | None],
                        max_loras: int, vocab_size: int, **kwargs: Any) -> None:
        if ab_file and os.path.exists(ab_file):
            return stock(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self.is_prefill = mapping.is_prefill
        self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)
        prepare_from_host(self.token_mapping_meta, self.token_lora_indices,
                          slots_of(mapping.index_mapping, lora_index_to_id))
        prepare_from_host(self.prompt_mapping_meta, self.sampler_indices,
                          slots_of(mapping.prompt_mapping, lora_index_to_id))
        return None

    update_metadata.__tunegate__ = True  # type: ignore[attr-defined]
    return update_metadata


def _switched_on(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off", "")


def register() -> None:
    """vLLM's general-plugin hook; runs in every vLLM process, possibly more than once. On CUDA
    it installs the host-side LoRA metadata (``TUNEGATE_VLLM_HOST_LORA_META``) and the LoRA
    fold of tunegate_lora_fold.py (``TUNEGATE_VLLM_LORA_FOLD``); either can be switched off."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cuda():
            return
    except Exception as exc:  # noqa: BLE001 - any import failure leaves vLLM untouched
        log.warning("tunegate plugin: off (%s)", exc)
        return
    if _switched_on(ENABLE_ENV):
        _install_host_meta()
    if _switched_on(FOLD_ENV):
        try:
            from tunegate_lora_fold import install
            install()
        except Exception as exc:  # noqa: BLE001 - vLLM keeps its own LoRA kernels
            log.warning("tunegate plugin: LoRA fold off (%r)", exc)


def _install_host_meta() -> None:
    try:
        from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
        from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
    except Exception as exc:  # noqa: BLE001 - any import failure leaves vLLM untouched
        log.warning("tunegate plugin: host LoRA metadata off (%s)", exc)
        return
    stock = PunicaWrapperGPU.update_metadata
    if getattr(stock, "__tunegate__", False):
        return
    needed = ("make", "prepare_tensors")
    fields = ("token_lora_mapping", "token_indices_sorted_by_lora_ids", "active_lora_ids",
              "num_tokens_per_lora", "lora_token_start_loc", "no_lora_flag_cpu",
              "num_active_loras_cpu", "captured_lora_counts")
    missing = [n for n in needed if not hasattr(LoRAKernelMeta, n)]
    missing += [f for f in fields if f not in getattr(LoRAKernelMeta, "__dataclass_fields__", {})]
    missing += [m for m in ("_update_base_metadata", "token_lora_indices", "sampler_indices")
                if not hasattr(PunicaWrapperGPU, m)]
    if missing:
        log.warning("tunegate plugin: host LoRA metadata off, this vLLM lacks %s", missing)
        return
    PunicaWrapperGPU.update_metadata = _patched_update_metadata(stock)
    log.info("tunegate plugin: LoRA kernel metadata prepared on the host")
