"""Error codes and exception types shared by the server, the storage layer and the Python client.

Every error the product reports has a stable string `code` (what programs branch on) and an HTTP status.
The REST API renders them as `{"error": {"code": ..., "message": ...}}`; the client turns that body back
into the same exception class via `error_from_code`.
"""

from __future__ import annotations

from typing import Any, ClassVar


class Code:
    """Stable error codes. Never rename one: clients and close reasons depend on them."""

    # Request shape
    INVALID_JSON = "invalid_json"
    VALIDATION_ERROR = "validation_error"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    # Authentication
    UNAUTHORIZED = "unauthorized"
    API_KEY_REVOKED = "api_key_revoked"
    # Lookups
    NOT_FOUND = "not_found"
    PIPE_NOT_FOUND = "pipe_not_found"
    API_KEY_NOT_FOUND = "api_key_not_found"
    SESSION_NOT_FOUND = "session_not_found"
    RECORDING_NOT_FOUND = "recording_not_found"
    CONFLICT = "conflict"
    # Session tokens
    TOKEN_MALFORMED = "token_malformed"
    TOKEN_UNKNOWN = "token_unknown"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_USED = "token_used"
    TOKEN_WRONG_PIPE = "token_wrong_pipe"
    # Limits and failures
    RATE_LIMITED = "rate_limited"
    INTERNAL_ERROR = "internal_error"
    UNAVAILABLE = "unavailable"
    CONFIG_ERROR = "config_error"
    # Client side only (no HTTP response was received)
    CONNECTION_ERROR = "connection_error"
    TIMEOUT = "timeout"


class SpeechPipeError(Exception):
    """Base of every Speech Pipe error: carries a stable `code` and the HTTP `status` it maps to."""

    default_code: ClassVar[str] = Code.INTERNAL_ERROR
    default_status: ClassVar[int] = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.status = status or STATUS_BY_CODE.get(self.code, self.default_status)
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return {"error": body}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status}, message={self.message!r})"


class BadRequestError(SpeechPipeError):
    default_code, default_status = Code.INVALID_JSON, 400


class ValidationError(SpeechPipeError):
    default_code, default_status = Code.VALIDATION_ERROR, 422


class PayloadTooLargeError(SpeechPipeError):
    default_code, default_status = Code.PAYLOAD_TOO_LARGE, 413


class AuthenticationError(SpeechPipeError):
    default_code, default_status = Code.UNAUTHORIZED, 401


class NotFoundError(SpeechPipeError):
    default_code, default_status = Code.NOT_FOUND, 404


class ConflictError(SpeechPipeError):
    default_code, default_status = Code.CONFLICT, 409


class TokenError(SpeechPipeError):
    """A session token was refused; `code` says why (malformed, unknown, expired, used, wrong pipe...)."""

    default_code, default_status = Code.TOKEN_UNKNOWN, 401


class RateLimitError(SpeechPipeError):
    default_code, default_status = Code.RATE_LIMITED, 429


class ServiceUnavailableError(SpeechPipeError):
    default_code, default_status = Code.UNAVAILABLE, 503


class ConfigError(SpeechPipeError):
    """Bad settings (environment variables, CLI options); raised before anything starts."""

    default_code, default_status = Code.CONFIG_ERROR, 500


class APIConnectionError(SpeechPipeError):
    """The client could not reach the server (refused, DNS, reset)."""

    default_code, default_status = Code.CONNECTION_ERROR, 0


class APITimeoutError(APIConnectionError):
    default_code, default_status = Code.TIMEOUT, 0


STATUS_BY_CODE: dict[str, int] = {
    Code.INVALID_JSON: 400,
    Code.VALIDATION_ERROR: 422,
    Code.PAYLOAD_TOO_LARGE: 413,
    Code.METHOD_NOT_ALLOWED: 405,
    Code.UNSUPPORTED_MEDIA_TYPE: 415,
    Code.UNAUTHORIZED: 401,
    Code.API_KEY_REVOKED: 401,
    Code.NOT_FOUND: 404,
    Code.PIPE_NOT_FOUND: 404,
    Code.API_KEY_NOT_FOUND: 404,
    Code.SESSION_NOT_FOUND: 404,
    Code.RECORDING_NOT_FOUND: 404,
    Code.CONFLICT: 409,
    Code.TOKEN_MALFORMED: 401,
    Code.TOKEN_UNKNOWN: 401,
    Code.TOKEN_EXPIRED: 401,
    Code.TOKEN_USED: 401,
    Code.TOKEN_WRONG_PIPE: 403,
    Code.RATE_LIMITED: 429,
    Code.INTERNAL_ERROR: 500,
    Code.UNAVAILABLE: 503,
    Code.CONFIG_ERROR: 500,
    Code.CONNECTION_ERROR: 0,
    Code.TIMEOUT: 0,
}

_CLASS_BY_CODE: dict[str, type[SpeechPipeError]] = {
    Code.INVALID_JSON: BadRequestError,
    Code.UNSUPPORTED_MEDIA_TYPE: BadRequestError,
    Code.METHOD_NOT_ALLOWED: BadRequestError,
    Code.VALIDATION_ERROR: ValidationError,
    Code.PAYLOAD_TOO_LARGE: PayloadTooLargeError,
    Code.UNAUTHORIZED: AuthenticationError,
    Code.API_KEY_REVOKED: AuthenticationError,
    Code.NOT_FOUND: NotFoundError,
    Code.PIPE_NOT_FOUND: NotFoundError,
    Code.API_KEY_NOT_FOUND: NotFoundError,
    Code.SESSION_NOT_FOUND: NotFoundError,
    Code.RECORDING_NOT_FOUND: NotFoundError,
    Code.CONFLICT: ConflictError,
    Code.TOKEN_MALFORMED: TokenError,
    Code.TOKEN_UNKNOWN: TokenError,
    Code.TOKEN_EXPIRED: TokenError,
    Code.TOKEN_USED: TokenError,
    Code.TOKEN_WRONG_PIPE: TokenError,
    Code.RATE_LIMITED: RateLimitError,
    Code.UNAVAILABLE: ServiceUnavailableError,
    Code.CONFIG_ERROR: ConfigError,
    Code.CONNECTION_ERROR: APIConnectionError,
    Code.TIMEOUT: APITimeoutError,
}

# Close codes for refused WebSocket connections (4000-4999 is the application range, RFC 6455 §7.4.2).
WS_CLOSE_CODE_BY_CODE: dict[str, int] = {
    Code.TOKEN_MALFORMED: 4400,
    Code.TOKEN_UNKNOWN: 4401,
    Code.TOKEN_EXPIRED: 4402,
    Code.TOKEN_USED: 4403,
    Code.TOKEN_WRONG_PIPE: 4404,
    Code.API_KEY_REVOKED: 4405,
    Code.UNAUTHORIZED: 4406,
    Code.PIPE_NOT_FOUND: 4407,
    Code.INTERNAL_ERROR: 4500,
}


def error_from_code(code: str, message: str, status: int | None = None,
                    details: Any = None) -> SpeechPipeError:
    """Builds the exception for an error `code` (unknown codes fall back by HTTP status)."""
    cls = _CLASS_BY_CODE.get(code)
    if cls is None:
        cls = {400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 409: ConflictError,
               413: PayloadTooLargeError, 422: ValidationError, 429: RateLimitError,
               503: ServiceUnavailableError}.get(status or 0, SpeechPipeError)
    return cls(message, code=code, status=status, details=details)
