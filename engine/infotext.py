"""AUTOMATIC1111's generation data ("infotext": the PNG `parameters` text civitai shows under a picture): read into
/generate's fields, and written for every picture: the prompt, "Negative prompt: ...", then one line of `Key: value`
pairs."""

import json
import re
from typing import TYPE_CHECKING

from engine.errors import ImagineError
from engine.families import Family
from engine.samplers import sampler_label, schedule_label, schedules_for, split_sampler

if TYPE_CHECKING:  # engine.request reads pasted data with this module
    from engine.request import GenerationRequest

# One `Key: value` item of the settings line; a value holding commas or colons is quoted as JSON (A1111's way).
SETTING = re.compile(r'\s*([\w][\w \-/+().]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
RNG_NAMES = {"cpu": "cpu", "gpu": "gpu", "nv": "nv"}


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
        raise ImagineError(f"parameters: Size must be WIDTHxHEIGHT, not {value!r}", field="parameters")
    return {"width": int(match[1]), "height": int(match[2])}


def rng(key: str, value: str) -> str:
    if value.lower() not in RNG_NAMES:
        raise ImagineError(f"parameters: RNG must be CPU, GPU or NV, not {value!r}", field="parameters")
    return RNG_NAMES[value.lower()]


# A1111's key -> (our field, how its text becomes the value); "Size" sets two fields.
FIELDS = {
    "Steps": ("num_steps", integer),
    "Sampler": ("sampler", lambda key, value: value),
    "Schedule type": ("schedule", lambda key, value: value),
    "CFG scale": ("guidance", number),
    "Distilled CFG Scale": ("distilled_guidance", number),  # Forge's, for FLUX.1-dev: see GenerationRequest
    "Seed": ("seed", integer),
    "Size": (None, size),
    "Clip skip": ("clip_skip", integer),
    "Model": ("model", lambda key, value: value),
    "RNG": ("rng", rng),
    "Denoising strength": ("strength", number),
    "Mask blur": ("mask_blur", integer),
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
    pairs, position = {}, 0
    while position < len(line):
        match = SETTING.match(line, position)
        if match is None or match.end() == position:
            rest = line[position:].strip()[:60]
            message = f"parameters: the settings line has text that is no 'Key: value': {rest!r}"
            raise ImagineError(message, field="parameters")
        value = match[2].strip()
        pairs[match[1].strip()] = json.loads(value) if value.startswith('"') else value
        position = match.end()
    return pairs


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
    return fields | older_schedule(fields), ignored


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
    }
    if req.img is not None:
        settings["Denoising strength"] = req.strength
    if req.mask is not None:
        settings["Mask blur"] = req.mask_blur
        if req.inpaint_area == "masked":
            settings["Inpaint area"] = "Only masked"
            settings["Masked area padding"] = req.inpaint_padding
    if req.clip_skip != 1:
        settings["Clip skip"] = req.clip_skip
    if req.rng != "gpu":  # A1111 names its RNG only where it is not its default, the GPU's
        settings["RNG"] = req.rng.upper()
    if lora_hashes:  # quoted as JSON, as A1111 writes a value holding commas or colons
        hashes = ", ".join(f"{name}: {short}" for name, short in lora_hashes.items())
        settings["Lora hashes"] = json.dumps(hashes, ensure_ascii=False)
    if cut is not None:
        settings["Steps"] = cut[0]
        settings["Interrupted"] = f"after step {cut[0]} of {cut[1]}"
    return "\n".join([*lines, ", ".join(f"{key}: {value}" for key, value in settings.items())])
