"""A generation request: every field checked before any work, errors naming the field and the bad value;
the pictures it carries decoded once; the settings a finished picture records."""

import dataclasses
import json
import math
import secrets

from PIL import Image

from engine import fields
from engine.errors import ImagineError, named
from engine.fields import MAX_NAME_CHARS
from engine.files.families import Family
from engine.flow import flow_notices
from engine.hires import DEFAULT_UPSCALER, HIRES_STRENGTH, check_hires, hires_field, hires_fields, wants_hires
from engine.infotext import with_infotext
from engine.loras import MAX_LORA_WEIGHT, MAX_LORAS_KEPT, lora_tags
from engine.noise import MAX_SEED, RNG_SOURCES
from engine.previews import PREVIEW_MODES
from engine.prompts import check_chunk_count, parse_prompt_attention
from engine.samplers import (
    DEFAULT_SAMPLER,
    PREDICTIONS,
    SAMPLER_NAMES,
    checked_schedule,
    split_sampler,
)
from engine.schedules import AUTOMATIC
from engine.settings import MAX_BATCH, MAX_SIZE, MIN_SIZE

MAX_STEPS = 150


MAX_GUIDANCE = 30.0


RANDOM_SEEDS = 2**32  # a random seed is drawn below this, as A1111 draws them; any 64-bit seed is accepted


SEED_RESIZE_MIN = 16  # the smallest "Resize seed from" width or height: 2 latent pixels


MAX_CLIP_SKIP = 12  # AUTOMATIC1111's limit; a model's own text encoder may have fewer layers


# A prompt is tokenised and stored in the PNG: 16k characters is some 200 CLIP chunks of 75 tokens,
# far beyond any prompt people write, and bounds the work an unbounded one would cost.
MAX_PROMPT_CHARS = 16_000


@dataclasses.dataclass
class GenerationRequest:
    prompt: str
    model: str | None = None
    width: int | None = None  # None: the model family's default size, known once the model is loaded
    height: int | None = None
    # None: the model family's own (engine/files/families.py), filled in by for_family once the model is known.
    num_steps: int | None = None
    guidance: float | None = None
    # Forge's distilled_cfg_scale (its "Distilled CFG Scale"), which its clients send beside a cfg_scale of 1: the
    # guidance of a family whose guidance is distilled (FLUX.1-dev), ignored by the others, as Forge does.
    distilled_guidance: float | None = None
    sampler: str | None = None
    schedule: str = AUTOMATIC  # a schedule type (engine/schedules.py); automatic: the sampler's own, as in A1111
    rng: str = "cpu"  # the noise source: torch's CPU numbers, or NVIDIA's ("gpu", "nv") computed on any device
    seed: int | None = None
    # A1111's variation seeds (engine.noise.Variation): picture k blends the noise of variation_seed + k into its
    # seed's, variation_strength of the way; a batch then keeps one seed. None: a random one, where strength is set.
    variation_seed: int | None = None
    variation_strength: float = 0.0
    seed_resize_from_width: int | None = None  # A1111's "Resize seed from": the noises drawn at this size first
    seed_resize_from_height: int | None = None
    tiling: bool = False  # a seamless picture: the UNet's and VAE's convolutions wrap around its edges
    neg: str = ""
    img: Image.Image | None = None
    strength: float = 0.8
    stream: int = 0
    prediction: str | None = None  # None: what the model's config says
    preview: str = "auto"
    mask: Image.Image | None = None  # L, the size of img: white repaints, black keeps
    mask_blur: int = 4
    inpaint_area: str = "whole"
    inpaint_padding: int = 32
    n: int = 1  # pictures, with seeds seed, seed+1, ...
    # A1111's hires fix (engine/hires.py): a hires_scale, or a hires_width or hires_height, turns it on.
    hires_scale: float | None = None
    hires_width: int = 0  # 0: from the other side and the aspect ratio (both 0: by hires_scale)
    hires_height: int = 0
    hires_upscaler: str = DEFAULT_UPSCALER
    hires_steps: int = 0  # 0: the first pass's
    hires_strength: float = HIRES_STRENGTH
    hires_sampler: str | None = None  # None: the first pass's sampler and schedule
    hires_schedule: str = AUTOMATIC
    hires_prompt: str | None = None  # None: the first pass's prompt, negative prompt and guidance
    hires_neg: str | None = None
    hires_guidance: float | None = None
    clip_skip: int = 1  # 1: the text encoder's last layer; 2: the one before, as AUTOMATIC1111 counts
    loras: list = dataclasses.field(default_factory=list)  # (name, weight): the field's, then the prompt's tags
    parameters: str | None = None  # pasted A1111 generation data, which filled the fields the body left out
    parameters_ignored: list = dataclasses.field(default_factory=list)  # its keys that set nothing here
    notices: list = dataclasses.field(default_factory=list)  # what the answer says of fields the model does without
    # The requests this one draws together in one call (engine/batching.py), each with its own prompts, seeds and n,
    # which add up to this one's n; empty: it draws its own.
    batch: tuple = ()


INPAINT_AREAS = ("whole", "masked")  # A1111's "Whole picture" and "Only masked"


MASK_STRENGTH = 0.75  # A1111's default denoising strength for inpainting


MAX_MASK_BLUR = 64


MAX_INPAINT_PADDING = 256


REQUEST_FIELDS = {f.name for f in dataclasses.fields(GenerationRequest)} - {"parameters_ignored", "notices", "batch"}


# Other names for fields, as OpenAI's extra_body and AUTOMATIC1111 call them; the fields' own names stay the
# documented ones.
FIELD_ALIASES = {"negative_prompt": "neg", "hires_negative_prompt": "hires_neg", "steps": "num_steps"}


def parse_request(
    body: dict, max_size: int = MAX_SIZE, max_batch: int = MAX_BATCH, rng: str = "cpu"
) -> GenerationRequest:
    """Checks every field of a /generate body and returns the request, or raises naming the bad field: the texts
    first (cheap to check), then the pictures (costly to decode), then the numbers and names; a prompt's weights
    last, so that a weight that is no number is refused now, not after the queue."""
    body = without_aliases(body)
    ignored = []
    if body.get("parameters") is not None:
        body, ignored = with_infotext(body)
    check_field_names(body)
    defaults = GenerationRequest(prompt="")
    prompt = fields.text(body, "prompt", "", MAX_PROMPT_CHARS)
    neg = fields.text(body, "neg", defaults.neg, MAX_PROMPT_CHARS)
    parsed = GenerationRequest(
        prompt=prompt,
        neg=neg,
        **picture_fields(body, max_size),
        **drawing_fields(body, rng, max_batch, max_size),
        **hires_fields(body, max_size, MAX_STEPS),
        **hires_sampler(body),
        **hires_prompts(body),
        model=fields.text(body, "model", None, MAX_NAME_CHARS),
        stream=fields.integer(body, "stream", 0, 0, MAX_STEPS),
        preview=one_of(body, "preview", defaults.preview, PREVIEW_MODES),
        loras=checked_loras(lora_field(body) + lora_tags(prompt)),
        parameters=body.get("parameters"),
        parameters_ignored=ignored,
    )
    parse_prompt_attention(parsed.prompt)
    parse_prompt_attention(parsed.neg, "neg")
    for field in ("hires_prompt", "hires_neg"):
        if getattr(parsed, field) is not None:
            parse_prompt_attention(getattr(parsed, field), field)
    if parsed.img is not None and parsed.num_steps is not None:
        check_steps_left(parsed)
    if wants_hires(parsed) and parsed.width is not None and parsed.height is not None:
        check_hires(parsed, max_size)
    return parsed


def check_field_names(body: dict) -> None:
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        raise ImagineError(f"unknown field {unknown[0]!r}; the fields are: {', '.join(sorted(REQUEST_FIELDS))}")
    if body.get("prompt") is None:
        raise ImagineError(f"{named('prompt')} is required", field="prompt")
    if body.get("model") == "":
        message = f"{named('model')} must name a model, not be empty; leave it out for the default"
        raise ImagineError(message, field="model")


def hires_prompts(body: dict) -> dict:
    """The hires fix's second-pass prompt, negative prompt and guidance, where given: as `prompt`, `neg` and
    `guidance` are read. Its prompt's <lora:...> tags load nothing: the first pass's LoRAs draw both passes."""
    return {
        "hires_prompt": fields.text(body, "hires_prompt", None, MAX_PROMPT_CHARS),
        "hires_neg": fields.text(body, "hires_neg", None, MAX_PROMPT_CHARS),
        "hires_guidance": fields.number(body, "hires_guidance", None, 0.0, MAX_GUIDANCE),
    }


def picture_fields(body: dict, max_size: int) -> dict:
    """The input picture, its mask and the size drawn. img2img keeps the input's size unless asked otherwise (rounded
    down to a multiple of 8); txt2img leaves a size it is not given to the model's family (512, 768 or 1024)."""
    img = None if body.get("img") is None else fields.picture(body, "img", "RGB")
    default_width, default_height = (img.width // 8 * 8, img.height // 8 * 8) if img else (None, None)
    width = fields.size(body, "width", default_width, max_size)
    height = fields.size(body, "height", default_height, max_size)
    # Sizes given in the body were checked above; one taken from img may still be out of range.
    if img is not None and not (MIN_SIZE <= width <= max_size and MIN_SIZE <= height <= max_size):
        message = f"{named('img')} is {img.width}x{img.height}; give width and height from {MIN_SIZE} to {max_size}"
        raise ImagineError(message, field="img")
    mask = parse_mask(body, img)
    defaults = GenerationRequest(prompt="")
    return {
        "img": img,
        "width": width,
        "height": height,
        "mask": mask,
        "strength": fields.number(body, "strength", MASK_STRENGTH if mask else defaults.strength, 0.0, 1.0),
        "mask_blur": fields.integer(body, "mask_blur", defaults.mask_blur, 0, MAX_MASK_BLUR),
        "inpaint_area": one_of(body, "inpaint_area", defaults.inpaint_area, INPAINT_AREAS),
        "inpaint_padding": fields.integer(body, "inpaint_padding", defaults.inpaint_padding, 0, MAX_INPAINT_PADDING),
    }


def drawing_fields(body: dict, rng: str, max_batch: int, max_size: int) -> dict:
    """How the pictures are drawn: steps, guidance, sampler and schedule, noise, seed and count."""
    defaults = GenerationRequest(prompt="")
    sampler, schedule = sampler_and_schedule(body)
    prediction = fields.text(body, "prediction", None)
    if prediction is not None and prediction not in PREDICTIONS:
        raise ImagineError(f"{named('prediction')} must be 'epsilon' or 'v', not {prediction!r}", field="prediction")
    n = fields.integer(body, "n", defaults.n, 1, max_batch)
    return {
        "num_steps": fields.integer(body, "num_steps", None, 1, MAX_STEPS),
        "guidance": fields.number(body, "guidance", None, 0.0, MAX_GUIDANCE),
        "distilled_guidance": fields.number(body, "distilled_guidance", None, 0.0, MAX_GUIDANCE),
        "sampler": sampler,
        "schedule": schedule,
        "prediction": prediction,
        "rng": rng_source(body, rng),
        **seed_fields(body, n, max_size),
        "n": n,
        "clip_skip": fields.integer(body, "clip_skip", defaults.clip_skip, 1, MAX_CLIP_SKIP),
        "tiling": fields.boolean(body, "tiling", defaults.tiling),
    }


def one_of(body: dict, field: str, default: str, choices: tuple) -> str:
    value = fields.text(body, field, default)
    if value not in choices:
        raise ImagineError(f"{named(field)} must be one of: {', '.join(choices)}, not {value!r}", field=field)
    return value


def seed_fields(body: dict, n: int, max_size: int) -> dict:
    """The seed, the variation seed and its strength, and the size the seed's noise is drawn at."""
    strength = fields.number(body, "variation_strength", 0.0, 0.0, 1.0)
    # Down to 2 latent pixels, below A1111's picture sizes: slerp's angles run down a column, which one row would
    # make 0 or 180 degrees, dividing by a sine of 0 into a noise of NaNs.
    width = fields.size(body, "seed_resize_from_width", None, max_size, SEED_RESIZE_MIN)
    height = fields.size(body, "seed_resize_from_height", None, max_size, SEED_RESIZE_MIN)
    if (width is None) != (height is None):
        given, missing = ("width", "height") if height is None else ("height", "width")
        message = f"{named('seed_resize_from_' + given)} needs {named('seed_resize_from_' + missing)} beside it"
        raise ImagineError(message, field=f"seed_resize_from_{missing}")
    return {
        "seed": seed(body, "seed", 1 if strength else n),  # with variation seeds, a batch keeps its seed
        "variation_seed": seed(body, "variation_seed", n if strength else 1),
        "variation_strength": strength,
        "seed_resize_from_width": width,
        "seed_resize_from_height": height,
    }


def seed(body: dict, field: str, n: int) -> int | None:
    """A seed, or None for a random one: left out, null, or -1 as AUTOMATIC1111's users send it. Any seed torch
    takes (64 bits) is accepted, as A1111 accepts it; a batch's seeds seed, seed+1, ... must all be seeds too."""
    if body.get(field) == -1 and isinstance(body[field], int):
        return None
    value = fields.integer(body, field, None, 0, MAX_SEED)
    if value is not None and value + n - 1 > MAX_SEED:
        raise ImagineError(
            f"{named(field)} {value} with {named('n')} {n} needs the seeds up to {value + n - 1}, beyond {MAX_SEED}; "
            f"give a seed at most {MAX_SEED - n + 1}",
            field=field,
        )
    return value


def with_seeds(req: GenerationRequest) -> GenerationRequest:
    """The request with the seeds it leaves to chance drawn, as the engine draws them when it queues a request: a job
    kept across restarts is drawn again with the same ones."""
    if req.seed is None:
        req = dataclasses.replace(req, seed=secrets.randbelow(RANDOM_SEEDS))
    if req.variation_strength and req.variation_seed is None:
        req = dataclasses.replace(req, variation_seed=secrets.randbelow(RANDOM_SEEDS))
    return req


def picture_seeds(req: GenerationRequest) -> list:
    """(seed, variation seed) of each picture of a filled-in request, as A1111 numbers them: seed, seed+1, ...; with
    variation seeds, the seed alone and variation_seed, variation_seed+1, ...; a batch's, its requests' in turn."""
    if req.batch:
        return [each for member in req.batch for each in picture_seeds(member)]
    if req.variation_strength:
        return [(req.seed, req.variation_seed + index) for index in range(req.n)]
    return [(req.seed + index, req.variation_seed) for index in range(req.n)]


def sampler_and_schedule(body: dict, prefix: str = "") -> tuple:
    """The sampler (None: the family's own) and schedule: `sampler` may name a schedule too, as A1111's "DPM++ 2M
    Karras" does, which must then agree with a `schedule` field given beside it. `prefix`: "hires_" for the hires
    fix's second pass."""
    sampler_field, schedule_field = f"{prefix}sampler", f"{prefix}schedule"
    text = fields.text(body, sampler_field, None)
    if text is None:  # the family's sampler, known once the model is: for_family checks the schedule then
        schedule = fields.text(body, schedule_field, None)
        return None, AUTOMATIC if schedule is None else checked_schedule(DEFAULT_SAMPLER, schedule, schedule_field)
    sampler, in_name = split_sampler(text)
    if sampler is None:
        message = f"{named(sampler_field)} {text!r} is unknown; choose one of: {', '.join(SAMPLER_NAMES)}"
        raise ImagineError(message, field=sampler_field)
    schedule = checked_schedule(sampler, fields.text(body, schedule_field, None), schedule_field)
    if in_name is not None:
        if schedule not in (AUTOMATIC, in_name):
            given = f"{named(schedule_field)} is {schedule!r}"
            message = f"{named(sampler_field)} {text!r} names schedule {in_name!r}, but {given}"
            raise ImagineError(message, field=schedule_field)
        schedule = checked_schedule(sampler, in_name, sampler_field)
    return sampler, schedule


def hires_sampler(body: dict) -> dict:
    """The hires fix's second-pass sampler and schedule, where given: as `sampler` and `schedule` are read."""
    sampler, schedule = sampler_and_schedule(body, "hires_")
    return {"hires_sampler": sampler, "hires_schedule": schedule}


def rng_source(body: dict, default: str) -> str:
    rng = fields.text(body, "rng", default).strip().lower()
    if rng not in RNG_SOURCES:
        raise ImagineError(f"{named('rng')} must be one of: {', '.join(RNG_SOURCES)}, not {body['rng']!r}", field="rng")
    return rng


def parse_mask(body: dict, img: Image.Image | None) -> Image.Image | None:
    """The mask as L at the input picture's size (A1111's convention: white repaints, black keeps, grey is partial)."""
    if body.get("mask") is None:
        return None
    if img is None:
        message = f"{named('mask')} needs {named('img')}: the picture whose white-masked part is repainted"
        raise ImagineError(message, field="mask")
    mask = fields.picture(body, "mask", "L")
    if mask.getbbox() is None:
        message = f"{named('mask')} is all black: nothing to repaint; white marks what to repaint"
        raise ImagineError(message, field="mask")
    return mask if mask.size == img.size else mask.resize(img.size, Image.Resampling.LANCZOS)


def check_steps_left(req: GenerationRequest) -> None:
    """img2img runs int(num_steps * strength) steps: at least one must be left."""
    if int(req.num_steps * req.strength) < 1:
        raise ImagineError(
            f"{named('strength')} {req.strength} with {named('num_steps')} {req.num_steps} leaves no step to run; "
            "raise either",
            field="strength",
        )


def for_family(req: GenerationRequest, family: Family, max_size: int) -> GenerationRequest:
    """The request with what it left out taken from the model's family (size, steps, guidance, sampler) and checked
    against what the family draws with; for the flow-matching families, with notices of what they do without."""
    size = min(family.default_size, max_size) // family.size_multiple * family.size_multiple
    width, height = req.width or size, req.height or size
    if req.img is not None and family.size_multiple > 8:  # a size taken from the picture, rounded as it needs
        width, height = (value // family.size_multiple * family.size_multiple for value in (width, height))
    filled = dataclasses.replace(
        req,
        width=width,
        height=height,
        num_steps=req.num_steps or family.default_steps,
        guidance=family_guidance(req, family),
        sampler=req.sampler or family.default_sampler,
        notices=flow_notices(family, req) if family.flow else [],
    )
    check_for_family(filled, family)
    if not family.flow:
        check_chunk_count(filled.prompt)
        check_chunk_count(filled.neg, "neg")
        for field in ("hires_prompt", "hires_neg"):
            if getattr(filled, field) is not None:
                check_chunk_count(getattr(filled, field), field)
    if filled.img is not None:
        check_steps_left(filled)
    if wants_hires(filled):
        check_hires_for_family(filled, family, max_size)
    return filled


def check_hires_for_family(req: GenerationRequest, family: Family, max_size: int) -> None:
    """The hires fix's second pass is SD's img2img on the first pass's latents: the flow-matching families and the
    inpainting checkpoints, whose pipelines take no latents to start from, are refused it."""
    field = hires_field(req)
    if family.flow or family.unet_channels == 9:
        kind = family.label if family.flow else "inpainting"
        message = f"{named(field)}: the hires fix is not supported for {kind} models; draw at the size you want"
        raise ImagineError(message, field=field)
    check_hires(req, max_size)


def family_guidance(req: GenerationRequest, family: Family) -> float:
    """The guidance a request draws with: a distilled guidance given apart where the family's guidance is distilled,
    else its guidance, else the family's own."""
    if family.guidance == "distilled" and req.distilled_guidance is not None:
        return req.distilled_guidance
    return family.default_guidance if req.guidance is None else req.guidance


def check_for_family(req: GenerationRequest, family: Family) -> None:
    """What one family cannot draw: sizes off its grid, samplers it has no form of, guidance beyond its range."""
    for field in ("width", "height"):
        value = getattr(req, field)
        if value % family.size_multiple:
            multiple = family.size_multiple
            message = f"{named(field)} must be a multiple of {multiple} for {family.label} models, not {value}"
            raise ImagineError(message, field=field)
    if family.samplers and req.sampler not in family.samplers:
        raise ImagineError(
            f"{named('sampler')} {req.sampler!r} has no flow-matching form for {family.label}; choose one of: "
            f"{', '.join(family.samplers)}",
            field="sampler",
        )
    if family.guidance != "none" and req.guidance > family.max_guidance:
        apart = family.guidance == "distilled" and req.distilled_guidance is not None  # family_guidance took it
        field = "distilled_guidance" if apart else "guidance"
        message = f"{named(field)} must be between 0 and {family.max_guidance} for {family.label}, not {req.guidance}"
        raise ImagineError(message, field=field)
    if family.flow:
        check_for_flow(req, family)


def check_for_flow(req: GenerationRequest, family: Family) -> None:
    """What the flow-matching families draw without: tiling, variation seeds, an SD prediction type."""
    if req.tiling:
        message = (
            f"{named('tiling')} needs a UNet: {family.label} draws with a transformer, whose pictures its VAE alone "
            "cannot make seamless"
        )
        raise ImagineError(message, field="tiling")
    if req.variation_strength or req.seed_resize_from_width is not None:
        field = "variation_strength" if req.variation_strength else "seed_resize_from_width"
        message = f"{named(field)} for {family.label} models is not supported yet; it applies to SD models"
        raise ImagineError(message, field=field)
    if req.prediction is not None:
        message = f"{named('prediction')} applies to SD models; {family.label} predicts a flow"
        raise ImagineError(message, field="prediction")


def without_aliases(body: dict) -> dict:
    """The body with each alias (FIELD_ALIASES) under its field's name; both given with different values is an error."""
    for alias, field in FIELD_ALIASES.items():
        if alias not in body:
            continue
        if field in body and body[field] != body[alias]:
            given = f"{json.dumps(body[alias])[:80]} and {json.dumps(body[field])[:80]}"
            message = f"{alias} and {named(field)} are one field; give one of them, not {given}"
            raise ImagineError(message, field=field)
        body = {**{key: value for key, value in body.items() if key != alias}, field: body[alias]}
    return body


def lora_field(body: dict) -> list:
    """The request's `loras` field: [{"name": ..., "weight": ...}], weight optional (1.0)."""
    value = body.get("loras")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(each, dict) for each in value):
        message = f'{named("loras")} must be a list like [{{"name": "add_detail", "weight": 0.8}}]'
        raise ImagineError(message, field="loras")
    loras = []
    for each in value:
        if set(each) - {"name", "weight"} or not isinstance(each.get("name"), str):
            message = f"{named('loras')} entries have a name and a weight, not {json.dumps(each)[:80]}"
            raise ImagineError(message, field="loras")
        loras.append((each["name"], fields.number(each, "weight", 1.0, -math.inf, math.inf)))
    return loras


def checked_loras(loras: list) -> list:
    if len(loras) > MAX_LORAS_KEPT:
        raise ImagineError(f"a request may use at most {MAX_LORAS_KEPT} loras, not {len(loras)}", field="loras")
    for name, weight in loras:
        if len(name) > MAX_NAME_CHARS:
            message = f"lora name is {len(name)} characters long; at most {MAX_NAME_CHARS} are accepted"
            raise ImagineError(message, field="loras")
        if not -MAX_LORA_WEIGHT <= weight <= MAX_LORA_WEIGHT:
            raise ImagineError(f"lora {name!r} weight must be between -5 and 5, not {weight}", field="loras")
    return loras
