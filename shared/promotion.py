"""Promotion of an adapter version, as a state machine per adapter name.

::

    candidate -> shadow -> canary -> stable
         \\          \\         \\
          rejected   rejected  rolled_back      (terminal: stable, rejected, rolled_back)

- **candidate**: registered (the trainer's golden gate passed) while the name already has a
  ``stable`` version; not served.
- **shadow**: a fraction (``shadow_fraction``) of bare-``NAME`` requests is mirrored to the
  candidate in the background; its answers are recorded (lane ``shadow``), never returned.
- **canary**: the ``canary`` alias points at the candidate and a weighted share
  (``canary_weight``, 10% by default) of bare-``NAME`` requests is answered by it (lane ``canary``).
- **stable**: the ``stable`` alias moved to the candidate.
- **rejected**: stopped before any client saw an answer of it; **rolled_back**: stopped after
  it served canary traffic (the ``canary`` alias moves back to the ``stable`` version), or after
  it reached ``stable`` and an operator rolled ``stable`` back.

At most one promotion per name is active (candidate, shadow or canary). Every transition is a
compare-and-set on the state (a monitor tick and an operator never both win) and an event row:
who (``actor``), why (``reason``) and the metrics that decided. :func:`decide` is the automatic
gate, a pure function of the evidence; ``trainer.monitor`` gathers the evidence and applies it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, select, update
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base, Database, UTCDateTime, utcnow
from shared.errors import Conflict, InvalidRequest, NotFound
from shared.registry import Registry

STATES = ("candidate", "shadow", "canary", "stable", "rolled_back", "rejected")
ACTIVE = frozenset({"candidate", "shadow", "canary"})
NEXT = {"candidate": "shadow", "shadow": "canary", "canary": "stable"}


class PromotionSettings(BaseSettings):
    """``TUNEGATE_PROMOTION_*``: how new versions enter and the automatic gates."""

    model_config = SettingsConfigDict(env_prefix="TUNEGATE_PROMOTION_", extra="ignore")

    # A gate-passing version of a name that already has a stable version enters as a candidate
    # (False: it moves ``stable`` at once, the trainer's behaviour before promotions existed).
    enabled: bool = True
    shadow_fraction: float = Field(default=0.25, ge=0, le=1)  # of bare-NAME requests, mirrored
    canary_weight: float = Field(default=0.10, ge=0, le=1)  # of bare-NAME requests, answered
    min_samples: int = Field(default=50, ge=1)  # scored samples before a quality gate decides
    min_quality: float = Field(default=0.8, ge=0, le=1)  # rule-based score, 0..1
    tolerance: float = Field(default=0.02, ge=0, le=1)  # allowed drop below stable, 0..1
    max_error_rate: float = Field(default=0.05, ge=0, le=1)  # errors / requests
    min_requests: int = Field(default=20, ge=1)  # requests before the error rate decides
    starved_after_s: float = Field(
        default=3600.0, gt=0,
        description="seconds a promotion may hold for lack of traffic before the monitor "
                    "reports it as waiting (event, metric, console) with how to promote by hand")

    def policy(self) -> Policy:
        return Policy(self.min_samples, self.min_quality, self.tolerance, self.max_error_rate,
                      self.min_requests)


class Promotion(Base):
    __tablename__ = "promotions"
    __table_args__ = (Index("ix_promotions_name_state", "name", "state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)  # the candidate
    baseline: Mapped[int | None] = mapped_column(Integer, nullable=True)  # stable when started
    state: Mapped[str] = mapped_column(String(16))
    shadow_fraction: Mapped[float] = mapped_column(Float)
    canary_weight: Mapped[float] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    state_since: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Set by the monitor when the state's gate has lacked traffic for ``starved_after_s``
    # (what it waits for); cleared when the state changes.
    waiting: Mapped[str | None] = mapped_column(String(500), nullable=True)


class PromotionEvent(Base):
    __tablename__ = "promotion_events"
    __table_args__ = (Index("ix_promotion_events_name", "name", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    promotion_id: Mapped[int] = mapped_column(ForeignKey("promotions.id"))
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_state: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(100))  # "monitor", "trainer:<job>", "key:<id>"
    reason: Mapped[str] = mapped_column(String(500))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class EvalRun(Base):
    """One evaluation of one version: ``quality`` (the monitor over sampled traffic) or
    ``shadow`` (sampled prompts replayed on a candidate and compared with stable)."""

    __tablename__ = "eval_runs"
    __table_args__ = (Index("ix_eval_runs_version", "name", "version", "kind", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    n: Mapped[int] = mapped_column(Integer)  # items scored
    score: Mapped[float | None] = mapped_column(Float, nullable=True)  # 0..1; None when n == 0
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    window_start: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


# ---- the automatic gate (pure) -------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    min_samples: int = 50
    min_quality: float = 0.8
    tolerance: float = 0.02
    max_error_rate: float = 0.05
    min_requests: int = 20


@dataclass(frozen=True)
class Evidence:
    """What a gate sees of a candidate since it entered its state."""

    n: int = 0  # scored samples
    quality: float | None = None  # mean rule-based score of the candidate, 0..1
    stable_quality: float | None = None  # the same measure for stable (same window or prompts)
    requests: int = 0
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "extra"},
                "error_rate": self.error_rate, **self.extra}


@dataclass(frozen=True)
class Decision:
    action: str  # "advance" | "hold" | "stop" (stop: rejected in shadow, rolled_back in canary)
    reason: str


def decide(state: str, ev: Evidence, policy: Policy) -> Decision:
    """The gate for leaving ``state``: errors first (they need no labels), then quality once
    there are ``min_samples`` scored samples: absolute (``min_quality``) and relative to stable
    (no more than ``tolerance`` below)."""
    eps = 1e-9  # scores are ratios of small integers
    if state == "candidate":
        return Decision("advance", "registered after passing the golden-set gate")
    if state not in ("shadow", "canary"):
        return Decision("hold", f"{state} is not gated")
    rate = ev.error_rate
    if rate is not None and ev.requests >= policy.min_requests and rate > policy.max_error_rate:
        return Decision("stop", f"error rate {rate:.3f} over {policy.max_error_rate:.3f} "
                                f"({ev.errors}/{ev.requests})")
    if ev.n < policy.min_samples or ev.quality is None:
        return Decision("hold", f"{ev.n} of {policy.min_samples} scored samples")
    if ev.quality + eps < policy.min_quality:
        return Decision("stop", f"quality {ev.quality:.3f} below {policy.min_quality:.3f}")
    if ev.stable_quality is not None and ev.quality + eps < ev.stable_quality - policy.tolerance:
        return Decision("stop", f"quality {ev.quality:.3f} regresses more than "
                                f"{policy.tolerance:.3f} below stable's {ev.stable_quality:.3f}")
    if rate is not None and ev.requests < policy.min_requests:
        return Decision("hold", f"{ev.requests} of {policy.min_requests} requests")
    return Decision("advance", f"quality {ev.quality:.3f} on {ev.n} samples passes"
                    + ("" if ev.stable_quality is None else
                       f" (stable {ev.stable_quality:.3f})"))


# ---- records and transitions ---------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    """What the gateway needs of an active promotion."""

    promotion_id: int
    name: str
    version: int
    state: str
    shadow_fraction: float
    canary_weight: float


def _row(p: Promotion) -> dict[str, Any]:
    return {"id": p.id, "name": p.name, "version": p.version, "ref": f"{p.name}@v{p.version}",
            "baseline": p.baseline, "state": p.state, "shadow_fraction": p.shadow_fraction,
            "canary_weight": p.canary_weight, "created_at": p.created_at.isoformat(),
            "state_since": p.state_since.isoformat(), "waiting": p.waiting}


def _event(e: PromotionEvent) -> dict[str, Any]:
    return {"id": e.id, "promotion_id": e.promotion_id, "version": e.version,
            "from_state": e.from_state, "to_state": e.to_state, "actor": e.actor,
            "reason": e.reason, "metrics": e.metrics, "at": e.at.isoformat()}


class Promotions:
    def __init__(self, db: Database, registry: Registry,
                 settings: PromotionSettings | None = None) -> None:
        self.db = db
        self.registry = registry
        self.settings = settings or PromotionSettings()

    def _stable(self, name: str) -> int | None:
        return self.registry.get_adapter(name)["aliases"].get("stable")

    def start(self, name: str, version: int, *, actor: str, reason: str,
              shadow_fraction: float | None = None, canary_weight: float | None = None,
              metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """A new promotion of ``NAME@vN`` in state ``candidate``. 409 when the name has another
        active promotion or no ``stable`` version yet (set it with the alias API)."""
        self.registry.get_version(name, version)  # 404 when missing
        stable = self._stable(name)
        if stable is None:
            raise Conflict(f"{name} has no stable version to compare with; set its stable "
                           "alias instead", code="no_stable")
        if stable == version:
            raise Conflict(f"{name}@v{version} is already stable", code="already_stable")
        with self.db.session() as s:
            if s.scalars(select(Promotion).where(Promotion.name == name,
                                                 Promotion.state.in_(ACTIVE))).first():
                raise Conflict(f"{name} already has an active promotion", code="promotion_active")
            p = Promotion(
                name=name, version=version, baseline=stable, state="candidate",
                shadow_fraction=(self.settings.shadow_fraction if shadow_fraction is None
                                 else shadow_fraction),
                canary_weight=(self.settings.canary_weight if canary_weight is None
                               else canary_weight))
            s.add(p)
            s.flush()
            s.add(PromotionEvent(promotion_id=p.id, name=name, version=version, from_state=None,
                                 to_state="candidate", actor=actor, reason=reason,
                                 metrics=metrics or {}))
            return _row(p)

    def current(self, name: str) -> dict[str, Any] | None:
        """The active promotion of ``name``, else its most recent one, else None."""
        with self.db.session() as s:
            rows = s.scalars(select(Promotion).where(Promotion.name == name)
                             .order_by(Promotion.id.desc())).all()
            active = [p for p in rows if p.state in ACTIVE]
            chosen = active or list(rows)
            return _row(chosen[0]) if chosen else None

    def get(self, name: str) -> dict[str, Any]:
        """The current promotion and every event of the name (oldest first). 404 when none."""
        cur = self.current(name)
        if cur is None:
            raise NotFound(f"{name} has no promotion", param="name")
        with self.db.session() as s:
            events = [_event(e) for e in s.scalars(
                select(PromotionEvent).where(PromotionEvent.name == name)
                .order_by(PromotionEvent.id))]
        return {**cur, "events": events}

    def active(self) -> list[dict[str, Any]]:
        with self.db.session() as s:
            return [_row(p) for p in s.scalars(select(Promotion).where(
                Promotion.state.in_(ACTIVE)).order_by(Promotion.id))]

    def routes(self) -> dict[str, Route]:
        """Active promotions in shadow or canary, by name (the gateway's routing table)."""
        with self.db.session() as s:
            return {p.name: Route(p.id, p.name, p.version, p.state, p.shadow_fraction,
                                  p.canary_weight)
                    for p in s.scalars(select(Promotion).where(
                        Promotion.state.in_(("shadow", "canary"))))}

    def _move(self, name: str, to: str, *, actor: str, reason: str,
              metrics: dict[str, Any] | None, allowed: frozenset[str],
              promotion_id: int | None = None) -> dict[str, Any]:
        cur = self.current(name)
        if cur is None:
            raise NotFound(f"{name} has no promotion", param="name")
        if promotion_id is not None and cur["id"] != promotion_id:
            raise Conflict(f"promotion {promotion_id} of {name} is no longer current",
                           code="promotion_changed")
        if cur["state"] not in allowed:
            raise Conflict(f"{cur['ref']} is {cur['state']}: cannot move to {to}",
                           code="invalid_transition")
        now = utcnow()
        with self.db.session() as s:
            done = s.execute(update(Promotion).where(
                Promotion.id == cur["id"], Promotion.state == cur["state"]).values(
                state=to, state_since=now, waiting=None)).rowcount  # type: ignore[attr-defined]
            if not done:
                raise Conflict(f"{cur['ref']} changed state meanwhile; retry",
                               code="promotion_changed")
            s.add(PromotionEvent(promotion_id=cur["id"], name=name, version=cur["version"],
                                 from_state=cur["state"], to_state=to, actor=actor,
                                 reason=reason, metrics=metrics or {}))
        self._move_aliases(cur, to, f"promotion {cur['id']}: {reason}"[:500])
        return {**cur, "state": to, "state_since": now.isoformat(), "from_state": cur["state"]}

    def _move_aliases(self, cur: dict[str, Any], to: str, why: str) -> None:
        name, version, before = cur["name"], cur["version"], cur["state"]
        reg = self.registry
        if to == "canary":
            reg.set_alias(name, "canary", version, reason=why)
        elif to == "stable":
            reg.set_alias(name, "stable", version, reason=why)
            reg.set_alias(name, "canary", version, reason=why)
        elif to == "rolled_back" and before == "canary":
            # ``canary`` equal to ``stable`` means no canary; NAME:canary stays resolvable.
            stable = self._stable(name)
            if stable is not None:
                reg.set_alias(name, "canary", stable, reason=why)
        elif to == "rolled_back" and before == "stable":
            reg.set_alias(name, "stable", cur["baseline"], reason=why)
            reg.set_alias(name, "canary", cur["baseline"], reason=why)

    def note_waiting(self, p: dict[str, Any], waits_for: str, *, actor: str = "monitor",
                     metrics: dict[str, Any] | None = None) -> bool:
        """Record, once per state, that promotion ``p`` holds for lack of traffic: its
        ``waiting`` field and an event (from and to its own state) saying what it waits for and
        how to move it by hand. Returns whether this call recorded it."""
        name = p["name"]
        reason = (f"waiting for traffic: {waits_for}; promote by hand with POST "
                  f"/admin/promotions/{name}/promote {{\"to\": \"stable\"}} or stop it with "
                  f"POST /admin/promotions/{name}/rollback")[:500]
        with self.db.session() as s:
            done = s.execute(update(Promotion).where(
                Promotion.id == p["id"], Promotion.state == p["state"],
                Promotion.waiting.is_(None)).values(waiting=reason)).rowcount  # type: ignore[attr-defined]
            if done:
                s.add(PromotionEvent(promotion_id=p["id"], name=name, version=p["version"],
                                     from_state=p["state"], to_state=p["state"], actor=actor,
                                     reason=reason, metrics=metrics or {}))
        return bool(done)

    def advance(self, name: str, *, actor: str, reason: str,
                metrics: dict[str, Any] | None = None,
                promotion_id: int | None = None) -> dict[str, Any]:
        """One step forward: candidate -> shadow -> canary -> stable."""
        cur = self.current(name)
        state = cur["state"] if cur else "candidate"
        if state not in NEXT:
            raise Conflict(f"{name}: the promotion is {state}, nothing to promote",
                           code="invalid_transition")
        return self._move(name, NEXT[state], actor=actor, reason=reason, metrics=metrics,
                          allowed=frozenset({state}), promotion_id=promotion_id)

    def stop(self, name: str, *, actor: str, reason: str, metrics: dict[str, Any] | None = None,
             promotion_id: int | None = None) -> dict[str, Any]:
        """Take the candidate out: ``rejected`` before it served clients (candidate, shadow),
        ``rolled_back`` after (canary; or stable when it is still the stable version, which
        moves ``stable`` back to the promotion's baseline)."""
        cur = self.current(name)
        if cur is None:
            raise NotFound(f"{name} has no promotion", param="name")
        if cur["state"] == "stable":
            if self._stable(name) != cur["version"] or cur["baseline"] is None:
                raise Conflict(f"{cur['ref']} is no longer {name}'s stable version",
                               code="invalid_transition")
            to = "rolled_back"
        else:
            to = "rolled_back" if cur["state"] == "canary" else "rejected"
        return self._move(name, to, actor=actor, reason=reason, metrics=metrics,
                          allowed=frozenset({"candidate", "shadow", "canary", "stable"}),
                          promotion_id=promotion_id)


def parse_ref(ref: str) -> tuple[str, int]:
    """``NAME@vN`` -> ``(NAME, N)``; 400 otherwise."""
    from shared.registry import parse_model_name

    try:
        name, _, version = parse_model_name(ref)
    except Exception:
        version = None
    if version is None:
        raise InvalidRequest(f"{ref!r} is not NAME@vN", param="version")
    return name, version


__all__ = ["ACTIVE", "NEXT", "STATES", "Decision", "EvalRun", "Evidence", "Policy", "Promotion",
           "PromotionEvent", "PromotionSettings", "Promotions", "Route", "decide", "parse_ref"]
