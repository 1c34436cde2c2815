"""The tiny autoencoders' decoders that previews decode with (madebyollin's TAESD family: `taesd` for SD1 and SD2,
`taesdxl` for SDXL, `taef1` for FLUX.1 and Z-Image, which share FLUX.1's VAE): where they are found, the decoder in
the original layout, and the shared cache that loads each file version once.

They are looked for in `vae_approx/` (ComfyUI's folder) and `VAE-approx/` (AUTOMATIC1111's) of the models folders, as
the files those tools use (`taesd_decoder.safetensors`, or `.pth` read as tensors only, in the original key layout:
`1.weight`, `3.conv.0.weight`, ...) or as a diffusers folder (`taesd/`, AutoencoderTiny's
`diffusion_pytorch_model.safetensors`, whose `decoder.layers.N.` is the original `N+1.`). FLUX.2's taef2 (32 channels,
a pooled group norm in its first blocks) is not supported: its previews stay the fast mapping."""

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine.errors import ImagineError
from engine.files.families import Family, refuse_pickles_that_could_run
from engine.files.tensors import check_tensors, file_version

log = logging.getLogger("imagine")

TAESD_FOLDERS = ("vae_approx", "VAE-approx")
DECODER_CHANNELS = {"taesd": 4, "taesdxl": 4, "taef1": 16}  # the latent channels each decoder reads
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
WIDTH = 64  # every block of the decoder
# The largest file read as a decoder: a decoder is 2.5-5 MB, a diffusers folder's whole autoencoder 10 MB; a file far
# larger is another model's, and is refused before it is read.
MAX_DECODER_BYTES = 64 * 2**20
REFUSALS = {
    "missing": "{name} lacks the decoder's tensor {{name}}: a damaged file, or no TAESD decoder",
    "unexpected": "{name} has a tensor {{name}} that no TAESD decoder has",
    "shape": "{name}'s tensor {{name}} has shape {{shape}}, not the decoder's {{expected}}",
}


def decoder_name(family: Family) -> str | None:
    """The TAESD decoder that reads `family`'s latents, None where none is supported (FLUX.2)."""
    if family.transformer is None:
        return "taesdxl" if family.group == "sdxl" else "taesd"
    return "taef1" if family.transformer in ("flux1", "z-image") else None


def find_decoder(folders: list, name: str) -> Path | None:
    """The first of `name`'s files in the TAESD folders of the models folders: `<name>_decoder.safetensors`,
    `<name>_decoder.pth`, or a diffusers folder `<name>/`."""
    for folder in folders:
        for sub in TAESD_FOLDERS:
            for entry in (f"{name}_decoder.safetensors", f"{name}_decoder.pth", name):
                path = Path(folder, sub, entry)
                if path.is_file() if entry != name else (path / DIFFUSERS_WEIGHTS).is_file():
                    return path
    return None


def is_taesd_decoder(names) -> bool:
    """Whether a file's tensor names are a TAESD decoder's in the original layout: its first convolution, its first
    block and its last convolution (a file fetched from a URL goes to vae_approx/ then)."""
    return {"1.weight", "3.conv.0.weight", "19.weight"} <= set(names)


def shown(path: Path) -> str:
    """The file as messages name it: its TAESD folder and name, never the server's own path."""
    return f"{path.parent.name}/{path.name}"


class Block(nn.Module):
    """The decoder's residual block: three 3x3 convolutions with ReLUs between, added to the input, then a ReLU."""

    def __init__(self):
        super().__init__()
        conv = [nn.Conv2d(WIDTH, WIDTH, 3, padding=1) for _ in range(3)]
        self.conv = nn.Sequential(conv[0], nn.ReLU(), conv[1], nn.ReLU(), conv[2])
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + x)


class Clamp(nn.Module):
    """Softly bounds the latents to (-3, 3), as TAESD was trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def tiny_decoder(latent_channels: int) -> nn.Sequential:
    """TAESD's decoder, laid out as madebyollin's taesd.py lays it out so that the files' names are its own: latents
    (the sampler's, scale factor 1) to pixels in [0, 1] at 8 times their size."""

    def upsample():
        return [nn.Upsample(scale_factor=2), nn.Conv2d(WIDTH, WIDTH, 3, padding=1, bias=False)]

    return nn.Sequential(
        Clamp(), nn.Conv2d(latent_channels, WIDTH, 3, padding=1), nn.ReLU(),
        Block(), Block(), Block(), *upsample(),
        Block(), Block(), Block(), *upsample(),
        Block(), Block(), Block(), *upsample(),
        Block(), nn.Conv2d(WIDTH, 3, 3, padding=1),
    )  # fmt: skip


def read_decoder_tensors(path: Path) -> dict:
    """The decoder's tensors by their original names: a .safetensors file's, a .pth's read as tensors only (a pickle
    that would run code is refused), or a diffusers folder's decoder renamed; 422 naming the file if it cannot be
    read."""
    file = path / DIFFUSERS_WEIGHTS if path.is_dir() else path
    if file.stat().st_size > MAX_DECODER_BYTES:
        raise ImagineError(f"{shown(path)} is {file.stat().st_size >> 20} MB: far too large for a TAESD decoder", 422)
    if path.suffix == ".pth":
        refuse_pickles_that_could_run(path.with_suffix(".ckpt"))  # the same pickle, the same guard
    try:
        if path.suffix == ".pth":
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        else:
            with safe_open(str(file), framework="pt") as opened:
                tensors = {name: opened.get_tensor(name) for name in opened.keys()}  # noqa: SIM118 (not iterable)
    except Exception as error:  # a pickle holding more than tensors, a truncated download
        raise ImagineError(f"{shown(path)} cannot be read as tensors ({type(error).__name__})", 422) from None
    if not isinstance(tensors, dict) or not all(isinstance(each, torch.Tensor) for each in tensors.values()):
        raise ImagineError(f"{shown(path)} holds no tensors by name: no TAESD decoder", 422)
    if path.is_dir():
        tensors = {original_name(name): tensor for name, tensor in tensors.items() if name.startswith("decoder.")}
    return tensors


def original_name(name: str) -> str:
    """`decoder.layers.3.conv.0.weight` (AutoencoderTiny's) -> `4.conv.0.weight`: diffusers leaves out the clamp
    at the front of the original Sequential, which holds no tensor."""
    index, _, rest = name.removeprefix("decoder.layers.").partition(".")
    return f"{int(index) + 1}.{rest}" if index.isdigit() else name


def load_decoder(path: Path, name: str, device: torch.device) -> nn.Sequential:
    """The decoder `name` from `path`, loaded strictly, in float32 on `device`; 422 naming the file where it holds
    another decoder (a wrong channel count) or a damaged one. Nothing is kept of a file that is refused."""
    tensors = read_decoder_tensors(path)
    conv_in = tensors.get("1.weight")
    if conv_in is None or conv_in.ndim != 4:
        raise ImagineError(f"{shown(path)} has no TAESD decoder's first convolution (1.weight)", 422)
    channels, wanted = conv_in.shape[1], DECODER_CHANNELS[name]
    if channels != wanted:
        raise ImagineError(
            f"{shown(path)} decodes {channels}-channel latents, but {name} reads {wanted}: it is another model's "
            "decoder (taesd and taesdxl read 4 channels, taef1 16)",
            422,
        )
    decoder = tiny_decoder(channels)
    refusals = {kind: text.format(name=shown(path)) for kind, text in REFUSALS.items()}
    check_tensors(tensors, decoder.state_dict(), refusals)
    decoder.load_state_dict(tensors, strict=True)
    return decoder.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


class TinyDecoders:
    """The decoders previews use, each file version loaded once (a file replaced is read again) and shared by every
    model of the families it fits: each is about 5 MB. A file that was refused is remembered as refused until it
    changes, so that its refusal is logged once, not at every request."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loaded = {}  # decoder name -> (file version, decoder or the ImagineError that refused it)
        self.told = set()  # the versions of refused files whose refusal the log has told

    def for_previews(self, folders: list, family: Family, asked: str) -> nn.Sequential | None:
        """The decoder for `family`'s previews where the request's `preview` (`asked`) takes one: "auto" where a
        fitting file is present and loads (a file that does not is logged and the fast mapping used), "taesd" always
        (refused naming the file, or where none is found, naming what to put where); None for the others."""
        if asked not in ("auto", "taesd"):
            return None
        name = decoder_name(family)
        path = None if name is None else find_decoder(folders, name)
        if path is None:
            if asked == "auto":
                return None
            if name is None:
                message = f"preview 'taesd' has no decoder for {family.label} (FLUX.2's taef2 is not supported)"
                raise ImagineError(message + "; use fast or full", field="preview")
            raise ImagineError(
                f"preview 'taesd' needs {name}_decoder.safetensors (or .pth, or a diffusers folder {name}/) in "
                "vae_approx/ of the models folders (imagine --pull fetches it with a model of its family)",
                field="preview",
            )
        version, decoder = self.loaded_decoder(path, name)
        if not isinstance(decoder, ImagineError):
            return decoder
        if asked == "taesd":
            raise ImagineError(decoder.message, decoder.status, field="preview")
        if version not in self.told:
            self.told.add(version)
            log.warning("previews use the fast mapping: %s", decoder.message)
        return None

    def loaded_decoder(self, path: Path, name: str) -> tuple:
        """(the file's version, its decoder or its refusal), loaded now if this version of it was not yet."""
        version = file_version(path / DIFFUSERS_WEIGHTS if path.is_dir() else path)
        kept = self.loaded.get(name)
        if kept is None or kept[0] != version:
            try:
                kept = (version, load_decoder(path, name, self.device))
                log.info("loaded the %s preview decoder from %s", name, shown(path))
            except ImagineError as refusal:
                kept = (version, refusal)
            self.loaded[name] = kept
        return kept
