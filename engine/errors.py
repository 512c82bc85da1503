"""vLLM's error types, on top of tunegate's error hierarchy.

vLLM's OpenAI server answers ``{"error": {"message", "type", "param", "code"}}`` with ``type`` the
error's class name (``BadRequestError``, ``NotFoundError``, ...) and ``code`` the HTTP status as a
number; the embedded engine answers the same so the gateway treats every replica alike.
"""

from __future__ import annotations

from shared.errors import InternalError, InvalidRequest, NotFound, Overloaded, TunegateError


class VllmError(TunegateError):
    """``code`` is the HTTP status, as a number (vLLM's)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.code = self.status  # type: ignore[assignment]


class BadRequestError(VllmError, InvalidRequest, type="BadRequestError"):
    pass


class InvalidUserInput(BadRequestError, type="InvalidUserInput"):
    """vLLM's type for adapter requests that make no sense (e.g. loading a name twice)."""


class NotFoundError(VllmError, NotFound, type="NotFoundError"):
    pass


class ModelDoesNotExist(NotFoundError):
    def __init__(self, model: str, aliases: list[str]) -> None:
        super().__init__(f"The model `{model}` does not exist. Valid aliases: "
                         f"{', '.join(aliases)}.", param="model")


class BodyInvalid(BadRequestError, type="Bad Request"):
    """A body that does not parse or fit the schema (vLLM's type string for these)."""


class EngineBusy(VllmError, Overloaded, type="ServiceUnavailableError"):
    pass


class EngineInternalError(VllmError, InternalError, type="InternalServerError"):
    pass
