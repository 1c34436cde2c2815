"""Pictures of the latents while they form (cheap 4x3 factors, a tiny TAESD decode, or a full VAE decode) and PNG
encoding."""

import base64
import functools
import io

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

# auto: a TAESD decode where a decoder that fits the model is present (engine/files/taesd.py), else fast; taesd: one
# always (refused where none fits); fast: the 4x3 mapping below; full: a VAE decode, costlier than a step.
PREVIEW_MODES = ("auto", "taesd", "fast", "full")


def predicted_clean(scheduler, output) -> torch.Tensor | None:
    """The scheduler's prediction of the finished latents at this step, which it computes anyway.

    Most samplers return it beside the next latents; DPM-Solver++ keeps it as its last model output.
    A preview of it already shows the picture, where the current latents still show mostly noise.
    """
    if len(output) > 1:
        return output[1]
    if getattr(scheduler.config, "algorithm_type", None) in ("dpmsolver++", "sde-dpmsolver++"):
        return scheduler.model_outputs[-1]
    return None


def keep_predictions(scheduler):
    """Makes `scheduler.step` keep each step's predicted clean latents in `scheduler.predicted`."""
    step = scheduler.step

    # wraps() keeps step's signature, which the pipeline inspects to decide whether to pass the
    # generator: without it the ancestral samplers would draw unseeded noise.
    @functools.wraps(step)
    def step_and_keep(*args, **kwargs):
        output = step(*args, **kwargs)
        scheduler.predicted = predicted_clean(scheduler, output)
        return output

    scheduler.step = step_and_keep
    scheduler.predicted = None
    return scheduler


def vae_preview(vae, latents: torch.Tensor, scaled: bool = True) -> Image.Image:
    """A full decode, as the pipeline does for the final picture: the real look, at the cost of a step or more.
    `scaled`: the latents are in SD's scaled space (the flow families unscale their own first)."""
    latents = latents.to(vae.dtype) / vae.config.scaling_factor if scaled else latents.to(vae.dtype)
    decoded = vae.decode(latents).sample[0]
    pixels = ((decoded.float() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(pixels.cpu().numpy())


def taesd_preview(decoder, latents: torch.Tensor) -> Image.Image:
    """A TAESD decoder's picture of the latents as the sampler sees them (TAESD's scale factor is 1), at full size."""
    decoded = decoder(latents.to(device=next(decoder.parameters()).device, dtype=torch.float32))[0]
    pixels = decoded.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(pixels.cpu().numpy())


def latents_to_preview(latents: torch.Tensor, latent_rgb: tuple, size: tuple, bias=(0.0, 0.0, 0.0)) -> Image.Image:
    factors = torch.tensor(latent_rgb, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float(), factors) + torch.tensor(bias, device=latents.device)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)


def png_bytes(image: Image.Image, parameters: str | None = None, compress_level: int = 6) -> bytes:
    """A PNG, with the generation settings in a `parameters` text chunk when given."""
    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def png_base64(image: Image.Image, parameters: str | None = None, compress_level: int = 6) -> str:
    return base64.b64encode(png_bytes(image, parameters, compress_level)).decode("ascii")
