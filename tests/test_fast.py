"""Speed mechanisms (issue 5): previews without the VAE, schedulers built once, 16-bit on every device.

Nothing here is timed (timings on a shared machine are noise); bench/bench.py measures the speed.
"""

import json

import numpy as np
import pytest
import torch
from conftest import FAST, decode_png, pixels, png_data
from PIL import Image

import imagine


def stream_lines(client, **fields):
    response = client.post("/generate", json={"prompt": "a lighthouse", **FAST, **fields})
    assert response.status_code == 200, response.get_data(as_text=True)
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


@pytest.fixture
def vae_decodes(engine, monkeypatch):
    """Counts the demo model's VAE decodes from here on."""
    vae = engine.models.get("demo").txt2img.vae
    calls = []
    decode = vae.decode

    def counting_decode(*args, **kwargs):
        calls.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", counting_decode)
    return calls


def test_fast_previews_cost_no_vae_decode(client, vae_decodes):
    lines = stream_lines(client, num_steps=6, stream=1)
    assert len(lines) == 6  # five previews, then the picture
    assert len(vae_decodes) == 1  # the final picture's


def test_full_previews_decode_each_preview_with_the_vae(client, vae_decodes):
    lines = stream_lines(client, num_steps=6, stream=2, preview="full")
    assert [line.get("step") for line in lines[:-1]] == [2, 4]
    assert all(decode_png(line["img"]).size == (64, 64) for line in lines)
    assert len(vae_decodes) == 3


def test_full_and_fast_previews_show_different_pictures_of_the_same_run(client):
    fast = stream_lines(client, stream=2)
    full = stream_lines(client, stream=2, preview="full")
    assert not np.array_equal(pixels(fast[0]["img"]), pixels(full[0]["img"]))
    assert np.array_equal(pixels(fast[-1]["img"]), pixels(full[-1]["img"]))  # the final picture is the same


@pytest.mark.parametrize("value", ["FULL", "vae", 1])
def test_preview_must_be_fast_or_full(client, value):
    response = client.post("/generate", json={"prompt": "x", "preview": value})
    assert response.status_code == 400
    assert "preview" in response.get_json()["error"] and str(value) in response.get_json()["error"]


def preview_correlations(model, sampler, monkeypatch):
    """Per step of a 10-step run: how much the (fast, noisy-latents) previews look like the final latents' one."""

    def run():
        seen = {}
        req = imagine.GenerationRequest(prompt="a cat", width=64, height=64, num_steps=10, seed=3, sampler=sampler)
        imagine.generate(model, req, lambda step, steps, latents: seen.__setitem__(step, latents.clone()))
        return seen

    def picture(latents):
        preview = imagine.latents_to_preview(latents, model.family.latent_rgb, (64, 64))
        return np.asarray(preview, dtype=np.float64).ravel()

    predicted = run()
    with monkeypatch.context() as patch:
        patch.setattr(imagine, "predicted_clean", lambda scheduler, output: None)  # previews of the noisy latents
        noisy = run()
    final = picture(noisy[max(noisy)])  # the last step's latents are what the VAE decodes

    def likeness(latents):
        return np.corrcoef(picture(latents), final)[0, 1]

    return {step: (likeness(predicted[step]), likeness(noisy[step])) for step in sorted(predicted)}


@pytest.mark.parametrize("sampler", ["dpm++ 2m", "ddim"])
def test_fast_previews_look_more_like_the_final_picture_than_the_noisy_latents_do(sampler, monkeypatch):
    model = imagine.Models(imagine.Settings(), torch.device("cpu"), torch.float32).get("demo")
    likeness = preview_correlations(model, sampler, monkeypatch)
    for step in (2, 3, 4):
        from_prediction, from_noise = likeness[step]
        assert from_prediction > from_noise, (step, likeness)


# ---- no wasted work


def test_a_sampler_builds_its_scheduler_once_per_model(client, engine):
    model = engine.models.get("demo")
    stream_lines(client, sampler="dpm2", stream=0)
    first = model.schedulers["dpm2"]
    stream_lines(client, sampler="euler", stream=0)
    stream_lines(client, sampler="dpm2", stream=0, seed=7)
    assert model.schedulers["dpm2"] is first


@pytest.mark.parametrize("sampler", list(imagine.SAMPLERS))
def test_a_reused_scheduler_draws_what_a_fresh_one_draws(client, engine, sampler):
    """Reuse leaks no state between runs: after txt2img and img2img with other seeds, the first picture repeats."""
    first = pixels(stream_lines(client, sampler=sampler)[-1]["img"])
    img = png_data(Image.fromarray(first.astype(np.uint8)))
    stream_lines(client, sampler=sampler, seed=1, img=img, strength=0.6)
    stream_lines(client, sampler=sampler, seed=2, stream=1)
    again = pixels(stream_lines(client, sampler=sampler)[-1]["img"])
    assert np.array_equal(first, again)
    fresh = imagine.Models(imagine.Settings(), torch.device("cpu"), torch.float32).get("demo")
    req = imagine.GenerationRequest(prompt="a lighthouse", sampler=sampler, **FAST)
    assert np.array_equal(first, np.asarray(imagine.generate(fresh, req), dtype=np.int16))
