"""Few-step models (SD-Turbo, SDXL-Lightning, Hyper-SD, LCM): their settings start at the top of the noise, as A1111
draws them, and the README's curls for them are bodies /generate takes."""

import json
import re
from pathlib import Path

import pytest
from conftest import decode_png

README = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()  # where the samplers are told
SH_BLOCKS = re.findall(r"```(?:sh|shell)\n(.*?)```", README, re.S)


def readme_body(marker: str) -> dict:
    """The JSON body of the README's curl example that holds `marker`."""
    block = next(block for block in SH_BLOCKS if marker in block and "-d '" in block)
    return json.loads(block.split("-d '", 1)[1].split("'", 1)[0])


def scheduler_after(client, engine, **fields):
    body = {"prompt": "a fox", "width": 64, "height": 64, "seed": 1, **fields}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.get_json()
    return engine.models.get("demo").txt2img.scheduler


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_turbo_settings_start_at_the_last_timestep_with_the_full_noise(client, engine, steps):
    scheduler = scheduler_after(client, engine, sampler="euler a", num_steps=steps, guidance=0)
    assert scheduler.timesteps[0].item() == pytest.approx(999, abs=1e-3)
    assert scheduler.init_noise_sigma == pytest.approx(14.6146, abs=1e-3)
    assert len(scheduler.timesteps) == steps


def test_lightning_settings_step_through_evenly_spaced_timesteps_from_the_top(client, engine):
    scheduler = scheduler_after(client, engine, sampler="euler", schedule="sgm_uniform", num_steps=4, guidance=1)
    assert scheduler.timesteps.tolist() == pytest.approx([999, 749.25, 499.5, 249.75], abs=1e-2)


@pytest.mark.parametrize("marker", ['"sd_turbo"', '"sdxl_lightning_4step"', "lcm_lora_sd15"])
def test_the_readmes_few_step_curls_are_bodies_generate_takes(client, marker):
    body = readme_body(marker)
    # The demo model stands in for the file; the LoRA tag is left out for the same reason.
    body |= {"model": "demo", "width": 64, "height": 64, "prompt": body["prompt"].split(" <lora:")[0]}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.get_json()


def test_the_readmes_pasted_generation_data_is_taken_as_written(client):
    body = readme_body('"parameters"')
    answer = client.post("/generate", json={**body, "model": "demo", "width": 64, "height": 64, "num_steps": 2})
    assert answer.status_code == 400
    assert "Size gives width 512, but width is 64" in answer.get_json()["error"]
    text = body["parameters"].replace("Size: 512x512", "Size: 64x64").replace("Steps: 20", "Steps: 2")
    answer = client.post("/generate", json={"parameters": text, "model": "demo"}).get_json()
    assert "Sampler: Euler a, Schedule type: Automatic" in decode_png(answer["img"]).info["parameters"]
