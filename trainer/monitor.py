"""Evaluation jobs over sampled traffic, and the promotion tick that acts on them.

Three arq jobs (``trainer.schedule`` runs them as cron jobs on their own queue):

- :func:`quality_monitor`: scores the sampled traffic of every adapter version seen in the last
  ``window_s`` seconds with the rule-based evaluator (``shared.quality``) and stores one ``quality``
  eval run per version (the gateway exports the newest as ``tunegate_quality_score``). A shadow
  row has no feedback of its own: it is scored against the label of the live row it copied.
- :func:`shadow_evaluation`: for every promotion in ``shadow``, replays the newest stable-lane
  prompts of the name (labelled ones first) on the candidate through the gateway (pinned
  ``NAME@vN``, ``temperature`` 0) and compares with what stable answered: agreement, and the
  accuracy of both where a feedback label exists. Stored as a ``shadow`` eval run.
- :func:`promotion_tick`: moves every active promotion one step when its gate passes
  (``shared.promotion.decide``), or stops it: a shadow candidate is ``rejected``, a canary is
  ``rolled_back``. Candidate -> shadow needs nothing more than the trainer's golden gate; shadow
  -> canary is gated by the newest shadow evaluation since the candidate entered shadow (paired
  accuracy against stable on the same prompts) and the shadow copies' error rate; canary ->
  stable by the canary lane's quality against the stable lane's over the same period, and the
  canary's error rate (the gateway's Redis counters; the sampled rows' status without Redis).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from shared.db import Database, utcnow
from shared.errors import NotFound
from shared.promotion import Decision, EvalRun, Evidence, Promotions, decide
from shared.quality import Rules, Tally, answer_text
from shared.registry import Registry
from shared.scoring import LabelSet, normalize
from shared.tracing import current_traceparent
from shared.traffic_records import TrafficSample

log = logging.getLogger("tunegate.monitor")
COUNTS_KEY = "tunegate:promotion:{id}"  # written by gateway.promotion


@dataclass
class MonitorContext:
    db: Database
    registry: Registry
    promotions: Promotions
    redis: Any | None = None  # redis.asyncio client (arq's pool)
    gateway_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    window_s: float = 3600.0
    max_rows: int = 5000
    shadow_samples: int = 50
    shadow_rerun_s: float = 1800.0
    replay_concurrency: int = 2
    replay_timeout_s: float = 60.0


def _feedback(row: TrafficSample) -> str | None:
    return row.label or row.corrected_output


def rows_of(db: Database, name: str, version: int | None, since: dt.datetime,
            lanes: tuple[str, ...] | None = None, limit: int = 5000) -> list[TrafficSample]:
    with db.session() as s:
        q = select(TrafficSample).where(TrafficSample.name == name,
                                        TrafficSample.created_at >= since)
        if version is not None:
            q = q.where(TrafficSample.version == version)
        if lanes:
            q = q.where(TrafficSample.lane.in_(lanes))
        return list(s.scalars(q.order_by(TrafficSample.id.desc()).limit(limit)))


def live_labels(db: Database, request_ids: list[str]) -> dict[str, str]:
    """Feedback of the live rows with these request ids (what their shadow copies are judged by)."""
    out: dict[str, str] = {}
    with db.session() as s:
        for i in range(0, len(request_ids), 500):  # bounded IN lists
            for r in s.scalars(select(TrafficSample).where(
                    TrafficSample.request_id.in_(request_ids[i:i + 500]),
                    TrafficSample.lane != "shadow")):
                fb = _feedback(r)
                if fb:
                    out[r.request_id] = fb
    return out


def tally(db: Database, rows: list[TrafficSample], rules: Rules) -> Tally:
    shadow_ids = [r.request_id for r in rows if r.lane == "shadow"]
    labels = live_labels(db, shadow_ids) if shadow_ids else {}
    t = Tally()
    for r in rows:
        label = labels.get(r.request_id) if r.lane == "shadow" else _feedback(r)
        t.add(r.output or "", rules, label, r.status)
    return t


class RulesCache:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._rules: dict[tuple[str, int], Rules] = {}

    def get(self, name: str, version: int) -> Rules:
        key = (name, version)
        if key not in self._rules:
            info = self.registry.get_version(name, version)
            self._rules[key] = Rules.from_manifest(info.manifest)
        return self._rules[key]


# ---- (a) the quality monitor ----------------------------------------------------------------
def run_quality(mc: MonitorContext) -> list[dict[str, Any]]:
    since = utcnow() - dt.timedelta(seconds=mc.window_s)
    with mc.db.session() as s:
        versions = s.execute(select(TrafficSample.name, TrafficSample.version).where(
            TrafficSample.created_at >= since, TrafficSample.version.is_not(None)).distinct()).all()
    rules = RulesCache(mc.registry)
    out = []
    for name, version in versions:
        try:
            version_rules = rules.get(name, version or 0)
        except NotFound:  # rows of a version the registry does not know: nothing to judge by
            continue
        rows = rows_of(mc.db, name, version, since, limit=mc.max_rows)
        t = tally(mc.db, rows, version_rules)
        lanes: dict[str, int] = defaultdict(int)
        for r in rows:
            lanes[r.lane] += 1
        metrics = {**t.to_dict(), "lanes": dict(lanes), "window_s": mc.window_s}
        with mc.db.session() as s:
            s.add(EvalRun(name=name, version=version, kind="quality", n=t.n, score=t.quality,
                          metrics=metrics, window_start=since))
        out.append({"model": name, "version": version, **metrics})
    return out


# ---- (b) the shadow evaluation --------------------------------------------------------------
def _same(a: str, b: str, rules: Rules) -> bool:
    if rules.labels:
        ls = LabelSet(rules.labels)
        return ls.find(a) is not None and ls.find(a) == ls.find(b)
    return normalize(a) == normalize(b)


async def replay(mc: MonitorContext, rows: list[TrafficSample], model: str) -> list[str | None]:
    """The answers of ``model`` to the rows' requests, through the gateway (None: failed)."""
    import httpx

    sem = asyncio.Semaphore(mc.replay_concurrency)
    headers = {"authorization": f"Bearer {mc.api_key}"} if mc.api_key else {}
    tp = current_traceparent()  # replays join the shadow evaluation's trace (trainer.tracing)
    if tp:
        headers["traceparent"] = tp

    async def one(client: httpx.AsyncClient, row: TrafficSample) -> str | None:
        body = {k: v for k, v in (row.request or {}).items() if k not in ("stream_options",)}
        body.update(model=model, stream=False, temperature=0)
        async with sem:
            try:
                r = await client.post(row.route, json=body, headers={
                    **headers, "x-request-id": f"replay-{row.request_id}"[:128]})
            except httpx.HTTPError as exc:
                log.warning("replay of %s failed: %s", row.request_id, exc)
                return None
        return answer_text(r.json()) if r.status_code == 200 else None

    async with httpx.AsyncClient(base_url=mc.gateway_url, timeout=mc.replay_timeout_s) as client:
        return list(await asyncio.gather(*(one(client, r) for r in rows)))


async def run_shadow(mc: MonitorContext) -> list[dict[str, Any]]:
    out = []
    for p in await asyncio.to_thread(mc.promotions.active):
        if p["state"] != "shadow":
            continue
        name, version, baseline = p["name"], p["version"], p["baseline"]
        entered = dt.datetime.fromisoformat(p["state_since"])
        last = await asyncio.to_thread(latest_shadow_run, mc.db, name, version, entered)
        if last is not None and (utcnow() - last.created_at).total_seconds() < mc.shadow_rerun_s:
            continue  # judged recently: replays cost engine time like live traffic
        since = utcnow() - dt.timedelta(seconds=mc.window_s)
        rows = await asyncio.to_thread(rows_of, mc.db, name, baseline, since, ("stable",),
                                       mc.max_rows)
        rows = [r for r in rows if r.status < 400 and r.route in (
            "/v1/chat/completions", "/v1/completions")]
        rows.sort(key=lambda r: _feedback(r) is None)  # labelled first, newest first within
        rows = rows[: mc.shadow_samples]
        rules = await asyncio.to_thread(RulesCache(mc.registry).get, name, version)
        answers = await replay(mc, rows, f"{name}@v{version}")
        cand, stab = Tally(), Tally()
        agree = replayed = 0
        for row, ans in zip(rows, answers, strict=True):
            cand.add(ans or "", rules, _feedback(row), 200 if ans is not None else 502)
            stab.add(row.output or "", rules, _feedback(row), row.status)
            if ans is not None:
                replayed += 1
                agree += _same(ans, row.output or "", rules)
        metrics = {"replayed": replayed, "errors": cand.errors, "requests": len(rows),
                   "agreement": agree / replayed if replayed else None,
                   "labelled": cand.labelled, "accuracy": cand.accuracy,
                   "stable_accuracy": stab.accuracy, "quality": cand.quality,
                   "stable_quality": stab.quality, "promotion_id": p["id"],
                   "baseline": baseline}
        score = cand.accuracy if cand.labelled else cand.quality
        with mc.db.session() as s:
            s.add(EvalRun(name=name, version=version, kind="shadow",
                          n=cand.labelled or cand.n, score=score, metrics=metrics,
                          window_start=since))
        out.append({"model": name, "version": version, **metrics})
    return out


# ---- (c) the promotion tick -----------------------------------------------------------------
async def counts(mc: MonitorContext, promotion_id: int, lane: str) -> tuple[int, int] | None:
    if mc.redis is None:
        return None
    try:
        raw = await mc.redis.hgetall(COUNTS_KEY.format(id=promotion_id))
    except Exception as exc:
        log.warning("reading promotion counters failed: %s", exc)
        return None
    h = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
    return h.get(f"{lane}:requests", 0), h.get(f"{lane}:errors", 0)


def latest_shadow_run(db: Database, name: str, version: int,
                      since: dt.datetime) -> EvalRun | None:
    with db.session() as s:
        return s.scalars(select(EvalRun).where(
            EvalRun.name == name, EvalRun.version == version, EvalRun.kind == "shadow",
            EvalRun.created_at >= since).order_by(EvalRun.id.desc())).first()


async def evidence(mc: MonitorContext, p: dict[str, Any]) -> Evidence:
    name, version, state = p["name"], p["version"], p["state"]
    since = dt.datetime.fromisoformat(p["state_since"])
    if state == "candidate":
        manifest = (await asyncio.to_thread(mc.registry.get_version, name, version)).manifest
        return Evidence(extra={"golden": (manifest.get("metrics") or {})})
    if state == "shadow":
        run = await asyncio.to_thread(latest_shadow_run, mc.db, name, version, since)
        c = await counts(mc, p["id"], "shadow") or (0, 0)
        if run is None:
            return Evidence(requests=c[0], errors=c[1], extra={"shadow_eval": None})
        m = run.metrics or {}
        labelled = bool(m.get("labelled"))
        # The replays were requests to the candidate too: they count for its error rate.
        return Evidence(n=run.n, quality=run.score,
                        stable_quality=m.get("stable_accuracy" if labelled else "stable_quality"),
                        requests=c[0] + int(m.get("requests") or 0),
                        errors=c[1] + int(m.get("errors") or 0),
                        extra={"shadow_eval": {"id": run.id, **m}})
    rules = await asyncio.to_thread(RulesCache(mc.registry).get, name, version)
    canary_rows = await asyncio.to_thread(rows_of, mc.db, name, version, since, ("canary",),
                                          mc.max_rows)
    stable_rows = await asyncio.to_thread(rows_of, mc.db, name, p["baseline"], since,
                                          ("stable",), mc.max_rows)
    cand = await asyncio.to_thread(tally, mc.db, canary_rows, rules)
    stab = await asyncio.to_thread(tally, mc.db, stable_rows, rules)
    counted = await counts(mc, p["id"], "canary")
    requests, errors = ((cand.requests, cand.errors) if counted is None or not counted[0]
                        else counted)
    return Evidence(n=cand.n, quality=cand.quality, stable_quality=stab.quality,
                    requests=requests, errors=errors,
                    extra={"canary": cand.to_dict(), "stable": stab.to_dict()})


async def run_tick(mc: MonitorContext, actor: str = "monitor") -> list[dict[str, Any]]:
    policy = mc.promotions.settings.policy()
    out = []
    for p in await asyncio.to_thread(mc.promotions.active):
        ev = await evidence(mc, p)
        d: Decision = decide(p["state"], ev, policy)
        entry = {"model": p["name"], "version": p["version"], "state": p["state"],
                 "action": d.action, "reason": d.reason, "evidence": ev.to_dict()}
        out.append(entry)
        if d.action == "hold":
            since = dt.datetime.fromisoformat(p["state_since"])
            held_s = (utcnow() - since).total_seconds()
            if p["state"] in ("shadow", "canary") and \
                    held_s >= mc.promotions.settings.starved_after_s:
                entry["waiting"] = True
                if await asyncio.to_thread(functools.partial(
                        mc.promotions.note_waiting, p,
                        f"{d.reason} after {held_s / 3600:.1f} h in {p['state']}",
                        actor=actor, metrics=ev.to_dict())):
                    log.warning("promotion %s@v%s waits for traffic in %s: %s", p["name"],
                                p["version"], p["state"], d.reason)
            continue
        move = mc.promotions.advance if d.action == "advance" else mc.promotions.stop
        try:
            row = await asyncio.to_thread(functools.partial(
                move, p["name"], actor=actor, reason=d.reason, metrics=ev.to_dict(),
                promotion_id=p["id"]))
            entry["to"] = row["state"]
            log.info("promotion %s@v%s: %s -> %s (%s)", p["name"], p["version"], p["state"],
                     row["state"], d.reason)
        except Exception as exc:  # an operator moved it meanwhile: next tick sees the new state
            entry["error"] = str(exc)
    return out
