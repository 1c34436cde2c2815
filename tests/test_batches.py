"""Several pictures per request (`n`): seeds seed, seed+1, ...; every picture as its single request draws it."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, decode_png, noise_picture, png_data, run_cli, square_mask

import imagine
from engine import pipeline
from engine.engine import Engine
from engine.errors import ImagineError
from engine.job import Failed
from engine.request import GenerationRequest

# A batched call computes in other matrix shapes, so its sums may round differently in the last bit; through the
# tiny random model's steps that came to at most 4 levels of 255 here (0 on the SD1.5-architecture bench model).
MAX_BATCH_DIFFERENCE = 4


def pixels(data: str) -> np.ndarray:
    return np.asarray(decode_png(data), dtype=np.int16)


def test_a_batch_keeps_img_and_seed_of_its_first_picture_and_each_png_carries_its_own_seed(client):
    batch = client.post("/generate", json={"prompt": "a cat", **FAST, "n": 2}).get_json()
    assert (batch["img"], batch["seed"]) == (batch["images"][0], 42)
    seeds = [decode_png(image).info["parameters"].split("Seed: ")[1].split(",")[0] for image in batch["images"]]
    assert seeds == ["42", "43"]


@pytest.mark.parametrize(
    "fields",
    [{}, {"sampler": "euler a"}, {"sampler": "dpm++ sde"}, {"img": "noise"}, {"img": "noise", "mask": "square"}],
    ids=["txt2img", "euler a", "dpm++ sde", "img2img", "inpaint"],
)
def test_picture_k_of_a_batch_is_the_single_picture_with_seed_plus_k(client, fields):
    inputs = {"noise": png_data(noise_picture()), "square": png_data(square_mask())}
    body = {"prompt": "a cat", **FAST, **{field: inputs.get(value, value) for field, value in fields.items()}}
    batch = client.post("/generate", json={**body, "n": 3}).get_json()
    assert batch["seeds"] == [42, 43, 44]
    for k, image in enumerate(batch["images"]):
        single = client.post("/generate", json={**body, "seed": 42 + k}).get_json()
        assert np.abs(pixels(image) - pixels(single["img"])).max() <= MAX_BATCH_DIFFERENCE, k
    assert len(set(batch["images"])) == 3


def test_streaming_a_batch_previews_every_picture_at_each_step_marked_with_its_index_and_ends_with_all(client):
    response = client.post("/generate", json={"prompt": "a cat", **FAST, "n": 2, "stream": 1})
    lines = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    previews = [(line["index"], line["seed"], line["step"]) for line in lines[:-1]]
    assert previews == [(0, 42, 1), (1, 43, 1), (0, 42, 2), (1, 43, 2), (0, 42, 3), (1, 43, 3)]
    assert len({line["img"] for line in lines[:-1]}) == 6
    assert lines[-1]["done"] and lines[-1]["seeds"] == [42, 43] and len(lines[-1]["images"]) == 2


@pytest.mark.parametrize("n", [0, 100, -1])
def test_n_out_of_range_is_refused_naming_the_field_and_value(client, n):
    response = client.post("/generate", json={"prompt": "a cat", **FAST, "n": n})
    assert response.status_code == 400
    assert response.get_json()["error"] == f"n must be between 1 and 8, not {n}"


def test_the_largest_batch_is_a_setting_from_a_flag_or_the_environment(monkeypatch, make_engine):
    assert imagine.parse_settings(["--max-batch", "2"]).max_batch == 2
    monkeypatch.setenv("IMAGINE_MAX_BATCH", "3")
    assert imagine.parse_settings([]).max_batch == 3
    client = imagine.create_app(make_engine(max_batch=2)).test_client()
    response = client.post("/generate", json={"prompt": "a cat", **FAST, "n": 3})
    assert response.get_json()["error"] == "n must be between 1 and 2, not 3"


def idle_engine(tmp_path, **settings):
    """An engine whose thread is not started: what is queued stays queued."""
    return Engine(imagine.Settings(models_dir=tmp_path, **settings))


def test_the_queue_counts_a_batch_as_one_job(tmp_path):
    engine = idle_engine(tmp_path, max_queue=1)
    engine.submit(GenerationRequest(prompt="x", width=64, height=64, num_steps=1, n=8))
    engine.submit(GenerationRequest(prompt="x", width=64, height=64, num_steps=1))  # one runs, one waits
    with pytest.raises(ImagineError) as full:
        engine.submit(GenerationRequest(prompt="x", width=64, height=64, num_steps=1))
    assert full.value.status == 503
    assert engine.jobs.qsize() == 2


def test_cancelling_a_batch_stops_all_its_pictures_at_the_next_step(make_engine):
    steps = []

    def cancelled_after_step_2(model, req, on_step=None, conditioning=None):
        def step_then_cancel(step, steps_in_all, latents):
            steps.append((step, len(latents)))
            if step == 2:
                engine.running.cancel(ImagineError("the client disconnected", 499))
            return on_step(step, steps_in_all, latents)

        return pipeline.generate(model, req, step_then_cancel, conditioning)

    engine = make_engine(generate=cancelled_after_step_2)
    job = engine.submit(GenerationRequest(prompt="x", width=64, height=64, num_steps=8, seed=1, n=5))
    events = list(job)
    assert isinstance(events[-1], Failed) and events[-1].error.status == 499
    assert steps == [(1, 5), (2, 5)]  # the five pictures are drawn together, and no step ran after the cancel


def test_cli_batch_writes_name_png_name_2_png_and_prints_every_path(live_server, tmp_path):
    options = ["-w", "64", "-h", "64", "-n", "2", "--seed", "7", "-b", "3", "-o", "cat.png"]
    result = run_cli("a cat", *options, cwd=tmp_path, server=live_server)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["cat.png", "cat-2.png", "cat-3.png"]
    seeds = [decode_png_file(tmp_path / name).split("Seed: ")[1].split(",")[0] for name in result.stdout.split()]
    assert seeds == ["7", "8", "9"]


def decode_png_file(path: Path) -> str:
    from PIL import Image

    return Image.open(path).info["parameters"]


def test_health_counts_a_waiting_batch_as_one_in_the_queue(tmp_path):
    engine = idle_engine(tmp_path)
    engine.submit(GenerationRequest(prompt="x", width=64, height=64, num_steps=1, n=4))
    client = imagine.create_app(engine).test_client()
    assert client.get("/health").get_json()["queue"] == 1
