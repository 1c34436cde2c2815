"""AUTOMATIC1111's samplers (k-diffusion's algorithms, and its own DDIM) as one diffusers scheduler, so every
diffusers pipeline draws what A1111 draws for the same noise, sigmas and model.

Each algorithm is a generator: it yields the latents it wants the model to see and at which noise level, and is
sent back the latents the pipeline evaluated and the model's denoised prediction. The scheduler turns the pipeline's
step() calls into that conversation, so the pipelines keep their own loops (CFG, SDXL's conditioning, inpainting).
"""

import dataclasses
import warnings

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from scipy import integrate

from engine.noise import PictureNoise, brownian_noise_as_on_a_gpu
from engine.schedules import AUTOMATIC, DiscreteSchedule, alphas_cumprod_from_config, sampling_sigmas

ETA, S_NOISE = 1.0, 1.0  # A1111's defaults for the ancestral and SDE samplers' noise


def to_d(x, sigma, denoised):
    """The ODE's derivative dx/dsigma at sigma, from the denoised prediction."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from, sigma_to, eta=ETA):
    """(sigma_down, sigma_up): where a deterministic step should land, and how much fresh noise then brings the
    latents to sigma_to (Karras et al.; k-diffusion's get_ancestral_step)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def euler(x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def euler_ancestral(x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * S_NOISE * sigma_up
    return x


def heun(x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        d, dt = to_d(x, sigmas[i], denoised), sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2, denoised_2 = yield x + d * dt, sigmas[i + 1]
            x = x + (d + to_d(x_2, sigmas[i + 1], denoised_2)) / 2 * dt
    return x


def dpm_2(x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2, denoised_2 = yield x + d * (sigma_mid - sigmas[i]), sigma_mid
            x = x + to_d(x_2, sigma_mid, denoised_2) * (sigmas[i + 1] - sigmas[i])
    return x


def dpm_2_ancestral(x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2, denoised_2 = yield x + d * (sigma_mid - sigmas[i]), sigma_mid
            x = x + to_d(x_2, sigma_mid, denoised_2) * (sigma_down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * S_NOISE * sigma_up
    return x


def lms_coefficient(order, t, i, j):
    """The weight of the j-th last derivative in a linear multistep step from t[i] to t[i + 1]."""

    def basis(tau):
        product = 1.0
        for k in range(order):
            if k != j:
                product *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return product

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


def lms(x, sigmas, noise, order=4):
    sigmas_cpu, derivatives = sigmas.detach().cpu().numpy(), []
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        derivatives = [*derivatives, to_d(x, sigmas[i], denoised)][-order:]
        current = min(i + 1, order)
        weights = [lms_coefficient(current, sigmas_cpu, i, j) for j in range(current)]
        x = x + sum(weight * d for weight, d in zip(weights, reversed(derivatives), strict=True))
    return x


def _t(sigma):
    return sigma.log().neg()


def _sigma(t):
    return t.neg().exp()


def dpmpp_2s_ancestral(x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2, denoised_2 = yield (_sigma(s) / _sigma(t)) * x - (-h * 0.5).expm1() * denoised, _sigma(s)
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * S_NOISE * sigma_up
    return x


def dpmpp_sde(x, sigmas, noise, r=0.5):
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        sigma_down, sigma_up = ancestral_step(_sigma(t), _sigma(s))
        s_ = _t(sigma_down)
        x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise(_sigma(t), _sigma(s)) * S_NOISE * sigma_up
        _, denoised_2 = yield x_2, _sigma(s)
        sigma_down, sigma_up = ancestral_step(_sigma(t), _sigma(t_next))
        t_next_ = _t(sigma_down)
        denoised_d = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_2
        x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise(_sigma(t), _sigma(t_next)) * S_NOISE * sigma_up
    return x


def dpmpp_2m(x, sigmas, noise):
    old_denoised = None
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _t(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def dpmpp_2m_sde(x, sigmas, noise, solver_type="midpoint"):
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            eta_h = ETA * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * S_NOISE
            h_last = h
        old_denoised = denoised
    return x


def dpmpp_2m_sde_heun(x, sigmas, noise):
    return (yield from dpmpp_2m_sde(x, sigmas, noise, solver_type="heun"))


def dpmpp_3m_sde(x, sigmas, noise):
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            h_eta = h * (ETA + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1, d2 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1), (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * ETA).expm1().neg().sqrt() * S_NOISE
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
    return x


def a1111_ddim(x, timesteps, alphas_cumprod, noise):
    """A1111's DDIM (eta 0) on its timesteps 1, 1 + 1000 // n, ...: the model is asked at all but the first, and
    the last step lands on timesteps[0], so n steps evaluate the model n - 1 times (A1111's own count)."""
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    for index in range(len(timesteps) - 1, 0, -1):
        x, eps = yield x, timesteps[index]
        a_t, a_prev = x.new_tensor(alphas[index].item()), x.new_tensor(alphas_prev[index].item())
        pred_x0 = (x - x.new_tensor(sqrt_one_minus_alphas[index].item()) * eps) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * eps
    return x


def a1111_ddim_timesteps(steps: int) -> torch.Tensor:
    return torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)


@dataclasses.dataclass(frozen=True)
class KSampler:
    """How A1111 runs one of its k-diffusion samplers."""

    label: str  # A1111's name, as its API lists it and its infotext writes it
    algorithm: object
    schedule: str = "uniform"  # what "Automatic" means for this sampler in A1111
    discard_penultimate: bool = False  # A1111 asks for a step more and drops the next-to-last sigma
    second_order: bool = False  # two model evaluations a step
    brownian: bool = False  # its noise comes from Brownian trees, one per picture's seed
    own_timesteps: bool = False  # DDIM: A1111's timestep sampler, which takes no schedule type


KSAMPLERS = {
    "euler": KSampler("Euler", euler),
    "euler a": KSampler("Euler a", euler_ancestral),
    "heun": KSampler("Heun", heun, second_order=True),
    "lms": KSampler("LMS", lms),
    "dpm2": KSampler("DPM2", dpm_2, "karras", discard_penultimate=True, second_order=True),
    "dpm2 a": KSampler("DPM2 a", dpm_2_ancestral, "karras", discard_penultimate=True, second_order=True),
    "dpm++ 2s a": KSampler("DPM++ 2S a", dpmpp_2s_ancestral, "karras", second_order=True),
    "dpm++ 2m": KSampler("DPM++ 2M", dpmpp_2m, "karras"),
    "dpm++ sde": KSampler("DPM++ SDE", dpmpp_sde, "karras", second_order=True, brownian=True),
    "dpm++ 2m sde": KSampler("DPM++ 2M SDE", dpmpp_2m_sde, "exponential", brownian=True),
    "dpm++ 2m sde heun": KSampler("DPM++ 2M SDE Heun", dpmpp_2m_sde_heun, "exponential", brownian=True),
    "dpm++ 3m sde": KSampler("DPM++ 3M SDE", dpmpp_3m_sde, "exponential", discard_penultimate=True, brownian=True),
    "ddim": KSampler("DDIM", a1111_ddim, schedule=None, own_timesteps=True),
}


class BrownianNoise:
    """The DPM++ SDE samplers' noise between two sigmas: one torchsde Brownian tree per picture, entropy its seed,
    over the run's whole sigma range, as A1111 builds them; drawn as they come out on an NVIDIA GPU."""

    def __init__(self, seeds: list, shape: tuple, sigmas: torch.Tensor):
        import torchsde

        low, high = sigmas[sigmas > 0].min(), sigmas.max()
        with brownian_noise_as_on_a_gpu():
            self.trees = [torchsde.BrownianTree(low, torch.zeros(shape), high, entropy=seed) for seed in seeds]

    def __call__(self, sigma, sigma_next):
        sigma, sigma_next = torch.as_tensor(sigma).cpu(), torch.as_tensor(sigma_next).cpu()
        low, high, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        with brownian_noise_as_on_a_gpu(), warnings.catch_warnings():
            # The smallest sigma, recomputed from log space, lands a rounding error below the tree's start; A1111's
            # trees see the same and draw the same: the warning says nothing to a user.
            warnings.filterwarnings("ignore", "Should have ta>=t0", UserWarning)
            increments = torch.stack([tree(low, high) for tree in self.trees]) * sign
        return increments / (sigma_next - sigma).abs().sqrt()


def evaluation_points(algorithm, sigmas: torch.Tensor) -> torch.Tensor:
    """The noise levels at which `algorithm` asks for the model on `sigmas`, found by a dry run on a scalar: they
    depend on the sigmas only, and the pipeline needs them as its list of timesteps before it starts."""
    run, points, zero = algorithm(torch.zeros(1), sigmas, lambda *_: torch.zeros(1)), [], torch.zeros(1)
    try:
        _, sigma = next(run)
        while True:
            points.append(sigma)
            _, sigma = run.send((zero, zero))
    except StopIteration:
        return torch.stack(points) if points else torch.zeros(0)


class KDiffusionScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that samples as AUTOMATIC1111 does: `sampler` (a KSAMPLERS key) on `schedule` (a schedule
    name, or "automatic" for the sampler's own), from the model's training schedule in the config.

    Before a run, `use_noise` hands it the batch's PictureNoise: the pipeline is given the starting noise as its
    latents, and the ancestral samplers draw each step's noise from it; SDE samplers grow Brownian trees from its
    seeds. After each step `predicted` holds the model's denoised prediction (for previews).
    """

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: list | None = None,
        prediction_type: str = "epsilon",
        sampler: str = "euler",
        schedule: str = AUTOMATIC,
        sdxl: bool = False,
    ):
        self.model = DiscreteSchedule(alphas_cumprod_from_config(self.config))
        self.sampler = KSAMPLERS[sampler]
        self.order = 2 if self.sampler.second_order else 1
        self.noise, self.starting_noise, self.predicted, self.exact = None, None, None, None
        self.timesteps, self.init_noise_sigma = torch.zeros(0), 1.0

    @classmethod
    def for_model(cls, model_config: dict, sampler: str, schedule: str = AUTOMATIC, sdxl: bool = False):
        """The scheduler for a model whose diffusers scheduler config is `model_config`."""
        known = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
        settings = {key: model_config[key] for key in known if model_config.get(key) is not None}
        return cls(**settings, sampler=sampler, schedule=schedule, sdxl=sdxl)

    @property
    def resolved_schedule(self) -> str | None:
        """The schedule drawn: the one asked for, or the sampler's own for "automatic" (None for DDIM)."""
        return self.sampler.schedule if self.config.schedule == AUTOMATIC else self.config.schedule

    def use_noise(self, noise: PictureNoise):
        self.noise = noise

    def set_timesteps(self, num_inference_steps: int, device=None, **_):
        if self.sampler.own_timesteps:
            self.sigmas = a1111_ddim_timesteps(num_inference_steps)
            self.points = self.sigmas[1:].flip(0)
            self.timesteps = self.points.to(device)
        else:
            self.sigmas = sampling_sigmas(
                self.resolved_schedule, num_inference_steps, self.model, self.config.sdxl,
                self.sampler.discard_penultimate,
            )  # fmt: skip
            self.points = evaluation_points(self.sampler.algorithm, self.sigmas)
            self.timesteps = self.model.sigma_to_t(self.points).to(device)
            self.init_noise_sigma = self.sigmas[0].item()
        self.index, self.begin, self.run, self.exact = 0, 0, None, None

    def set_begin_index(self, begin_index: int = 0):
        """Starts at the `begin_index`-th evaluation (img2img skips the first steps)."""
        self.index = self.begin = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        if self.sampler.own_timesteps:
            return sample
        return sample / (self.points[self.index] ** 2 + 1) ** 0.5

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """`original` noised to the level of `timesteps` (img2img's start, inpainting's kept part), with the batch's
        own starting noise in place of the pipeline's where it was given one."""
        if self.starting_noise is not None and self.starting_noise.shape == noise.shape:
            noise = self.starting_noise.to(noise)
        t = timesteps.flatten()[0].to(self.timesteps.device)
        if self.sampler.own_timesteps:
            alpha = self.model.alphas_cumprod[int(t)].item()
            return original * alpha**0.5 + noise * (1 - alpha) ** 0.5
        matches = (self.timesteps == t).nonzero()
        sigma = self.points[matches[0, 0]] if len(matches) else self.model.t_to_sigma(t.cpu())
        return original + noise * sigma.item()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, return_dict=True):
        # The latents stay float32 here, as A1111 keeps them, whatever precision the pipeline holds them in; the
        # pipeline's copy is taken instead where it changed them (inpainting puts the kept part back each step).
        exact = self.exact is not None and torch.equal(self.exact.to(sample.dtype), sample)
        x, output = self.exact if exact else sample.float(), model_output.float()
        if self.run is None:
            self.run = self._start(x)
        value = self._eps(output, x) if self.sampler.own_timesteps else self._denoised(output, x)
        self.predicted = self._clean(value, x).to(sample.dtype)
        try:
            x, _ = self.run.send((x, value))
        except StopIteration as finished:
            x = finished.value
        self.index += 1
        self.exact = x
        return (x.to(sample.dtype), self.predicted)

    def _start(self, x: torch.Tensor):
        """The algorithm, started on the sigmas from the begin index on and waiting for its first evaluation."""
        if self.sampler.own_timesteps:
            keep = len(self.sigmas) - self.begin
            run = a1111_ddim(x, self.sigmas[:keep], self.model.alphas_cumprod, None)
        else:
            run = self.sampler.algorithm(x, self.sigmas[self.begin // self.order :], self._noise_source(x))
        next(run)
        return run

    def _noise_source(self, x: torch.Tensor):
        if self.sampler.brownian:
            brownian = BrownianNoise(self.noise.seeds, tuple(x.shape[1:]), self.sigmas)
            return lambda sigma, sigma_next: brownian(sigma, sigma_next).to(x)
        return lambda sigma, sigma_next: self.noise.next().to(x)

    def _denoised(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's denoised latents at the current sigma (k-diffusion's CompVis eps and v denoisers)."""
        sigma = self.points[self.index].to(x.device)
        if self.config.prediction_type == "v_prediction":
            return output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        return x - output * sigma

    def _eps(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.config.prediction_type != "v_prediction":
            return output
        alpha = self.model.alphas_cumprod[int(self.points[self.index])].to(x.device)
        return alpha.sqrt() * output + (1 - alpha).sqrt() * x

    def _clean(self, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.sampler.own_timesteps:
            return value
        alpha = self.model.alphas_cumprod[int(self.points[self.index])].to(x.device)
        return (x - (1 - alpha).sqrt() * value) / alpha.sqrt()
