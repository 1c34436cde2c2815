"""AUTOMATIC1111's generation data ("infotext": the PNG `parameters` text civitai shows under a picture): the prompt,
"Negative prompt: ...", then one settings line of `Key: value` pairs. Here are its writer (for every picture's PNG),
one scanner of the settings line, and the two readers built on it: the strict one that fills /generate's fields from
pasted data and refuses what it cannot read, and the lenient one that A1111's png-info answers with, which refuses
nothing."""

import contextlib
import json
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from engine.errors import ImagineError
from engine.files.families import Family
from engine.hires import wants_hires
from engine.samplers import sampler_label, schedule_label, schedules_for, split_sampler
from engine.schedules import AUTOMATIC

if TYPE_CHECKING:  # engine.request reads pasted data with this module
    from engine.request import GenerationRequest


# ---- The writer


def generation_parameters(
    req: "GenerationRequest", model_name: str, family: Family, lora_hashes: dict | None = None, cut: tuple | None = None
) -> str:
    """The settings of a picture in the text layout AUTOMATIC1111 writes, which image viewers and
    prompt readers understand: the prompt, the negative prompt, then one line of `key: value` pairs.
    `cut` is (steps run, steps planned) for a picture an interrupt ended early: its Steps are those it ran.
    The flow-matching families step on their own schedule, "Automatic"; FLUX.1-dev's distilled guidance is written
    as Forge, the A1111 fork that draws FLUX, writes it: "CFG scale: 1" (no classifier-free guidance) and
    "Distilled CFG Scale"."""
    lines = [req.prompt, f"Negative prompt: {req.neg}"] if req.neg else [req.prompt]
    scales = {"CFG scale": req.guidance}
    if family.guidance == "distilled":
        scales = {"CFG scale": 1.0, "Distilled CFG Scale": req.guidance}
    settings = {
        "Steps": req.num_steps,
        "Sampler": sampler_label(req.sampler),
        "Schedule type": schedule_label(req.sampler, req.schedule, family.flow),
        **scales,
        "Seed": req.seed,
        "Size": f"{req.width}x{req.height}",
        "Model": model_name,
        **variation_settings(req),
    }
    if req.img is not None:
        settings["Denoising strength"] = req.strength
    if wants_hires(req):
        settings |= hires_parameters(req)
    if req.mask is not None:
        settings["Mask blur"] = req.mask_blur
        if req.inpaint_area == "masked":
            settings["Inpaint area"] = "Only masked"
            settings["Masked area padding"] = req.inpaint_padding
    if req.clip_skip != 1:
        settings["Clip skip"] = req.clip_skip
    if req.rng != "gpu":  # A1111 names its RNG only where it is not its default, the GPU's
        settings["RNG"] = req.rng.upper()
    if req.tiling:
        settings["Tiling"] = "True"
    if lora_hashes:  # quoted as JSON, as A1111 writes a value holding commas or colons
        hashes = ", ".join(f"{name}: {short}" for name, short in lora_hashes.items())
        settings["Lora hashes"] = json.dumps(hashes, ensure_ascii=False)
    if cut is not None:
        settings["Steps"] = cut[0]
        settings["Interrupted"] = f"after step {cut[0]} of {cut[1]}"
    return "\n".join([*lines, ", ".join(f"{key}: {value}" for key, value in settings.items())])


def hires_parameters(req: "GenerationRequest") -> dict:
    """The hires fix's settings as A1111 writes them; Size stays the first pass's."""
    settings = {"Denoising strength": req.hires_strength}
    if req.hires_width or req.hires_height:
        settings["Hires resize"] = f"{req.hires_width}x{req.hires_height}"
    else:
        scale = 2.0 if req.hires_scale is None else req.hires_scale
        settings["Hires upscale"] = int(scale) if scale.is_integer() else scale  # "2", as A1111's slider writes it
    if req.hires_steps:
        settings["Hires steps"] = req.hires_steps
    settings["Hires upscaler"] = req.hires_upscaler
    if req.hires_sampler is not None and req.hires_sampler != req.sampler:
        settings["Hires sampler"] = sampler_label(req.hires_sampler)
    if req.hires_schedule != AUTOMATIC and req.hires_schedule != req.schedule:
        settings["Hires schedule type"] = schedule_label(req.hires_sampler or req.sampler, req.hires_schedule, False)
    # A1111 writes the second pass's prompts (Forge its CFG scale) only where they differ from the first pass's.
    if req.hires_prompt is not None and req.hires_prompt != req.prompt:
        settings["Hires prompt"] = quoted(req.hires_prompt)
    if req.hires_neg is not None and req.hires_neg != req.neg:
        settings["Hires negative prompt"] = quoted(req.hires_neg)
    if req.hires_guidance is not None and req.hires_guidance != req.guidance:
        settings["Hires CFG Scale"] = req.hires_guidance
    return settings


def quoted(text: str) -> str:
    """A value as A1111's quote writes it: plain, or as a JSON string where it holds a comma, colon or line break (a
    quote too, here, so that a value opening with one reads back as itself)."""
    return json.dumps(text, ensure_ascii=False) if any(mark in text for mark in ',:\n"') else text


def variation_settings(req: "GenerationRequest") -> dict:
    """The variation seed and the size the seed's noise was drawn at, written only where they are used, as A1111
    writes them."""
    settings = {}
    if req.variation_strength:
        settings["Variation seed"] = req.variation_seed
        settings["Variation seed strength"] = req.variation_strength
    if req.seed_resize_from_width is not None:
        settings["Seed resize from"] = f"{req.seed_resize_from_width}x{req.seed_resize_from_height}"
    return settings


# ---- The settings line, scanned in one pass

SPACES = re.compile(r"\s*")  # matched where it stands, to its end: nothing after it to backtrack for


class Setting(NamedTuple):
    """One item of a settings line, as written."""

    start: int  # where the item starts in the line: what an error quotes from
    head: str  # the text from there to its colon: the key, after whatever a lenient reader skips
    value: str | None  # from the colon's first non-space to the comma, or past a closing quote; None: no colon
    after: str  # what a quoted value leaves before the comma (nothing, as A1111 writes it)


def settings_items(line: str) -> Iterator[Setting]:
    """The items of `Key: value, Key: "quoted, value", ...` in one pass, each character looked at a bounded number of
    times: a regex for this backtracked exponentially on an unclosed quote of backslashes and quadratically on long
    runs of spaces, holding the GIL for minutes. A quote never closed is a plain value, up to the next comma; only one
    search for a closing quote can run to the line's end, since any value opening with a quote after it closes it."""
    start = 0
    while start < len(line):
        colon = line.find(":", start)
        if colon == -1:
            yield Setting(start, line[start:], None, "")
            return
        value_start = SPACES.match(line, colon + 1).end()
        end = closing_quote(line, value_start) if line.startswith('"', value_start) else -1
        if end == -1:
            end = comma_or_end(line, value_start)
        comma = comma_or_end(line, end)
        yield Setting(start, line[start:colon], line[value_start:end], line[end:comma])
        start = comma + 1


def closing_quote(line: str, start: int) -> int:
    """The index just past the quote that closes the one at `start` (backslash escapes skipped), or -1."""
    index = start + 1
    while (index := line.find('"', index)) != -1:
        before = index  # count the backslashes right before it: an odd number escapes it
        while line[before - 1] == "\\":
            before -= 1
        if (index - before) % 2 == 0:
            return index + 1
        index += 1
    return -1


def comma_or_end(line: str, start: int) -> int:
    comma = line.find(",", start)
    return len(line) if comma == -1 else comma


# ---- The strict reader: pasted data into /generate's fields

KEY = re.compile(r"\w[\w \-/+().]*")  # keys as A1111 writes them: "Steps", "Schedule type", "Hires resize-1", ...
RNG_NAMES = {"cpu": "cpu", "gpu": "gpu", "nv": "nv"}
INPAINT_AREAS = {"Whole picture": "whole", "Only masked": "masked"}  # A1111's labels of inpaint_area's values


def integer(key: str, value: str) -> int:
    if not re.fullmatch(r"-?\d+", value):
        raise ImagineError(f"parameters: {key} must be a whole number, not {value!r}", field="parameters")
    return int(value)


def number(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ImagineError(f"parameters: {key} must be a number, not {value!r}", field="parameters") from None


def size(key: str, value: str) -> dict:
    match = re.fullmatch(r"(\d+)x(\d+)", value)
    if match is None:
        raise ImagineError(f"parameters: {key} must be WIDTHxHEIGHT, not {value!r}", field="parameters")
    return {"width": int(match[1]), "height": int(match[2])}


def seed_resize(key: str, value: str) -> dict:
    width_height = size(key, value)
    return {"seed_resize_from_width": width_height["width"], "seed_resize_from_height": width_height["height"]}


def truth(key: str, value: str) -> bool:
    if value not in ("True", "False"):
        raise ImagineError(f"parameters: {key} must be True or False, not {value!r}", field="parameters")
    return value == "True"


def rng(key: str, value: str) -> str:
    if value.lower() not in RNG_NAMES:
        raise ImagineError(f"parameters: RNG must be CPU, GPU or NV, not {value!r}", field="parameters")
    return RNG_NAMES[value.lower()]


def hires_resize(key: str, value: str) -> dict:
    match = re.fullmatch(r"(\d+)x(\d+)", value)
    if match is None:
        raise ImagineError(f"parameters: Hires resize must be WIDTHxHEIGHT, not {value!r}", field="parameters")
    return {"hires_width": int(match[1]), "hires_height": int(match[2])}


def inpaint_area(key: str, value: str) -> str:
    if value not in INPAINT_AREAS:
        message = f"parameters: Inpaint area must be Whole picture or Only masked, not {value!r}"
        raise ImagineError(message, field="parameters")
    return INPAINT_AREAS[value]


# A1111's key -> (our field, how its text becomes the value); "Size" and "Seed resize from" set two fields.
FIELDS = {
    "Steps": ("num_steps", integer),
    "Sampler": ("sampler", lambda key, value: value),
    "Schedule type": ("schedule", lambda key, value: value),
    "CFG scale": ("guidance", number),
    "Distilled CFG Scale": ("distilled_guidance", number),  # Forge's, for FLUX.1-dev: see GenerationRequest
    "Seed": ("seed", integer),
    "Size": (None, size),
    "Variation seed": ("variation_seed", integer),
    "Variation seed strength": ("variation_strength", number),
    "Seed resize from": (None, seed_resize),
    "Tiling": ("tiling", truth),
    "Clip skip": ("clip_skip", integer),
    "Model": ("model", lambda key, value: value),
    "RNG": ("rng", rng),
    "Denoising strength": ("strength", number),
    "Mask blur": ("mask_blur", integer),
    "Inpaint area": ("inpaint_area", inpaint_area),
    "Masked area padding": ("inpaint_padding", integer),
    "Hires upscale": ("hires_scale", number),
    "Hires resize": (None, hires_resize),
    "Hires steps": ("hires_steps", integer),
    "Hires upscaler": ("hires_upscaler", lambda key, value: value),
    "Hires sampler": ("hires_sampler", lambda key, value: value),
    "Hires schedule type": ("hires_schedule", lambda key, value: value),
    "Hires prompt": ("hires_prompt", lambda key, value: value),
    "Hires negative prompt": ("hires_neg", lambda key, value: value),
    "Hires CFG Scale": ("hires_guidance", number),  # Forge's
}
# Keys understood without a field of their own: the prompt's <lora:...> tags load the LoRAs these name.
UNDERSTOOD = {"Lora hashes"}


def split_infotext(text: str) -> tuple:
    """(prompt, negative prompt, settings line) of an infotext; the settings line is the one starting "Steps:"."""
    lines = text.strip().replace("\r\n", "\n").split("\n")
    if not lines or not lines[-1].lstrip().startswith("Steps:"):
        starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("Steps:")]
        if starts:
            extra = lines[starts[-1] + 1].strip()[:60]
            raise ImagineError(f"parameters has a line after its settings line: {extra!r}", field="parameters")
        message = "parameters has no settings line (the last line, 'Steps: ..., Sampler: ...')"
        raise ImagineError(message, field="parameters")
    body, negative_at = lines[:-1], None
    for index, line in enumerate(body):
        if line.startswith("Negative prompt:"):
            negative_at = index
            break
    if negative_at is None:
        return "\n".join(body).strip(), None, lines[-1]
    negative = "\n".join([body[negative_at].removeprefix("Negative prompt:"), *body[negative_at + 1 :]])
    return "\n".join(body[:negative_at]).strip(), negative.strip(), lines[-1]


def settings_pairs(line: str) -> dict:
    """The settings line as {key: value text}; anything that is no `Key: value` item is refused, quoting it."""
    pairs = {}
    for item in settings_items(line):
        if item.value is None or not KEY.fullmatch(item.head.lstrip()):
            rest = line[item.start :].strip()[:60]
            message = f"parameters: the settings line has text that is no 'Key: value': {rest!r}"
            raise ImagineError(message, field="parameters")
        pairs[item.head.strip()] = setting_value(item)
    return pairs


def setting_value(item: Setting) -> str:
    """An item's value: a plain one without the spaces around it, a quoted one read as the JSON string A1111 writes."""
    if not item.value.startswith('"'):
        return item.value.strip()
    if not item.after.strip():
        with contextlib.suppress(json.JSONDecodeError):  # unclosed, or no JSON string ("\q", a raw tab)
            return json.loads(item.value)
    quoted = (item.value + item.after)[:60]
    message = f"parameters: {item.head.strip()}'s quoted value is no JSON string: {quoted!r}"
    raise ImagineError(message, field="parameters")


def infotext_fields(text: str) -> tuple:
    """(the /generate fields an infotext sets, its keys that set nothing here). No RNG key means A1111's default,
    the GPU's noise, which it never writes."""
    prompt, negative, line = split_infotext(text)
    fields, ignored = {"prompt": prompt, "rng": "gpu"}, []
    if negative is not None:
        fields["neg"] = negative
    pairs = settings_pairs(line)
    for key, value in pairs.items():
        if key in FIELDS:
            field, convert = FIELDS[key]
            converted = convert(key, value)
            fields |= converted if field is None else {field: converted}
        elif key not in UNDERSTOOD:
            ignored.append(key)
    return fields | older_schedule(fields) | hires_settings(fields, ignored), ignored


def hires_settings(fields: dict, ignored: list) -> dict:
    """A hires picture's Denoising strength is its second pass's. (An upscaler model the folders lack, such as
    R-ESRGAN, is replaced by A1111's default latent one where the engine knows its upscalers: Engine.submit.)"""
    if not any(field.startswith("hires_") for field in fields):
        return {}
    return {"hires_strength": fields.pop("strength")} if "strength" in fields else {}


def names_schedule(text: str) -> bool:
    """Whether an infotext names its schedule type; older_schedule infers one for an SD model where it does not."""
    return "Schedule type" in settings_pairs(split_infotext(text)[2])


def older_schedule(fields: dict) -> dict:
    """Generation data without a "Schedule type" comes from A1111 before 1.9, where every k-diffusion sampler not
    named "... Karras" stepped through the model's own timesteps: that is "uniform" now ("automatic" has since
    become Karras for DPM++ 2M and others)."""
    if "sampler" not in fields or "schedule" in fields:
        return {}
    sampler, named = split_sampler(fields["sampler"])
    if sampler is None or named is not None or "uniform" not in schedules_for(sampler):
        return {}
    return {"schedule": "uniform"}


def with_infotext(body: dict) -> tuple:
    """(`body` with the fields its `parameters` infotext sets wherever the body leaves them out, the ignored keys).
    A Size that disagrees with a width or height given beside it is refused: one of them is a mistake."""
    text = body["parameters"]
    if not isinstance(text, str):
        raise ImagineError(f"parameters must be a string, not {json.dumps(text)[:80]}", field="parameters")
    fields, ignored = infotext_fields(text)
    for field in ("width", "height"):
        if body.get(field) is not None and field in fields and body[field] != fields[field]:
            raise ImagineError(
                f"parameters' Size gives {field} {fields[field]}, but {field} is {body[field]}", field=field
            )
    given = {key: value for key, value in body.items() if value is not None}
    if "guidance" in given:  # the body's guidance is the one to draw with, over the pasted Distilled CFG Scale too
        fields.pop("distilled_guidance", None)
    return {**fields, **given}, ignored


# ---- The lenient reader: png-info's dict of strings


def infotext_strings(text: str) -> dict:
    """A1111's infotext ("prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: Euler, ...") as the dict of strings
    A1111's png-info answers: "Prompt", "Negative prompt", each key with its value as written, "Size-1" and "Size-2".
    Whatever it cannot read is left out, never refused."""
    if not text:
        return {}
    lines = text.split("\n")
    settings = lines.pop() if len(lines) > 1 or re.search(r"\bSteps: ", lines[0]) else ""
    prompt, neg = [], []
    for line in lines:
        if line.startswith("Negative prompt:") or neg:
            neg.append(line.removeprefix("Negative prompt:").strip())
        else:
            prompt.append(line)
    parsed = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(neg)}
    for item in settings_items(settings):
        if item.value is not None and (key := key_ending(item.head)):
            parsed[key] = item.value
    if "Size" in parsed:
        parsed["Size-1"], _, parsed["Size-2"] = parsed["Size"].partition("x")
    return parsed


def key_ending(head: str) -> str:
    """The letters, digits, _ and spaces that end an item's head, without the spaces around them: the key png-info
    takes, skipping whatever text comes before it."""
    start = len(head)
    while start > 0 and (head[start - 1].isalnum() or head[start - 1] in "_ "):
        start -= 1
    return head[start:].strip()
