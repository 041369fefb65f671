"""RetailCRM error envelopes with their exact ``errorMsg`` strings (docs/retailcrm.md#errors).

Exceptions of the sandbox::

    SandboxError                 base of everything the package raises on purpose
    ├── ApiError                 a RetailCRM-style error answer (status, errorMsg, errors)
    └── ControlError             a bad request to the /_sandbox/ control API
"""

from __future__ import annotations

from typing import Any

API_KEY_MISSING = '"apiKey" is missing.'
API_KEY_WRONG = 'Wrong "apiKey" value.'
ACCESS_DENIED = "Access denied."
ACCOUNT_MISSING = "Account does not exist."
ENTITY_ERRORS = "Errors in the entity format"
INPUT_ERRORS = "Errors in the input parameters"
NOT_FOUND = "Not found"
METHOD_NOT_FOUND = "API method not found"
METHOD_NOT_ALLOWED = "Method not allowed"
RATE_LIMITED = "Rate limit exceeded"
TELEPHONY_DISABLED = "Telephony not enabled"
UPLOAD_DISABLED = "Telephony not enabled or not supports calls upload"
INTERNAL_ERROR = "Internal Server Error"
SERVICE_UNAVAILABLE = "Service Unavailable"

Errors = dict[str, str] | list[str]


class SandboxError(Exception):
    """Base of the sandbox's own exceptions."""


class ApiError(SandboxError):
    """An error answer in RetailCRM's envelope."""

    def __init__(self, status: int, message: str, errors: Errors | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"success": False, "errorMsg": self.message}
        if self.errors:
            body["errors"] = self.errors
        return body


class ControlError(SandboxError):
    """A bad control request; answered as ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def missing_parameter(name: str) -> ApiError:
    return ApiError(400, f"Parameter '{name}' is missing")


def non_scalar(name: str) -> ApiError:
    return ApiError(400, f'Input value "{name}" contains a non-scalar value')


def entity_error(errors: Errors) -> ApiError:
    return ApiError(400, ENTITY_ERRORS, errors)


ACCOUNT_MISSING_HTML = (
    "<html>\r\n<head><title>405 Not Allowed</title></head>\r\n<body>\r\n"
    "<center><h1>405 Not Allowed</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
DOWN_HTML = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
TIMEOUT_HTML = (
    "<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n"
    "<center><h1>504 Gateway Time-out</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
