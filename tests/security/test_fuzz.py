"""The fuzz lane (see ``fuzz_lane``): every gateway operation, with a user key and an admin key,
valid inputs and invalid ones, against a real gateway process; no 5xx, no response outside the
schema, every 4xx in OpenAI's error shape, and invalid inputs refused with a 4xx.

The engine behind it is the fake replica (``bench/fake_upstream.py``): the gateway is what is
fuzzed, and the fake answers in microseconds, so a couple of thousand cases fit in a minute or
two of CI time (the embedded engine would spend seconds of CPU per generated request).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from schemathesis import GenerationMode

from tests.gateway.conftest import Records, gateway
from tests.security.fuzz_lane import fuzz

EXAMPLES = 30  # per operation and key (valid inputs): about 1,700 cases in all
# Per operation and key (invalid inputs): schemathesis spends far more CPU drawing an invalid
# case (most drawn ones are discarded), so a few each keep this lane near a minute on 2 cores;
# bench/abuse.py draws more.
NEGATIVE_EXAMPLES = 4


@pytest.fixture(scope="module")
def gw(engine: str, data_dir: Path, redis_url: str) -> Iterator[str]:
    with gateway(data_dir, [engine], redis_url) as url:
        yield url


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode,examples,least_cases", [
    (GenerationMode.POSITIVE, EXAMPLES, 1500),
    (GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES, 100),
], ids=["valid_inputs", "invalid_inputs"])
def test_fuzz_every_operation(gw: str, records: Records, mode: GenerationMode, examples: int,
                              least_cases: int) -> None:
    keys = {"user": records.key("user"), "admin": records.key("admin")}
    report = fuzz(gw, keys, max_examples=examples, modes=(mode,))
    assert report.operations >= 30
    assert report.cases >= least_cases
    assert report.server_errors == 0, "\n".join(report.failures)
    assert report.schema_violations == 0, "\n".join(report.failures)
    assert report.bad_rejections == 0, "\n".join(report.failures)


def test_fuzz_findings_stay_fixed(gw: str, records: Records) -> None:
    """What the lane found: a limit too large for the database and the quota script, and NUL
    characters in names, were 500s."""
    admin = {"Authorization": f"Bearer {records.key('admin')}"}
    for body in ({"name": "k", "tpm": 31392070705515516603138048},
                 {"name": "k", "rpm": 10**13},
                 {"name": "k\x00", "models": ["base"]},
                 {"name": "k", "models": ["a\x00b"]}):
        r = httpx.post(gw + "/admin/keys", headers=admin, json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}),
    ("/v1/chat/completions", {"messages": ["hi"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "temperature": "hot"}),
    ("/v1/completions", {"prompt": [[]], "temperature": []}),
    ("/v1/completions", {"prompt": ["ok", ""]}),
    ("/v1/completions", {"prompt": [["a"]]}),
])
def test_invalid_inference_bodies_are_400(gw: str, records: Records, path: str,
                                          body: dict[str, object]) -> None:
    """What the invalid-input lane found: bodies outside the documented schema were forwarded
    and answered 200 by a lenient engine. The gateway refuses what it documents."""
    r = httpx.post(gw + path, headers={"Authorization": f"Bearer {records.key('user')}"},
                   json=body, timeout=30)
    assert r.status_code == 400, (body, r.text)
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["type"] == "invalid_request_error"
