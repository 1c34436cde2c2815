"""Noise schedules as AUTOMATIC1111 names them ("Schedule type"): the sigmas a sampler steps through, made from a
model's discrete training schedule the way k-diffusion's discrete denoisers and A1111's schedulers make them.
"""

import dataclasses
import math

import numpy as np
import torch
from scipy import stats


class DiscreteSchedule:
    """A model's training noise levels, sigma(t) for the timesteps t = 0 .. N-1, in float32 as A1111 holds them,
    with k-diffusion's mapping between continuous sigmas and fractional timesteps (linear in log sigma)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        alphas_cumprod = alphas_cumprod.to(torch.float32)
        self.alphas_cumprod = alphas_cumprod
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_config(cls, config: dict) -> "DiscreteSchedule":
        return cls(alphas_cumprod_from_config(config))

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional timestep whose interpolated sigma is `sigma` (clamped to the table's ends)."""
        log_sigma = sigma.log()
        distances = log_sigma - self.log_sigmas[:, None]
        low = distances.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high = low + 1
        low_log, high_log = self.log_sigmas[low], self.log_sigmas[high]
        weight = ((low_log - log_sigma) / (low_log - high_log)).clamp(0, 1)
        return ((1 - weight) * low + weight * high).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low, high, weight = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - weight) * self.log_sigmas[low] + weight * self.log_sigmas[high]).exp()


def alphas_cumprod_from_config(config: dict) -> torch.Tensor:
    """The cumulative alphas a diffusers scheduler config describes, computed in float64 and stored in float32 as
    the original Stable Diffusion code (and so A1111) does; diffusers itself computes them in float32."""
    count = config.get("num_train_timesteps", 1000)
    start, end = config.get("beta_start", 0.00085), config.get("beta_end", 0.012)
    kind = config.get("beta_schedule", "scaled_linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, count, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(start, end, count, dtype=torch.float64)
    elif kind == "squaredcos_cap_v2":
        betas = cosine_betas(count)
    else:
        raise ValueError(f"beta_schedule {kind!r} is not supported")
    return torch.cumprod(1 - betas, dim=0).to(torch.float32)


def cosine_betas(count: int, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule of Nichol and Dhariwal (2021), as diffusers' squaredcos_cap_v2."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / count) / alpha_bar(i / count), max_beta) for i in range(count)]
    return torch.tensor(betas, dtype=torch.float64)


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


# Each schedule: (n, model, sdxl) -> n + 1 sigmas, the last the end of sampling (0 for every one but KL Optimal).


def uniform(n: int, model: DiscreteSchedule, sdxl: bool = False) -> torch.Tensor:
    """Timesteps evenly spaced from the last to 0 (k-diffusion's get_sigmas; "Automatic" for Euler, Euler a...)."""
    return append_zero(model.t_to_sigma(torch.linspace(len(model.sigmas) - 1, 0, n)))


def karras(n: int, model: DiscreteSchedule, sdxl: bool = False, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022): evenly spaced in sigma ** (1 / rho)."""
    ramp = torch.linspace(0, 1, n)
    low, high = model.sigma_min ** (1 / rho), model.sigma_max ** (1 / rho)
    return append_zero((high + ramp * (low - high)) ** rho)


def exponential(n: int, model: DiscreteSchedule, sdxl: bool = False) -> torch.Tensor:
    return append_zero(torch.linspace(math.log(model.sigma_max), math.log(model.sigma_min), n).exp())


def polyexponential(n: int, model: DiscreteSchedule, sdxl: bool = False, rho: float = 1.0) -> torch.Tensor:
    ramp = torch.linspace(1, 0, n) ** rho
    low = math.log(model.sigma_min)
    return append_zero(torch.exp(ramp * (math.log(model.sigma_max) - low) + low))


def sgm_uniform(n: int, model: DiscreteSchedule, sdxl: bool = False) -> torch.Tensor:
    """Stability's SGM sampling: n + 1 evenly spaced timesteps, the last (0) dropped; what Lightning and Hyper-SD
    models are distilled for."""
    return _timesteps_to_sigmas(_model_t_span(model, n + 1)[:-1], model)


def normal(n: int, model: DiscreteSchedule, sdxl: bool = False) -> torch.Tensor:
    return _timesteps_to_sigmas(_model_t_span(model, n), model)


def _model_t_span(model: DiscreteSchedule, count: int) -> torch.Tensor:
    start = model.sigma_to_t(torch.tensor(model.sigma_max))
    end = model.sigma_to_t(torch.tensor(model.sigma_min))
    return torch.linspace(start.item(), end.item(), count)


def _timesteps_to_sigmas(timesteps: torch.Tensor, model: DiscreteSchedule) -> torch.Tensor:
    sigmas = [model.t_to_sigma(t).item() for t in timesteps]
    return torch.tensor([*sigmas, 0.0], dtype=torch.float32)


def simple(n: int, model: DiscreteSchedule, sdxl: bool = False) -> torch.Tensor:
    """Every (N / n)-th training sigma from the top, as ComfyUI's "simple"."""
    stride = len(model.sigmas) / n
    return torch.tensor([*(model.sigmas[-(1 + int(x * stride))].item() for x in range(n)), 0.0])


def ddim(n: int, model: DiscreteSchedule, sdxl: bool = False) -> torch.Tensor:
    """The training sigmas at 1, 1 + N // n, ... (DDIM's own spacing) from the top; more than n steps where n does
    not divide N, as A1111 makes them."""
    stride = max(len(model.sigmas) // n, 1)
    picked = [model.sigmas[x].item() for x in range(1, len(model.sigmas), stride)]
    return torch.tensor([*picked[::-1], 0.0])


def kl_optimal(n: int, model: DiscreteSchedule, sdxl: bool = False) -> torch.Tensor:
    """Evenly spaced in arctan(sigma) (Zhang et al. 2024); it ends at the model's smallest sigma, not at 0."""
    low, high = torch.arctan(torch.tensor(model.sigma_min)), torch.arctan(torch.tensor(model.sigma_max))
    steps = torch.arange(n + 1)
    return torch.tan(steps / n * low + (1.0 - steps / n) * high)


# NVIDIA's published Align Your Steps sigmas for 10 steps (research.nvidia.com/labs/toronto-ai/AlignYourSteps).
AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


def align_your_steps(n: int, model: DiscreteSchedule, sdxl: bool = False) -> torch.Tensor:
    """NVIDIA's optimised sigmas for SD 1.5 or SDXL, interpolated in log sigma to n steps."""
    table = AYS_SDXL if sdxl else AYS_SD15
    if n == len(table):
        return torch.tensor([*table, 0.0], dtype=torch.float32)
    positions = np.linspace(0, 1, len(table))
    logs = np.interp(np.linspace(0, 1, n), positions, np.log(table[::-1]))
    return torch.tensor([*np.exp(logs)[::-1], 0.0], dtype=torch.float32)


BETA_ALPHA, BETA_BETA = 0.6, 0.6  # A1111's defaults for its Beta schedule's distribution


def beta(n: int, model: DiscreteSchedule, sdxl: bool = False) -> torch.Tensor:
    """Lee et al. (2024), "Beta sampling is all you need": sigmas at the Beta(0.6, 0.6) quantiles, as A1111 spaces
    them (between the model's smallest and largest sigma)."""
    quantiles = stats.beta.ppf(1 - np.linspace(0, 1, n), BETA_ALPHA, BETA_BETA)
    low, high = model.sigma_min, model.sigma_max
    return torch.tensor([*(low + q * (high - low) for q in quantiles), 0.0], dtype=torch.float32)


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str  # A1111's name in its API (`scheduler`), e.g. "sgm_uniform"
    label: str  # its label in the UI and the infotext ("Schedule type: SGM Uniform")
    function: object
    aliases: tuple = ()


SCHEDULES = {
    schedule.name: schedule
    for schedule in (
        Schedule("uniform", "Uniform", uniform),
        Schedule("karras", "Karras", karras),
        Schedule("exponential", "Exponential", exponential),
        Schedule("polyexponential", "Polyexponential", polyexponential),
        Schedule("sgm_uniform", "SGM Uniform", sgm_uniform, ("SGMUniform",)),
        Schedule("kl_optimal", "KL Optimal", kl_optimal),
        Schedule("align_your_steps", "Align Your Steps", align_your_steps),
        Schedule("simple", "Simple", simple),
        Schedule("normal", "Normal", normal),
        Schedule("ddim", "DDIM", ddim),
        Schedule("beta", "Beta", beta),
    )
}
AUTOMATIC = "automatic"  # the sampler's own default schedule
SCHEDULE_NAMES = (AUTOMATIC, *SCHEDULES)
LABELS = {AUTOMATIC: "Automatic", **{name: schedule.label for name, schedule in SCHEDULES.items()}}


def schedule_name(text: str) -> str | None:
    """The schedule a name, label or alias means ("Karras", "karras", "SGM Uniform", "sgm uniform"), or None."""
    wanted = text.strip().lower().replace(" ", "_")
    for name, label in LABELS.items():
        aliases = SCHEDULES[name].aliases if name in SCHEDULES else ()
        if wanted in (name, label.lower().replace(" ", "_"), *(alias.lower() for alias in aliases)):
            return name
    return None


def sampling_sigmas(
    schedule: str, steps: int, model: DiscreteSchedule, sdxl: bool = False, discard_penultimate: bool = False
) -> torch.Tensor:
    """The sigmas for `steps` steps on `schedule` (a resolved name, not "automatic"), as A1111's k-diffusion samplers
    get them: DPM2-style samplers ask for one step more and drop the next-to-last sigma."""
    if discard_penultimate:
        sigmas = SCHEDULES[schedule].function(steps + 1, model, sdxl)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return SCHEDULES[schedule].function(steps, model, sdxl)
