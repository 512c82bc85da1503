"""LoRA layer latency on the GPU: vLLM's kernels against tunegate's fold, per Llama-3.1-8B layer.

For each linear layer of a decoder layer (qkv, o, gate_up, down) and each batch size, three
paths are timed, each replayed from a CUDA graph as the engine runs them (the timing of
engine/vllm/tune_lora.py): the base GEMM alone; the base GEMM plus vLLM's LoRA (buffer, shrink,
expand, with tunegate's tuned kernel configs); the fold (one GEMM over the weight with the
adapters' A rows under it, then the fold's expand kernel). Four adapters of rank 16, tokens
spread over them. Each path's output is also compared with float32 math. The per-step figures
sum a 32-layer model. Run on the device machine (``bash bench/serve_device.sh --fold-kernels``);
writes bench/results/lora_fold_device.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "engine" / "vllm" / "plugin"))

LAYERS = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)),
          "gate_up": (4096, (14336, 14336)), "down": (14336, (4096,))}


def measure(timer: Any, meta: Any, fold: Any, weight: Any, a: list[Any], b: list[Any], x: Any,
            slots: int) -> dict[str, float]:
    """One layer at one batch size: the three paths' times (us) and errors (ulp)."""
    import torch
    from tunegate_lora_fold import reference, tolerance
    from vllm.lora.ops.triton_ops import lora_expand, lora_shrink

    m = x.shape[0]
    mapping = torch.arange(m, device="cuda", dtype=torch.int32) % slots
    meta.prepare_tensors(mapping)
    args = meta.meta_args(m, False)
    y = torch.empty(m, weight.shape[0], dtype=weight.dtype, device="cuda")
    rank = b[0].shape[-1]

    def base() -> None:
        torch.mm(x, weight.T, out=y)

    def stock() -> None:
        torch.mm(x, weight.T, out=y)
        buf = torch.empty(len(a), m, rank, dtype=torch.float32, device="cuda")
        lora_shrink(x, a, buf, *args, 1.0)
        lora_expand(buf, b, y, *args, offset_start=0, add_inputs=True)

    def folded() -> Any:
        return fold.apply(x, mapping, no_lora=False)

    ref = reference(x, weight, a, b, mapping)
    stock()
    row = {"stock_err_ulp": round(tolerance(y, ref), 2),
           "fold_err_ulp": round(tolerance(folded(), ref), 2),
           "base_us": timer.time_us(base), "stock_us": timer.time_us(stock),
           "fold_us": timer.time_us(folded)}
    row["stock_lora_us"] = round(row["stock_us"] - row["base_us"], 2)
    row["fold_lora_us"] = round(row["fold_us"] - row["base_us"], 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,16,64,128,256,512")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/lora_fold_device.json")
    args = ap.parse_args()

    import os

    from engine.vllm.launcher import VllmSettings

    # vLLM's kernels with the configs `--kind vllm` gives them (read on first use, after this).
    os.environ.setdefault("VLLM_TUNED_CONFIG_FOLDER", VllmSettings().lora_kernel_configs)
    import torch
    from tunegate_lora_fold import Fold
    from vllm.lora.ops.triton_ops import utils
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

    from engine.vllm.tune_lora import Bench

    slots, rank, dtype = 4, 16, torch.bfloat16
    tokens = [int(t) for t in args.tokens.split(",")]
    timer = Bench(slots, max(tokens), dtype)  # its CUDA-graph timing
    meta = LoRAKernelMeta.make(slots, max(tokens), "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for name, (k, slices) in LAYERS.items():
        # vLLM caches LoRA weight pointers by address; freed tensors' addresses come back.
        utils._LORA_A_PTR_DICT.clear()
        utils._LORA_B_PTR_DICT.clear()
        weight = rand(sum(slices), k, scale=k ** -0.5)
        fold = Fold(weight, slices, slots, rank)
        a = [rand(slots, 1, rank, k, scale=k ** -0.5) for _ in slices]
        b = [rand(slots, 1, w, rank, scale=rank ** -0.5) for w in slices]
        for i in range(len(slices)):
            fold.lora_a(i).copy_(a[i])
            fold.lora_b(i).copy_(b[i])
        for m in tokens:
            row = {"layer": name, "tokens": m,
                   **measure(timer, meta, fold, weight, a, b, rand(m, k), slots)}
            rows.append(row)
            print(f"{name:8} {m:5} tokens: base {row['base_us']:7.1f} us, +LoRA vLLM "
                  f"{row['stock_lora_us']:6.1f} us, fold {row['fold_lora_us']:6.1f} us "
                  f"(error {row['stock_err_ulp']:.2f} / {row['fold_err_ulp']:.2f} ulp)",
                  flush=True)
    per_step = {}
    for m in tokens:
        mine = [r for r in rows if r["tokens"] == m]
        per_step[str(m)] = {key: round(32 * sum(r[f"{key}_us"] for r in mine) / 1000, 3)
                            for key in ("base", "stock_lora", "fold_lora")}
    result = {"gpu": torch.cuda.get_device_name(), "slots": slots, "rank": rank,
              "dtype": "bfloat16", "rows": rows, "per_step_ms": per_step,
              "wall_s": round(time.perf_counter() - start, 1)}
    print(json.dumps(per_step, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
