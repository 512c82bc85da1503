"""tunegate's vLLM plugin (engine/vllm/plugin): LoRA kernel metadata prepared on the host.

The metadata logic runs here against numpy/torch references; the checks that need vLLM run in
vLLM's own environment (.venv-vllm, the contract lane): vLLM discovers the plugin through its
entry point, and the plugin fills vLLM's own ``LoRAKernelMeta`` exactly as vLLM's
``prepare_tensors`` does. The GPU test (``-m gpu``, device machine) checks the same on CUDA and
that the plugin patches vLLM's GPU wrapper there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.vllm.launcher import VLLM_PLUGIN_DIR

sys.path.insert(0, str(VLLM_PLUGIN_DIR))
from tunegate_vllm_plugin import host_meta, slots_of  # noqa: E402

# Run in vLLM's interpreter: random mappings through vLLM's LoRAKernelMeta, both ways.
COMPARE = """
import json, sys
from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
from tunegate_vllm_plugin import check_random_mappings
print(json.dumps(check_random_mappings(LoRAKernelMeta, sys.argv[1], cases=300, max_tokens=600,
                                       seed=7)))
"""


def _in_vllm(python: str, code: str, *args: str, inherit_path: bool = False,
             env: dict[str, str] | None = None) -> str:
    """Runs ``code`` in ``python`` with the plugin folder on PYTHONPATH (before this process's
    PYTHONPATH when ``inherit_path``: on the device machine, vLLM is found through it), with
    ``env`` added to its environment."""
    paths = [str(VLLM_PLUGIN_DIR)]
    if inherit_path and os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    full = {"PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
            **(env or {})}
    done = subprocess.run([python, "-c", code, *args], capture_output=True, text=True,
                          timeout=300, env=full)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_slots_follow_vllms_slot_table() -> None:
    # LoRA ids 3 and 7 sit in slots 0 and 2; id 0 is the base model; empty slots are None.
    slots = slots_of([0, 3, 3, 7, 0, 7, 3], [3, None, 7, None])
    assert slots.tolist() == [-1, 0, 0, 2, -1, 2, 0]
    assert slots.dtype == np.int32


def test_host_meta_matches_torch_sort_and_unique() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        max_loras = int(rng.integers(1, 9))
        slots = rng.integers(-1, max_loras, int(rng.integers(1, 300))).astype(np.int32)
        no_lora, packed, num_active = host_meta(slots, max_loras, [])
        n, width = slots.shape[0], max_loras + 1
        t = torch.from_numpy(slots)
        ids, counts = torch.unique(t, sorted=True, return_counts=True)
        assert not no_lora or bool((t == -1).all())
        if no_lora:
            continue
        assert packed[:n].tolist() == torch.sort(t, stable=True).indices.tolist()
        k = ids.shape[0]
        assert num_active == k
        assert packed[n:n + k].tolist() == ids.tolist()
        assert (packed[n + k:n + width] == -1).all()
        assert packed[n + width:n + width + k].tolist() == counts.tolist()
        starts = packed[n + 2 * width:]
        assert starts[0] == 0 and starts[1:k + 1].tolist() == torch.cumsum(counts, 0).tolist()


def test_base_only_batches_need_no_lora_kernels() -> None:
    no_lora, packed, num_active = host_meta(np.full(5, -1, np.int32), 4, [1, 2, 4])
    assert no_lora and num_active == 0
    assert packed.tolist() == [-1] * 5 + [0] * 5 + [0] * 6


def test_active_count_rounds_up_to_a_captured_graph() -> None:
    slots = np.array([0, 1, 2, -1, 0], np.int32)  # 4 distinct values, -1 included
    assert host_meta(slots, 4, [1, 2, 4, 8])[2] == 4
    assert host_meta(slots[:2], 4, [1, 2, 4, 8])[2] == 2
    assert host_meta(np.array([0, 1, 2], np.int32), 4, [1, 2, 4, 8])[2] == 4
    assert host_meta(slots, 4, [])[2] == 4


@pytest.mark.vllm
def test_vllm_discovers_the_plugin_and_leaves_cpu_alone(vllm_python: str) -> None:
    out = _in_vllm(vllm_python, """
import json
from vllm.plugins import load_plugins_by_group
plugins = load_plugins_by_group("vllm.general_plugins")
plugins["tunegate_host_lora_meta"]()
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
print(json.dumps({"names": sorted(plugins),
                  "patched": getattr(PunicaWrapperGPU.update_metadata, "__tunegate__", False)}))
""")
    got = json.loads(out)
    assert "tunegate_host_lora_meta" in got["names"]
    assert got["patched"] is False  # a CPU platform keeps vLLM's own code


@pytest.mark.vllm
def test_plugin_fills_vllms_lora_meta_as_vllm_does(vllm_python: str) -> None:
    assert json.loads(_in_vllm(vllm_python, COMPARE, "cpu")) == []


@pytest.mark.gpu
def test_plugin_on_cuda_patches_vllm_and_matches_it() -> None:
    python = sys.executable  # on the device machine, the interpreter that has vLLM
    assert json.loads(_in_vllm(python, COMPARE, "cuda", inherit_path=True)) == []
    out = _in_vllm(python, """
import json
from tunegate_vllm_plugin import register
register()
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
print(json.dumps(getattr(PunicaWrapperGPU.update_metadata, "__tunegate__", False)))
""", inherit_path=True)
    assert json.loads(out) is True
