"""The input embedding table in host memory while a GPU backend trains.

LoRA never trains the input embeddings, and a step reads only its micro-batches' rows of them,
yet the table is one of a model's largest tensors: 128,256 x 4,096 in bf16 for Llama-3.1-8B,
0.98 GiB of the 8 GiB an 8B QLoRA job is held to (the 4-bit layers take about 4). With
``TrainerSettings.input_embeddings = "host"`` the table moves to host memory when training
starts, each micro-batch's rows are gathered there from the token ids (built on the host anyway)
into pinned memory and copied to the GPU without waiting for it, and the model gets them as
``inputs_embeds``; the table goes back to the GPU once the loop ends. Models whose output layer
shares the table (tied embeddings: SmolLM2, Llama-3.2-1B) keep it on the GPU, where the output
layer needs it every step.
"""

from __future__ import annotations

from typing import Any

from trainer.backends.supervised import unwrap


class HostEmbeddings:
    """Holds ``model``'s input embedding table in host memory until :meth:`restore`."""

    def __init__(self, model: Any) -> None:
        import torch

        self.module = unwrap(model).get_input_embeddings()
        weight = self.module.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.table = weight.detach().to("cpu")
        self.dim = self.table.shape[1]
        # The parameter stays (same device, dtype and requires_grad) with no elements; nothing
        # reads it while the caller passes inputs_embeds.
        weight.data = torch.empty(0, dtype=self.dtype, device=self.device)

    @staticmethod
    def applies(model: Any) -> bool:
        """Whether the table can leave the GPU: the output layer does not share it."""
        inner = unwrap(model)
        out = inner.get_output_embeddings()
        return out is None or out.weight is not inner.get_input_embeddings().weight

    def __call__(self, host_ids: Any) -> Any:
        """The embeddings of ``host_ids`` (a CPU tensor of token ids) on the model's device,
        requiring grad so that checkpointed layers back-propagate to the adapters."""
        import torch

        on_cuda = self.device.type == "cuda"
        rows = torch.empty((host_ids.numel(), self.dim), dtype=self.dtype, pin_memory=on_cuda)
        torch.index_select(self.table, 0, host_ids.reshape(-1), out=rows)
        out = rows.view(*host_ids.shape, self.dim).to(self.device, non_blocking=on_cuda)
        return out.requires_grad_(True)

    def restore(self) -> None:
        """The table back on its device, in the model (before the adapter is saved)."""
        self.module.weight.data = self.table.to(self.device)
