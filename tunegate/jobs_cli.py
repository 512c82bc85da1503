"""`tunegate jobs ...`: fine-tuning jobs through the gateway's API, as any client would use it.

The gateway's address and an admin key come from ``--url``/``--api-key``, else from
``TUNEGATE_URL``/``TUNEGATE_API_KEY`` (:class:`ClientSettings`), else ``http://127.0.0.1:8000``
and the key `tunegate up` wrote to ``$TUNEGATE_DATA_DIR/local-admin.key``.

- ``create TRAIN.jsonl [--golden G.jsonl] [--suffix NAME] [--follow]``: upload, create, follow
- ``follow ID``: a live progress bar (step/total, loss, tokens/s, ETA) and the milestones; at the
  end the gate's verdict and the model name to call
- ``list``, ``cancel ID``
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.progress_bar import bar
from shared.settings import StorageSettings

app = typer.Typer(help="Fine-tuning jobs, through the gateway's API.", no_args_is_help=True)
TERMINAL = ("succeeded", "failed", "cancelled")


class ClientSettings(BaseSettings):
    """``TUNEGATE_URL`` and ``TUNEGATE_API_KEY``: the gateway a client command talks to."""

    model_config = SettingsConfigDict(env_prefix="TUNEGATE_", extra="ignore")

    url: str = Field(default="http://127.0.0.1:8000", description="the gateway's base URL")
    api_key: str | None = Field(
        default=None,
        description="an admin key; default: the local key `tunegate up` wrote in the data folder",
    )

    def key(self) -> str:
        if self.api_key:
            return self.api_key
        path = StorageSettings().local_key_file
        if not path.is_file():
            raise typer.BadParameter(f"no --api-key, no TUNEGATE_API_KEY and no {path}")
        return path.read_text().strip()


UrlOpt = Annotated[str | None, typer.Option("--url", help="Gateway URL ($TUNEGATE_URL)")]
KeyOpt = Annotated[str | None, typer.Option("--api-key", help="Admin key ($TUNEGATE_API_KEY)")]


def client(url: str | None, api_key: str | None) -> httpx.Client:
    s = ClientSettings(**{k: v for k, v in (("url", url), ("api_key", api_key)) if v})
    return httpx.Client(
        base_url=s.url.rstrip("/"), timeout=60.0, headers={"Authorization": f"Bearer {s.key()}"}
    )


def _check(r: httpx.Response) -> Any:
    if r.is_success:
        return r.json()
    try:
        msg = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = r.text[:500]
    typer.secho(f"error {r.status_code}: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def upload(c: httpx.Client, path: Path) -> str:
    with path.open("rb") as f:
        r = c.post("/v1/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"})
    return str(_check(r)["id"])


def bar_line(job: dict[str, Any], width: int = 30) -> str:
    """The progress line of a job object (``shared.progress_bar``)."""
    t = job.get("tunegate") or {}
    p = t.get("progress") or {}
    eta = job["estimated_finish"] - time.time() if job.get("estimated_finish") else None
    return bar(p.get("step") or 0, p.get("total_steps") or t.get("total_steps"),
               p.get("train_loss"), p.get("tokens_per_s"), eta, width)


def verdict(job: dict[str, Any]) -> list[str]:
    """What a finished job says: status, the gate's verdict, the model to call and how it
    reaches users."""
    t = job.get("tunegate") or {}
    result = t.get("result") or {}
    lines = [f"{job['id']}: {job['status']}"]
    gate = result.get("gate")
    if gate:
        lines.append(f"gate: {'passed' if gate.get('passed') else 'failed'}: {gate.get('reason')}")
    if job.get("error"):
        lines.append(f"error: {job['error'].get('message')}")
    if job.get("fine_tuned_model"):
        lines.append(f"model to call: {job['fine_tuned_model']}")
    rollout = t.get("rollout")
    if rollout:
        lines.append(f"rollout: {rollout.get('message')}")
    return lines


def follow_job(c: httpx.Client, job_id: str, interval_s: float = 1.0) -> dict[str, Any]:
    seen: set[str] = set()
    tty = sys.stdout.isatty()
    last = ""
    while True:
        job = _check(c.get(f"/v1/fine_tuning/jobs/{job_id}"))
        events = _check(
            c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 50, "type": "message"})
        )["data"]
        for e in reversed(events):
            if e["id"] not in seen:
                seen.add(e["id"])
                typer.echo(("\r\033[K" if tty and last else "") + f"  {e['message']}")
                last = ""
        if job["status"] in TERMINAL:
            if tty and last:
                typer.echo("")
            for line in verdict(job):
                typer.echo(line)
            return dict(job)
        line = bar_line(job) if job["status"] == "running" else job["status"]
        if line != last:
            if tty:
                typer.echo(f"\r\033[K{line}", nl=False)
            else:
                typer.echo(line)
            last = line
        time.sleep(interval_s)


@app.command()
def create(
    training: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="TRAIN.jsonl")],
    golden: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Golden set for the gate")
    ] = None,
    suffix: Annotated[str | None, typer.Option(help="The adapter's name")] = None,
    model: Annotated[str, typer.Option(help="The base model")] = "SmolLM2-135M-Instruct",
    epochs: Annotated[int | None, typer.Option(help="n_epochs (default: auto)")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Follow the job to its end")] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
) -> None:
    """Upload TRAIN (and the golden set) and start a fine-tuning job."""
    with client(url, api_key) as c:
        body: dict[str, Any] = {"model": model, "training_file": upload(c, training)}
        if golden is not None:
            body["golden_file"] = upload(c, golden)
        if suffix:
            body["suffix"] = suffix
        if epochs is not None:
            body["hyperparameters"] = {"n_epochs": epochs}
        if max_steps is not None:
            body["max_steps"] = max_steps
        job = _check(c.post("/v1/fine_tuning/jobs", json=body))
        typer.echo(f"{job['id']} {job['status']}")
        if follow:
            done = follow_job(c, job["id"])
            raise typer.Exit(0 if done["status"] == "succeeded" else 1)


@app.command("follow")
def follow_cmd(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Follow a job: a live progress bar, its milestones, then the verdict."""
    with client(url, api_key) as c:
        done = follow_job(c, job_id)
    raise typer.Exit(0 if done["status"] == "succeeded" else 1)


@app.command("list")
def list_cmd(limit: int = 20, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """The newest jobs."""
    with client(url, api_key) as c:
        jobs = _check(c.get("/v1/fine_tuning/jobs", params={"limit": limit}))["data"]
    for j in jobs:
        p = (j.get("tunegate") or {}).get("progress") or {}
        steps = f"{p.get('step')}/{p.get('total_steps')}" if p else "-"
        typer.echo(
            f"{j['id']}  {j['status']:<10} {j.get('suffix') or '-':<20} {steps:<10} "
            f"{j.get('fine_tuned_model') or '-'}"
        )


@app.command()
def cancel(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None) -> None:
    """Cancel a job (it stops at its next step)."""
    with client(url, api_key) as c:
        job = _check(c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel"))
    typer.echo(f"{job['id']} {job['status']}")
