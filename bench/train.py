"""GPU training figures (issue 4): the trainer's own backend (Unsloth 4-bit QLoRA, the defaults of
``shared.job_spec``) on a random-weight Llama-3.1-8B shape.

Two phases, each in its own process so the second starts from an empty GPU:
- ``speed``: micro-batches of 8 examples of 512 tokens; ``train_tok_s_8x512`` is input tokens per
  second over the steps after a warm-up (the median of the runs in ``train_tok_s_8x512_runs``),
  ``peak_gib`` the largest peak allocated GPU memory of those runs;
- ``seed``: the seed's workload, 5,000 examples of 300 to 500 tokens (``seed_data.chats``), one
  epoch, timed from model load to saved adapter (``seed_workload_s``: the median of the runs in
  ``seed_workload_runs_s``);
- ``hf_speed``: ``speed``'s batches on the fallback backend (transformers + peft + bitsandbytes
  QLoRA, used where Unsloth is missing), for ``hf_tok_s`` and ``hf_peak_gib``.

Options compare the trainer's choices: ``--checkpointing offload|device`` (where Unsloth keeps
activation checkpoints), ``--optimizer adamw|adamw_8bit``, ``--input-embeddings host|device``
(where the input embedding table stays while training), ``--gc-prefetch`` (Unsloth copies a
layer's offloaded checkpoint back during the backward of the layer above), ``--compile-layers
auto|on|off`` (Unsloth's torch.compile region per decoder layer), ``--memory-target GIB`` (after
the first step, layers keep their activations while they fit under it), ``--attention auto|flash``
(torch's choice of attention kernel, cuDNN on an H200, or its flash kernel), ``--keep-layers K``
(K decoder layers keep their activations instead of recomputing them), ``--whole-loss`` (the
model's own loss over every position instead of the output layer at the answer tokens only),
``--seed-batch``, ``--speed-batch``/``--speed-tokens`` (the speed phase's shape); ``--label X``
keeps a run's figures under ``speedX``/``seedX`` only. ``--variants JSON`` runs several such
variants one after the other in one process (one Unsloth import; each loads its own model), a list
of objects of these options' names and a ``label`` each (over the flags' values). Each run records
its load time, its first ten steps' seconds (the warm-up) and, with ``--profile``, a
torch.profiler table of two late steps (``--trace DIR`` also keeps their Chrome trace and
``bench/trace_gaps.py``'s account of where the GPU sat idle in them); with ``--profile-first``, a
cProfile of the host from the start of training to the first step's report (the model's load and a
cold first step).

Runs on the device machine (bench/train_speed_device.sh); writes bench/results/train_device.json.
Random weights measure speed, never quality.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.seed_data import chats  # noqa: E402


class Recorder:
    """Training hooks that keep every step's figures and print events."""

    def __init__(self, profile_steps: tuple[int, int] | None = None,
                 profile_first: bool = False, trace: Path | None = None) -> None:
        self.steps: list[dict[str, Any]] = []
        self.loaded_at: float | None = None  # perf_counter when the model was loaded
        self.profile_steps = profile_steps  # (first, last): profile the steps after first..last
        self.profiler: Any = None
        self.profile_table = ""
        self.trace = trace  # where the profiled steps' Chrome trace goes (gzipped)
        self.trace_gaps = ""  # bench/trace_gaps.py's summary of it
        self.trainable_dtypes: list[str] | None = None
        # cProfile of the training thread from the start of ``train()`` to the first step's
        # report (on CUDA, once the second step is queued): where the model's load and a
        # process's cold first step spend their seconds.
        self.host_profiler: Any = None
        if profile_first:
            import cProfile

            self.host_profiler = cProfile.Profile()
        self.first_step_table = ""

    def on_step(self, info: Any) -> None:
        d = info.to_dict()
        d["tokens"] = info.tokens_per_s * info.elapsed_s
        self.steps.append(d)
        if self.host_profiler is not None:
            import io
            import pstats

            self.host_profiler.disable()
            text = io.StringIO()
            stats = pstats.Stats(self.host_profiler, stream=text)
            stats.sort_stats("cumulative").print_stats(35)
            stats.sort_stats("tottime").print_stats(20)
            self.first_step_table = text.getvalue()
            print(self.first_step_table, flush=True)
            self.host_profiler = None
        if self.profile_steps and info.step == self.profile_steps[0]:
            import torch

            self.profiler = torch.profiler.profile(activities=[
                torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            self.profiler.start()
        elif self.profiler is not None and info.step == self.profile_steps[1]:
            import torch

            torch.cuda.synchronize()
            self.profiler.stop()
            self.profile_table = self.profiler.key_averages().table(
                sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
            print(self.profile_table, flush=True)
            if self.trace is not None:
                self.write_trace()
            self.profiler = None
        if info.step % 25 == 0 or info.step == info.total_steps:
            print(f"step {info.step}/{info.total_steps} loss {info.loss:.3f} "
                  f"{info.tokens_per_s:.0f} tok/s", flush=True)

    def write_trace(self) -> None:
        import gzip
        import shutil

        from bench.trace_gaps import analyse, load

        assert self.trace is not None
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        raw = self.trace.with_suffix("")  # the .json beside the .json.gz
        self.profiler.export_chrome_trace(str(raw))
        self.trace_gaps = analyse(load(raw), 5.0, 25)
        print(self.trace_gaps, flush=True)
        with raw.open("rb") as src, gzip.open(self.trace, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()

    def on_event(self, message: str, data: dict[str, Any]) -> None:
        if "model loaded" in message and self.loaded_at is None:
            self.loaded_at = time.perf_counter()
            self.trainable_dtypes = data.get("trainable_dtypes")
        print("event:", message, json.dumps(data, default=str), flush=True)

    def check_cancelled(self) -> None:
        pass


OPTIONS = {  # a variant's options and their defaults (the trainer's own)
    "checkpointing": "offload", "optimizer": "adamw", "input_embeddings": "host",
    "compile_layers": "auto", "memory_target_gib": 0.0, "attention": "auto", "keep_layers": 0,
    "whole_loss": False,
    "seed_batch": 8, "speed_steps": 40, "speed_batch": 8, "speed_tokens": 512, "profile": False,
    "profile_first": False, "gc_prefetch": False, "label": "", "trace": "",
}


def described(v: dict[str, Any]) -> dict[str, Any]:
    """What a result records of its variant: the options that shape the training."""
    return {k: v[k] for k in OPTIONS if k not in ("profile", "profile_first", "label", "trace")}


def set_gc_prefetch(on: bool) -> None:
    """Unsloth's ``UNSLOTH_GC_PREFETCH``: during one layer's backward, copy the offloaded
    checkpoint of the layer below back to the GPU (off by default there). Read when its
    checkpointing starts in a process, so the module's flag is set too (variants share one)."""
    os.environ["UNSLOTH_GC_PREFETCH"] = "1" if on else "0"
    try:
        import unsloth_zoo.gradient_checkpointing as gc
    except ImportError:
        return
    gc.GC_PREFETCH = on


def phase(name: str, model_dir: Path, work: Path, v: dict[str, Any]) -> dict[str, Any]:
    import torch

    from trainer.backends import GpuOptions, select_backend

    backend_name = "hf_qlora" if name == "hf_speed" else "unsloth"
    # unsloth is imported before transformers
    backend = select_backend(backend_name, GpuOptions(
        v["checkpointing"], v["optimizer"], v["input_embeddings"], v["compile_layers"],
        v["memory_target_gib"]))
    # "flash": torch's cuDNN attention off, so that SDPA runs its flash kernel (and Unsloth does
    # not pad Q, K and V to its 128-token cuDNN buckets); "auto": torch's choice, the trainer's.
    torch.backends.cuda.enable_cudnn_sdp(v["attention"] == "auto")
    # Read by Unsloth's get_peft_model: this many decoder layers (evenly spaced) keep their
    # activations instead of recomputing them in the backward (its checkpoint_skip_layers).
    os.environ["UNSLOTH_GC_KEEP_LAYERS"] = str(v["keep_layers"])
    backend.answer_logits_only = not v["whole_loss"]
    set_gc_prefetch(v["gc_prefetch"])
    from shared.job_spec import TrainSpec
    from trainer.backends.lora import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    if name in ("speed", "hf_speed"):
        batch, steps = v["speed_batch"], v["speed_steps"]
        data = chats(tokenizer, batch * steps, (v["speed_tokens"],) * 2, seed=1)
        spec = TrainSpec(job_id=f"bench-{name}", name="bench", base_model=str(model_dir),
                         training_file="-", batch_size=batch, micro_batch_size=batch,
                         max_steps=steps, max_seq_length=576, backend=backend_name)
    else:
        data = chats(tokenizer, 5000, (300, 500), seed=2)
        spec = TrainSpec(job_id="bench-seed", name="bench", base_model=str(model_dir),
                         training_file="-", batch_size=v["seed_batch"],
                         micro_batch_size=v["seed_batch"], n_epochs=1,
                         max_seq_length=576, backend="unsloth")
    lengths = [len(tokenizer.apply_chat_template(m, tokenize=True, return_dict=False))
               for m in data[:50]]
    print(f"{name}{v['label']}: {len(data)} examples, mean {sum(lengths) / len(lengths):.0f} "
          f"tokens", flush=True)
    n_steps = spec.max_steps or 0
    trace = (Path(v["trace"]) / f"trace-{name}{v['label']}.json.gz") if v["trace"] else None
    hooks = Recorder((n_steps - 3, n_steps - 1) if v["profile"] and n_steps > 8 else None,
                     profile_first=v["profile_first"], trace=trace)
    before_gib = torch.cuda.memory_allocated() / 2**30  # what an earlier variant left
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if hooks.host_profiler is not None:
        hooks.host_profiler.enable()
    result = backend.train(spec, data, work / f"adapter-{name}", hooks)
    wall = time.perf_counter() - t0
    warm = 5  # steps left out of the speed figure: first steps compile and autotune kernels
    # The profiled steps (the last three but one) are left out too.
    last_i = -5 if hooks.profile_steps else -1
    first, last = hooks.steps[warm - 1], hooks.steps[last_i]
    starts = [0.0] + [st["elapsed_s"] for st in hooks.steps]
    took = [b - a for a, b in itertools.pairwise(starts)]  # each step's seconds
    tok_s = (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
    return {
        "phase": name, "backend": result.backend, "steps": result.steps, "tokens": result.tokens,
        "tok_s": tok_s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "allocated_before_gib": round(before_gib, 3),
        "load_to_saved_s": wall, "train_s": result.train_s, "final_loss": result.final_loss,
        "micro_batch_size": result.micro_batch_size, "grad_accum": result.grad_accum,
        "mean_tokens_per_example": sum(lengths) / len(lengths),
        "load_s": (hooks.loaded_at - t0) if hooks.loaded_at else None,
        "first_steps_s": [round(t, 3) for t in took[:10]],
        "steady_step_s_median": sorted(took[warm:])[len(took[warm:]) // 2] if took[warm:] else None,
        "trainable_dtypes": hooks.trainable_dtypes,
        "kept_layers": getattr(backend, "kept_layers", None),
        "variant": described(v),
        "profile": hooks.profile_table,
        "trace_gaps": hooks.trace_gaps,
        "first_step_profile": hooks.first_step_table,
    }


def run_variants(name: str, args: argparse.Namespace, variants: list[dict[str, Any]]) -> None:
    """Each variant in turn in this process, the previous one's model released first; each
    one's figures are written to ``args.out`` as soon as it ends (a variant that fails is
    recorded with its error, and the next one runs)."""
    import gc
    import traceback

    import torch

    for v in variants:
        try:
            figures = phase(name, args.model_dir, args.work, v)
        except Exception as exc:  # an OOM or a library's failure: keep the other variants
            traceback.print_exc()
            figures = {"phase": name, "error": f"{type(exc).__name__}: {exc}"[:2000],
                       "variant": described(v)}
        gc.collect()
        torch.cuda.empty_cache()
        print(json.dumps({k: x for k, x in figures.items()
                          if k not in ("profile", "first_step_profile", "trace_gaps")}),
              flush=True)
        results = json.loads(args.out.read_text()) if args.out.exists() else {}
        record(results, name, v["label"], figures)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/rand8b"))
    ap.add_argument("--tokenizer", type=Path, default=ROOT / ".device" / "tok")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_device.json")
    ap.add_argument("--phase", choices=["speed", "seed", "hf_speed"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-train"))
    ap.add_argument("--phases", default="speed,seed", help="which phases, comma-separated")
    ap.add_argument("--checkpointing", choices=["offload", "device"],
                    default=OPTIONS["checkpointing"])
    ap.add_argument("--optimizer", choices=["adamw", "adamw_8bit"], default=OPTIONS["optimizer"])
    ap.add_argument("--input-embeddings", choices=["host", "device"],
                    default=OPTIONS["input_embeddings"])
    ap.add_argument("--compile-layers", choices=["auto", "on", "off"],
                    default=OPTIONS["compile_layers"],
                    help="Unsloth's torch.compile region per decoder layer (auto: by job size)")
    ap.add_argument("--memory-target", dest="memory_target_gib", type=float,
                    default=OPTIONS["memory_target_gib"],
                    help="GiB under which layers keep their activations after the first step "
                    "(TUNEGATE_TRAINER_MEMORY_TARGET_GIB; 0: none)")
    ap.add_argument("--attention", choices=["flash", "auto"], default=OPTIONS["attention"],
                    help="attention kernel (auto: torch's choice, cuDNN on an H200; flash: "
                    "cuDNN's attention off)")
    ap.add_argument("--keep-layers", type=int, default=OPTIONS["keep_layers"],
                    help="decoder layers that keep their activations (no recompute; Unsloth's "
                    "UNSLOTH_GC_KEEP_LAYERS)")
    ap.add_argument("--gc-prefetch", action="store_true",
                    help="UNSLOTH_GC_PREFETCH=1: offloaded checkpoints copied back a layer early")
    ap.add_argument("--whole-loss", action="store_true",
                    help="the model's own loss over every position (not the answer tokens only)")
    ap.add_argument("--seed-batch", type=int, default=OPTIONS["seed_batch"],
                    help="seed phase: examples per step")
    ap.add_argument("--speed-steps", type=int, default=OPTIONS["speed_steps"])
    ap.add_argument("--speed-batch", type=int, default=OPTIONS["speed_batch"],
                    help="speed phase: examples per step")
    ap.add_argument("--speed-tokens", type=int, default=OPTIONS["speed_tokens"],
                    help="speed phase: tokens each")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over two steps near the end (left out of tok_s)")
    ap.add_argument("--profile-first", action="store_true",
                    help="cProfile of the host from the model's load to the first step's report")
    ap.add_argument("--trace", default="", metavar="DIR",
                    help="with --profile: the profiled steps' Chrome trace (gzipped) in DIR, and "
                    "bench/trace_gaps.py's summary of where the GPU sat idle")
    ap.add_argument("--label", default="", help="suffix of the result keys of this run")
    ap.add_argument("--variants", default="",
                    help="JSON list of option objects (with a label each), run in one process")
    args = ap.parse_args()
    # The flags set every variant's options; a variant's own keys override them.
    given = {k: getattr(args, k) for k in OPTIONS}
    variants = [{**given, **v} for v in json.loads(args.variants)] if args.variants else [given]

    if args.phase:  # a child: one phase, its runs' figures recorded in args.out
        run_variants(args.phase, args, variants)
        return

    if not (args.model_dir / "config.json").exists():
        subprocess.run([sys.executable, "-m", "tunegate", "models", "random",
                        str(args.model_dir), "--shape", "llama-3.1-8b", "--device", "cuda",
                        "--tokenizer", str(args.tokenizer)], check=True, cwd=ROOT)
    results: dict[str, Any] = {"model": "random-weight llama-3.1-8b shape"}
    if args.out.exists():  # a run of some phases keeps the figures of the others
        results = {**json.loads(args.out.read_text()), **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for name in args.phases.split(","):
        # Each phase in a process of its own, started on an empty GPU; it records in args.out.
        subprocess.run([sys.executable, __file__, "--phase", name, "--model-dir",
                        str(args.model_dir), "--work", str(args.work), "--out", str(args.out),
                        "--variants", json.dumps(variants)], check=True, cwd=ROOT)
    results = json.loads(args.out.read_text())
    print(json.dumps({k: results.get(k) for k in ("train_tok_s_8x512", "peak_gib",
                                                  "seed_workload_s", "hf_tok_s", "hf_peak_gib")}))


def record(results: dict[str, Any], name: str, label: str, figures: dict[str, Any]) -> None:
    """A run's figures under ``name + label``; an unlabelled run also sets the headline keys
    (``peak_gib``: the speed runs' largest peak, ``seed_peak_gib``: the seed runs')."""
    results[name + label] = figures
    if "error" in figures:
        return  # a failed run: its figures stay under its own key
    if label:  # an experiment: under its own key; a labelled seed run's time also in its list
        if name == "seed":
            results.setdefault(f"seed{label}_runs_s", []).append(figures["load_to_saved_s"])
        return
    if name == "speed":  # the median of the runs, as for the seed
        runs = results.setdefault("train_tok_s_8x512_runs", [])
        runs.append(figures["tok_s"])
        results["train_tok_s_8x512"] = results["tok_s"] = sorted(runs)[(len(runs) - 1) // 2]
        results["peak_gib"] = max(results.get("peak_gib", 0.0), figures["peak_gib"])
    elif name == "hf_speed":
        results["hf_tok_s"] = figures["tok_s"]
        results["hf_peak_gib"] = figures["peak_gib"]
    else:
        runs = results.setdefault("seed_workload_runs_s", [])
        runs.append(figures["load_to_saved_s"])
        results["seed_workload_s"] = sorted(runs)[(len(runs) - 1) // 2]
        results["seed_peak_gib"] = max(results.get("seed_peak_gib", 0.0), figures["peak_gib"])


if __name__ == "__main__":
    main()
