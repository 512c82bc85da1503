"""Point 8 (exposure): /docs, /redoc and /openapi.json are off unless the operator turns them on;
/metrics is open by default (Prometheus), or admin-only, or off."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.gateway.conftest import Records, auth, gateway

DOCS = ("/docs", "/redoc", "/openapi.json")


def test_docs_closed_by_default(engine: str, data_dir: Path, records: Records) -> None:
    admin = records.key("admin")
    with gateway(data_dir, [engine]) as g:
        for path in DOCS:
            assert httpx.get(g + path).status_code == 401, path
            assert httpx.get(g + path, headers=auth(admin)).status_code == 404, path
        assert httpx.get(g + "/metrics").status_code == 200
    with gateway(data_dir, [engine], env={"TUNEGATE_GATEWAY_API_DOCS": "true"}) as g:
        for path in DOCS:
            assert httpx.get(g + path).status_code == 200, path
        assert "/v1/chat/completions" in httpx.get(g + "/openapi.json").json()["paths"]


def test_metrics_access(engine: str, data_dir: Path, records: Records) -> None:
    admin, user = records.key("admin"), records.key("user")
    with gateway(data_dir, [engine], env={"TUNEGATE_GATEWAY_METRICS_ACCESS": "admin"}) as g:
        assert httpx.get(g + "/metrics").status_code == 401
        assert httpx.get(g + "/metrics", headers=auth(user)).status_code == 403
        r = httpx.get(g + "/metrics", headers=auth(admin))
        assert r.status_code == 200 and "tunegate_gateway_requests_total" in r.text
    with gateway(data_dir, [engine], env={"TUNEGATE_GATEWAY_METRICS_ACCESS": "off"}) as g:
        assert httpx.get(g + "/metrics", headers=auth(admin)).status_code == 404
        assert httpx.get(g + "/health").status_code == 200
