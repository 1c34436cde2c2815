"""AUTOMATIC1111's Extras tab as its API has it (/sdapi/v1/extra-single-image, /sdapi/v1/extra-batch-images and
/sdapi/v1/upscalers): pure translators from its bodies to the engine's UpscaleRequest and back. Face restoration
(GFPGAN, CodeFormer) is not done: a body that asks for it is upscaled all the same, and html_info names what was
ignored."""

from engine import fields
from engine.errors import ImagineError, named
from engine.request import MAX_NAME_CHARS
from engine.settings import MIN_SIZE, Settings
from engine.upscalers import MAX_SCALE, Upscaler, UpscaleRequest

# The fields of A1111's Extras that Imagine does not act on, and the values that ask for them.
EXTRAS_IGNORED = {
    "gfpgan_visibility": lambda value: bool(value),
    "codeformer_visibility": lambda value: bool(value),
    "upscale_first": lambda value: value is True,  # only changes the order of upscaling and face restoration
}

# The engine's names of the Extras fields -> A1111's, so that an error names the field the client sent.
EXTRAS_FIELD_NAMES = {
    "upscaler": "upscaler_1",
    "scale": "upscaling_resize",
    "size": "upscaling_resize_w",
    "upscaler_2_visibility": "extras_upscaler_2_visibility",
}


def a1111_upscaler(upscaler: Upscaler) -> dict:
    """An upscaler as A1111's /sdapi/v1/upscalers lists it; model_path is the file below the models folder, since the
    server's own paths are not the client's business."""
    return {
        "name": upscaler.name,
        "model_name": upscaler.architecture,
        "model_path": upscaler.relative,
        "model_url": None,
        "scale": upscaler.scale,
    }


def extras_request(body: dict, images: list, settings: Settings) -> tuple:
    """(UpscaleRequest, html_info) of an Extras body whose pictures are `images` (extras_images): resize_mode 0
    upscales by upscaling_resize, 1 to cover upscaling_resize_w x upscaling_resize_h, cut to it where upscaling_crop
    says so (as A1111 does, it does by default)."""
    mode = fields.integer(body, "resize_mode", 0, 0, 1)
    size = None
    if mode == 1:
        sides = ("upscaling_resize_w", "upscaling_resize_h")
        size = tuple(fields.integer(body, side, 512, MIN_SIZE, settings.max_size) for side in sides)
    req = UpscaleRequest(
        images=images,
        upscaler=fields.text(body, "upscaler_1", "None", MAX_NAME_CHARS),
        scale=fields.number(body, "upscaling_resize", 2.0, 1.0, MAX_SCALE),
        size=size,
        crop=body.get("upscaling_crop", True) is True,
        upscaler_2=fields.text(body, "upscaler_2", "None", MAX_NAME_CHARS),
        visibility_2=fields.number(body, "extras_upscaler_2_visibility", 0.0, 0.0, 1.0),
    )
    return req, extras_info(body, req)


def extras_info(body: dict, req: UpscaleRequest) -> str:
    """html_info: the postprocessing parameters, as A1111 writes them, and the fields ignored."""
    if req.size is not None:
        info = f"Postprocess upscale to: {req.size[0]}x{req.size[1]}, Postprocess upscaler: {req.upscaler}"
    else:
        info = f"Postprocess upscale by: {req.scale:g}, Postprocess upscaler: {req.upscaler}"
    if req.upscaler_2 != "None" and req.visibility_2 > 0:
        info += f", Postprocess upscaler 2: {req.upscaler_2}, Postprocess upscaler 2 visibility: {req.visibility_2:g}"
    ignored = [field for field, asks in EXTRAS_IGNORED.items() if asks(body.get(field))]
    return info + (f"; ignored (Imagine does not restore faces): {', '.join(ignored)}" if ignored else "")


def extras_images(body: dict, single: bool, settings: Settings) -> list:
    """The pictures of an Extras body: extra-single-image's `image`, or extra-batch-images' `imageList` of
    {"data": base64, "name": ...}, at most --max-batch of them."""
    if single:
        if body.get("image") is None:
            raise ImagineError(f"{named('image')} is required", field="image")
        return [fields.picture(body, "image", "RGB")]
    listed = body.get("imageList")
    if not isinstance(listed, list) or not 1 <= len(listed) <= settings.max_batch:
        message = f"{named('imageList')} must be a list of 1 to {settings.max_batch} pictures ({{'data': base64}})"
        raise ImagineError(message, field="imageList")
    images = []
    for index, each in enumerate(listed):
        if not isinstance(each, dict) or not isinstance(each.get("data"), str):
            message = f"{named('imageList')}[{index}] must be an object with the picture's base64 as its data"
            raise ImagineError(message, field="imageList")
        images.append(fields.decode_image(each["data"], "imageList", "RGB"))
    return images
