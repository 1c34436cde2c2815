"""Z-Image, FLUX.2 klein and FLUX.1 as the files people download: tiny random models of their real architectures
written as ComfyUI's split files in their original key layouts, all-in-one checkpoints, diffusers folders and fp8
files (flow_models), loaded with the network blocked and listed with their parts; what a model lacking its parts, a
sidecar, a GGUF or a damaged file is told; offloading. Drawing them through every mode, dialect and the page is
test_flow_families_drawing's."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import assert_same_picture, decode_png, serving
from diffusion_model_files import flux2_tensors, scaled_fp8_tensors, z_image_tensors
from encoder_files import QWEN3_WIDER, flux2_vae_tensors, qwen3_tensors, t5_tensors
from flow_models import SMALL, SPLIT_MODELS, generate, save

import engine.files.headers
import imagine
from engine.engine import Engine
from engine.files.families import FAMILIES
from engine.files.headers import read_header
from engine.models import Models

# Every test here but those over loopback runs with the network blocked (conftest's offline).
pytestmark = pytest.mark.usefixtures("offline")


@pytest.mark.parametrize("name, family", SPLIT_MODELS.items())
def test_each_family_draws_from_comfyuis_split_files_with_its_own_defaults(flow_client, flow_engine, name, family):
    answer = generate(flow_client, model=name)
    assert decode_png(answer["img"]).size == (64, 64)
    assert answer["steps"] == flow_engine.models.loaded[next(iter(flow_engine.models.loaded))].family.default_steps
    assert flow_engine.models.loaded[next(iter(flow_engine.models.loaded))].family.name == family


def test_models_lists_each_flow_model_with_its_family_and_parts(flow_client):
    listed = {entry["name"]: entry for entry in flow_client.get("/models").get_json()["models"]}
    for name, family in SPLIT_MODELS.items():
        assert listed[name]["family"] == family, listed[name]
    assert listed["z_image_turbo_bf16"]["parts"] == {"text_encoder": "text_encoders/qwen_3_4b", "vae": "vae/ae"}
    assert listed["flux-2-klein-4b"]["parts"] == {"text_encoder": "text_encoders/qwen_3_4b", "vae": "vae/flux2-vae"}
    assert listed["flux-2-klein-9b"]["parts"] == {"text_encoder": "text_encoders/qwen_3_8b", "vae": "vae/flux2-vae"}
    assert listed["flux1-schnell"]["parts"] == {
        "text_encoder": "text_encoders/clip_l", "text_encoder_2": "clip/t5xxl_fp16", "vae": "vae/ae",
    }  # fmt: skip
    # An all-in-one checkpoint's parts are its own.
    all_in_one = listed["flux1-dev-all-in-one"]["parts"]
    assert set(all_in_one.values()) == {"flux1-dev-all-in-one"}
    # Text encoders and VAEs are parts, not models.
    parts = ("text_encoders/", "vae/", "clip/")
    assert not any(name.startswith(parts) or name in ("ae", "qwen_3_4b") for name in listed)


@pytest.mark.parametrize(
    "split, all_in_one",
    [("flux1-dev", "flux1-dev-all-in-one"), ("z_image_turbo_bf16", "z-image-all-in-one"),
     ("flux-2-klein-4b", "flux-2-klein-all-in-one")],
)  # fmt: skip
def test_an_all_in_one_checkpoint_draws_as_its_split_files_do(flow_client, split, all_in_one):
    listed = {entry["name"]: entry for entry in flow_client.get("/models").get_json()["models"]}
    assert set(listed[all_in_one]["parts"].values()) == {all_in_one}  # every part found inside it
    split_picture = decode_png(generate(flow_client, model=split)["img"])
    whole_picture = decode_png(generate(flow_client, model=all_in_one)["img"])
    assert np.array_equal(np.asarray(split_picture), np.asarray(whole_picture))  # the same tensors, read from one file


@pytest.mark.parametrize(
    "fp8_name, split", [("flux1-dev-fp8-e4m3fn", "flux1-dev"), ("flux-2-klein-4b-fp8", "flux-2-klein-4b"),
                        ("z_image_turbo_fp8_e4m3fn", "z_image_turbo_bf16")],
)  # fmt: skip
def test_an_fp8_file_of_each_family_stays_fp8_and_draws_near_its_bf16_file(flow_client, flow_engine, fp8_name, split):
    bf16 = np.asarray(decode_png(generate(flow_client, model=split)["img"]), float)
    drawn = np.asarray(decode_png(generate(flow_client, model=fp8_name)["img"]), float)
    transformer = flow_engine.models.loaded[next(iter(flow_engine.models.loaded))].txt2img.transformer
    assert any(p.dtype == torch.float8_e4m3fn for p in transformer.parameters())  # kept as downloaded, in fp8
    other_seed = np.asarray(decode_png(generate(flow_client, model=split, seed=8)["img"]), float)
    assert np.abs(drawn - bf16).mean() < np.abs(other_seed - bf16).mean() / 2  # rounded weights, the same picture


def test_comfyuis_scaled_fp8_files_of_klein_9b_as_people_download_them_draw_near_the_bf16_files(
    flow_client, tiny_configs, tmp_path
):
    # klein 9B's downloads: flux-2-klein-9b-fp8 and Comfy-Org's qwen_3_8b_fp8mixed (scaled fp8, ComfyUI's layout)
    models = tmp_path / "models"
    klein = flux2_tensors(size="flux2-klein/transformer-9b")
    save(models / "diffusion_models" / "flux-2-klein-9b-fp8.safetensors", scaled_fp8_tensors(klein))
    qwen = qwen3_tensors(numbers=QWEN3_WIDER)
    mixed = scaled_fp8_tensors(qwen, lambda name, _: ".layers." in name and name.endswith("proj.weight"))
    save(models / "text_encoders" / "qwen_3_8b_fp8mixed.safetensors", mixed)
    save(models / "vae" / "flux2-vae.safetensors", flux2_vae_tensors())
    engine = Engine(imagine.Settings(model="demo", models_dir=models), configs_dir=tiny_configs)
    engine.start()
    try:
        client = imagine.create_app(engine).test_client()
        drawn = generate(client, model="flux-2-klein-9b-fp8")
        bf16 = np.asarray(decode_png(generate(flow_client, model="flux-2-klein-9b")["img"]), float)
        other_seed = np.asarray(decode_png(generate(flow_client, model="flux-2-klein-9b", seed=8)["img"]), float)
        difference = np.abs(np.asarray(decode_png(drawn["img"]), float) - bf16).mean()
        assert difference < np.abs(other_seed - bf16).mean() / 2  # rounded weights, the same picture
    finally:
        engine.stop()


@pytest.mark.parametrize(
    "name, folder_name, family",
    [("z_image_turbo_bf16", "Z-Image-Turbo", "z-image"), ("flux-2-klein-4b", "FLUX.2-klein-4B", "flux2-klein"),
     ("flux1-schnell", "FLUX.1-schnell", "flux1-schnell"), ("flux1-dev", "FLUX.1-dev", "flux1-dev")],
)  # fmt: skip
def test_a_diffusers_folder_of_each_flow_family_loads_too(flow_client, flow_engine, comfyui, name, folder_name, family):
    split = generate(flow_client, model=name)
    model = flow_engine.models.loaded[next(iter(flow_engine.models.loaded))]
    folder = comfyui / folder_name
    model.txt2img.save_pretrained(folder)  # as a snapshot of the model's Hugging Face repository is laid out
    try:
        listed = {e["name"]: e for e in flow_client.get("/models").get_json()["models"]}
        assert listed[folder_name]["family"] == family
        assert set(listed[folder_name]["parts"]) == {component for component, _ in FAMILIES[family].parts}
        assert set(listed[folder_name]["parts"].values()) == {"in the folder"}
        folder_picture = decode_png(generate(flow_client, model=folder_name)["img"])
        assert_same_picture(np.asarray(folder_picture), np.asarray(decode_png(split["img"])))
    finally:
        shutil.rmtree(folder)


@pytest.fixture
def lacking_parts(tiny_configs, tmp_path):
    """An engine whose models folder holds Z-Image with a T5 text encoder beside it, of the wrong kind, a GGUF Qwen3,
    and no VAE."""
    models = tmp_path / "models"
    save(models / "diffusion_models" / "z_image_turbo_bf16.safetensors", z_image_tensors())
    save(models / "text_encoders" / "t5xxl_fp16.safetensors", t5_tensors())
    (models / "text_encoders" / "Qwen3-4B-Q4_K_M.gguf").write_bytes(b"GGUF")
    engine = Engine(imagine.Settings(model="demo", models_dir=models), configs_dir=tiny_configs)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture
def over_loopback_lacking_parts(lacking_parts):
    with serving(lacking_parts) as url:
        yield url


def test_a_model_whose_parts_are_missing_says_what_to_download_and_where(lacking_parts):
    models = lacking_parts.settings.models_dir
    client = imagine.create_app(lacking_parts).test_client()
    response = client.post("/generate", json={"prompt": "p", "model": "z_image_turbo_bf16", **SMALL})
    error = response.get_json()["error"]
    assert response.status_code == 422
    assert "qwen_3_4b.safetensors" in error and "text_encoders/" in error and "ae.safetensors" in error
    assert "text_encoders/t5xxl_fp16 (a T5-XXL text encoder" in error  # what is there, and why it does not fit
    gguf = "text_encoders/Qwen3-4B-Q4_K_M.gguf"
    assert error.endswith(f"; GGUF files, which Imagine loads as diffusion models only: {gguf}")
    assert str(models) not in error
    listed = {e["name"]: e for e in client.get("/models").get_json()["models"]}
    assert "qwen_3_4b.safetensors" in listed["z_image_turbo_bf16"]["parts"]["missing"]


def test_the_clis_model_list_says_what_a_model_lacks(over_loopback_lacking_parts):
    table = subprocess.run(
        [sys.executable, str(Path(imagine.__file__).parent / "imagine-cli.py"), "--list",
         "--server", over_loopback_lacking_parts],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith("z_image_turbo_bf16 "))
    assert "z-image, cannot draw: model 'z_image_turbo_bf16' (Z-Image) needs a Qwen3 text encoder" in row


def test_a_sidecar_names_the_parts_refuses_a_wrong_one_and_an_edit_takes_effect(comfyui, tiny_configs, tmp_path):
    models = tmp_path / "models"
    save(models / "diffusion_models" / "z.safetensors", z_image_tensors())
    shutil.copy(comfyui / "text_encoders" / "qwen_3_4b.safetensors", models / "mine.safetensors")
    shutil.copy(comfyui / "vae" / "ae.safetensors", models / "my-vae.safetensors")
    sidecar = models / "diffusion_models" / "z.json"
    sidecar.write_text(json.dumps({"text_encoder": "mine", "vae": "my-vae"}))
    engine = Engine(imagine.Settings(model="demo", models_dir=models), configs_dir=tiny_configs)
    engine.start()
    client = imagine.create_app(engine).test_client()
    try:
        assert client.post("/generate", json={"prompt": "p", "model": "z", **SMALL}).status_code == 200
        sidecar.write_text(json.dumps({"text_encoder": "my-vae", "vae": "my-vae"}))  # edited while z is loaded
        response = client.post("/generate", json={"prompt": "p", "model": "z", **SMALL})
        assert response.status_code == 422
        assert "'my-vae' holds FLUX.1's VAE" in response.get_json()["error"]
        (models / "qwen-q4.gguf").write_bytes(b"GGUF")
        sidecar.write_text(json.dumps({"text_encoder": "qwen-q4", "vae": "my-vae"}))
        response = client.post("/generate", json={"prompt": "p", "model": "z", **SMALL})
        assert response.status_code == 422
        assert response.get_json()["error"].startswith("the sidecar's text_encoder 'qwen-q4' is a GGUF file")
        sidecar.write_text(json.dumps({"text_encoder": "mine", "vae": "my-vae"}))
        assert client.post("/generate", json={"prompt": "p", "model": "z", **SMALL}).status_code == 200
    finally:
        engine.stop()


def test_a_request_for_a_model_read_before_reads_no_header_again_until_its_file_changes(
    flow_client, comfyui, monkeypatch
):
    path = comfyui / "diffusion_models" / "flux-2-klein-4b.safetensors"
    generate(flow_client, model="flux-2-klein-4b")
    reads = []
    monkeypatch.setattr(engine.files.headers, "read_header", lambda path: reads.append(path) or read_header(path))
    generate(flow_client, model="flux-2-klein-4b")
    assert reads == []
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1000))  # a new version of the file
    generate(flow_client, model="flux-2-klein-4b")
    assert path in reads  # the spy sees the reads there are


def test_a_gguf_file_of_four_bytes_is_refused_by_either_name_as_no_gguf(flow_client, comfyui):
    (comfyui / "diffusion_models" / "flux1-dev-Q4_K_S.gguf").write_bytes(b"GGUF")
    for name in ("flux1-dev-Q4_K_S", "flux1-dev-Q4_K_S.gguf"):
        response = flow_client.post("/generate", json={"prompt": "p", "model": name})
        assert response.status_code == 422
        assert response.get_json()["error"].startswith("flux1-dev-Q4_K_S.gguf: the file cannot be read as GGUF")
    (comfyui / "diffusion_models" / "flux1-dev-Q4_K_S.gguf").unlink()


def test_a_truncated_diffusion_model_is_refused_as_damaged(flow_client, comfyui):
    whole = (comfyui / "diffusion_models" / "flux-2-klein-4b.safetensors").read_bytes()
    (comfyui / "diffusion_models" / "cut.safetensors").write_bytes(whole[: len(whole) // 2])
    response = flow_client.post("/generate", json={"prompt": "p", "model": "cut", **SMALL})
    assert response.status_code == 422 and "truncated" in response.get_json()["error"]


def test_offload_is_a_setting_taking_none_model_or_sequential(monkeypatch, capsys):
    assert imagine.parse_settings([]).offload == "none"
    assert imagine.parse_settings(["--offload", "model"]).offload == "model"
    monkeypatch.setenv("IMAGINE_OFFLOAD", "sequential")
    assert imagine.parse_settings([]).offload == "sequential"
    with pytest.raises(SystemExit):
        imagine.parse_settings(["--offload", "all"])
    assert "--offload must be none, model or sequential, not 'all'" in capsys.readouterr().err


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_hands_a_gpu_models_parts_to_diffusers_cpu_offload(offload):
    calls = []

    class Pipeline:
        """Records what loading asks of a pipeline: offloading needs a GPU, which is beside the point here."""

        vae = SimpleNamespace(
            enable_slicing=lambda: calls.append("slicing"), enable_tiling=lambda: calls.append("tiling")
        )

        def enable_model_cpu_offload(self, device):
            calls.append(("model", device))

        def enable_sequential_cpu_offload(self, device):
            calls.append(("sequential", device))

        def to(self, *args, **kwargs):
            calls.append("to")

    models = Models(imagine.Settings(offload=offload), torch.device("cuda"), torch.bfloat16)
    models.place(Pipeline(), FAMILIES["z-image"])
    assert calls == [(offload, torch.device("cuda")), "slicing", "tiling"]  # never moved whole onto the GPU
