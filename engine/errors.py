"""The two exceptions the engine raises: a problem to tell the client about, and a generation cancelled; and how a
message names a request field, so that each API dialect can call it what its clients call it."""

import re

FIELD_MARK = "\x1f"  # around a field's name in a message (named): never in a message's own text
MARKED_FIELD = re.compile(f"{FIELD_MARK}(\\w+){FIELD_MARK}")


def named(field: str) -> str:
    """A request field's name, as a message names it: `field` in Imagine's own dialect, and in the others the name
    their clients send (ImagineError.text), e.g. A1111's and OpenAI's `steps` for num_steps."""
    return f"{FIELD_MARK}{field}{FIELD_MARK}"


class ImagineError(Exception):
    """A problem to tell the client about; `status` is the HTTP status it maps to, and `field` the request field
    it is about (None where it is about none). `message` names fields as Imagine's own dialect does; text() as
    another dialect's clients call them."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None, field: str | None = None):
        self.template = message  # with each request field it names marked (see named)
        self.message = self.text({})
        super().__init__(self.message)
        self.status = status
        self.retry_after = retry_after  # seconds, for a 503: when trying again is likely to work
        self.field = field

    def text(self, names: dict) -> str:
        """The message with each field it names called as `names` calls it, or by its own name where they do not."""
        return MARKED_FIELD.sub(lambda match: names.get(match[1], match[1]), self.template)


class Cancelled(Exception):
    """Raised from the step callback or a cancel point inside a step (add_cancel_points) to stop a generation."""
