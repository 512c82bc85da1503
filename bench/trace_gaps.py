"""Where a GPU sits idle in a torch.profiler trace (``bench/train.py --trace DIR``).

Reads a Chrome trace (``.json`` or ``.json.gz``) and prints, over the window from the first GPU
activity to the last: the time some kernel or copy ran on any stream, the compute stream's busy
time, and its idle gaps by cause:

- *waiting for the host*: the kernel after the gap was launched after the stream went idle, so
  the host was late; charged to the innermost CPU op that launched it (``aten::...``);
- *waiting for another stream*: the kernel had been launched before the gap began, so it waited
  on a dependency (an event of a copy stream, such as an offloaded checkpoint's copy).

Per optimizer step (cut at the optimizer's kernels) it gives the GPU's time, its busy share, its
wait for the host, and how long the host took to queue the step (from the previous
``Optimizer.step`` annotation to this one): a host that queues a step faster than the GPU runs
it leaves the GPU no gap. It also lists the host's synchronizing CUDA calls (stream, event and
device synchronizations, blocking copies) with the CPU op each ran in.

    python bench/trace_gaps.py trace.json.gz [--min-gap-us 5] [--top 25]
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import itertools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
         "cudaStreamWaitEvent", "cudaHostAlloc", "cudaFreeHost", "cudaMalloc", "cudaFree")


def load(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


class Ops:
    """CPU ops per thread, for the innermost op around a moment."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.by_tid: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for e in events:
            if e.get("cat") == "cpu_op":
                self.by_tid[e["tid"]].append(e)
        self.starts = {}
        for tid, ops in self.by_tid.items():
            ops.sort(key=lambda e: e["ts"])
            self.starts[tid] = [e["ts"] for e in ops]

    def innermost(self, tid: Any, ts: float) -> str:
        ops = self.by_tid.get(tid, [])
        i = bisect.bisect_right(self.starts.get(tid, []), ts)
        best: dict[str, Any] | None = None
        # Enclosing ops start before ts; look back a bounded way (ops nest shallowly).
        for e in reversed(ops[max(0, i - 400):i]):
            if e["ts"] <= ts <= e["ts"] + e["dur"] and (best is None or e["dur"] < best["dur"]):
                best = e
        return best["name"] if best else "(no op)"


Gap = tuple[dict[str, Any], float, dict[str, Any] | None]  # next kernel, idle us, late launch


def idle_gaps(kernels: list[dict[str, Any]], runtime: dict[Any, dict[str, Any]]) -> list[Gap]:
    """Each idle stretch of the stream before a kernel: the kernel, the stretch's length and,
    when the host launched that kernel only after the stream went idle, the launch."""
    out: list[Gap] = []
    end = kernels[0]["ts"] + kernels[0]["dur"]
    for k in kernels[1:]:
        if k["ts"] > end:
            launch = runtime.get(k["args"].get("correlation"))
            late = launch if launch is not None and launch["ts"] + launch["dur"] > end else None
            out.append((k, k["ts"] - end, late))
        end = max(end, k["ts"] + k["dur"])
    return out


def per_step(events: list[dict[str, Any]], kernels: list[dict[str, Any]],
             gaps: list[Gap]) -> list[str]:
    """A line per optimizer step whose start and end are both in the trace."""
    ends = [k["ts"] + k["dur"] for i, k in enumerate(kernels)
            if "adam" in k["name"].lower()
            and (i + 1 == len(kernels) or "adam" not in kernels[i + 1]["name"].lower())]
    marks = sorted(e["ts"] for e in events
                   if e.get("cat") == "user_annotation" and e["name"].startswith("Optimizer.step"))
    out = []
    for n, (a, b) in enumerate(itertools.pairwise(ends), start=1):
        inside = [k for k in kernels if a <= k["ts"] < b]
        busy = union([(k["ts"], min(k["ts"] + k["dur"], b)) for k in inside])
        waited = sum(gap for k, gap, late in gaps if late and a <= k["ts"] < b)
        queued = [y - x for x, y in itertools.pairwise(marks) if a - 50_000 < y <= b]
        host = f"; the host queued it in {queued[0] / 1e3:.0f} ms" if queued else ""
        out.append(f"step {n}: GPU {(b - a) / 1e3:.1f} ms, busy {100 * busy / (b - a):.1f}%, "
                   f"waiting for the host {waited / 1e3:.1f} ms{host}")
    return out


def analyse(events: list[dict[str, Any]], min_gap_us: float, top: int) -> str:
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    if not gpu:
        return "no GPU activity in the trace"
    runtime = {e["args"]["correlation"]: e for e in events
               if e.get("cat") in ("cuda_runtime", "cuda_driver")
               and "correlation" in e.get("args", {})}
    ops = Ops(events)
    t0 = min(e["ts"] for e in gpu)
    t1 = max(e["ts"] + e["dur"] for e in gpu)
    window = t1 - t0
    per_stream: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in gpu:
        per_stream[e["args"].get("stream", e.get("tid"))].append(e)
    busy_time = {s: sum(e["dur"] for e in es) for s, es in per_stream.items()}
    compute = max(busy_time, key=lambda s: busy_time[s])
    kernels = sorted(per_stream[compute], key=lambda e: e["ts"])
    lines = [f"window {window / 1e3:.1f} ms; any stream busy "
             f"{union([(e['ts'], e['ts'] + e['dur']) for e in gpu]) / 1e3:.1f} ms; compute stream "
             f"{compute} busy {union([(e['ts'], e['ts'] + e['dur']) for e in kernels]) / 1e3:.1f}"
             f" ms ({len(kernels)} kernels)"]
    for s, t in sorted(busy_time.items(), key=lambda x: -x[1]):
        lines.append(f"  stream {s}: {t / 1e3:.1f} ms in {len(per_stream[s])} activities")
    host: dict[str, list[float]] = defaultdict(list)
    dep: dict[str, list[float]] = defaultdict(list)
    gaps = idle_gaps(kernels, runtime)
    for k, gap, late in gaps:
        if gap < min_gap_us:
            continue
        if late is not None:
            host[ops.innermost(late["tid"], late["ts"])].append(gap)
        else:
            dep[k["name"][:70]].append(gap)
    lines += per_step(events, kernels, gaps)
    for title, table in (("idle waiting for the host (launching op)", host),
                         ("idle waiting for another stream (next kernel)", dep)):
        total = sum(sum(v) for v in table.values())
        lines.append(f"{title}: {total / 1e3:.1f} ms in {sum(len(v) for v in table.values())} gaps")
        for name, times in sorted(table.items(), key=lambda x: -sum(x[1]))[:top]:
            lines.append(f"  {sum(times) / 1e3:8.2f} ms  {len(times):5d} x  {name}")
    syncs: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and e["name"] in SYNCS:
            syncs[f"{e['name']} in {ops.innermost(e['tid'], e['ts'])}"].append(e["dur"])
    lines.append("host calls that can wait for the device or the allocator:")
    for name, durs in sorted(syncs.items(), key=lambda x: -sum(x[1]))[:top]:
        lines.append(f"  {sum(durs) / 1e3:8.2f} ms  {len(durs):5d} x  {name}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace", type=Path)
    ap.add_argument("--min-gap-us", type=float, default=5.0)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    print(analyse(load(args.trace), args.min_gap_us, args.top))


if __name__ == "__main__":
    main()
