"""Noise sources for a picture's seed, as AUTOMATIC1111 draws them: torch's CPU generator ("CPU") or the numbers
torch.randn gives on an NVIDIA GPU ("GPU"/"NV"), recomputed here with Philox 4x32-10 so they come out on any device;
and a batch's noise from them, with A1111's variation seeds (slerp) and "Resize seed from".
"""

import contextlib
import dataclasses
import math

import numpy as np
import torch

MAX_SEED = 2**64 - 1  # torch.manual_seed takes any 64-bit seed, and so does Philox's key
RNG_SOURCES = ("cpu", "gpu", "nv")

# Philox 4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011): the two
# round multipliers and the Weyl increments added to the key between rounds.
PHILOX_M0, PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
PHILOX_W0, PHILOX_W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
LOW32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """The Philox 4x32 block function with 10 rounds on many blocks at once: `counter` is (4, n) uint32, `key` is
    (2, n) uint32, the answer (4, n) uint32."""
    c0, c1, c2, c3 = (word.astype(np.uint64) for word in counter)
    k0, k1 = key[0].copy(), key[1].copy()
    for round_index in range(10):
        if round_index:
            k0 += PHILOX_W0
            k1 += PHILOX_W1
        product0, product1 = PHILOX_M0 * c0, PHILOX_M1 * c2
        c0 = (product1 >> np.uint64(32)) ^ c1 ^ k0.astype(np.uint64)
        c1 = product1 & LOW32
        c2 = (product0 >> np.uint64(32)) ^ c3 ^ k1.astype(np.uint64)
        c3 = product0 & LOW32
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


def box_muller(x: np.ndarray, y: np.ndarray) -> tuple:
    """Two normal numbers from two uint32 words, as cuRAND's curand_normal4 makes them: u and v are formed in float32
    exactly as it does (u in (0, 1], v in (0, 2*pi)); the sine comes first, then the cosine."""
    scale = np.float32(2.0**-32)
    scale_2pi = np.float32(2.0**-32) * np.float32(2 * math.pi)
    u = x.astype(np.float32) * scale + np.float32(2.0**-33)
    v = y.astype(np.float32) * scale_2pi + scale_2pi / np.float32(2)
    radius = np.sqrt(-2.0 * np.log(u.astype(np.float64)))
    angle = v.astype(np.float64)
    return (radius * np.sin(angle)).astype(np.float32), (radius * np.cos(angle)).astype(np.float32)


class PhiloxGenerator:
    """What torch's CUDA generator draws for a seed, on any device: torch.randn(shape) on an NVIDIA GPU.

    Torch's CUDA normal kernel gives element i of a tensor the Philox stream `subsequence i` keyed by the seed, at the
    generator's counter offset, and keeps the first of the four normals a Philox block makes; each call then moves
    the offset on by one block. That holds while the tensor has no more elements than the GPU runs threads at once
    (its SM count times its threads per SM: 270,336 on an H200, 43,008 on an RTX 3060; a 1024x1024 SDXL latent has
    65,536), as AUTOMATIC1111's "NV" source assumes too.
    """

    def __init__(self, seed: int):
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and {MAX_SEED}, but is {seed}")
        self.seed = seed
        self.offset = 0  # Philox blocks used so far in every element's stream

    def randn(self, shape) -> torch.Tensor:
        count = math.prod(shape)
        index = np.arange(count, dtype=np.uint64)
        counter = np.empty((4, count), dtype=np.uint32)
        counter[0], counter[1] = self.offset & 0xFFFFFFFF, self.offset >> 32
        counter[2], counter[3] = index & LOW32, index >> np.uint64(32)
        key = np.empty((2, count), dtype=np.uint32)
        key[0], key[1] = self.seed & 0xFFFFFFFF, self.seed >> 32
        self.offset += 1
        words = philox4x32_10(counter, key)
        return torch.from_numpy(box_muller(words[0], words[1])[0].reshape(shape))


class CpuGenerator:
    """torch's CPU generator for a seed: the same numbers on every machine."""

    def __init__(self, seed: int):
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator)


def make_generator(rng: str, seed: int):
    """A generator of the `rng` source ("cpu", "gpu" or "nv") for `seed`."""
    if rng not in RNG_SOURCES:
        raise ValueError(f"rng must be one of {', '.join(RNG_SOURCES)}, but is {rng!r}")
    return CpuGenerator(seed) if rng == "cpu" else PhiloxGenerator(seed)


class PictureNoise:
    """The noise of a batch, each picture from its own seed's generator, as AUTOMATIC1111's ImageRNG draws it.

    The first `next()` is the starting noise; each later one is a sampler's extra noise for a step (ancestral and
    SDE samplers), drawn from the same generators in turn. `delta` is A1111's "Eta noise seed delta" (ENSD): when set,
    the extra noise comes from generators for seed + delta instead. `variation` (a Variation) blends a second seed's
    noise into the starting noise and may draw it at another size first, as A1111's variation seeds do.
    """

    def __init__(self, rng: str, seeds: list, shape: tuple, delta: int = 0, variation: "Variation | None" = None):
        self.rng, self.seeds, self.shape, self.delta = rng, list(seeds), tuple(shape), delta
        self.variation = variation or Variation()
        self.generators = [make_generator(rng, seed) for seed in self.seeds]
        self.started = False

    def next(self) -> torch.Tensor:
        if self.started:
            return torch.stack([generator.randn(self.shape) for generator in self.generators])
        self.started = True
        noise = torch.stack([self.starting(index) for index in range(len(self.seeds))])
        if self.delta:
            self.generators = [make_generator(self.rng, (seed + self.delta) % (MAX_SEED + 1)) for seed in self.seeds]
        return noise

    def starting(self, index: int) -> torch.Tensor:
        """Picture `index`'s starting noise. Its generator draws the full-size noise first whatever else is drawn, so
        its step noise continues from the same place; the other draws come from fresh generators of their seeds."""
        noise = self.generators[index].randn(self.shape)
        variation, seed = self.variation, self.seeds[index]
        drawn_shape = self.shape if variation.resize_from is None else variation.latent_shape(self.shape[0])
        blended = noise if drawn_shape == self.shape else make_generator(self.rng, seed).randn(drawn_shape)
        if variation.strength:
            other = make_generator(self.rng, variation.seeds[index]).randn(drawn_shape)
            blended = slerp(variation.strength, blended, other)
        return blended if drawn_shape == self.shape else centred_paste(blended, noise)


@dataclasses.dataclass(frozen=True)
class Variation:
    """A1111's variation seeds: each picture's starting noise is its seed's slerped `strength` of the way (0 to 1)
    towards its variation seed's; with `resize_from` (width, height), both are drawn at that picture size and pasted
    into the middle of the seed's noise at the size drawn, so a picture keeps its look at another size."""

    seeds: tuple = ()  # one per picture
    strength: float = 0.0
    resize_from: tuple | None = None

    def latent_shape(self, channels: int) -> tuple:
        width, height = self.resize_from
        return channels, height // 8, width // 8


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical blend of two noises (channels, height, width), `strength` of the way from `low` to `high`.
    As A1111 computes it, the angle is taken per channel and column (the norms run down dim 1), and where the two
    are almost parallel on average it falls back to a straight blend whose weights are the other way round: copied
    as it is, since it decides which picture a seed draws."""
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    cosine = (low_unit * high_unit).sum(1)
    if cosine.mean() > 0.9995:
        return low * strength + high * (1 - strength)
    angle = torch.acos(cosine)
    sine = torch.sin(angle)
    low_weight = (torch.sin((1.0 - strength) * angle) / sine).unsqueeze(1)
    high_weight = (torch.sin(strength * angle) / sine).unsqueeze(1)
    return low_weight * low + high_weight * high


def centred_paste(small: torch.Tensor, large: torch.Tensor) -> torch.Tensor:
    """`large` with `small` in its middle: A1111's "Resize seed from". Where `small` is the larger along an axis, its
    middle part is taken; an odd difference puts the extra row or column after it (A1111's floor division)."""
    result = large.clone()
    (rows, row_from, row_to), (columns, column_from, column_to) = (
        overlap(small.shape[axis], large.shape[axis]) for axis in (1, 2)
    )
    result[:, row_to : row_to + rows, column_to : column_to + columns] = small[
        :, row_from : row_from + rows, column_from : column_from + columns
    ]
    return result


def overlap(small: int, large: int) -> tuple:
    """(length, start in small, start in large) of the centred overlap of two lengths along one axis."""
    shift = (large - small) // 2
    return (small, 0, shift) if shift >= 0 else (small + 2 * shift, -shift, 0)


def _torchsde_cuda_randn(size, dtype, device, seed):
    """torchsde's draw for one Brownian-tree node as it comes out on an NVIDIA GPU: a fresh generator per node."""
    return PhiloxGenerator(int(seed)).randn(tuple(size)).to(device=device, dtype=dtype)


@contextlib.contextmanager
def brownian_noise_as_on_a_gpu():
    """While open, torchsde's Brownian trees (the noise of the DPM++ SDE samplers) draw what they draw on an NVIDIA
    GPU, where AUTOMATIC1111 keeps them whatever its RNG setting, instead of torch's CPU numbers."""
    from torchsde._brownian import brownian_interval

    original = brownian_interval._randn
    brownian_interval._randn = _torchsde_cuda_randn
    try:
        yield
    finally:
        brownian_interval._randn = original
