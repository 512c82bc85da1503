"""The LoRA fold of tunegate's vLLM plugin (engine/vllm/plugin/tunegate_lora_fold.py).

The fold and its Triton kernel import no vLLM, but Triton: the CPU checks run in vLLM's
environment (the contract lane ships Triton) under Triton's interpreter, against float32 torch
math, on layers shaped like vLLM's (``lora_a_stacked``/``lora_b_stacked`` tuples, adapter
weights written the way vLLM's ``set_lora`` writes them, into the views the fold hands out).
A second check goes through vLLM's own LoRA layer classes (their adapter loading and apply).
The GPU test (``-m gpu``) runs the first check on CUDA in bfloat16 at Llama-3.1-8B's shapes.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.vllm.test_vllm_plugin import _in_vllm

CHECK = """
import json, sys, types
import torch
from tunegate_lora_fold import fold_layer, reference, tolerance

device, dtype = sys.argv[1], getattr(torch, sys.argv[2])
hidden, q, kv, inter = (int(v) for v in sys.argv[3].split(","))
tokens = [int(t) for t in sys.argv[4].split(",")]
gen = torch.Generator().manual_seed(0)

def rand(*shape, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

def layer(k, slices, slots=4, rank=16):
    lay = types.SimpleNamespace(output_slices=slices)
    lay.base_layer = types.SimpleNamespace(weight=torch.nn.Parameter(
        rand(sum(slices), k, scale=k ** -0.5), requires_grad=False), bias=None)
    lay.lora_a_stacked = tuple(torch.zeros(slots, 1, rank, k, dtype=dtype, device=device)
                               for _ in slices)
    lay.lora_b_stacked = tuple(torch.zeros(slots, 1, w, rank, dtype=dtype, device=device)
                               for w in slices)
    return lay

report = []
for name, k, slices in (("qkv", hidden, (q, kv, kv)), ("o", q, (hidden,)),
                        ("gate_up", hidden, (inter, inter)), ("down", inter, (hidden,))):
    lay = layer(k, slices)
    weight = lay.base_layer.weight.detach().clone()
    fold = fold_layer(lay)
    assert fold is not None, name
    assert torch.equal(lay.base_layer.weight, weight), "the base weight must survive the fold"
    # As vLLM's set_lora writes an adapter: slot 1 stays empty (reset), slot 3 has rank 8.
    for slot, rank in ((0, 16), (2, 16), (3, 8)):
        for i, width in enumerate(slices):
            lay.lora_a_stacked[i][slot, 0, :rank, :k].copy_(rand(rank, k, scale=k ** -0.5))
            lay.lora_b_stacked[i][slot, 0, :width, :rank].copy_(rand(width, rank, scale=0.5))
    for m in tokens:
        x = rand(m, k)
        slot_of_row = torch.randint(-1, 4, (m,), generator=gen).to(device=device,
                                                                      dtype=torch.int32)
        slot_of_row[0] = 3  # at least one row with an adapter (the rank-8 one)
        ref = reference(x, weight, lay.lora_a_stacked, lay.lora_b_stacked, slot_of_row)
        out = fold.apply(x, slot_of_row, no_lora=False)
        base = fold.apply(x, slot_of_row, no_lora=True)
        no_adapter = torch.full_like(slot_of_row, -1)
        report.append({
            "layer": name, "tokens": m,
            "err": tolerance(out, ref),
            "base_exact": bool(torch.equal(base, torch.nn.functional.linear(x, weight))),
            "none_err": tolerance(fold.apply(x, no_adapter, no_lora=False),
                                  x.float() @ weight.float().T),
            "lora_changes": float((out.float() - base.float()).abs().max()),
            "shape": list(out.shape)})
print(json.dumps(report))
"""

# Through vLLM's own LoRA layer classes (the contract lane's vLLM): the patched
# create_lora_weights folds them, vLLM's set_lora/reset_lora load and unload adapters into the
# fold's views, and apply goes through the registered custom op; float16, as on a GPU.
THROUGH_VLLM = """
import json, socket, types
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.config.lora import LoRAConfig
from vllm.distributed import init_distributed_environment, initialize_model_parallel
import tunegate_lora_fold as fold_mod

assert fold_mod.install()
s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()
gen = torch.Generator().manual_seed(0)
def rand(*shape, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(torch.float16)
report = []
with set_current_vllm_config(VllmConfig()):
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel(1, 1)
    from vllm.model_executor.layers.linear import (MergedColumnParallelLinear,
                                                   QKVParallelLinear, RowParallelLinear)
    from vllm.lora.layers import (MergedColumnParallelLinearWithLoRA,
                                  MergedQKVParallelLinearWithLoRA, RowParallelLinearWithLoRA)
    torch.set_default_dtype(torch.float16)
    cfg = LoRAConfig(max_lora_rank=16, max_loras=4, lora_dtype=torch.float16)
    layers = {
        "qkv": (MergedQKVParallelLinearWithLoRA, QKVParallelLinear(64, 16, 4, 2, bias=False)),
        "gate_up": (MergedColumnParallelLinearWithLoRA,
                    MergedColumnParallelLinear(64, [128, 128], bias=False)),
        "down": (RowParallelLinearWithLoRA, RowParallelLinear(128, 64, bias=False)),
    }
    for name, (cls, base) in layers.items():
        with torch.no_grad():
            base.weight.copy_(rand(*base.weight.shape, scale=0.1))
        weight = base.weight.detach().clone()
        lay = cls(base)
        lay.create_lora_weights(4, cfg)
        k = weight.shape[1]
        n = len(lay.output_slices)
        a = [rand(16, k, scale=k ** -0.5) for _ in range(n)]
        b = [rand(w, 16, scale=0.5) for w in lay.output_slices]
        for slot in (0, 2, 3):
            lay.set_lora(slot, a if n > 1 else a[0], b if n > 1 else b[0])
        lay.reset_lora(2)  # unloaded: slot 2 is zeros again
        # vLLM's punica wrapper as the fold reads it: each row's slot, the no-adapter flag.
        meta = types.SimpleNamespace(
            token_lora_mapping=torch.tensor([0, -1, 2, 3, 0, 3, 1], dtype=torch.int32),
            no_lora_flag_cpu=torch.tensor([False]))
        lay.set_mapping(types.SimpleNamespace(token_mapping_meta=meta))
        x = rand(7, k)
        out = lay.apply(x)
        ref = fold_mod.reference(x, weight, lay.lora_a_stacked, lay.lora_b_stacked,
                                 meta.token_lora_mapping)
        plain = x.float() @ weight.float().T
        meta.no_lora_flag_cpu[0] = True
        base_out = lay.apply(x)
        report.append({
            "layer": name, "folded": getattr(lay, "_tunegate_fold_id", None) is not None,
            "err": fold_mod.tolerance(out, ref),
            # rows 1 (no adapter), 2 (its adapter unloaded), 6 (an empty slot)
            "rows_without_adapter": [fold_mod.tolerance(out[i:i + 1], plain[i:i + 1])
                                     for i in (1, 2, 6)],
            "rows_with_adapter": [float((out[i].float() - plain[i]).abs().max()) for i in (0, 3)],
            "base_exact": bool(torch.equal(base_out, torch.nn.functional.linear(x, weight)))})
print(json.dumps(report))
"""


def _check(python: str, device: str, dtype: str, shape: str, tokens: str,
           inherit_path: bool = False) -> list[dict]:
    env = {"TRITON_INTERPRET": "1"} if device == "cpu" else {}
    return json.loads(_in_vllm(python, CHECK, device, dtype, shape, tokens,
                               inherit_path=inherit_path, env=env))


def _assert_exact_within_rounding(report: list[dict], shape: str) -> None:
    hidden, q, kv, inter = (int(v) for v in shape.split(","))
    widths = {"qkv": q + 2 * kv, "o": hidden, "gate_up": 2 * inter, "down": hidden}
    assert report, "no case ran"
    for row in report:
        # bf16/fp16 output rounding is 1 unit; the adapter term's input is rounded once more,
        # as vLLM's own expand rounds its float32 shrink buffer to the weights' dtype.
        assert row["err"] <= 4, row
        assert row["none_err"] <= 2, row
        assert row["base_exact"], row
        assert row["lora_changes"] > 0.05, row  # the adapters do change the output
        assert row["shape"] == [row["tokens"], widths[row["layer"]]], row


@pytest.mark.vllm
def test_fold_matches_float32_math_in_the_interpreter(vllm_python: str) -> None:
    # SmolLM2-135M's shapes (hidden 576, 3 KV heads of 64, MLP 1,536): its slices divide only
    # into 64-column tiles. Token counts cross the 16/64-row tiles, with empty rows of padding.
    shape = "576,576,192,1536"
    report = _check(vllm_python, "cpu", "float16", shape, "1,5,64,70")
    _assert_exact_within_rounding(report, shape)
    assert {r["layer"] for r in report} == {"qkv", "o", "gate_up", "down"}


@pytest.mark.vllm
def test_fold_through_vllms_own_lora_layers(vllm_python: str) -> None:
    report = json.loads(_in_vllm(vllm_python, THROUGH_VLLM, env={"TRITON_INTERPRET": "1"}))
    assert [r["layer"] for r in report] == ["qkv", "gate_up", "down"]
    for row in report:
        assert row["folded"], row
        assert row["err"] <= 4, row
        assert all(e <= 2 for e in row["rows_without_adapter"]), row  # no adapter: base output
        assert all(d > 0.5 for d in row["rows_with_adapter"]), row  # adapters change theirs
        assert row["base_exact"], row  # a step without adapter tokens: the base GEMM alone


@pytest.mark.gpu
def test_fold_matches_float32_math_on_cuda() -> None:
    shape = "4096,4096,1024,14336"  # Llama-3.1-8B
    report = _check(sys.executable, "cuda", "bfloat16", shape, "1,16,64,100,256,1000",
                    inherit_path=True)
    _assert_exact_within_rounding(report, shape)
