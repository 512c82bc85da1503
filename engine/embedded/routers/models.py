"""``GET /v1/models`` and the runtime LoRA endpoints (``/v1/load_lora_adapter``,
``/v1/unload_lora_adapter``), answered as vLLM answers them: plain-text success messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.embedded.routers.deps import EngineDep
from engine.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

router = APIRouter()


def _card(model_id: str, created: int, root: str, parent: str | None,
          max_model_len: int | None) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "vllm",
            "root": root, "parent": parent, "max_model_len": max_model_len,
            "permission": [{"id": f"modelperm-{model_id}", "object": "model_permission",
                            "created": created, "allow_create_engine": False,
                            "allow_sampling": True, "allow_logprobs": True,
                            "allow_search_indices": False, "allow_view": True,
                            "allow_fine_tuning": False, "organization": "*", "group": None,
                            "is_blocking": False}]}


@router.get("/v1/models")
async def list_models(request: Request, engine: EngineDep) -> dict[str, Any]:
    st = request.app.state
    cards = [_card(st.model_name, st.started, str(st.model_path), None, engine.max_model_len)]
    cards += [_card(a.name, a.created, str(a.path), st.model_name, None)
              for a in engine.adapters.list()]
    return {"object": "list", "data": cards}


# vLLM answers these with a bare string body and no content type; so do we.
@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, engine: EngineDep) -> Response:
    await engine.load_lora(body.lora_name, Path(body.lora_path))
    return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, engine: EngineDep) -> Response:
    await engine.unload_lora(body.lora_name)
    return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
