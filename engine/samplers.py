"""Samplers: the A1111 names people know, mapped to diffusers schedulers, built once per model."""

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
)

from engine.models import LoadedModel
from engine.previews import keep_predictions

SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpm++ 2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # diffusers has no exact DPM++ 2S; its single-step second-order DPM-Solver++ is the usual stand-in.
    "dpm++ 2s": (DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++ sde": (DPMSolverSDEScheduler, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2 a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpm++ 2m sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    # For LCM and LCM-LoRA, turbo and lightning models: 4-8 steps at a guidance of 1-2.
    "lcm": (LCMScheduler, {}),
}


# "<name> karras": the same sampler on the Karras et al. noise schedule, for every sampler whose
# diffusers scheduler offers it (DDIM and Euler a do not). A plain name turns it off explicitly:
# some models' own scheduler configs switch it on, and the name should mean the same on every model.
for _name in ("euler", "heun", "lms", "dpm++ 2m", "dpm++ 2s", "dpm++ sde", "dpm2", "dpm2 a", "dpm++ 2m sde"):
    _cls, _options = SAMPLERS[_name]
    SAMPLERS[_name] = (_cls, {**_options, "use_karras_sigmas": False})
    SAMPLERS[f"{_name} karras"] = (_cls, {**_options, "use_karras_sigmas": True})


DEFAULT_SAMPLER = "dpm++ 2m"


def make_scheduler(sampler: str, base_config: dict, seed: int):
    """A scheduler for `sampler` on the model's own settings (`base_config`)."""
    cls, options = SAMPLERS[sampler]
    if cls is DPMSolverSDEScheduler:
        # Its Brownian noise has its own seed; tie it to the request's so the picture repeats.
        options = {**options, "noise_sampler_seed": seed}
    return cls.from_config(base_config, **options)


# What the model predicts at each step, for a request's `prediction` field: the noise ("epsilon",
# SD1, SDXL, SD2 512) or "v" (SD2 768-v). Only needed where a checkpoint's kind is guessed wrong.
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction"}


def sampler_label(sampler: str) -> str:
    """The AUTOMATIC1111 spelling of a sampler name: 'dpm++ 2m karras' -> 'DPM++ 2M Karras'."""
    words = {"a": "a", "euler": "Euler", "heun": "Heun", "karras": "Karras"}
    return " ".join(words.get(word, word.upper()) for word in sampler.split())


def scheduler_for(model: LoadedModel, sampler: str, seed: int | list, prediction: str | None = None):
    """The model's scheduler for `sampler` (and a `prediction` override, if any), built on first use
    and kept (building some takes tens of milliseconds). `seed` is the picture's, or a list with each
    picture's of a batch.

    Reuse is safe: the pipeline's set_timesteps resets a scheduler's per-run state at the start of
    every run, and generations run one at a time.
    """
    scheduler = model.schedulers.get((sampler, prediction))
    if scheduler is None:
        config = model.scheduler_config
        if prediction is not None:
            config = {**config, "prediction_type": PREDICTIONS[prediction]}
        scheduler = keep_predictions(make_scheduler(sampler, config, seed))
        model.schedulers[(sampler, prediction)] = scheduler
    if isinstance(scheduler, DPMSolverSDEScheduler):
        scheduler.noise_sampler_seed = seed  # each run draws its Brownian noise afresh from this seed
    scheduler.predicted = None
    return scheduler
