"""AUTOMATIC1111's hires fix (txt2img with enable_hr), as /generate's hires_* fields: their checks, the size the
second pass draws (A1111's calculate_target_resolution), the steps it runs (A1111's setup_img2img_steps) and the
upscale between the two passes. The two-pass recipe itself is engine/pipeline.py's generate_hires."""

import torch
from PIL import Image

from engine import fields
from engine.errors import ImagineError, named
from engine.settings import MIN_SIZE

# A1111's latent_upscale_modes: the first pass's latents interpolated by torch, no decode between the passes.
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# A1111's picture upscalers without a model: the first pass is decoded, resized and encoded again. "None" is a plain
# Lanczos resize to the size; the others resize by the scale with their filter, then Lanczos onto the size.
PICTURE_UPSCALERS = {"None": None, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
UPSCALERS = (*LATENT_UPSCALERS, *PICTURE_UPSCALERS)
DEFAULT_UPSCALER = "Latent"  # A1111's latent_upscale_default_mode
HIRES_STRENGTH = 0.7  # A1111's UI default for the second pass's denoising strength
# The key of a conditioning (engine/prompts.py's prompt_embeddings) under which the second pass's own encoded prompts
# ride along with the first pass's, where it has its own.
SECOND_PASS = "second_pass"
MAX_HIRES_STRENGTH = 0.999  # A1111 caps the strength here: the second pass always starts from the upscaled picture


def hires_fields(body: dict, max_size: int, max_steps: int) -> dict:
    """The hires_* fields of a /generate body, checked: hires_scale (or hires_width/hires_height) turns it on."""
    scale = fields.number(body, "hires_scale", None, 0.0, float(max_size))
    if scale is not None and scale <= 0:
        raise ImagineError(f"{named('hires_scale')} must be more than 0, not {scale}", field="hires_scale")
    strength = fields.number(body, "hires_strength", HIRES_STRENGTH, 0.0, 1.0)
    if strength == 0:
        message = f"{named('hires_strength')} must be more than 0: at 0 the second pass has no step to run"
        raise ImagineError(message, field="hires_strength")
    # Another name is an upscaler model's, which the engine finds (Upscalers.find) before the request queues.
    upscaler = fields.text(body, "hires_upscaler", DEFAULT_UPSCALER, fields.MAX_NAME_CHARS)
    return {
        "hires_scale": scale,
        "hires_width": fields.integer(body, "hires_width", 0, 0, max_size),
        "hires_height": fields.integer(body, "hires_height", 0, 0, max_size),
        "hires_upscaler": upscaler,
        "hires_steps": fields.integer(body, "hires_steps", 0, 0, max_steps),
        "hires_strength": strength,
    }


def wants_hires(req) -> bool:
    return req.hires_scale is not None or bool(req.hires_width or req.hires_height)


def hires_field(req) -> str:
    """The field that turned the hires fix on, for its errors: hires_scale, or hires_width with a size to draw."""
    return "hires_width" if req.hires_width or req.hires_height else "hires_scale"


def upscale_target(req) -> tuple:
    """(width, height, latent columns, latent rows to crop) as A1111 upscales to: by the scale, or to hires_width x
    hires_height, a 0 keeping the aspect ratio; both given, the picture is scaled to cover them and cropped to them."""
    width, height = req.width, req.height
    resize_x, resize_y = req.hires_width, req.hires_height
    if not resize_x and not resize_y:
        scale = 2.0 if req.hires_scale is None else req.hires_scale
        return int(width * scale), int(height * scale), 0, 0
    if not resize_y:
        return resize_x, resize_x * height // width, 0, 0
    if not resize_x:
        return resize_y * width // height, resize_y, 0, 0
    if width / height < resize_x / resize_y:
        to_x, to_y = resize_x, resize_x * height // width
    else:
        to_x, to_y = resize_y * width // height, resize_y
    return to_x, to_y, (to_x - resize_x) // 8, (to_y - resize_y) // 8


def hires_size(req) -> tuple:
    """The size the second pass draws: the target's latents (a picture's size // 8), less what is cropped."""
    to_x, to_y, crop_x, crop_y = upscale_target(req)
    return (to_x // 8 - crop_x) * 8, (to_y // 8 - crop_y) * 8


def check_hires(req, max_size: int) -> None:
    """A hires fix whose second pass would draw a picture beyond `max_size` (or below MIN_SIZE) is refused, naming the
    size it would make; so is one on an input picture (img2img has no hires fix in A1111)."""
    field = hires_field(req)
    if req.img is not None:
        raise ImagineError(f"{named(field)} is txt2img's hires fix; leave it out with {named('img')}", field=field)
    width, height = hires_size(req)
    if not (MIN_SIZE <= width <= max_size and MIN_SIZE <= height <= max_size):
        asked = f"{named(field)} {req.hires_scale if field == 'hires_scale' else req.hires_width}"
        if field == "hires_width":
            asked += f" with {named('hires_height')} {req.hires_height}"
        message = (
            f"{asked} makes {width}x{height} from {req.width}x{req.height}; each side must be from {MIN_SIZE} to "
            f"{max_size} (the server's --max-size)"
        )
        raise ImagineError(message, field=field)


def second_pass_steps(req) -> tuple:
    """(steps of the schedule, steps run): A1111 runs hires_steps (0: the first pass's) of a schedule lengthened by
    1 / strength, starting where its noise level matches the strength."""
    steps = req.hires_steps or req.num_steps
    return int(steps / min(req.hires_strength, MAX_HIRES_STRENGTH)), steps


def second_pass_prompts(req) -> tuple:
    """(prompt, negative prompt) the second pass draws with: its own where given, else the first pass's."""
    prompt = req.prompt if req.hires_prompt is None else req.hires_prompt
    return prompt, req.neg if req.hires_neg is None else req.hires_neg


def upscaled(pictures, req, upscale=None):
    """The first pass's result upscaled for the second: latents (shape N, C, h, w) interpolated by a latent
    upscaler, or pictures (PIL, decoded) resized by a picture upscaler or made larger by an upscaler model
    (`upscale(picture, name, scale)`, the engine's Upscalers.upscale), either cropped to the hires size."""
    to_x, to_y, crop_x, crop_y = upscale_target(req)
    if req.hires_upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[req.hires_upscaler]
        latents = torch.nn.functional.interpolate(
            pictures.float(), size=(to_y // 8, to_x // 8), mode=mode, antialias=antialias
        ).to(pictures.dtype)
        return latents[:, :, crop_y // 2 : to_y // 8 - (crop_y + 1) // 2, crop_x // 2 : to_x // 8 - (crop_x + 1) // 2]
    size = (to_x // 8 * 8, to_y // 8 * 8)
    box = (crop_x // 2 * 8, crop_y // 2 * 8, size[0] - (crop_x + 1) // 2 * 8, size[1] - (crop_y + 1) // 2 * 8)
    return [picture_upscaled(picture, req.hires_upscaler, size, upscale).crop(box) for picture in pictures]


def picture_upscaled(picture: Image.Image, upscaler: str, size: tuple, upscale=None) -> Image.Image:
    """A1111's resize_image with an upscaler: a model's (by `upscale`) or a filter by the scale, then Lanczos onto
    `size` (the upscaler's own rounding to a multiple of 8 first, as A1111's Upscaler.upscale does)."""
    scale = max(size[0] / picture.width, size[1] / picture.height)
    if upscaler not in PICTURE_UPSCALERS:
        picture = upscale(picture, upscaler, scale)
    elif PICTURE_UPSCALERS[upscaler] is not None and scale > 1:
        upscaler_size = (int(picture.width * scale) // 8 * 8, int(picture.height * scale) // 8 * 8)
        picture = picture.resize((int(picture.width * scale), int(picture.height * scale)), PICTURE_UPSCALERS[upscaler])
        if picture.size != upscaler_size:
            picture = picture.resize(upscaler_size, Image.Resampling.LANCZOS)
    return picture if picture.size == size else picture.resize(size, Image.Resampling.LANCZOS)
