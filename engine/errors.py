"""vLLM's error types, on top of tunegate's error hierarchy.

vLLM's OpenAI server answers ``{"error": {"message", "type", "param", "code"}}`` with ``type`` the
error's class name (``BadRequestError``, ``NotFoundError``, ...) and ``code`` the HTTP status as a
number; the embedded engine answers the same so the gateway treats every replica alike.
"""

from __future__ import annotations

from shared.errors import InternalError, InvalidRequest, NotFound, Overloaded


class BadRequestError(InvalidRequest):
    type = "BadRequestError"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.code = 400  # type: ignore[assignment]


class InvalidUserInput(BadRequestError):
    """vLLM's type for adapter requests that make no sense (e.g. loading a name twice)."""

    type = "InvalidUserInput"


class NotFoundError(NotFound):
    type = "NotFoundError"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.code = 404  # type: ignore[assignment]


class ModelDoesNotExist(NotFoundError):
    def __init__(self, model: str, aliases: list[str]) -> None:
        super().__init__(f"The model `{model}` does not exist. Valid aliases: "
                         f"{', '.join(aliases)}.", param="model")


class BodyInvalid(BadRequestError):
    """A body that does not parse or fit the schema (vLLM's type string for these)."""

    type = "Bad Request"


class EngineBusy(Overloaded):
    type = "ServiceUnavailableError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 503  # type: ignore[assignment]


class EngineInternalError(InternalError):
    type = "InternalServerError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 500  # type: ignore[assignment]
