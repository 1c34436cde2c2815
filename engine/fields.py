"""Reading one field of a request body: the checks every dialect's translator and parse_request share, each error
naming the field (see errors.named, so that each dialect names it as its clients do) and quoting the bad value."""

import base64
import binascii
import io
import json
import math
import re

from PIL import Image, UnidentifiedImageError

from engine.errors import ImagineError, named
from engine.settings import MIN_SIZE

MAX_IMG_PIXELS = 4096 * 4096  # an input picture, checked from its header before it is decoded


# Picture formats an input image may have: what cameras, browsers and editors save. Pillow knows many
# more (EPS runs Ghostscript on the data, others are rare codecs); those are refused, unread.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def value_of(body: dict, field: str, kinds, kind_name: str):
    """The field's value, which must be one of `kinds` (a bool is never a number); `kind_name` says which."""
    value = body[field]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise ImagineError(f"{named(field)} must be {kind_name}, not {json.dumps(value)[:80]}", field=field)
    return value


def in_range(field: str, value, low, high):
    if not (isinstance(value, int) or math.isfinite(value)) or not low <= value <= high:
        raise ImagineError(f"{named(field)} must be between {low} and {high}, not {value}", field=field)
    return value


def integer(body: dict, field: str, default, low: int, high: int):
    """A whole number from `low` to `high`, or `default` where the field is left out or null."""
    if body.get(field) is None:
        return default
    return in_range(field, value_of(body, field, int, "an integer"), low, high)


def number(body: dict, field: str, default, low: float, high: float):
    """A finite number from `low` to `high`, as a float, or `default` where the field is left out or null."""
    if body.get(field) is None:
        return default
    return float(in_range(field, value_of(body, field, (int, float), "a number"), low, high))


def boolean(body: dict, field: str, default: bool) -> bool:
    """true or false, or `default` where the field is left out or null."""
    if body.get(field) is None:
        return default
    value = body[field]
    if not isinstance(value, bool):
        raise ImagineError(f"{named(field)} must be true or false, not {json.dumps(value)[:80]}", field=field)
    return value


MAX_NAME_CHARS = 512  # a model's, LoRA's or upscaler's name: a path below a models folder, not a text


def text(body: dict, field: str, default, max_chars: int | None = None):
    """A string of at most `max_chars` characters, valid Unicode, or `default` where the field is left out or null."""
    if body.get(field) is None:
        return default
    value = value_of(body, field, str, "a string")
    if max_chars is not None and len(value) > max_chars:
        message = f"{named(field)} is {len(value)} characters long; at most {max_chars} are accepted"
        raise ImagineError(message, field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # JSON may escape half of a surrogate pair ("\ud800"), which is no text
        bad = value[error.start : error.end].encode("unicode_escape").decode()
        message = f"{named(field)} must be valid Unicode text, not a lone surrogate {bad}"
        raise ImagineError(message, field=field) from None
    return value


def size(body: dict, field: str, default, max_size: int, min_size: int = MIN_SIZE):
    """A width or height: a multiple of 8 (the latents are 1/8 of the picture) from `min_size` to `max_size`."""
    value = integer(body, field, default, min_size, max_size)
    if value is not None and value % 8:
        raise ImagineError(f"{named(field)} must be a multiple of 8, not {value}", field=field)
    return value


def rounded_size(value):
    """A width or height as AUTOMATIC1111 draws it, rounded down to a multiple of 8 (its latents are size // 8), for
    the dialects whose clients let users type any size; a value that is no size, or too small, is left for the checks
    to refuse as sent."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= MIN_SIZE:
        return value // 8 * 8
    return value


def whole_number(name: str, text: str, low: int, high: int) -> int:
    """A query or header value that must be a whole number from `low` to `high`; a 400 naming it otherwise."""
    if not re.fullmatch(r"\d{1,9}", text.strip()) or not low <= int(text) <= high:
        raise ImagineError(f"{name} must be a whole number from {low} to {high}, not {text[:40]!r}", field=name)
    return int(text)


def decode_image(data: str, field: str = "img", mode: str = "RGB") -> Image.Image:
    """The one way a request's picture is read: a data URI (`data:image/png;base64,...`) or bare base64
    of a PNG, JPEG, WEBP, BMP or GIF (its first frame), converted to `mode`; `field` names the request field
    in errors."""
    name = named(field)
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise ImagineError(f"{name} must be a base64 data URI (data:image/...;base64,...)", field=field)
    try:
        # Line breaks are allowed: `base64` wraps its output at 76 columns.
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImagineError(f"{name} is not valid base64", field=field) from None
    try:
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        if image.width * image.height > MAX_IMG_PIXELS:  # from the header: nothing is decoded yet
            message = f"{name} is {image.width}x{image.height}; at most {MAX_IMG_PIXELS} pixels are accepted"
            raise ImagineError(message, field=field)
        image.load()
        return image.convert(mode)
    except Image.DecompressionBombError:
        raise ImagineError(f"{name} has too many pixels to be decoded safely", field=field) from None
    except UnidentifiedImageError:
        message = f"{name} is not a picture in a format accepted: {', '.join(IMAGE_FORMATS)}"
        raise ImagineError(message, field=field) from None
    except ImagineError:
        raise
    except Exception:  # a damaged file: Pillow's decoders raise OSError, SyntaxError, EOFError, struct.error...
        raise ImagineError(f"{name} is a damaged picture that cannot be decoded", field=field) from None


def picture(body: dict, field: str, mode: str) -> Image.Image:
    """A request's picture: base64 text from a client, or a picture an API dialect has decoded already."""
    if isinstance(body[field], Image.Image):
        return body[field].convert(mode)
    return decode_image(text(body, field, None), field, mode)
