"""Generation: one diffusers pipeline call for a request's pictures, txt2img, img2img or inpainting; two for the
hires fix (txt2img, then img2img on its upscaled result); seamless where the request asks for tiling."""

import contextlib
import dataclasses

import torch
from PIL import Image, ImageFilter

from engine.flow import call_flow, vae_latents
from engine.hires import (
    LATENT_UPSCALERS,
    SECOND_PASS,
    hires_size,
    second_pass_prompts,
    second_pass_steps,
    upscaled,
    wants_hires,
)
from engine.ksampling import KDiffusionScheduler
from engine.models import LoadedModel
from engine.noise import PictureNoise, Variation
from engine.previews import latents_to_preview, taesd_preview, vae_preview
from engine.prompts import prompt_embeddings
from engine.request import GenerationRequest, picture_seeds
from engine.samplers import scheduler_for
from engine.schedules import AUTOMATIC


def generate(
    model: LoadedModel, req: GenerationRequest, on_step=None, conditioning: dict | None = None, upscale=None
) -> list:
    """Runs the diffusers pipeline once for `req` (whose seed, width and height must be set) on the
    encoded prompt `conditioning` (see prompt_embeddings, and flow.flow_conditioning for the flow-matching families;
    None: the request's prompts, no embeddings; a hires fix's second pass's own under SECOND_PASS), and returns its
    `req.n` pictures, drawn together from the seeds seed, seed+1, ...; or, for several requests drawn as one
    (`req.batch`, engine/batching.py), from each one's seeds, with a row of `conditioning` a picture.

    `on_step(step, steps, latents)` is called after each denoising step with the latents a preview
    should show, one per picture: the predicted finished latents where the sampler gives them, else the
    current ones; if it returns True, the remaining steps are skipped and the pictures as far as they got are
    returned. `steps` counts model evaluations, so second-order samplers (heun, dpm2) report about twice
    `num_steps`. `upscale(picture, name, scale)` runs the upscaler models a hires fix may name (Upscalers.upscale).
    """
    with seamless(model, req.tiling):
        return draw(model, req, on_step, conditioning, upscale)


def draw(model: LoadedModel, req: GenerationRequest, on_step, conditioning, upscale) -> list:
    """The pipeline call that draws `req`: inpainting, a flow-matching family's, img2img or txt2img."""
    if req.mask is not None or model.family.unet_channels == 9:
        return inpaint(model, req, on_step, conditioning)
    if model.family.flow:
        return generate_flow(model, req, on_step, conditioning)
    if wants_hires(req):
        return generate_hires(model, req, on_step, conditioning, upscale)
    pipe = model.img2img if req.img is not None else model.txt2img
    size_args = (
        {"image": req.img.resize((req.width, req.height), Image.Resampling.LANCZOS), "strength": req.strength}
        if req.img is not None
        else {"width": req.width, "height": req.height}
    )
    return call_pipeline(model, pipe, req, on_step, conditioning, **size_args)


def call_pipeline(model: LoadedModel, pipe, req: GenerationRequest, on_step, conditioning, **inputs) -> list:
    """One pipeline call for the `req.n` pictures of `req` with the sampler, seeds, encoded prompt and step callback
    set; `inputs` are the picture's."""
    # One seed and noise stream per picture, as A1111's: picture k is the picture that its seed (seed+k, or with
    # variation seeds the seed and variation_seed+k) alone draws. The pipeline is handed each picture's starting noise;
    # the sampler draws its step noise from the same streams.
    seeds, variation_seeds = zip(*picture_seeds(req), strict=True)
    resize_from = (req.seed_resize_from_width, req.seed_resize_from_height)
    variation = Variation(variation_seeds, req.variation_strength, None if resize_from[0] is None else resize_from)
    shape = (pipe.vae.config.latent_channels, req.height // 8, req.width // 8)
    noise = PictureNoise(req.rng, seeds, shape, variation=variation)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]  # for what else the pipeline draws
    one_or_all = (lambda each: each[0]) if req.n == 1 else (lambda each: each)  # diffusers' form for one picture
    per_prompt = 1 if req.batch else req.n  # a batch's conditioning has a row a picture (joined_conditioning)
    pipe.scheduler = scheduler = scheduler_for(model, req.sampler, req.schedule, req.prediction)
    if isinstance(scheduler, KDiffusionScheduler):
        scheduler.use_noise(noise)
    # img2img noises its picture through the scheduler's add_noise (at any strength), inpainting below strength 1.
    if inputs.get("strength", 1.0) < 1.0 or pipe is model.img2img:
        scheduler.starting_noise = noise.next()
    else:
        inputs["latents"] = noise.next().to(pipe.unet.dtype)

    def step_end(pipeline, index, timestep, tensors):
        if on_step is not None:
            latents = tensors["latents"] if scheduler.predicted is None else scheduler.predicted
            if on_step(index + 1, pipeline.num_timesteps, latents):
                pipeline._interrupt = True  # skips the remaining steps; the latents so far are decoded
        return tensors

    with torch.inference_mode():
        if conditioning is None:
            conditioning = prompt_embeddings(pipe, req.prompt, req.neg, req.clip_skip, {})
        return pipe(
            **conditioning,
            num_inference_steps=req.num_steps,
            guidance_scale=req.guidance,
            generator=one_or_all(generators),
            num_images_per_prompt=per_prompt,
            callback_on_step_end=step_end,
            **inputs,
        ).images


def generate_hires(model: LoadedModel, req: GenerationRequest, on_step=None, conditioning=None, upscale=None) -> list:
    """A1111's hires fix (its txt2img sample and sample_hr_pass): txt2img at width x height, the result upscaled
    (engine/hires.py), then img2img on it at the hires size with a noise drawn afresh from the pictures' seeds at that
    size, as A1111 draws it. Progress counts both passes' steps as one run; a stop in the first pass skips the second,
    as A1111's interrupt does, and returns the first pass's pictures."""
    width, height = hires_size(req)
    schedule_steps, steps = second_pass_steps(req)
    own_schedule = req.hires_sampler is not None or req.hires_schedule != AUTOMATIC
    prompt, neg = second_pass_prompts(req)
    second = dataclasses.replace(
        req, width=width, height=height, num_steps=schedule_steps, hires_scale=None, hires_width=0, hires_height=0,
        sampler=req.hires_sampler or req.sampler, schedule=req.hires_schedule if own_schedule else req.schedule,
        prompt=prompt, neg=neg, guidance=req.guidance if req.hires_guidance is None else req.hires_guidance,
    )  # fmt: skip
    # The engine's conditioning carries the second pass's own encoded prompts under SECOND_PASS, where it has them;
    # without a conditioning, each pass encodes its own request's prompts.
    conditioning = conditioning or {}
    first_conditioning = {key: value for key, value in conditioning.items() if key != SECOND_PASS} or None
    second_conditioning = conditioning.get(SECOND_PASS, first_conditioning)
    first_steps = evaluations(model, req, 0)
    total = first_steps + evaluations(model, second, schedule_steps - steps)
    stopped = []

    def first_step(step, _, latents):
        stopped.append(on_step is not None and on_step(step, total, latents))
        return stopped[-1]

    def second_step(step, _, latents):
        return on_step is not None and on_step(first_steps + step, total, latents)

    latent = req.hires_upscaler in LATENT_UPSCALERS
    size = {"width": req.width, "height": req.height, "output_type": "latent" if latent else "pil"}
    first = call_pipeline(model, model.txt2img, req, first_step, first_conditioning, **size)
    if stopped and stopped[-1]:
        with torch.inference_mode():
            return [vae_preview(model.txt2img.vae, each[None]) for each in first] if latent else first
    # The diffusers pipeline runs int(num_steps * strength) steps of its schedule: this strength makes that `steps`.
    strength = min(1.0, (steps + 0.5) / schedule_steps)
    image = upscaled(first, req, upscale)
    return call_pipeline(model, model.img2img, second, second_step, second_conditioning, image=image, strength=strength)


def evaluations(model: LoadedModel, req: GenerationRequest, skipped: int) -> int:
    """The model evaluations a pass of `req` runs when it skips its first `skipped` steps: its pipeline's count."""
    scheduler = scheduler_for(model, req.sampler, req.schedule, req.prediction)
    scheduler.set_timesteps(req.num_steps)
    return len(scheduler.timesteps) - skipped * scheduler.order


@contextlib.contextmanager
def seamless(model: LoadedModel, tiling: bool):
    """While open with `tiling`, every convolution of the UNet and the VAE pads by wrapping round the picture's edges,
    as A1111's Tiling sets them ("circular" padding), so that the picture tiles without a seam; on leaving, whatever
    happened inside, each gets its own padding back, so that the next request of the cached model draws as before."""
    if not tiling:
        yield
        return
    parts = (model.txt2img.unet, model.txt2img.vae)  # the img2img and inpaint pipelines share these modules
    convolutions = [module for part in parts for module in part.modules() if isinstance(module, torch.nn.Conv2d)]
    modes = [convolution.padding_mode for convolution in convolutions]
    for convolution in convolutions:
        convolution.padding_mode = "circular"
    try:
        yield
    finally:
        for convolution, mode in zip(convolutions, modes, strict=True):
            convolution.padding_mode = mode


def inpaint(model: LoadedModel, req: GenerationRequest, on_step=None, conditioning=None) -> list:
    """Repaints the white part of `req.mask` (as AUTOMATIC1111 does), or with an inpainting checkpoint and no mask,
    the whole picture: txt2img from noise, img2img from `req.img`.

    The mask is blurred by `mask_blur` pixels; with `inpaint_area` "masked" only its bounding box plus
    `inpaint_padding` is generated, at the request's size, for full detail on a small part of a big picture.
    The result is pasted back through the blurred mask after decoding, so every pixel outside it is the input's.
    """
    size = (req.width, req.height)

    def paint(image, mask, strength=req.strength):
        image, mask = image.resize(size, Image.Resampling.LANCZOS), mask.resize(size, Image.Resampling.LANCZOS)
        # A copy of the picture for each of the batch: the pipeline encodes one picture with the first picture's
        # generator only, and each copy makes every picture's draw the one its single request makes.
        inputs = {"image": [image] * req.n, "mask_image": [mask] * req.n, "strength": strength}
        call = call_flow if model.family.flow else call_pipeline
        return call(model, model.inpaint, req, on_step, conditioning, width=req.width, height=req.height, **inputs)

    if req.img is None:  # an inpainting checkpoint's txt2img: all repainted, nothing of the (blank) picture kept
        return paint(Image.new("RGB", size, (127, 127, 127)), Image.new("L", size, 255), strength=1.0)
    if req.mask is None:  # an inpainting checkpoint's img2img: the whole picture may change
        return paint(req.img, Image.new("L", req.img.size, 255))
    mask = req.mask.filter(ImageFilter.GaussianBlur(req.mask_blur)) if req.mask_blur else req.mask
    if req.inpaint_area == "masked":
        box = crop_box(mask, req.inpaint_padding, size)
        image, crop_mask = req.img.crop(box), mask.crop(box)
        return [pasted(req.img, painted, box, crop_mask) for painted in paint(image, crop_mask)]
    image, mask = req.img.resize(size, Image.Resampling.LANCZOS), mask.resize(size, Image.Resampling.LANCZOS)
    return [Image.composite(painted, image, mask) for painted in paint(image, mask)]


def pasted(picture: Image.Image, painted: Image.Image, box: tuple, mask: Image.Image) -> Image.Image:
    """`picture` with `painted` scaled into `box` through `mask` (the box's part of the blurred mask)."""
    result = picture.copy()
    result.paste(painted.resize(mask.size, Image.Resampling.LANCZOS), box[:2], mask)
    return result


def crop_box(mask: Image.Image, padding: int, size: tuple) -> tuple:
    """A1111's "only masked" region: the mask's bounding box plus `padding`, widened to the aspect ratio of
    `size` (the size it is generated at) as far as the picture allows, so it is not stretched."""
    left, top, right, bottom = mask.getbbox()
    width, height = mask.size
    left, top = max(left - padding, 0), max(top - padding, 0)
    right, bottom = min(right + padding, width), min(bottom + padding, height)
    ratio = size[0] / size[1]
    if (right - left) / (bottom - top) < ratio:
        left, right = _widen(left, right, round((bottom - top) * ratio), width)
    else:
        top, bottom = _widen(top, bottom, round((right - left) / ratio), height)
    return left, top, right, bottom


def _widen(low: int, high: int, length: int, limit: int) -> tuple:
    """[low, high) grown evenly on both sides to `length`, shifted to stay within [0, limit)."""
    low = max(0, low - (length - (high - low)) // 2)
    high = min(limit, low + length)
    return max(0, high - length), high


def generate_flow(model: LoadedModel, req: GenerationRequest, on_step=None, conditioning=None) -> list:
    """txt2img or img2img with a flow-matching family on the encoded prompt `conditioning` (flow.flow_conditioning;
    None: encoded now); FLUX.2 klein's img2img is its inpaint pipeline, all repainted."""
    if req.img is None:
        return call_flow(model, model.txt2img, req, on_step, conditioning, width=req.width, height=req.height)
    image = req.img.resize((req.width, req.height), Image.Resampling.LANCZOS)
    inputs = {"image": [image] * req.n, "strength": req.strength, "width": req.width, "height": req.height}
    if model.family.img2img is model.family.inpaint:
        inputs["mask_image"] = [Image.new("L", image.size, 255)] * req.n
    return call_flow(model, model.img2img, req, on_step, conditioning, **inputs)


@torch.inference_mode()
def preview_image(model: LoadedModel, req: GenerationRequest, latents: torch.Tensor, decoder=None) -> Image.Image:
    """A picture of step latents (one picture's): with `preview: full` a VAE decode, else with a TAESD `decoder` (see
    engine/files/taesd.py: the request's and the folders' choice) its decode, else the cheap factor mapping; on the
    engine's thread (its step callback) under inference mode, as the pipeline's own decode."""
    if req.preview == "full":
        vae = model.txt2img.vae
        if model.family.flow:
            return vae_preview(vae, vae_latents(model, latents), scaled=False)
        return vae_preview(vae, latents)
    size = hires_size(req) if wants_hires(req) else (req.width, req.height)  # both passes' previews at the final size
    if decoder is not None:
        picture = taesd_preview(decoder, latents)
        return picture if picture.size == size else picture.resize(size, Image.Resampling.BILINEAR)
    return latents_to_preview(latents, model.family.latent_rgb, size, model.family.latent_rgb_bias)
