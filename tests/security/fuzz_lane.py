"""The fuzz lane: schemathesis (v4) generates requests for every operation of the gateway's
OpenAPI schema (valid and invalid ones), sends each with every given key to a running gateway, and
collects responses that are 5xx or do not match the schema (``server_errors``,
``schema_violations``), and 4xx answers outside OpenAI's error shape or invalid inputs that were
not refused (``bad_rejections``; schemathesis' ``negative_data_rejection`` decides which generated
cases are truly invalid once serialized). Used by ``test_fuzz.py`` and by ``bench/abuse.py``.

The schema is the app's own (``create_app(...).openapi()``, read in-process: a production gateway
does not serve ``/openapi.json``). Cases are not shrunk: a failure is recorded as it was sent.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
)

from gateway.app import create_app
from gateway.settings import GatewaySettings

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


@dataclass
class FuzzReport:
    operations: int = 0
    cases: int = 0
    server_errors: int = 0
    schema_violations: int = 0
    bad_rejections: int = 0  # a 4xx not in OpenAI's error shape, or invalid input accepted
    failures: list[str] = field(default_factory=list)  # the first few, for the assertion message
    statuses: dict[int, int] = field(default_factory=dict)  # status -> responses


def gateway_schema() -> dict[str, Any]:
    return create_app(GatewaySettings(engines=["http://127.0.0.1:1"])).openapi()


def fuzz(base_url: str, keys: dict[str, str], *, max_examples: int,
         schema: dict[str, Any] | None = None,
         modes: tuple[GenerationMode, ...] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
         ) -> FuzzReport:
    """Every operation x every key x (valid, invalid) inputs, ``max_examples`` cases each."""
    api = schemathesis.openapi.from_dict(schema or gateway_schema())
    report = FuzzReport()
    session = requests.Session()
    for result in api.get_all_operations():
        if not isinstance(result, Ok):
            raise AssertionError(f"the gateway's OpenAPI schema does not load: {result}")
        operation = result.ok()
        report.operations += 1
        for role, key in keys.items():
            for mode in modes:
                if mode is GenerationMode.NEGATIVE and not _has_inputs(operation):
                    continue  # nothing to make invalid
                _run(operation, role, key, mode, base_url, session, max_examples, report)
    return report


def _run(operation: Any, role: str, key: str, mode: GenerationMode, base_url: str,
         session: requests.Session, max_examples: int, report: FuzzReport) -> None:
    headers = {"Authorization": f"Bearer {key}"}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    def one(case: Any) -> None:
        report.cases += 1
        try:
            response = case.call(base_url=base_url, session=session, headers=headers,
                                 timeout=30)
        except requests.RequestException as exc:  # the gateway dropped the connection
            report.server_errors += 1
            _note(report, f"{operation.label} [{role}] {type(exc).__name__}: {exc}")
            return
        report.statuses[response.status_code] = report.statuses.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            report.server_errors += 1
            _note(report, f"{operation.label} [{role}] {response.status_code}: "
                          f"{response.text[:300]} <- {case.as_curl_command()[:300]}")
            return
        try:
            case.validate_response(response, checks=[response_schema_conformance,
                                                      content_type_conformance])
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup
            report.schema_violations += 1
            _note(report, f"{operation.label} [{role}] schema: {_first_line(exc)} <- "
                          f"{case.as_curl_command()[:300]}")
            return
        if 400 <= response.status_code < 500 and not _openai_error(response):
            report.bad_rejections += 1
            _note(report, f"{operation.label} [{role}] {response.status_code} not in OpenAI's "
                          f"error shape: {response.text[:200]} <- {case.as_curl_command()[:300]}")
            return
        if mode is GenerationMode.NEGATIVE:
            try:  # invalid input must be refused (4xx); schemathesis knows which are truly invalid
                case.validate_response(response, checks=[negative_data_rejection])
            except (Exception, BaseExceptionGroup) as exc:
                report.bad_rejections += 1
                _note(report, f"{operation.label} [{role}] invalid input got "
                              f"{response.status_code}: {_first_line(exc)} <- "
                              f"{case.as_curl_command()[:300]}")

    with contextlib.suppress(Unsatisfiable):  # nothing left to generate for this operation
        one()


def _openai_error(response: requests.Response) -> bool:
    """A 4xx whose body is OpenAI's error shape: ``{"error": {"message": str, "type": str}}``."""
    if not 400 <= response.status_code < 500:
        return False
    try:
        error = response.json().get("error")
    except ValueError:
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str) and \
        isinstance(error.get("type"), str)


def _has_inputs(operation: Any) -> bool:
    return any(len(getattr(operation, name, None) or ()) for name in
               ("path_parameters", "query", "headers", "cookies", "body"))


def _first_line(exc: BaseException) -> str:
    inner = getattr(exc, "exceptions", None)
    if inner:
        return "; ".join(f"{type(e).__name__}: {str(e)[:200]}" for e in inner)
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _note(report: FuzzReport, line: str) -> None:
    if len(report.failures) < 20:
        report.failures.append(line)
