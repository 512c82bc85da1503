"""GPU training figures (issue 4): the trainer's own backend (Unsloth 4-bit QLoRA, the defaults of
``shared.job_spec``) on a random-weight Llama-3.1-8B shape.

Two phases, each in its own process so the second starts from an empty GPU:
- ``speed``: micro-batches of 8 examples of 512 tokens; ``tok_s`` is input tokens per second over
  the steps after a warm-up, ``peak_gib`` the peak allocated GPU memory;
- ``seed``: the seed's workload, 5,000 examples of about 400 tokens, one epoch, timed from model
  load to saved adapter (``seed_workload_s``);
- ``hf_speed``: ``speed``'s batches on the fallback backend (transformers + peft + bitsandbytes
  QLoRA, used where Unsloth is missing), for ``hf_tok_s`` and ``hf_peak_gib``.

Runs on the device machine (bench/train_device.sh); writes bench/results/train_device.json.
Random weights measure speed, never quality.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = [
    "river", "stone", "lantern", "orbit", "quiet", "maple", "copper", "harbor", "velvet",
    "signal", "meadow", "thunder", "canvas", "ember", "falcon", "glacier", "willow", "prism",
]


class Recorder:
    """Training hooks that keep every step's figures and print events."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_step(self, info: Any) -> None:
        d = info.to_dict()
        d["tokens"] = info.tokens_per_s * info.elapsed_s
        self.steps.append(d)
        if info.step % 25 == 0 or info.step == info.total_steps:
            print(f"step {info.step}/{info.total_steps} loss {info.loss:.3f} "
                  f"{info.tokens_per_s:.0f} tok/s", flush=True)

    def on_event(self, message: str, data: dict[str, Any]) -> None:
        print("event:", message, json.dumps(data, default=str), flush=True)

    def check_cancelled(self) -> None:
        pass


def examples(tokenizer: Any, n: int, tokens: int, seed: int) -> list[list[dict[str, str]]]:
    """``n`` chats of about ``tokens`` tokens once templated: a long user turn, a short answer."""
    rng = random.Random(seed)
    overhead = len(tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
        tokenize=True, return_dict=False))
    per_word = 1.06  # tokens per word of the list above with the SmolLM2 tokenizer (measured)
    answer_words = max(8, tokens // 8)
    user_words = max(8, int((tokens - overhead) / per_word) - answer_words)
    out = []
    for _ in range(n):
        out.append([
            {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(user_words))},
            {"role": "assistant",
             "content": " ".join(rng.choice(WORDS) for _ in range(answer_words))},
        ])
    return out


def phase(name: str, model_dir: Path, out: Path) -> dict[str, Any]:
    import torch

    from trainer.backends import select_backend

    backend_name = "hf_qlora" if name == "hf_speed" else "unsloth"
    backend = select_backend(backend_name)  # unsloth is imported before transformers
    from shared.job_spec import TrainSpec
    from trainer.backends.lora import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    if name in ("speed", "hf_speed"):
        data = examples(tokenizer, 8 * 40, 512, seed=1)
        spec = TrainSpec(job_id=f"bench-{name}", name="bench", base_model=str(model_dir),
                         training_file="-", batch_size=8, micro_batch_size=8, max_steps=40,
                         max_seq_length=576, backend=backend_name)
    else:
        data = examples(tokenizer, 5000, 400, seed=2)
        spec = TrainSpec(job_id="bench-seed", name="bench", base_model=str(model_dir),
                         training_file="-", batch_size=8, micro_batch_size=8, n_epochs=1,
                         max_seq_length=576, backend="unsloth")
    lengths = [len(tokenizer.apply_chat_template(m, tokenize=True, return_dict=False))
               for m in data[:50]]
    print(f"{name}: {len(data)} examples, mean {sum(lengths) / len(lengths):.0f} tokens",
          flush=True)
    hooks = Recorder()
    t0 = time.perf_counter()
    result = backend.train(spec, data, out / f"adapter-{name}", hooks)
    wall = time.perf_counter() - t0
    warm = 5  # steps left out of the speed figure: first steps compile and autotune kernels
    first, last = hooks.steps[warm - 1], hooks.steps[-1]
    tok_s = (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
    return {
        "phase": name, "backend": result.backend, "steps": result.steps, "tokens": result.tokens,
        "tok_s": tok_s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "load_to_saved_s": wall, "train_s": result.train_s, "final_loss": result.final_loss,
        "micro_batch_size": result.micro_batch_size, "grad_accum": result.grad_accum,
        "mean_tokens_per_example": sum(lengths) / len(lengths),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/rand8b"))
    ap.add_argument("--tokenizer", type=Path, default=ROOT / ".device" / "tok")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_device.json")
    ap.add_argument("--phase", choices=["speed", "seed", "hf_speed"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-train"))
    ap.add_argument("--phases", default="speed,seed", help="which phases, comma-separated")
    args = ap.parse_args()

    if args.phase:  # a child: one phase, its figures as the last line of stdout
        print(json.dumps(phase(args.phase, args.model_dir, args.work)), flush=True)
        return

    if not (args.model_dir / "config.json").exists():
        subprocess.run([sys.executable, "-m", "tunegate", "models", "random",
                        str(args.model_dir), "--shape", "llama-3.1-8b", "--device", "cuda",
                        "--tokenizer", str(args.tokenizer)], check=True, cwd=ROOT)
    results: dict[str, Any] = {"model": "random-weight llama-3.1-8b shape"}
    if args.out.exists():  # a run of some phases keeps the figures of the others
        results = {**json.loads(args.out.read_text()), **results}
    for name in args.phases.split(","):
        proc = subprocess.run([sys.executable, __file__, "--phase", name, "--model-dir",
                               str(args.model_dir), "--work", str(args.work)],
                              check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        print(proc.stdout, flush=True)
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        if name == "speed":
            results["tok_s"] = results["speed"]["tok_s"]
            results["peak_gib"] = results["speed"]["peak_gib"]
        elif name == "hf_speed":
            results["hf_tok_s"] = results["hf_speed"]["tok_s"]
            results["hf_peak_gib"] = results["hf_speed"]["peak_gib"]
        else:
            results["seed_workload_s"] = results["seed"]["load_to_saved_s"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results.get(k) for k in ("tok_s", "peak_gib", "seed_workload_s",
                                                  "hf_tok_s", "hf_peak_gib")}))


if __name__ == "__main__":
    main()
