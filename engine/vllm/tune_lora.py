"""Tune vLLM's LoRA Triton kernels for one model shape on the local GPU.

vLLM applies LoRA with two Triton kernels per linear layer: *shrink* (``x @ A``, into a float32
buffer of ``rank`` columns) and *expand* (``buffer @ B``, added to the layer's output). Their
tile sizes come from a heuristic unless ``VLLM_TUNED_CONFIG_FOLDER`` holds per-GPU files
(``{GPU}_SHRINK.json``, ``{GPU}_EXPAND_TRUE.json``) keyed
``max_loras + 1 -> slices -> tokens -> K -> N``; for a key that is missing vLLM takes the
nearest one. The heuristic tiles 64 (expand) or 32 (shrink) tokens at a time and, under 128
tokens, splits K 64 ways whatever K is, so at decode batch sizes most of its tiles exit at once.

This module times the kernels themselves (vLLM's own ``_lora_shrink``/``_lora_expand``, each
candidate captured in a CUDA graph as the engine runs them), checks every candidate's output
against a float32 reference, and writes the fastest into those files, plus a report with the
heuristic's time next to the tuned one for every shape. ``tunegate engine serve --kind vllm``
points vLLM at the folder shipped in ``engine/vllm/lora_configs`` (made with this module on an
H200); other GPUs find no file for their name there and keep vLLM's heuristic, unless tuned:

    tunegate engine tune-lora --model MODEL_DIR --out DIR     (or --shape llama-3.1-8b)

which runs this file under vLLM's python (``TUNEGATE_VLLM_PYTHON``), then
``TUNEGATE_VLLM_LORA_KERNEL_CONFIGS=DIR``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Token counts tuned, most telling first (the search is time-boxed): decode batches up to
# vLLM's 256 sequences, then prefill chunks.
DEFAULT_TOKENS = (64, 16, 128, 32, 256, 8, 1, 4, 512, 2048, 8192)


@dataclass(frozen=True)
class OpShape:
    """One kernel call of a decoder layer. ``in_dim`` is the hidden size going in; ``out_dims``
    the output width of each slice (q, k, v for the fused qkv projection)."""

    op: str  # "shrink" or "expand"
    layer: str
    in_dim: int
    out_dims: tuple[int, ...]
    rank: int

    @property
    def slices(self) -> int:
        return len(self.out_dims)

    def key(self) -> tuple[int, int, int]:
        """(slices, K, N) as vLLM looks them up: shrink K = hidden in, N = rank; expand K = rank,
        N = the widest slice."""
        if self.op == "shrink":
            return self.slices, self.in_dim, self.rank
        return self.slices, self.rank, max(self.out_dims)


def layer_shapes(config: dict[str, Any], rank: int) -> list[OpShape]:
    """The LoRA kernel calls of one Llama-style decoder layer (qkv, o, gate_up, down), as vLLM
    fuses them (one call for q, k and v, one for gate and up)."""
    h = config["hidden_size"]
    inter = config["intermediate_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    q = config["num_attention_heads"] * head_dim
    layers = {"qkv_proj": (h, (q, kv, kv)), "o_proj": (q, (h,)),
              "gate_up_proj": (h, (inter, inter)), "down_proj": (inter, (h,))}
    return [OpShape(op, name, d_in, outs, rank)
            for op in ("shrink", "expand") for name, (d_in, outs) in layers.items()]


def candidates(op: str, tokens: int) -> Iterator[dict[str, Any]]:
    """Configs worth timing for ``tokens`` tokens in the batch. Tiles taller than the batch
    only add masked rows, so BLOCK_M stops at the first power of two >= tokens (64 at most)."""
    top_m = max(16, 1 << (max(tokens, 1) - 1).bit_length())
    block_ms = [m for m in (16, 32, 64) if m <= top_m]
    if op == "shrink":
        for bm, bk, sk in itertools.product(block_ms, (64, 256), (1, 4, 8, 16, 32, 64)):
            yield {"block_m": bm, "block_n": 16, "block_k": bk, "split_k": sk,
                   "num_warps": 4, "num_ctas": 1, "num_stages": 2, "group_size_m": 8,
                   "max_nreg": None}
    else:
        for bm, bn in itertools.product(block_ms, (32, 64, 128, 256)):
            yield {"block_m": bm, "block_n": bn, "block_k": 16, "num_warps": 4,
                   "num_ctas": 1, "num_stages": 2, "max_nreg": None}


def refinements(best: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The winner of the tile search with other warp counts and pipeline depths."""
    for warps, stages in itertools.product((2, 4, 8), (1, 2, 3)):
        if (warps, stages) != (best["num_warps"], best["num_stages"]):
            yield {**best, "num_warps": warps, "num_stages": stages}


class Bench:
    """vLLM's LoRA ops on random weights for ``max_loras`` adapters, tokens spread round-robin
    over them (a decode batch of mixed adapters)."""

    def __init__(self, max_loras: int, max_tokens: int, dtype: Any) -> None:
        import torch
        from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op
        from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

        self.torch = torch
        self.shrink_mod, self.expand_mod = lora_shrink_op, lora_expand_op
        self.max_loras = max_loras
        self.dtype = dtype
        self.meta = LoRAKernelMeta.make(max_loras, max_tokens, "cuda")
        self.gen = torch.Generator(device="cuda").manual_seed(0)

    def _rand(self, *shape: int, scale: float = 1.0) -> Any:
        t = self.torch.randn(*shape, generator=self.gen, device="cuda", dtype=self.torch.float32)
        return (t * scale).to(self.dtype)

    def prepare(self, shape: OpShape, tokens: int) -> tuple[Callable[[], None],
                                                          Callable[[], bool]]:
        """(run, check): ``run`` calls the kernel with the config installed by :meth:`use`;
        ``check`` runs it once from a clean output and compares with float32 torch math."""
        from vllm.lora.ops.triton_ops import utils

        torch = self.torch
        # vLLM caches weight pointers and strides by data_ptr; a freed tensor's address comes
        # back for the next shape's weights, with other strides.
        utils._LORA_A_PTR_DICT.clear()
        utils._LORA_B_PTR_DICT.clear()
        mapping = torch.arange(tokens, device="cuda", dtype=torch.int32) % self.max_loras
        self.meta.prepare_tensors(mapping)
        meta = self.meta.meta_args(tokens, False)
        rows = [torch.nonzero(mapping == lora).flatten() for lora in range(self.max_loras)]
        if shape.op == "shrink":
            x = self._rand(tokens, shape.in_dim)
            weights = [self._rand(self.max_loras, 1, shape.rank, shape.in_dim,
                                  scale=shape.in_dim ** -0.5) for _ in shape.out_dims]
            out = torch.empty(shape.slices, tokens, shape.rank, dtype=torch.float32,
                              device="cuda")
            ref = torch.zeros_like(out)
            for i, w in enumerate(weights):
                for lora, idx in enumerate(rows):
                    ref[i, idx] = x[idx].float() @ w[lora, 0].float().T

            def run() -> None:
                self.shrink_mod._lora_shrink(x, weights, out, *meta, 1.0)
            return run, lambda: self._close(run, out, ref)
        buf = torch.randn(shape.slices, tokens, shape.rank, generator=self.gen, device="cuda")
        weights = [self._rand(self.max_loras, 1, n, shape.rank, scale=shape.rank ** -0.5)
                   for n in shape.out_dims]
        y = torch.zeros(tokens, sum(shape.out_dims), dtype=self.dtype, device="cuda")
        ref = torch.zeros(y.shape, dtype=torch.float32, device="cuda")
        start = 0
        for i, w in enumerate(weights):
            for lora, idx in enumerate(rows):
                ref[idx, start:start + w.shape[2]] = buf[i, idx] @ w[lora, 0].float().T
            start += w.shape[2]

        def run_expand() -> None:
            self.expand_mod._lora_expand(buf, weights, y, *meta, offset_start=0,
                                         add_inputs=True)

        def check() -> bool:
            y.zero_()  # expand adds into its output: timing runs left sums there
            return self._close(run_expand, y, ref)
        return run_expand, check

    def _close(self, run: Callable[[], None], out: Any, ref: Any) -> bool:
        run()
        self.torch.cuda.synchronize()
        scale = ref.abs().max().item() + 1e-6
        return bool((out.float() - ref).abs().max().item() <= 2e-2 * scale)

    def use(self, op: str, config: dict[str, Any] | None) -> None:
        """Install ``config`` for every call of ``op`` (None: vLLM's own choice)."""
        from vllm.lora.ops.triton_ops import utils

        mod = self.shrink_mod if op == "shrink" else self.expand_mod
        mod.get_lora_op_configs = (utils.get_lora_op_configs if config is None
                                   else lambda *a, **k: config)

    def time_us(self, run: Callable[[], None], reps: int = 20, rounds: int = 5) -> float:
        """Median microseconds per call, ``reps`` calls replayed from one CUDA graph (as the
        engine runs them: no Python launch cost in the figure). The repeated calls find their
        weights in L2, as a forward pass through 32 layers would not; at decode sizes these
        kernels are bound by launch and tile latency (4 adapters x 16 x 14,336 bf16 is 1.8 MB),
        and the served figures in the README confirm the gain."""
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                run()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000 / reps)
        return statistics.median(times)


def tune(config: dict[str, Any], *, rank: int, max_loras: int, tokens: tuple[int, ...],
         dtype_name: str, budget_s: float) -> dict[str, Any]:
    """Time vLLM's heuristic and the candidates for every (kernel, layer, tokens); returns the
    report (see module docstring). Token counts go in the order given (the ones that matter
    first): past ``budget_s / 2`` the warp/stage refinement is skipped, past ``budget_s`` the
    search too, and vLLM's heuristic config is recorded for what is left."""
    import torch
    from vllm.lora.ops.triton_ops import utils

    dtype = getattr(torch, dtype_name)
    bench = Bench(max_loras, max(tokens), dtype)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    done: dict[tuple[str, tuple[int, int, int], int], dict[str, Any]] = {}
    shapes = layer_shapes(config, rank)
    for n, shape in itertools.product(tokens, shapes):
        key = (shape.op, shape.key(), n)
        if key in done:  # o_proj and down_proj expand share (slices, K, N)
            rows.append({**done[key], "layer": shape.layer})
            continue
        try:
            run, check = bench.prepare(shape, n)
            bench.use(shape.op, None)
            default_us = bench.time_us(run)
        except Exception as exc:  # noqa: BLE001 - recorded; the other shapes still count
            print(f"{shape.op} {shape.layer} tokens {n}: {exc!r}", flush=True)
            continue
        heuristic = utils.get_lora_op_configs(shape.op, max_loras + 1, n, *(
            (shape.in_dim, rank) if shape.op == "shrink" else (max(shape.out_dims), rank)),
            shape.slices, **({"add_inputs": True} if shape.op == "expand" else {}))
        best: tuple[float, dict[str, Any]] = (default_us, dict(heuristic))
        rejected = 0

        def consider(cfg: dict[str, Any]) -> None:
            nonlocal best, rejected
            bench.use(shape.op, cfg)  # noqa: B023 - used within this iteration only
            try:
                if not check():  # noqa: B023
                    rejected += 1
                    return
                us = bench.time_us(run)  # noqa: B023
            except Exception:  # noqa: BLE001 - a config Triton cannot build (shared memory)
                rejected += 1
                return
            if us < best[0]:
                best = (us, cfg)
        elapsed = time.perf_counter() - start
        if elapsed < budget_s:
            for cfg in candidates(shape.op, n):
                consider(cfg)
        if elapsed < budget_s / 2:
            for cfg in refinements(best[1]):
                consider(cfg)
        bench.use(shape.op, None)
        row = {"op": shape.op, "layer": shape.layer, "tokens": n, "slices": shape.slices,
               "k": shape.key()[1], "n": shape.key()[2], "default_us": round(default_us, 2),
               "tuned_us": round(best[0], 2), "config": best[1], "rejected": rejected,
               "searched": elapsed < budget_s}
        done[key] = row
        rows.append(row)
        print(f"{shape.op:6} {shape.layer:12} tokens {n:5}: default {default_us:7.1f} us, "
              f"tuned {best[0]:7.1f} us ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"gpu": torch.cuda.get_device_name(), "rank": rank, "max_loras": max_loras,
            "dtype": dtype_name, "rows": rows, "wall_s": round(time.perf_counter() - start, 1),
            "per_step": per_step(rows, config["num_hidden_layers"])}


def per_step(rows: list[dict[str, Any]], layers: int) -> dict[str, dict[str, float]]:
    """LoRA kernel time of one forward pass (every layer), heuristic vs tuned, by batch size."""
    out: dict[str, dict[str, float]] = {}
    for n in sorted({r["tokens"] for r in rows}):
        mine = [r for r in rows if r["tokens"] == n]
        out[str(n)] = {
            "default_ms": round(layers * sum(r["default_us"] for r in mine) / 1000, 3),
            "tuned_ms": round(layers * sum(r["tuned_us"] for r in mine) / 1000, 3)}
    return out


def config_files(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """vLLM's file name -> content: the best config of every row (vLLM's heuristic where
    nothing beat it), so that the nearest-key lookup finds every token count."""
    gpu = report["gpu"].replace(" ", "_").replace("-", "_")
    files: dict[str, dict[str, Any]] = {f"{gpu}_SHRINK.json": {}, f"{gpu}_EXPAND_TRUE.json": {}}
    slot = str(report["max_loras"] + 1)  # vLLM's lora_ids holds max_loras + 1 entries
    for r in report["rows"]:
        name = f"{gpu}_SHRINK.json" if r["op"] == "shrink" else f"{gpu}_EXPAND_TRUE.json"
        (files[name].setdefault(slot, {}).setdefault(str(r["slices"]), {})
         .setdefault(str(r["tokens"]), {}).setdefault(str(r["k"]), {}))[str(r["n"])] = r["config"]
    return files


def tune_command(python: str, *, model: Path, out: Path, rank: int, max_loras: int,
                 budget_s: float) -> list[str]:
    """The command line that runs this file as a script under ``python`` (vLLM's interpreter,
    which need not have tunegate installed: with ``--model`` this file imports only the
    standard library, torch and vLLM)."""
    # runpy rather than ``python FILE``: a script's folder goes first on sys.path, and this
    # folder's module names (models, metrics, errors, ...) must not shadow anything vLLM imports.
    run = ("import runpy, sys; path = sys.argv.pop(1); sys.argv[0] = path; "
           "runpy.run_path(path, run_name='__main__')")
    return [python, "-c", run, str(Path(__file__).resolve()), "--model", str(model),
            "--out", str(out), "--rank", str(rank), "--max-loras", str(max_loras),
            "--budget-s", str(budget_s)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", type=Path, help="model folder (its config.json)")
    what.add_argument("--shape", help="a shape of `tunegate models random` (llama-3.1-8b)")
    ap.add_argument("--out", type=Path, required=True, help="folder for vLLM's config files")
    ap.add_argument("--report", type=Path, help="JSON report (default: OUT/report.json)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-loras", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKENS)))
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="search time: refinement stops at half of it, the search at all of it")
    args = ap.parse_args(argv)
    # The baseline is vLLM's heuristic: a tuned folder in the environment would replace it
    # (vLLM reads the variable on first use, after this).
    os.environ.pop("VLLM_TUNED_CONFIG_FOLDER", None)
    if args.shape:
        from engine.models import SHAPES

        config = SHAPES[args.shape]
    else:
        config = json.loads((args.model / "config.json").read_text())
    report = tune(config, rank=args.rank, max_loras=args.max_loras,
                  tokens=tuple(int(t) for t in args.tokens.split(",")), dtype_name=args.dtype,
                  budget_s=args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, content in config_files(report).items():
        (args.out / name).write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
    (args.report or args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["per_step"], indent=1))


if __name__ == "__main__":
    main()
