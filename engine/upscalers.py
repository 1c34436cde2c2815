"""Upscalers: AUTOMATIC1111's built-in None, Lanczos and Nearest, and the upscaler models (ESRGAN, Real-ESRGAN, SwinIR,
HAT, DAT and the other architectures spandrel knows) in the upscale_models/ (ComfyUI) and ESRGAN/, RealESRGAN/,
SwinIR/, DAT/ (AUTOMATIC1111) sub-folders of the models folders: their listing, the checks of an upscale request, and
Upscalers.upscale(), which makes a picture larger tile by tile."""

import contextlib
import dataclasses
import importlib
import logging
import sys
import types
from pathlib import Path

import numpy
import safetensors.torch
import torch
from PIL import Image

from engine import fields
from engine.errors import Cancelled, ImagineError, named
from engine.files.families import refuse_pickles_that_could_run
from engine.files.folders import model_folders, walk_folders
from engine.logs import escaped
from engine.models import cancel_check
from engine.request import MAX_NAME_CHARS

log = logging.getLogger("imagine")

# The sub-folders upscaler models live in: ComfyUI's, then AUTOMATIC1111's.
UPSCALER_FOLDERS = ("upscale_models", "ESRGAN", "RealESRGAN", "SwinIR", "DAT")

# .pth is a pickle: read only with torch.load(weights_only=True), as every pickle here.
UPSCALER_SUFFIXES = (".safetensors", ".pth")

# AUTOMATIC1111's upscalers that are no model, listed first as it lists them (with its scale, 4); None leaves the
# picture as it is.
BUILT_IN = {"None": None, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
BUILT_IN_SCALE = 4

# A model runs on tiles of TILE x TILE input pixels, each widened by TILE_PAD pixels on every side that the model sees
# and whose output is cut away: within TILE_PAD of a tile's edge a convolution sees the same pixels as on the whole
# picture, so there is no seam, and memory stays that of one tile whatever the picture's size
# (docs/performance.md, Upscaling).
TILE = 256
TILE_PAD = 16

MAX_PASSES = 3  # as A1111: a 2x model runs up to three times to reach 8x
MAX_SCALE = 8.0  # A1111's upscaling_resize slider ends at 8


@dataclasses.dataclass(frozen=True)
class Upscaler:
    """One entry of the listing: a built-in (path None) or a model file; `error` says why a file cannot be used."""

    name: str
    scale: float
    architecture: str | None = None  # spandrel's name for a model's architecture ("ESRGAN", "RealESRGAN Compact"...)
    path: Path | None = None
    relative: str | None = None  # the path below the models folder, as listed (the server's own paths are not told)
    error: str | None = None


@dataclasses.dataclass
class UpscaleRequest:
    """What to upscale and how, checked (check_upscale_request) before it queues.

    Each picture is made `scale` times larger, or, where `size` is given (A1111's resize_mode 1), just large enough to
    cover `size` (width, height), then cut to it in the middle where `crop` says so. Where `upscaler_2` is given, its
    picture is blended over the first with weight `visibility_2` (A1111's extras_upscaler_2_visibility)."""

    images: list
    upscaler: str
    scale: float = 2.0
    size: tuple | None = None
    crop: bool = False
    upscaler_2: str = "None"
    visibility_2: float = 0.0

    def scale_for(self, image: Image.Image) -> float:
        if self.size is None:
            return self.scale
        return max(self.size[0] / image.width, self.size[1] / image.height)


def upscaled_size(image: Image.Image, scale: float) -> tuple:
    """The size `scale` makes of `image`, rounded. (A1111 rounds down to a multiple of 8, which leaves black edges
    where its resize_mode 1 then cuts the picture to a size it no longer covers.)"""
    return round(image.width * scale), round(image.height * scale)


def upscaler_files(models_dir) -> dict:
    """name -> (path, path below its models folder) of every upscaler model file; the name is the path below its
    sub-folder, without the suffix (A1111 names them so), the first folder winning where two hold the same name."""
    found = {}
    for folder in model_folders(models_dir):
        subfolders = [folder / sub for sub in UPSCALER_FOLDERS]
        for name, path in walk_folders(subfolders):
            if path.suffix in UPSCALER_SUFFIXES and path.is_file():
                found.setdefault(name.removesuffix(path.suffix), (path, path.relative_to(folder).as_posix()))
    return found


def read_state_dict(path: Path, relative: str) -> dict:
    """The tensors of an upscaler file: a .safetensors read directly, a .pth only with torch.load(weights_only=True)."""
    if path.suffix == ".pth":
        refuse_pickles_that_could_run(path.with_suffix(".ckpt"))  # the same pickle as a .ckpt
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated download, or a pickle holding more than tensors
        raise ImagineError(f"upscaler file {relative!r} cannot be read ({type(error).__name__})", 422) from error


def imported_spandrel():
    """spandrel, imported on first use: it imports every architecture it knows (a second or two), which only upscaling
    needs. It imports torchvision for two architectures that upscale nothing (LaMa inpainting, RestoreFormer face
    restoration); where torchvision cannot be imported (it is not installed, or PyPI's CUDA build sits beside torch's
    CPU build), a stand-in serves for that import alone and is removed at once, so that no other library takes it for
    torchvision."""
    with contextlib.suppress(ImportError):
        importlib.import_module("torchvision")
        return importlib.import_module("spandrel")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = functional.rotate = functional.normalize = None
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    stand_in = {"torchvision": torchvision, "torchvision.transforms": transforms, functional.__name__: functional}
    sys.modules.update(stand_in)
    try:
        return importlib.import_module("spandrel")
    finally:
        for name in stand_in:
            del sys.modules[name]


def load_model(path: Path, relative: str):
    """The file as spandrel's ImageModelDescriptor, in float32 on the CPU, or an ImagineError naming the file."""
    state_dict = read_state_dict(path, relative)
    try:
        spandrel = imported_spandrel()
    except ImportError as error:
        message = (
            f"upscaler file {relative!r} needs spandrel, which cannot be imported here ({error}); install it with "
            "pip install --no-deps spandrel einops"
        )
        raise ImagineError(message, 422) from error
    try:
        model = spandrel.ModelLoader().load_from_state_dict(state_dict)
    except spandrel.UnsupportedModelError:
        raise ImagineError(f"upscaler file {relative!r} is no model architecture spandrel knows", 422) from None
    except Exception as error:  # tensors of the right names and wrong shapes
        message = f"upscaler file {relative!r} cannot be loaded ({type(error).__name__}: {str(error)[:200]})"
        raise ImagineError(message, 422) from error
    if not isinstance(model, spandrel.ImageModelDescriptor) or (model.input_channels, model.output_channels) != (3, 3):
        message = f"upscaler file {relative!r} is a {model.architecture.name} model, not one that upscales a picture"
        raise ImagineError(message, 422)
    return model.eval()


def describe(name: str, path: Path, relative: str) -> Upscaler:
    """A file's entry in the listing: its architecture and scale, or the error that keeps it from being used."""
    try:
        model = load_model(path, relative)
    except ImagineError as error:
        log.warning("%s", escaped(error.message))
        return Upscaler(name, BUILT_IN_SCALE, path=path, relative=relative, error=error.message)
    return Upscaler(name, model.scale, model.architecture.name, path, relative)


def run_tiled(model, image: Image.Image, device: torch.device, dtype: torch.dtype) -> Image.Image:
    """`image` through `model` (scale s) tile by tile (TILE, TILE_PAD): the picture s times larger."""
    pixels = torch.from_numpy(numpy.asarray(image, dtype=numpy.float32) / 255).permute(2, 0, 1)[None]
    height, width, s = image.height, image.width, model.scale
    # The picture's bytes, filled tile by tile: a float32 copy of a 4096x4096 result would take 192 MiB, and converting
    # it at the end several times that.
    out = torch.empty(height * s, width * s, 3, dtype=torch.uint8)
    for top in range(0, height, TILE):
        for left in range(0, width, TILE):
            stop_if_cancelled()
            rows, cols = (top, min(top + TILE, height)), (left, min(left + TILE, width))
            (y0, y1), (x0, x1) = padded(rows, height), padded(cols, width)
            result = model(pixels[:, :, y0:y1, x0:x1].to(device, dtype)).float().cpu()
            inner = result[0, :, (rows[0] - y0) * s : (rows[1] - y0) * s, (cols[0] - x0) * s : (cols[1] - x0) * s]
            out[rows[0] * s : rows[1] * s, cols[0] * s : cols[1] * s] = (inner.permute(1, 2, 0) * 255).round()
    return Image.fromarray(out.numpy())


def padded(span: tuple, length: int) -> tuple:
    """A tile's rows (or columns) widened by TILE_PAD, stopping at the picture's edges as the whole picture does."""
    return max(span[0] - TILE_PAD, 0), min(span[1] + TILE_PAD, length)


def stop_if_cancelled() -> None:
    cancelled = cancel_check.get()
    if cancelled is not None and cancelled():
        raise Cancelled


def model_dtype(model, dtype: torch.dtype) -> torch.dtype:
    """float16 where the engine runs in it (a GPU) and the architecture supports it (spandrel says which), else
    float32: on a CPU, bfloat16 made a Real-ESRGAN slower, not faster (docs/performance.md, Upscaling)."""
    return dtype if dtype == torch.float16 and model.supports_half else torch.float32


class Upscalers:
    """The listing of the upscalers (each model file described once per version of the file) and the model last used,
    kept loaded for the next picture. upscale() runs on the engine's thread, as a generation does."""

    def __init__(self, models_dir, device: torch.device, dtype: torch.dtype):
        self.models_dir = models_dir
        self.device, self.dtype = device, dtype
        self.described = {}  # (path, mtime, size) -> Upscaler
        self.loaded = None  # (Upscaler, its model on the device)

    def listing(self) -> list:
        """Every upscaler: the built-ins, then the model files by name, a broken one with its error."""
        listing = [Upscaler(name, BUILT_IN_SCALE) for name in BUILT_IN]
        for name, (path, relative) in sorted(upscaler_files(self.models_dir).items(), key=lambda item: item[0].lower()):
            stat = path.stat()
            version = (path, stat.st_mtime_ns, stat.st_size)
            if version not in self.described:
                self.described[version] = describe(name, path, relative)
            listing.append(self.described[version])
        return listing

    def find(self, name: str, field: str = "upscaler") -> Upscaler:
        """The usable upscaler `name`, or a 422 naming `field` and why."""
        found = {upscaler.name: upscaler for upscaler in self.listing()}.get(name)
        if found is None:
            raise ImagineError(f"{named(field)}: no upscaler {name!r}; GET /upscalers lists them", 422, field=field)
        if found.error is not None:
            raise ImagineError(f"{named(field)}: {found.error}", 422, field=field)
        return found

    def upscale(self, image: Image.Image, name: str, scale: float) -> Image.Image:
        """`image` made `scale` times larger by the upscaler `name`, as A1111 does it: a model runs (tiled) until the
        picture is at least that large, at most MAX_PASSES times, and Lanczos resizes it to upscaled_size(); None gives
        the picture back as it is. Call it on the engine's thread (no two models run at once); it raises an
        ImagineError for an unknown or broken upscaler."""
        upscaler = self.find(name)
        if upscaler.name == "None":
            return image
        size = upscaled_size(image, scale)
        if upscaler.path is None:
            return image.resize(size, BUILT_IN[upscaler.name])
        model = self.model(upscaler)
        dtype = model_dtype(model, self.dtype)
        image = image.convert("RGB")
        with torch.inference_mode():
            for _ in range(MAX_PASSES):
                if image.width >= size[0] and image.height >= size[1] and scale != 1:
                    break
                image = run_tiled(model, image, self.device, dtype)
                if model.scale == 1:  # a restoration model: once is all it does
                    break
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)

    def model(self, upscaler: Upscaler):
        """The upscaler's model on the device, loaded once and kept until another is used."""
        if self.loaded is None or self.loaded[0] != upscaler:
            self.loaded = None  # the last one's memory goes before the next one's comes
            model = load_model(upscaler.path, upscaler.relative)
            model.to(self.device, model_dtype(model, self.dtype))
            self.loaded = (upscaler, model)
        return self.loaded[1]

    def upscale_pictures(self, req: UpscaleRequest) -> list:
        """Every picture of a checked request upscaled, blended with its second upscaler's and cut, as it asks."""
        pictures = []
        for image in req.images:
            scale = req.scale_for(image)
            picture = self.upscale(image, req.upscaler, scale).convert("RGB")
            if req.upscaler_2 != "None" and req.visibility_2 > 0:
                second = self.upscale(image, req.upscaler_2, scale).convert("RGB").resize(picture.size)
                picture = Image.blend(picture, second, req.visibility_2)
            if req.size is not None and req.crop:
                picture = cut_to(picture, req.size)
            pictures.append(picture)
        return pictures


def cut_to(image: Image.Image, size: tuple) -> Image.Image:
    """The middle `size` of `image` (A1111's upscaling_crop)."""
    left, top = (image.width - size[0]) // 2, (image.height - size[1]) // 2
    return image.crop((left, top, left + size[0], top + size[1]))


def check_upscale_request(req: UpscaleRequest, upscalers: Upscalers, max_size: int) -> None:
    """Refuses, before any work, an unknown or broken upscaler, a scale out of range, and a picture that would be
    larger than `max_size` (--max-size) on a side, naming the field and the size it would make."""
    upscalers.find(req.upscaler, "upscaler")
    if req.upscaler_2 != "None" and req.visibility_2 > 0:
        upscalers.find(req.upscaler_2, "upscaler_2")
    for index, image in enumerate(req.images):
        scale = req.scale_for(image)
        field = "size" if req.size is not None else "scale"
        if not 1 <= scale <= MAX_SCALE:
            message = f"{named(field)} makes picture {index} {scale:g} times larger; from 1 to {MAX_SCALE:g} can be"
            raise ImagineError(message, 422, field=field)
        width, height = upscaled_size(image, scale)
        if max(width, height) > max_size:
            message = (
                f"{named(field)} makes picture {index} ({image.width}x{image.height}) {width}x{height}, larger than "
                f"the server's --max-size {max_size}"
            )
            raise ImagineError(message, 422, field=field)


# The fields of Imagine's own POST /upscale.
UPSCALE_FIELDS = ("img", "upscaler", "scale", "upscaler_2", "upscaler_2_visibility")


def parse_upscale_request(body: dict) -> UpscaleRequest:
    """An /upscale body: `img` (required), `upscaler` (required), `scale` (2), `upscaler_2` and its
    `upscaler_2_visibility` (0 to 1) blended over the first."""
    unknown = sorted(set(body) - set(UPSCALE_FIELDS))
    if unknown:
        raise ImagineError(f"unknown field {unknown[0]!r}; the fields are: {', '.join(UPSCALE_FIELDS)}")
    for field in ("img", "upscaler"):
        if body.get(field) is None:
            raise ImagineError(f"{named(field)} is required", field=field)
    return UpscaleRequest(
        images=[fields.picture(body, "img", "RGB")],
        upscaler=fields.text(body, "upscaler", None, MAX_NAME_CHARS),
        scale=fields.number(body, "scale", 2.0, 1.0, MAX_SCALE),
        upscaler_2=fields.text(body, "upscaler_2", "None", MAX_NAME_CHARS),
        visibility_2=fields.number(body, "upscaler_2_visibility", 0.0, 0.0, 1.0),
    )
