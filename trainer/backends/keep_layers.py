"""Spare GPU memory spent on fewer recomputations: once a job's first step has run, as many decoder
layers as fit under ``TrainerSettings.memory_target_gib`` keep their activations instead of
recomputing them in the backward.

With gradient checkpointing a decoder layer stores only its input and runs again in the backward.
Over a frozen 4-bit base a step's matrix products then run three times (the forward, the
recomputation and the input gradient), so the recomputation is about a third of a step; a kept
layer skips it, at the price of its activations, held from its forward to its backward.

The GPU backends train the costliest micro-batch (rows x longest row) first, so what that step
measures bounds the steps after it: its peak allocated memory, and the most any layer's
recomputation allocated (the tensors the layer saves for its backward, and its output). Once that
step is reported (on CUDA, when the second is queued) the last ``layers_that_fit`` layers stop
checkpointing; the peak then grows by about that many layers' cost. A job whose first step comes
near the target keeps none. Should a later step run out of memory, every layer checkpoints again
before the micro-batch is halved.

A recomputation is recognised as a layer's call with gradients that follows one without (a
reentrant checkpoint runs the layer first without gradients, then again in the backward):
Unsloth's checkpoint, inside the layer's call where module hooks see both runs (transformers 5.17
on the device). Where the checkpoint runs inside ``forward`` instead (later transformers), or is
not reentrant (the transformers + peft backend), the hooks see one call and nothing is measured:
every layer keeps checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

MARGIN = 256 * 2**20  # bytes left under the target for what one step's measure does not see


def layers_that_fit(target: int, peak: int, layer_cost: int, n_layers: int,
                    margin: int = MARGIN) -> int:
    """How many layers can keep their activations: ``(target - peak - margin) // layer_cost``,
    within ``[0, n_layers]``; none when no layer's cost was measured."""
    if layer_cost <= 0 or target <= 0:
        return 0
    return max(0, min(n_layers, (target - peak - margin) // layer_cost))


class KeepLayers:
    """Measures ``layers`` (decoder layers that checkpoint: transformers'
    ``GradientCheckpointingLayer``, Unsloth's included) while the first step runs, then keeps the
    last ones that fit under ``target`` bytes (``plan``). ``allocated`` and ``peak``: the device's
    allocated and peak allocated bytes (host-side counters of torch's allocator: reading them
    waits for nothing)."""

    def __init__(self, layers: Sequence[Any], target: int,
                 allocated: Callable[[], int], peak: Callable[[], int]) -> None:
        self.layers = [layer for layer in layers if getattr(layer, "gradient_checkpointing", False)]
        self.target = target
        self.allocated = allocated
        self.peak = peak
        self.layer_cost = 0
        self.kept: list[int] = []  # indices into self.layers
        self.planned = False
        self._before: dict[int, int] = {}
        self._first_run: set[int] = set()  # layers seen running without gradients
        self._handles = [h for i, layer in enumerate(self.layers) for h in (
            layer.register_forward_pre_hook(self._pre(i)),
            layer.register_forward_hook(self._post(i)))]

    @classmethod
    def for_model(cls, model: Any, target_gib: float) -> KeepLayers | None:
        """For the CUDA model's decoder layers, or None (no target, or no layer checkpoints)."""
        import torch

        from trainer.backends.supervised import unwrap

        if target_gib <= 0:
            return None
        layers = getattr(unwrap(model).get_decoder(), "layers", [])
        keep = cls(layers, int(target_gib * 2**30), torch.cuda.memory_allocated,
                   torch.cuda.max_memory_allocated)
        return keep if keep.layers else None

    def _pre(self, i: int) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:
            import torch

            if torch.compiler.is_compiling():
                return  # traced into a compiled region: measure only in eager calls
            if not torch.is_grad_enabled():
                self._first_run.add(i)  # a reentrant checkpoint's first run
            elif i in self._first_run:  # its recomputation, in the backward
                self._first_run.discard(i)
                self._before[i] = self.allocated()
        return hook

    def _post(self, i: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            import torch

            if torch.compiler.is_compiling():
                return
            before = self._before.pop(i, None)
            if before is not None:
                self.layer_cost = max(self.layer_cost, self.allocated() - before)
        return hook

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def plan(self) -> int:
        """Keep the last layers that fit (once); returns how many."""
        if self.planned:
            return len(self.kept)
        self.planned = True
        self.remove_hooks()
        n = layers_that_fit(self.target, self.peak(), self.layer_cost, len(self.layers))
        self.kept = list(range(len(self.layers) - n, len(self.layers)))
        for i in self.kept:
            self.layers[i].gradient_checkpointing = False
        if self.kept:
            _recount_offloads()
        return n

    def restore(self) -> bool:
        """Every layer checkpoints again; returns whether any had stopped."""
        for i in self.kept:
            self.layers[i].gradient_checkpointing = True
        changed = bool(self.kept)
        self.kept = []
        if changed:
            _recount_offloads()
        return changed


def _recount_offloads() -> None:
    """Unsloth's offloading checkpoint learns in its first pass how many checkpointed calls a
    forward makes (the last one is not offloaded); after a change of that number it must count
    again, as Unsloth's own layer planner has it do between steps."""
    try:
        import unsloth_zoo.gradient_checkpointing as zoo_gc
    except ImportError:
        return
    if getattr(zoo_gc, "CURRENT_GC_INDEX", None) == 0:
        zoo_gc.FIRST_PASS = True
        zoo_gc.LAST_GC_INDEX = 0
