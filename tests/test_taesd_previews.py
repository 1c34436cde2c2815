"""TAESD previews (issue 33): madebyollin's tiny decoders found in `vae_approx/` as ComfyUI and A1111 keep them (the
original layout, .safetensors or .pth) or as a diffusers folder, decoding each streamed preview of SD1 and Z-Image at
the picture's full size; a file of the wrong channel count or a .pth holding code refused, naming the file. The
decoder files are made here with random weights by diffusers' own AutoencoderTiny, the reference each preview is
checked against."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import decode_png
from diffusers import AutoencoderTiny
from diffusion_model_files import z_image_tensors
from encoder_files import ae_tensors, qwen3_tensors
from flow_models import SMALL, save
from taesd_files import original_layout, tiny_autoencoder, write_decoder

import engine.engine
import imagine
from engine.files.families import FAMILIES
from engine.files.library import Library
from engine.files.placing import folder_for
from engine.files.taesd import decoder_name
from engine.flow import flow_scheduler

SD_REQUEST = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_steps": 3, "seed": 5, "stream": 1}


def reference_picture(vae: AutoencoderTiny, latents: torch.Tensor) -> np.ndarray:
    """diffusers' decode of the latents (scale factor 1, as TAESD's), as 8-bit pixels."""
    with torch.no_grad():
        decoded = vae.decode(latents.float()).sample[0]
    return ((decoded + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture(autouse=True)
def every_due_preview(monkeypatch):
    """TAESD previews at every step they are due, whatever they cost against a step (the share of the time they may
    take is a cost rule, tested on its own): all the time may go to them, which the time they took is part of."""
    monkeypatch.setattr(engine.engine, "TAESD_SHARE", 1.0)


@pytest.fixture
def previews_built(monkeypatch) -> list:
    """Records each preview the engine builds from here on, as (the latents it was built from, its picture)."""
    built = []
    build = engine.engine.preview_image

    def recording(model, req, latents, decoder=None):
        image = build(model, req, latents, decoder)
        built.append((latents.clone(), image))
        return image

    monkeypatch.setattr(engine.engine, "preview_image", recording)
    return built


def streamed(client, **body) -> list:
    response = client.post("/generate", json={**SD_REQUEST, **body})
    assert response.status_code == 200, response.get_data(as_text=True)
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


def assert_same_pixels(one: np.ndarray, other: np.ndarray) -> None:
    assert one.shape == other.shape
    assert np.abs(one.astype(int) - other.astype(int)).max() <= 1  # float rounding at a .5 only


@pytest.mark.parametrize("form", ["safetensors", "pth", "diffusers folder"])
def test_sd1_streams_previews_decoded_by_taesd_at_the_pictures_full_size(make_engine, tmp_path, previews_built, form):
    vae = tiny_autoencoder(4)
    write_decoder(tmp_path, vae, "taesd", form)
    client = imagine.create_app(make_engine(model="demo")).test_client()
    lines = streamed(client)
    assert [line.get("step") for line in lines[:-1]] == [1, 2]
    for line, (latents, _) in zip(lines[:-1], previews_built, strict=True):
        picture = np.asarray(decode_png(line["img"]))
        assert picture.shape == (64, 64, 3)  # the picture's size, where the latents are 8x8
        assert_same_pixels(picture, reference_picture(vae, latents))
    assert picture.std() > 1  # a picture, not one flat colour the comparison would pass anyway


def test_without_a_decoder_file_or_with_preview_fast_the_previews_are_the_cheap_mapping(make_engine, tmp_path):
    client = imagine.create_app(make_engine(model="demo")).test_client()
    without = streamed(client)
    write_decoder(tmp_path, tiny_autoencoder(4), "taesd")
    fast = streamed(client, preview="fast")
    taesd = streamed(client)
    assert [line["img"] for line in without[:-1]] == [line["img"] for line in fast[:-1]]
    assert without[0]["img"] != taesd[0]["img"]
    assert without[-1]["img"] == taesd[-1]["img"]  # the finished picture is the VAE's, whatever the previews


def test_preview_taesd_without_a_decoder_file_is_refused_naming_the_file_to_add(make_engine):
    client = imagine.create_app(make_engine(model="demo")).test_client()
    response = client.post("/generate", json={**SD_REQUEST, "stream": 0, "preview": "taesd"})
    assert response.status_code == 400
    assert "taesd_decoder.safetensors" in response.get_json()["error"]
    assert "vae_approx/" in response.get_json()["error"]


def test_a_decoder_of_the_wrong_channel_count_is_refused_naming_it_and_auto_falls_back_to_fast(
    make_engine, tmp_path, caplog
):
    write_decoder(tmp_path, tiny_autoencoder(16), "taesd")  # taef1's channels under taesd's name
    client = imagine.create_app(make_engine(model="demo")).test_client()
    with caplog.at_level(logging.WARNING, logger="imagine"):
        auto = streamed(client)
    refusals = [record.getMessage() for record in caplog.records if "fast mapping" in record.getMessage()]
    assert len(refusals) == 1 and "vae_approx/taesd_decoder.safetensors" in refusals[0] and "16" in refusals[0]
    assert [line["img"] for line in auto[:-1]] == [line["img"] for line in streamed(client, preview="fast")[:-1]]
    response = client.post("/generate", json={**SD_REQUEST, "stream": 0, "preview": "taesd"})
    assert response.status_code == 422
    message = response.get_json()["error"]
    assert "vae_approx/taesd_decoder.safetensors" in message and "16" in message and str(tmp_path) not in message


def test_taesd_previews_over_their_share_of_the_time_are_left_out(make_engine, tmp_path, monkeypatch):
    write_decoder(tmp_path, tiny_autoencoder(4), "taesd")
    client = imagine.create_app(make_engine(model="demo")).test_client()
    monkeypatch.setattr(engine.engine, "TAESD_SHARE", 0.0)  # the first one spends all there is
    lines = streamed(client, num_steps=4)
    assert [line.get("step") for line in lines[:-1]] == [1]
    assert [line.get("step") for line in streamed(client, num_steps=4, preview="fast")[:-1]] == [1, 2, 3]


class WritesAFile:
    """A pickle that, unpickled unsafely, would run code: it opens (creates) a file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_pth_decoder_that_would_run_code_is_refused_and_runs_nothing(make_engine, tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "vae_approx").mkdir()
    torch.save({"1.weight": WritesAFile(marker)}, tmp_path / "vae_approx" / "taesd_decoder.pth")
    client = imagine.create_app(make_engine(model="demo")).test_client()
    response = client.post("/generate", json={**SD_REQUEST, "stream": 0, "preview": "taesd"})
    assert response.status_code == 422
    assert "vae_approx/taesd_decoder.pth cannot be read as tensors" in response.get_json()["error"]
    assert not marker.exists()
    assert client.post("/generate", json={**SD_REQUEST, "stream": 0}).status_code == 200  # serving as before


def test_a_decoder_file_far_too_large_is_refused_before_it_is_read(make_engine, tmp_path):
    (tmp_path / "vae_approx").mkdir()
    with open(tmp_path / "vae_approx" / "taesd_decoder.safetensors", "wb") as file:
        file.truncate(65 * 2**20)  # sparse: no disk written
    client = imagine.create_app(make_engine(model="demo")).test_client()
    response = client.post("/generate", json={**SD_REQUEST, "stream": 0, "preview": "taesd"})
    assert response.status_code == 422
    assert "vae_approx/taesd_decoder.safetensors is 65 MB: far too large" in response.get_json()["error"]


@pytest.fixture
def z_image_folder(tmp_path) -> Path:
    """A models folder holding a tiny Z-Image with its parts, and a taef1 decoder (tiny_autoencoder(16, seed=1))."""
    save(tmp_path / "diffusion_models" / "z_image_turbo_bf16.safetensors", z_image_tensors())
    save(tmp_path / "text_encoders" / "qwen_3_4b.safetensors", qwen3_tensors())
    save(tmp_path / "vae" / "ae.safetensors", ae_tensors())
    write_decoder(tmp_path, tiny_autoencoder(16, seed=1), "taef1")
    return tmp_path


def test_z_image_streams_previews_decoded_by_taef1_at_the_pictures_full_size(
    make_engine, tiny_configs, z_image_folder, previews_built
):
    client = imagine.create_app(make_engine(model="demo", configs_dir=tiny_configs)).test_client()
    body = {"model": "z_image_turbo_bf16", **SMALL, "num_steps": 3}
    lines = streamed(client, **body)
    assert [line.get("step") for line in lines[:-1]] == [1, 2]
    vae = tiny_autoencoder(16, seed=1)
    for line, (latents, _) in zip(lines[:-1], previews_built, strict=True):
        assert latents.shape == (1, 16, 8, 8)  # the transformer's latents on the picture's grid: taef1's input
        assert_same_pixels(np.asarray(decode_png(line["img"])), reference_picture(vae, latents))
    fast = streamed(client, **body, preview="fast")
    assert fast[0]["img"] != lines[0]["img"]


@pytest.mark.parametrize("sampler", ["euler", "dpm++ 2m"])
def test_flow_previews_show_the_predicted_finished_latents(sampler):
    """x0 = sample - sigma * velocity: at a step from sigma 1 it is the velocity's negative, and at the last step
    (to sigma 0) it is what the step returns, the finished latents."""
    model = type("Model", (), {"scheduler_config": {"shift": 1.0, "use_dynamic_shifting": False}})()
    scheduler = flow_scheduler(model, sampler, [torch.Generator().manual_seed(0)])
    scheduler.set_timesteps(2)
    sample, velocity = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    after = scheduler.step(velocity, scheduler.timesteps[0], sample).prev_sample
    assert torch.allclose(scheduler.predicted, sample - velocity)
    assert not torch.allclose(scheduler.predicted, after)
    last = scheduler.step(velocity, scheduler.timesteps[1], after).prev_sample
    assert torch.allclose(scheduler.predicted, last, atol=1e-5)


def test_the_pull_catalog_brings_each_family_its_taesd_decoder_into_vae_approx():
    library = Library()
    for entry in library.entries.values():
        name = decoder_name(FAMILIES[entry.family])
        for variant in entry.variants.values():
            decoders = [file.name for file in variant.files if file.folder == "vae_approx"]
            assert decoders == ([] if name is None else [f"{name}_decoder.safetensors"]), variant.label


def test_decoders_in_vae_approx_are_not_listed_as_models(make_engine, tmp_path):
    write_decoder(tmp_path, tiny_autoencoder(4), "taesd")
    save(tmp_path / "VAE-approx" / "taesdxl_decoder.safetensors", original_layout(tiny_autoencoder(4)))
    client = imagine.create_app(make_engine(model="demo")).test_client()
    assert [model["name"] for model in client.get("/models").get_json()["models"]] == ["demo"]


def test_a_decoder_pulled_from_a_url_goes_to_vae_approx(tmp_path):
    path = write_decoder(tmp_path, tiny_autoencoder(16), "taef1")
    assert folder_for(path, "taef1_decoder.safetensors") == "vae_approx"
