"""AUTOMATIC1111's starting noise with variation seeds and "Resize seed from" (its modules/rng.py, ImageRNG), written
again here apart from engine.noise, in float64 numpy, as the reference that engine.noise is checked against: what A1111
does, step by step, including its quirks. The seeds' numbers come from torch's CPU generator or the Philox generator
(itself checked against published answers in test_noise.py)."""

import numpy as np
import torch

from engine.noise import PhiloxGenerator


def seed_noise(rng: str, seed: int, shape: tuple) -> np.ndarray:
    """The first noise a fresh generator for `seed` draws, as A1111 draws one seed's noise."""
    if rng == "nv":
        return PhiloxGenerator(seed).randn(shape).numpy()
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()


def a1111_slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A1111's slerp of two (channels, rows, columns) noises: each channel's columns are the vectors blended (the norm
    runs over the rows); when the mean cosine is above 0.9995 it blends straight, weighting `a` by t (not 1 - t)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cosine = np.einsum("crw,crw->cw", a64 / np.linalg.norm(a64, axis=1, keepdims=True),
                       b64 / np.linalg.norm(b64, axis=1, keepdims=True))  # fmt: skip
    if cosine.mean() > 0.9995:
        return t * a64 + (1 - t) * b64
    theta = np.arccos(cosine)[:, None, :]
    return (np.sin((1 - t) * theta) * a64 + np.sin(t * theta) * b64) / np.sin(theta)


def window(small: int, large: int) -> tuple:
    """(where in `large`, where in `small`, how long) A1111 pastes along one axis: centred by floor division, and
    when `small` is the longer, its middle `small + 2 * shift` values (one short of `large` for an odd difference)."""
    shift = (large - small) // 2
    if shift >= 0:
        return shift, 0, small
    return 0, -shift, small + 2 * shift


def first_noise(rng, shape, seeds, subseeds, strength, resize_from=None) -> np.ndarray:
    """The batch's starting noise as A1111 draws it for `seeds` (one a picture) with `subseeds` at `strength`, drawn at
    `resize_from` (width, height) first where given."""
    channels, rows, columns = shape
    drawn = shape if resize_from is None else (channels, resize_from[1] // 8, resize_from[0] // 8)
    pictures = []
    for seed, subseed in zip(seeds, subseeds, strict=True):
        noise = seed_noise(rng, seed, drawn).astype(np.float64)
        if strength != 0:
            noise = a1111_slerp(strength, noise, seed_noise(rng, subseed, drawn))
        if drawn != shape:  # pasted into the middle of the seed's own noise at the size drawn
            (row_to, row_from, height), (column_to, column_from, width) = (
                window(drawn[axis], shape[axis]) for axis in (1, 2)
            )
            full = seed_noise(rng, seed, shape).astype(np.float64)
            full[:, row_to : row_to + height, column_to : column_to + width] = noise[
                :, row_from : row_from + height, column_from : column_from + width
            ]
            noise = full
        pictures.append(noise)
    return np.stack(pictures)
