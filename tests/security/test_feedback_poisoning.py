"""Feedback poisoning: a key that reuses another key's ``X-Request-ID`` can neither take over its
sample nor label it; labels record who gave them and only keys that may label make training data;
one request-id length rule from the header to SQL."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from sqlalchemy import select

from shared.traffic_datasets import traffic_data
from shared.traffic_records import TrafficSample
from tests.security.fixtures_trust import (  # noqa: F401 (fixtures)
    ask,
    give_feedback,
    ingest,
    sampled,
    trust_dir,
    trust_records,
)


def rows_of(system: dict[str, Any], **where: Any) -> list[TrafficSample]:
    with system["db"].session() as s:
        q = select(TrafficSample)
        for col, value in where.items():
            q = q.where(getattr(TrafficSample, col) == value)
        return list(s.scalars(q))


def wait_stored(system: dict[str, Any], n: int, **where: Any) -> list[TrafficSample]:
    deadline = time.monotonic() + 10
    while True:
        ingest(system)
        found = rows_of(system, **where)
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_reused_client_id_cannot_take_over_or_label_a_victims_sample(
        sampled: dict[str, Any]) -> None:  # noqa: F811
    records = sampled["records"]
    victim, attacker = records.key(), records.key()
    shared_id = "order-4711-shared"
    mine = ask(sampled, victim, shared_id, content="victim prompt")
    theirs = ask(sampled, attacker, shared_id, content="attacker prompt")
    # Both are told the id they chose, and each gets a gateway id of its own.
    assert mine.headers["x-request-id"] == theirs.headers["x-request-id"] == shared_id
    victim_rid = mine.headers["x-tunegate-request-id"]
    attacker_rid = theirs.headers["x-tunegate-request-id"]
    assert victim_rid != attacker_rid and shared_id not in (victim_rid, attacker_rid)

    # The attacker labels the shared id (before and after ingestion) and the victim's own id.
    for body in ({"request_id": shared_id, "label": "poison"},
                 {"request_id": victim_rid, "label": "poison"}):
        assert give_feedback(sampled, attacker, body).status_code == 404
    stored = wait_stored(sampled, 2, client_request_id=shared_id)
    for body in ({"request_id": shared_id, "label": "poison"},
                 {"request_id": victim_rid, "label": "poison"}):
        assert give_feedback(sampled, attacker, body).status_code == 404

    # Both samples are stored, each under its own owner, and the victim's row is untouched.
    by_prompt = {r.request["messages"][0]["content"]: r for r in stored}
    assert set(by_prompt) == {"victim prompt", "attacker prompt"}
    victim_row = by_prompt["victim prompt"]
    assert victim_row.request_id == victim_rid and victim_row.label is None
    assert by_prompt["attacker prompt"].request_id == attacker_rid

    # The attacker may label its own request, which lands on its own row only.
    own = give_feedback(sampled, attacker, {"request_id": attacker_rid, "label": "mine"})
    assert own.status_code == 200, own.text
    assert rows_of(sampled, request_id=victim_rid)[0].label is None


def test_labels_record_who_gave_them_and_only_labellers_make_training_data(
        sampled: dict[str, Any]) -> None:  # noqa: F811
    records = sampled["records"]
    user, labeller = records.key(), records.key(may_label=True)
    since = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    from_user = ask(sampled, user, content="user says").headers["x-tunegate-request-id"]
    from_labeller = ask(sampled, labeller,
                        content="labeller says").headers["x-tunegate-request-id"]
    for key, rid in ((user, from_user), (labeller, from_labeller)):
        resp = give_feedback(sampled, key, {"request_id": rid, "label": "fresh"})
        assert resp.status_code in (200, 202), resp.text
    wait_stored(sampled, 1, request_id=from_user)
    wait_stored(sampled, 1, request_id=from_labeller)
    u = rows_of(sampled, request_id=from_user)[0]
    lab = rows_of(sampled, request_id=from_labeller)[0]
    assert (u.label, u.feedback_key_id, u.feedback_trusted) == ("fresh", u.key_id, False)
    assert (lab.label, lab.feedback_key_id, lab.feedback_trusted) == ("fresh", lab.key_id, True)
    data = traffic_data(sampled["db"], "base", since)
    prompts = [r["messages"][0]["content"] for r in data.records]
    assert prompts == ["labeller says"]


def test_one_request_id_rule_from_header_to_sql(sampled: dict[str, Any]) -> None:  # noqa: F811
    key = sampled["records"].key()
    long_id = "L" * 100  # accepted by the header check: kept, echoed and stored, not dropped
    resp = ask(sampled, key, long_id)
    assert resp.headers["x-request-id"] == long_id
    stored = wait_stored(sampled, 1, client_request_id=long_id)
    assert len(stored) == 1
    rid = resp.headers["x-tunegate-request-id"]
    assert stored[0].request_id == rid
    ok = give_feedback(sampled, key, {"request_id": rid, "score": 1.0})
    assert ok.status_code == 200, ok.text
    too_long = ask(sampled, key, "L" * 129)  # over the rule: replaced by the gateway's id
    assert too_long.headers["x-request-id"] == too_long.headers["x-tunegate-request-id"]
    assert give_feedback(sampled, key, {"request_id": "L" * 129, "label": "x"}).status_code == 400
