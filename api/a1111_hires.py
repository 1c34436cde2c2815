"""AUTOMATIC1111's txt2img fields that switch on more than one picture's plain drawing, as /generate's: the hires fix
(enable_hr's hr_* fields) and variation seeds (subseed, subseed_strength, seed_resize_from_*); and the variation
seeds as A1111's info reports them. Pure translation: /generate's checks name A1111's fields (api/a1111.py)."""

from engine.fields import rounded_size
from engine.request import picture_seeds
from engine.samplers import schedules_for, split_sampler
from engine.schedules import AUTOMATIC, schedule_name

A1111_STRENGTH = 0.75  # A1111's default denoising_strength


def a1111_variation(body: dict) -> dict:
    """The variation seed fields: A1111 sends subseed -1 (random) and a strength of 0 when they are off, and a seed
    resize size of 0 or -1 when it is."""
    resize = [body.get(field) for field in ("seed_resize_from_w", "seed_resize_from_h")]
    off = any(isinstance(value, int) and not isinstance(value, bool) and value <= 0 for value in resize)
    return {
        "variation_seed": body.get("subseed") if body.get("subseed_strength") else None,
        "variation_strength": body.get("subseed_strength"),
        "seed_resize_from_width": None if off else rounded_size(resize[0]),
        "seed_resize_from_height": None if off else rounded_size(resize[1]),
    }


SAME = ("", "Use same sampler", "Use same scheduler", "Use same checkpoint")  # A1111's words for the first pass's


def a1111_hires_fields(body: dict, sampler: str, upscalers: tuple) -> tuple:
    """(txt2img's hires fix fields as /generate's, those dropped). An upscaler not among `upscalers` (those that can
    be used) falls back to Latent, A1111's default, so that a client's full form still draws; a second-pass sampler
    or schedule unknown here falls back to the first pass's. What the second pass cannot take apart from the first
    (its own checkpoint or distilled guidance) is dropped. Each is named in imagine_ignored."""
    upscaler, dropped = body.get("hr_upscaler"), []
    if upscaler is not None and upscaler not in upscalers:
        upscaler, dropped = None, ["hr_upscaler"]
    hires_sampler, schedule = None, None
    if body.get("hr_sampler_name") not in (None, *SAME):
        hires_sampler, schedule = split_sampler(str(body["hr_sampler_name"]))
        dropped += [] if hires_sampler else ["hr_sampler_name"]
    if body.get("hr_scheduler") not in (None, *SAME) and str(body["hr_scheduler"]).lower() != AUTOMATIC:
        schedule = schedule_name(str(body["hr_scheduler"]))
        dropped += [] if schedule else ["hr_scheduler"]
    if schedule is not None and schedule not in schedules_for(hires_sampler or sampler):
        schedule = None
    # Forge's hires distilled guidance is FLUX.1-dev's, and the flow families draw no hires fix.
    if body.get("hr_distilled_cfg") not in (None, body.get("distilled_cfg_scale")):
        dropped.append("hr_distilled_cfg")
    if body.get("hr_checkpoint_name") not in (None, *SAME):
        dropped.append("hr_checkpoint_name")
    fields = {
        "hires_scale": 2.0 if body.get("hr_scale") is None else body["hr_scale"],
        "hires_width": body.get("hr_resize_x"),
        "hires_height": body.get("hr_resize_y"),
        "hires_upscaler": upscaler,
        "hires_steps": body.get("hr_second_pass_steps"),
        "hires_strength": A1111_STRENGTH if body.get("denoising_strength") is None else body["denoising_strength"],
        "hires_sampler": (hires_sampler or sampler) if hires_sampler or schedule else None,
        "hires_schedule": schedule,
        # An empty second-pass prompt is the first pass's, as A1111 reads it.
        "hires_prompt": body.get("hr_prompt") or None,
        "hires_neg": body.get("hr_negative_prompt") or None,
        "hires_guidance": body.get("hr_cfg"),
    }
    return fields, dropped


def a1111_subseeds(req, seeds: list) -> dict:
    """The variation seeds as A1111's info reports them; without them, the seeds (A1111 would draw unused ones)."""
    subseeds = [variation_seed for _, variation_seed in picture_seeds(req)] if req.variation_strength else seeds
    resize = (req.seed_resize_from_width, req.seed_resize_from_height)
    return {
        "subseed": subseeds[0],
        "all_subseeds": subseeds,
        "subseed_strength": req.variation_strength,
        "seed_resize_from_w": -1 if resize[0] is None else resize[0],
        "seed_resize_from_h": -1 if resize[1] is None else resize[1],
    }
