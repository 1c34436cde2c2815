"""Progress and previews have one owner, the engine: it builds each preview on its own thread, under its inference
context, once a step and only where someone asked; the stream, /jobs, A1111's /progress and the page read that copy."""

import threading

import torch
from conftest import decode_png
from jobs_client import events, stream, submit, wait_for

import imagine


def test_full_previews_are_decoded_on_the_engines_thread_in_inference_mode_whoever_asks(make_engine):
    engine = make_engine(model="demo")
    client = imagine.create_app(engine).test_client()
    wait_for(client, submit(client)["id"], "done")  # the model is loaded
    decodes = []

    def record(module, args):
        decodes.append((threading.current_thread().name, torch.is_inference_mode_enabled()))

    engine.models.loaded["demo"].txt2img.vae.decoder.register_forward_pre_hook(record)
    job_id = submit(client, num_steps=8, preview="full")["id"]
    previews, current_images = [], []
    with stream(client, job_id, "?every=1") as response:
        for _, kind, data in events(response):
            if kind == "preview":
                previews.append(decode_png(data["img"]))
            elif kind == "progress":  # A1111's clients poll the progress, with its picture, while a job runs
                current_images.append(client.get("/sdapi/v1/progress").get_json()["current_image"])
    assert previews and any(current_images)
    assert decodes and set(decodes) == {("imagine-engine", True)}, decodes
