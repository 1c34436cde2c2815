"""Generation with the flow-matching families (Z-Image, FLUX.2 klein, FLUX.1): their samplers, the pipeline call,
the prompt as they read it, and their latents made into previews."""

import functools
import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from engine.encodings import Encodings
from engine.files.text_encoders import inner_layers
from engine.infotext import names_schedule
from engine.loras import text_encoder_loras, without_lora_tags
from engine.prompts import parse_prompt_attention
from engine.schedules import AUTOMATIC

# Notices a picture's answer carries where the request asked for something the family does without.
IGNORED_NEGATIVE = "neg is ignored: {label} draws without classifier-free guidance, which a negative prompt needs"
NEGATIVE_AT_NO_GUIDANCE = "neg is ignored at guidance 0: {label} reads a negative prompt only with guidance above 0"
IGNORED_GUIDANCE = "guidance is ignored: {label} is distilled to draw without it"
IGNORED_SCHEDULE = "schedule {schedule!r} is ignored: {label} keeps its own shifted schedule"
IGNORED_CLIP_SKIP = "clip_skip is ignored: it picks a CLIP layer of SD models; {label} reads its encoder's own"
STRIPPED_WEIGHTS = "the prompt's (word:weight) emphasis is A1111's for CLIP models; {label} reads it as plain text"


class FlowDPMSolver2M(FlowMatchEulerDiscreteScheduler):
    """DPM-Solver++(2M) (Lu et al., 2022; k-diffusion's sample_dpmpp_2m, A1111's DPM++ 2M) on a flow-matching
    model's own schedule. diffusers' DPMSolverMultistepScheduler has a flow form, but on sigmas of its own: it takes
    neither the `sigmas` these pipelines pass (FLUX's resolution-dependent shift is applied to them) nor img2img's
    `scale_noise`. Subclassing the Euler scheduler keeps its schedule, shift and noising, and replaces only the step.

    In flow terms a latent at sigma is (1 - sigma) x0 + sigma noise, and the model predicts the velocity, noise - x0;
    the solver steps in the log signal-to-noise ratio lambda = log((1 - sigma) / sigma), with the previous step's x0
    prediction as its second order, and ends on the last prediction (sigma 0)."""

    # The pipelines read this signature to see whether they may pass `sigmas`: it is spelled out, not *args.
    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        super().set_timesteps(num_inference_steps, device, sigmas, mu, timesteps)
        self.previous = None  # (the last step's x0 prediction, its step in lambda)

    def step(self, model_output, timestep, sample, return_dict=True, **_):
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_next = (float(each) for each in self.sigmas[self.step_index : self.step_index + 2])
        sample = sample.to(torch.float32)
        denoised = sample - sigma * model_output.to(torch.float32)
        if sigma_next == 0:
            prev_sample = denoised
        else:
            h = log_snr(sigma_next) - log_snr(sigma)
            target = denoised
            if self.previous is not None:
                last_denoised, last_h = self.previous
                half_ratio = h / (2 * last_h)  # 1 / 2r for r = last_h / h; 0 after the first step (last_h infinite)
                target = (1 + half_ratio) * denoised - half_ratio * last_denoised
            prev_sample = (sigma_next / sigma) * sample - (1 - sigma_next) * math.expm1(-h) * target
            self.previous = (denoised, h)
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)


def log_snr(sigma: float) -> float:
    """lambda = log((1 - sigma) / sigma): minus infinity at sigma 1 (pure noise), where the first step starts."""
    return -math.inf if sigma >= 1 else math.log1p(-sigma) - math.log(sigma)


def flow_scheduler(model, sampler: str, generators: list) -> FlowMatchEulerDiscreteScheduler:
    """A fresh scheduler on the model's own settings (its shift, FLUX's resolution-dependent one included):
    "euler" as trained, "euler a" adding fresh noise at each step, drawn from each picture's own seed, "dpm++ 2m"
    the second-order multistep solver."""
    if sampler == "dpm++ 2m":
        return keep_flow_predictions(FlowDPMSolver2M.from_config(model.scheduler_config))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        model.scheduler_config, stochastic_sampling=sampler == "euler a"
    )
    step = scheduler.step

    # The pipelines call step() without a generator: the stochastic noise would then be unseeded.
    @functools.wraps(step)
    def seeded_step(*args, **kwargs):
        return step(*args, **{**kwargs, "generator": generators if len(generators) > 1 else generators[0]})

    scheduler.step = seeded_step
    return keep_flow_predictions(scheduler)


def keep_flow_predictions(scheduler):
    """Makes `scheduler.step` keep each step's prediction of the finished latents in `scheduler.predicted`, as
    engine/previews.py keep_predictions does for SD: x0 = sample - sigma * velocity, at the sigma the step started
    from. Previews of it show the picture where the current latents still show mostly noise."""
    step = scheduler.step

    @functools.wraps(step)
    def step_and_keep(model_output, timestep, sample, *args, **kwargs):
        output = step(model_output, timestep, sample, *args, **kwargs)
        sigma = scheduler.sigmas[scheduler.step_index - 1]  # step() has moved its index on
        scheduler.predicted = (sample.float() - sigma * model_output.float()).to(sample.dtype)
        return output

    scheduler.step = step_and_keep
    scheduler.predicted = None
    return scheduler


def plain_prompt(prompt: str) -> tuple:
    """(the prompt as these families read it, whether A1111 emphasis was taken out): `(word:1.3)` weights mean
    something only to CLIP-conditioned SD models; the T5 and Qwen3 encoders would read the brackets as text."""
    parts = parse_prompt_attention(prompt)
    plain = "".join(text for text, _ in parts)
    return plain, any(weight != 1.0 for _, weight in parts) or plain != prompt


def flow_notices(family, req) -> list:
    """What the answer tells the client about parts of its request the family does without."""
    notices = []
    if req.neg and family.guidance != "cfg":
        notices.append(IGNORED_NEGATIVE.format(label=family.label))
    elif req.neg and (family.default_guidance if req.guidance is None else req.guidance) == 0:
        notices.append(NEGATIVE_AT_NO_GUIDANCE.format(label=family.label))  # Z-Image-Turbo's default
    # As sent, or as filled in already (the engine fills a request in before it queues and again as it runs): only a
    # guidance other than the family's own asks for something it does without.
    if req.guidance not in (None, family.default_guidance) and family.guidance == "none":
        notices.append(IGNORED_GUIDANCE.format(label=family.label))
    # Refusing a schedule would fail every A1111 client and pasted infotext, which name one ("Simple" in Forge's).
    # One inferred for pasted data that names none was asked for by nobody.
    inferred = req.parameters is not None and not names_schedule(req.parameters)
    if req.schedule != AUTOMATIC and not inferred:
        notices.append(IGNORED_SCHEDULE.format(schedule=req.schedule, label=family.label))
    if plain_prompt(without_lora_tags(req.prompt))[1]:
        notices.append(STRIPPED_WEIGHTS.format(label=family.label))
    if req.clip_skip != 1:
        notices.append(IGNORED_CLIP_SKIP.format(label=family.label))
    return notices


def guidance_scale(model, req) -> float:
    """The pipeline's `guidance_scale` for `req`, as the family reads it."""
    family = model.family
    if family.guidance in ("cfg", "distilled"):  # Z-Image's classifier-free guidance (off at 0), FLUX.1-dev's embedded
        return req.guidance
    return 1.0 if family.transformer == "flux2" else 0.0


def prompt_texts(model, req) -> tuple:
    """(the prompt, the negative prompt) as the family's encoders read them: no <lora:...> tags, no A1111 emphasis in
    the prompt; the negative prompt only where Z-Image's classifier-free guidance is on (the pipeline reads none as
    the empty one), else None: nothing reads it."""
    prompt = plain_prompt(without_lora_tags(req.prompt))[0]  # the PNG keeps the tags; the encoder reads none
    if model.family.guidance != "cfg" or req.guidance <= 0:
        return prompt, None
    return prompt, without_lora_tags(req.neg)


def flow_conditioning(model, req, encodings: Encodings) -> dict:
    """The pipeline's encoded-prompt arguments for `req`: each text from `encodings` (the model's) where a request
    sent it to the text encoders before, else encoded now and kept there. Z-Image encodes its negative prompt as a
    prompt of its own, so a negative prompt kept for one prompt serves the next."""
    prompt, negative = prompt_texts(model, req)
    conditioning = dict(encoded_text(model, prompt, encodings))
    if negative is not None:
        conditioning["negative_prompt_embeds"] = encoded_text(model, negative, encodings)["prompt_embeds"]
    return conditioning


def encoded_text(model, text: str, encodings: Encodings) -> dict:
    """One text encoded by the pipeline's own encode_prompt, for one picture (what the pipeline would encode from
    it), kept in `encodings` by the text and the LoRAs that change a text encoder."""

    def encode():
        pipe, tokens = model.txt2img, model.family.prompt_tokens
        device = pipe._execution_device
        with torch.inference_mode():
            if model.family.transformer == "z-image":
                return {"prompt_embeds": pipe.encode_prompt(text, device, False, max_sequence_length=tokens)[0]}
            if model.family.transformer == "flux2":
                # klein conditions on three inner layers of its Qwen3 encoder: a quarter, half and three quarters.
                layers = inner_layers(pipe.text_encoder.config.num_hidden_layers)
                embeds, _ = pipe.encode_prompt(text, device, max_sequence_length=tokens, text_encoder_out_layers=layers)
                return {"prompt_embeds": embeds}
            embeds, pooled, _ = pipe.encode_prompt(text, None, device, max_sequence_length=tokens)
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    return encodings.get((text, text_encoder_loras(model)), encode)


def call_flow(model, pipe, req, on_step, conditioning=None, **inputs) -> list:
    """One pipeline call for the `req.n` pictures of `req`: the counterpart of pipeline.call_pipeline. Picture k draws
    from the generator of seed+k alone, so it is the picture that seed draws in a request of its own. `conditioning`
    is flow_conditioning's (None: encoded now, kept nowhere)."""
    generators = [torch.Generator("cpu").manual_seed(req.seed + index) for index in range(req.n)]
    pipe.scheduler = flow_scheduler(model, req.sampler, generators)
    size = (req.height, req.width)

    def step_end(pipeline, index, timestep, tensors):
        if on_step is None:
            return tensors
        latents = tensors["latents"] if pipe.scheduler.predicted is None else pipe.scheduler.predicted
        if on_step(index + 1, pipeline.num_timesteps, spatial_latents(model, latents, size)):
            pipeline._interrupt = True  # skips the remaining steps; the latents so far are decoded
        return tensors

    if conditioning is None:
        conditioning = flow_conditioning(model, req, Encodings(0))
    if model.family.transformer == "z-image":  # its lists of tensors: the pipeline gets lists of its own
        conditioning = {name: list(value) for name, value in conditioning.items()}
    with torch.inference_mode():
        # One picture's encoded prompt: Z-Image's and klein's pipelines repeat it for each picture, FLUX.1's
        # transformer broadcasts it over them.
        return pipe(
            **conditioning,
            num_images_per_prompt=req.n,
            num_inference_steps=req.num_steps,
            generator=generators if req.n > 1 else generators[0],
            callback_on_step_end=step_end,
            guidance_scale=guidance_scale(model, req),
            **inputs,
        ).images


def spatial_latents(model, latents: torch.Tensor, size: tuple) -> torch.Tensor:
    """A step's latents (as the pipeline packs them) as the VAE's channels on the picture's grid (1/8 of its size),
    which previews show: FLUX packs them 2x2 into tokens, FLUX.2 normalises them as well; Z-Image keeps them as they
    are."""
    height, width = size[0] // 8, size[1] // 8
    kind = model.family.transformer
    if kind == "z-image":
        return latents
    if kind == "flux1":  # (batch, tokens, channels x 2 x 2), tokens row by row
        batch, _, packed = latents.shape
        grid = latents.view(batch, height // 2, width // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return grid.reshape(batch, packed // 4, height, width)
    batch, _, packed = latents.shape  # FLUX.2: patchified channels, normalised by the VAE's batch norm
    grid = latents.permute(0, 2, 1).reshape(batch, packed, height // 2, width // 2)
    bn = model.txt2img.vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + model.txt2img.vae.config.batch_norm_eps)
    grid = grid * std.to(grid.dtype) + bn.running_mean.view(1, -1, 1, 1).to(grid.dtype)
    grid = grid.reshape(batch, packed // 4, 2, 2, height // 2, width // 2).permute(0, 1, 4, 2, 5, 3)
    return grid.reshape(batch, packed // 4, height, width)


def vae_latents(model, latents: torch.Tensor) -> torch.Tensor:
    """spatial_latents as the VAE decodes them: FLUX.1's `ae` works on shifted and scaled ones."""
    if model.family.transformer == "flux2":
        return latents
    config = model.txt2img.vae.config
    return latents / config.scaling_factor + config.shift_factor
