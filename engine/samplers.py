"""Samplers by the names people know: AUTOMATIC1111's (engine/ksampling.py), each on a schedule type
(engine/schedules.py), and diffusers' LCM for LCM and LCM-LoRA models; one scheduler per generation."""

from diffusers import LCMScheduler

from engine import ksampling
from engine.errors import ImagineError, named
from engine.models import LoadedModel
from engine.previews import keep_predictions
from engine.schedules import AUTOMATIC, LABELS, SCHEDULE_NAMES, SCHEDULES, schedule_name

# /generate's sampler names (lowercase A1111 names). LCM's scheduler is diffusers': LCM models are distilled for
# its boundary conditions, and A1111's own LCM sampler is an extension's.
SAMPLER_NAMES = (*ksampling.KSAMPLERS, "lcm")
OLD_NAMES = {"dpm++ 2s": "dpm++ 2s a"}  # "dpm++ 2s" was diffusers' stand-in for A1111's DPM++ 2S a
DEFAULT_SAMPLER = "dpm++ 2m"


# What the model predicts at each step, for a request's `prediction` field: the noise ("epsilon",
# SD1, SDXL, SD2 512) or "v" (SD2 768-v). Only needed where a checkpoint's kind is guessed wrong.
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction"}


def split_sampler(text: str) -> tuple:
    """(sampler, schedule or None) for a sampler name, which may end in a schedule as A1111's combined names do
    ("DPM++ 2M Karras", "euler sgm uniform"); the sampler is None where the name is unknown."""
    name = " ".join(text.strip().lower().split())
    name = OLD_NAMES.get(name, name)
    if name in SAMPLER_NAMES:
        return name, None
    for schedule in SCHEDULES:
        for spelling in {schedule, LABELS[schedule].lower(), *(alias.lower() for alias in SCHEDULES[schedule].aliases)}:
            head = name.removesuffix(" " + spelling)
            if head != name and OLD_NAMES.get(head, head) in SAMPLER_NAMES:
                return OLD_NAMES.get(head, head), schedule
    return None, None


def schedules_for(sampler: str) -> tuple:
    """The schedules a sampler can use: A1111's DDIM and LCM take their own timesteps, so only "automatic"."""
    if sampler == "lcm" or ksampling.KSAMPLERS[sampler].own_timesteps:
        return (AUTOMATIC,)
    return SCHEDULE_NAMES


def checked_schedule(sampler: str, text: str | None, field: str = "schedule") -> str:
    """The schedule `text` names for `sampler`, or an error listing the valid ones."""
    if text is None:
        return AUTOMATIC
    schedule = schedule_name(text)
    if schedule is None:
        message = f"{named(field)} {text!r} is unknown; choose one of: {', '.join(SCHEDULE_NAMES)}"
        raise ImagineError(message, field=field)
    if schedule not in schedules_for(sampler):
        must = f"{named(field)} must be 'automatic', not {text!r}"
        raise ImagineError(f"{named('sampler')} {sampler!r} takes its own timesteps, so {must}", field=field)
    return schedule


def sampler_label(sampler: str) -> str:
    """A1111's spelling of a sampler name: 'dpm++ 2m' -> 'DPM++ 2M'."""
    return "LCM" if sampler == "lcm" else ksampling.KSAMPLERS[sampler].label


def schedule_label(sampler: str, schedule: str, flow: bool = False) -> str:
    """What A1111 writes as "Schedule type" for a picture: the schedule drawn, "Automatic" where that is the
    model's own timesteps (Euler, DDIM, LCM, and every sampler of the flow-matching families, which keep their
    shifted schedule), the sampler's default schedule's label otherwise."""
    if flow:
        return LABELS[AUTOMATIC]
    if schedule != AUTOMATIC:
        return LABELS[schedule]
    default = None if sampler == "lcm" else ksampling.KSAMPLERS[sampler].schedule
    return LABELS[default] if default not in (None, "uniform") else LABELS[AUTOMATIC]


def scheduler_for(model: LoadedModel, sampler: str, schedule: str, prediction: str | None = None):
    """A fresh scheduler for one generation (schedulers hold a run's state) on the model's own training settings,
    with a `prediction` override if any."""
    config = dict(model.scheduler_config)
    if prediction is not None:
        config["prediction_type"] = PREDICTIONS[prediction]
    if sampler == "lcm":
        return keep_predictions(LCMScheduler.from_config(config))
    return ksampling.KDiffusionScheduler.for_model(config, sampler, schedule, sdxl=model.family.group == "sdxl")
