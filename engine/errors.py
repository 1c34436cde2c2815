"""The two exceptions the engine raises: a problem to tell the client about, and a generation cancelled."""


class ImagineError(Exception):
    """A problem to tell the client about; `status` is the HTTP status it maps to, and `field` the request field
    it is about (None where it is about none), so that each API dialect can name that field its own way."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after  # seconds, for a 503: when trying again is likely to work
        self.field = field


class Cancelled(Exception):
    """Raised from the step callback or a cancel point inside a step (add_cancel_points) to stop a generation."""
