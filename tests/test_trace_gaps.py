"""bench/trace_gaps.py's accounting on a small hand-made trace whose gaps are known."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from bench.trace_gaps import analyse, load


def event(name: str, cat: str, ts: float, dur: float, tid: int, **args: Any) -> dict[str, Any]:
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "tid": tid, "pid": 1,
            "args": args}


def trace() -> list[dict[str, Any]]:
    host, gpu, compute, copies = 1, 0, 7, 9
    return [
        event("Optimizer.step#AdamW.step", "user_annotation", 0, 5, host),
        event("_fused_adamw_kernel", "kernel", 0, 10, gpu, stream=compute, correlation=10),
        # Step 2: k1 launched 5 us after the GPU went idle and k2 100 us after (the host's
        # fault); k3 queued early but held 40 us by a copy on another stream.
        event("aten::mm", "cpu_op", 10, 10, host),
        event("cudaLaunchKernel", "cuda_runtime", 12, 3, host, correlation=1),
        event("k1", "kernel", 20, 100, gpu, stream=compute, correlation=1),
        event("aten::copy_", "cpu_op", 130, 50, host),
        event("cudaStreamSynchronize", "cuda_runtime", 140, 30, host),
        event("aten::add", "cpu_op", 215, 10, host),
        event("cudaLaunchKernel", "cuda_runtime", 216, 3, host, correlation=2),
        event("cudaLaunchKernel", "cuda_runtime", 220, 3, host, correlation=3),
        event("k2", "kernel", 220, 50, gpu, stream=compute, correlation=2),
        event("Memcpy HtoD", "gpu_memcpy", 270, 40, gpu, stream=copies, correlation=99),
        event("k3", "kernel", 310, 20, gpu, stream=compute, correlation=3),
        event("Optimizer.step#AdamW.step", "user_annotation", 300, 5, host),
        event("cudaLaunchKernel", "cuda_runtime", 301, 3, host, correlation=11),
        event("_fused_adamw_kernel", "kernel", 330, 20, gpu, stream=compute, correlation=11),
    ]


def test_gaps_are_charged_to_the_host_or_to_another_stream(tmp_path: Path) -> None:
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": trace()}, f)
    text = analyse(load(path), min_gap_us=5, top=5)
    lines = text.splitlines()
    assert lines[0].startswith("window 0.3 ms;")
    # Step 2 runs from the first optimizer's end (10) to the second's (350): 340 us, of which
    # 190 busy (k1 100, k2 50, k3 20, adam 20), 110 waiting for the host (before k1 and k2).
    step = next(line for line in lines if line.startswith("step 1:"))
    assert "GPU 0.3 ms, busy 55.9%, waiting for the host 0.1 ms" in step
    assert step.endswith("the host queued it in 0 ms")  # 300 us between the two annotations
    host = lines.index(next(x for x in lines if x.startswith("idle waiting for the host")))
    assert lines[host].endswith("0.1 ms in 2 gaps")
    assert lines[host + 1].split() == ["0.10", "ms", "1", "x", "aten::add"]
    assert lines[host + 2].split() == ["0.01", "ms", "1", "x", "aten::mm"]
    dep = lines.index(next(x for x in lines if x.startswith("idle waiting for another stream")))
    assert lines[dep].endswith("0.0 ms in 1 gaps")
    assert lines[dep + 1].split() == ["0.04", "ms", "1", "x", "k3"]
    assert any(x.endswith("cudaStreamSynchronize in aten::copy_") for x in lines)
