"""The noise a seed gives: torch's CPU numbers ("cpu") and NVIDIA's ("gpu"/"nv", Philox 4x32-10) on any device."""

import a1111_rng_reference
import numpy as np
import pytest
import torch

from engine.noise import (
    MAX_SEED,
    PhiloxGenerator,
    PictureNoise,
    Variation,
    box_muller,
    brownian_noise_as_on_a_gpu,
    make_generator,
    philox4x32_10,
    slerp,
)

# Random123's known-answer vectors for Philox 4x32-10 (kat_vectors): counter, key, output.
PHILOX_KNOWN_ANSWERS = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KNOWN_ANSWERS)
def test_philox_gives_the_published_known_answers(counter, key, expected):
    words = philox4x32_10(np.array(counter, dtype=np.uint32)[:, None], np.array(key, dtype=np.uint32)[:, None])
    assert words[:, 0].tolist() == expected


def test_nv_noise_for_seed_0_is_what_torch_randn_gives_on_an_nvidia_gpu():
    # torch.manual_seed(0); torch.randn(4, device="cuda") prints tensor([-0.9247, -0.4253, -2.6438, 0.1452]).
    noise = PhiloxGenerator(0).randn((4,))
    assert noise.dtype == torch.float32
    assert noise.tolist() == pytest.approx([-0.9247, -0.4253, -2.6438, 0.1452], abs=5e-5)


def test_nv_noise_differs_from_the_cpu_noise_of_the_same_seed():
    assert not torch.equal(make_generator("nv", 7).randn((4, 8, 8)), make_generator("cpu", 7).randn((4, 8, 8)))


def test_each_nv_draw_moves_the_generator_on_so_two_draws_differ_and_a_fresh_generator_repeats_the_first():
    generator = PhiloxGenerator(123)
    first, second = generator.randn((4, 8, 8)), generator.randn((4, 8, 8))
    assert not torch.equal(first, second)
    assert torch.equal(first, PhiloxGenerator(123).randn((4, 8, 8)))


def test_nv_noise_element_i_is_the_same_whatever_the_shape_of_the_draw():
    flat = PhiloxGenerator(5).randn((256,))
    assert torch.equal(PhiloxGenerator(5).randn((4, 8, 8)).flatten(), flat)
    assert torch.equal(PhiloxGenerator(5).randn((16,)), flat[:16])


def test_nv_noise_takes_every_64_bit_seed_and_the_high_word_matters():
    assert not torch.equal(PhiloxGenerator(0).randn((8,)), PhiloxGenerator(2**32).randn((8,)))
    assert torch.isfinite(PhiloxGenerator(MAX_SEED).randn((8,))).all()
    with pytest.raises(ValueError, match="seed"):
        PhiloxGenerator(MAX_SEED + 1)


def test_nv_noise_is_standard_normal():
    noise = PhiloxGenerator(2024).randn((4, 128, 128))
    assert abs(noise.mean().item()) < 0.02
    assert abs(noise.std().item() - 1) < 0.02


def test_box_muller_maps_the_middle_of_the_range_as_curand_does():
    # u = 2**31 * 2**-32 + 2**-33 (just over 1/2), v just over pi: sin(v) is about 0, cos(v) about -sqrt(2 ln 2).
    sine, cosine = box_muller(np.array([2**31], dtype=np.uint32), np.array([2**31], dtype=np.uint32))
    assert sine[0] == pytest.approx(0, abs=1e-6)
    assert cosine[0] == pytest.approx(-np.sqrt(-2 * np.log(0.5 + 2**-33)), rel=1e-6)


def test_cpu_noise_is_torchs_cpu_generator_for_the_seed_even_above_2_to_the_63():
    for seed in (0, 2**32 + 1, MAX_SEED):
        expected = torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))
        assert torch.equal(make_generator("cpu", seed).randn((4, 8, 8)), expected)


def test_an_unknown_rng_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="cpu, gpu, nv.*'quantum'"):
        make_generator("quantum", 1)


@pytest.mark.parametrize("rng", ["cpu", "nv"])
def test_picture_k_of_a_batch_gets_the_noise_its_seed_alone_gets(rng):
    batch = PictureNoise(rng, [10, 11, 12], (4, 8, 8))
    single = PictureNoise(rng, [11], (4, 8, 8))
    start, step = batch.next(), batch.next()
    assert start.shape == (3, 4, 8, 8)
    assert torch.equal(start[1], single.next()[0])
    assert torch.equal(step[1], single.next()[0])


@pytest.mark.parametrize("rng", ["cpu", "nv"])
def test_a_pictures_step_noise_continues_its_seeds_stream_after_the_starting_noise(rng):
    generator, noise = make_generator(rng, 99), PictureNoise(rng, [99], (4, 8, 8))
    assert torch.equal(noise.next()[0], generator.randn((4, 8, 8)))
    assert torch.equal(noise.next()[0], generator.randn((4, 8, 8)))


def test_an_eta_noise_seed_delta_draws_the_step_noise_from_seed_plus_delta():
    noise = PictureNoise("cpu", [5], (4, 8, 8), delta=31337)
    assert torch.equal(noise.next()[0], make_generator("cpu", 5).randn((4, 8, 8)))
    assert torch.equal(noise.next()[0], make_generator("cpu", 5 + 31337).randn((4, 8, 8)))


def test_brownian_trees_draw_nvidia_numbers_inside_the_context_and_torchs_again_after_it():
    import torchsde

    def increment():
        tree = torchsde.BrownianTree(torch.tensor(0.03), torch.zeros(4, 8, 8), torch.tensor(14.6), entropy=42)
        return tree(torch.tensor(1.0), torch.tensor(2.0))

    plain = increment()
    with brownian_noise_as_on_a_gpu():
        as_on_a_gpu = increment()
        assert torch.equal(increment(), as_on_a_gpu)
    assert not torch.allclose(plain, as_on_a_gpu)
    assert torch.equal(increment(), plain)


# (width, height) the seed's noise is drawn at for a 64x48 picture: none, its own, larger, smaller, odd differences.
RESIZES = [None, (64, 48), (96, 80), (40, 32), (56, 72), (88, 40)]


@pytest.mark.parametrize("rng", ["cpu", "nv"])
@pytest.mark.parametrize("strength", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("resize_from", RESIZES)
def test_variation_noise_is_a1111s_and_the_step_noise_continues_each_seeds_stream(rng, strength, resize_from):
    seeds, subseeds, shape = [7, 7], [2**64 - 2, 2**64 - 1], (4, 6, 8)
    expected = a1111_rng_reference.first_noise(rng, shape, seeds, subseeds, strength, resize_from)
    noise = PictureNoise(rng, seeds, shape, variation=Variation(tuple(subseeds), strength, resize_from))
    assert np.allclose(noise.next().numpy(), expected, rtol=0, atol=1e-5)  # float32 against float64
    # Each picture's generator has drawn the full-size noise once, whatever else was drawn: the step noise goes on.
    plain = PictureNoise(rng, seeds, shape)
    plain.next()
    assert torch.equal(noise.next(), plain.next())


def test_a_nearly_parallel_pair_of_noises_is_blended_straight_with_a1111s_weights():
    low = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1))
    high = low + 1e-3 * torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(2))
    expected = a1111_rng_reference.a1111_slerp(0.3, low.numpy(), high.numpy())
    assert np.allclose(slerp(0.3, low, high).numpy(), expected, rtol=0, atol=1e-5)
    assert np.allclose(expected, 0.3 * low.numpy() + 0.7 * high.numpy(), atol=1e-6)


def test_a_variation_seed_changes_the_noise_more_the_stronger_it_is_and_strength_1_is_its_own_noise():
    def noise(strength):
        return PictureNoise("cpu", [1], (4, 8, 8), variation=Variation((2,), strength)).next()

    plain, other = PictureNoise("cpu", [1], (4, 8, 8)).next(), PictureNoise("cpu", [2], (4, 8, 8)).next()
    distances = [float((noise(strength) - plain).abs().mean()) for strength in (0.0, 0.1, 0.5, 0.9)]
    assert distances[0] == 0 and distances == sorted(distances) and len(set(distances)) == 4
    assert torch.equal(noise(1.0), other)
