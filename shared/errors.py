"""One error hierarchy for every tunegate process.

Each error knows its HTTP status and its OpenAI error type, and renders as the body OpenAI and
vLLM both use: ``{"error": {"message", "type", "param", "code"}}``. Servers install one handler
(see :func:`error_body`) and raise these; they never build error bodies by hand.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TunegateError(Exception):
    """Base class. ``status`` is the HTTP status, ``type`` the OpenAI error type; a subclass
    names them as class keywords: ``class NotFound(TunegateError, status=404, type=...)``."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_server_error"

    def __init_subclass__(cls, *, status: int | None = None, type: str | None = None,
                          **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if status is not None:
            cls.status = status
        if type is not None:
            cls.type = type

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.message, self.type, param=self.param, code=self.code)


class InvalidRequest(TunegateError, status=400, type="invalid_request_error"):
    pass


class ContextLengthExceeded(InvalidRequest):
    """The prompt (plus the tokens asked for) does not fit the model's context."""

    def __init__(self, message: str, *, param: str | None = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class AuthenticationFailed(TunegateError, status=401, type="authentication_error"):
    pass


class PermissionDenied(TunegateError, status=403, type="permission_error"):
    pass


class NotFound(TunegateError, status=404, type="not_found_error"):
    pass


class ModelNotFound(NotFound):
    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist.", param="model", code="model_not_found"
        )


class Conflict(TunegateError, status=409, type="conflict_error"):
    pass


class RateLimited(TunegateError, status=429, type="rate_limit_error"):
    def __init__(self, message: str, *, retry_after_s: int, code: str = "rate_limit_exceeded"):
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, retry_after_s))})
        self.retry_after_s = retry_after_s


class Overloaded(TunegateError, status=503, type="service_unavailable"):
    pass


class UpstreamError(TunegateError, status=502, type="upstream_error"):
    """An engine replica failed or could not be reached."""


class InternalError(TunegateError, status=500, type="internal_server_error"):
    pass


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
