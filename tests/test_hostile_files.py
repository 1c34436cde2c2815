"""Hard to knock over, round four (issue 35, items 1-7): model files as hostile input. Numbers and text read from a
file (block counts, config sizes, a header's size and depth, an SD2 `.yaml`, a format note, a sidecar's names, a
folder's name) are checked before anything is built or read whole, each through the real server where /health must
keep answering at once and the memory come back. The files are built here, small: header-only where that is enough,
tiny models where a part must load."""

import gc
import json
import re
import shutil
import tracemalloc
from pathlib import Path

import pytest
import requests
import torch
from conftest import FAST, HEALTH_BOUND, health_while, save_tiny_folder
from diffusion_model_files import flux1_tensors
from encoder_files import ae_tensors
from flow_models import SMALL, save
from safetensors.torch import save_file

import engine.files.families
import engine.files.headers
import imagine
from engine.errors import ImagineError
from engine.files.catalog import Catalog
from engine.settings import Settings

LISTINGS = ("/models", "/sdapi/v1/sd-models", "/v1/models")


def header_file(path: Path, header) -> Path:
    """A .safetensors file of a header alone (`header`: a dict, or the JSON text itself), as a hostile file may be:
    an 8-byte little-endian length, the header, no data (its entries say zero bytes)."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    return path


EMPTY = {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]}  # an entry of no values: no data to hold


def rss() -> int:
    """This process's resident memory in bytes (VmRSS), after a collection."""
    gc.collect()
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def assert_memory_back(before: int) -> None:
    after = rss()
    print(f"RSS {before >> 20} MiB before, {after >> 20} MiB after")
    assert after <= before * 1.1, (before >> 20, after >> 20)


def with_parts(comfyui: Path, models: Path, *diffusion_models: str) -> Path:
    """A models folder whose part folders (text_encoders/, clip/, vae/) link to the tiny ComfyUI folder's files, with
    copies of the diffusion models named (paths below it) in diffusion_models/: a sidecar is read beside the file a
    link leads to."""
    for sub in ("text_encoders", "clip", "vae"):
        (models / sub).mkdir(parents=True)
        for file in (comfyui / sub).glob("*.safetensors"):
            (models / sub / file.name).symlink_to(file)
    (models / "diffusion_models").mkdir()
    for name in diffusion_models:
        shutil.copy(comfyui / name, models / "diffusion_models")
    return models


def draw(url: str, model: str, timeout=60, **fields) -> requests.Response:
    return requests.post(f"{url}/generate", json={"prompt": "p", "model": model, **SMALL, **fields}, timeout=timeout)


def listed(url: str) -> dict:
    return {model["name"]: model for model in requests.get(f"{url}/models", timeout=60).json()["models"]}


# ---- 1. a block count from a header, or a config's size, builds nothing beyond the blocks there


def test_a_block_count_beyond_the_blocks_there_is_refused_before_any_model_is_built(
    comfyui, tiny_configs, make_engine, serve, tmp_path
):
    models = with_parts(comfyui, tmp_path / "models", "unet/flux1-schnell.safetensors")
    tensors = flux1_tensors(guidance=False)
    block = {name: tensor for name, tensor in tensors.items() if name.startswith("double_blocks.0.")}

    def with_blocks(*numbers):
        more = {name.replace(".0.", f".{n}.", 1): tensor.clone() for n in numbers for name, tensor in block.items()}
        return {**tensors, **more}

    save(models / "diffusion_models" / "endless.safetensors", with_blocks(999_999_999))
    save(models / "diffusion_models" / "gap.safetensors", with_blocks(5))
    save(models / "diffusion_models" / "many.safetensors", with_blocks(*range(2, 300)))
    url = serve(make_engine(model="demo", models_dir=models, configs_dir=tiny_configs))
    before = rss()
    refusals = {
        "endless": "the file names 1000000000 blocks double_blocks.N, more than any model has (256 at most)",
        "gap": "the file names double_blocks.5 but lacks double_blocks.2.img_attn.qkv.weight",
        "many": "the file names 300 blocks double_blocks.N",
    }
    for name, refusal in refusals.items():
        answer, slowest = health_while(url, lambda name=name: draw(url, name))
        assert answer.status_code == 422 and refusal in answer.json()["error"], answer.json()
        assert slowest < HEALTH_BOUND
    assert_memory_back(before)
    assert refusals["endless"] in listed(url)["endless"]["error"]
    assert draw(url, "flux1-schnell").status_code == 200  # the job after them starts, and draws


def test_a_diffusers_folder_whose_config_counts_a_billion_layers_is_refused_before_any_model_is_built(
    make_engine, serve, tmp_path
):
    config = save_tiny_folder(tmp_path / "deep", seed=2) / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_hidden_layers": 1_000_000_000}))
    url = serve(make_engine(model="demo", models_dir=tmp_path))
    before = rss()
    answer, slowest = health_while(url, lambda: draw(url, "deep", **FAST))
    assert answer.status_code == 422
    assert "text_encoder/config.json gives num_hidden_layers as 1000000000" in answer.json()["error"]
    assert slowest < HEALTH_BOUND
    assert_memory_back(before)
    assert draw(url, "demo", **FAST).status_code == 200


# ---- 2. an SD2 .yaml is matched in linear time, once per version


def test_an_sd2_yaml_of_blank_lines_is_read_in_linear_time_and_once_per_version(
    make_engine, serve, tmp_path, monkeypatch
):
    header_file(tmp_path / "sd2.safetensors", {"cond_stage_model.model.x": EMPTY})  # what marks an SD2 checkpoint
    yaml = tmp_path / "sd2.yaml"
    yaml.write_text("\n" * 150_000)  # held /health 19-40 s, or the listing past --folder-timeout, on every request
    reads = []
    sd2_family = engine.files.families.sd2_family
    monkeypatch.setattr(engine.files.families, "sd2_family", lambda path: reads.append(path) or sd2_family(path))
    url = serve(make_engine(model="demo", models_dir=tmp_path))
    listing = [lambda: requests.get(f"{url}/models", timeout=60)]
    requests_for_it = [lambda: draw(url, "sd2", **FAST)] * 3  # each read the .yaml again
    for attack in listing + requests_for_it:
        answer, slowest = health_while(url, attack)
        assert slowest < HEALTH_BOUND
        assert answer.status_code in (200, 422), answer.json()  # a header alone cannot load, but says so at once
    assert listed(url)["sd2"]["family"] == "sd2"
    assert len(reads) == 1
    yaml.write_text('model:\n  params:\n    parameterization: "v"\n')  # a new version is read again
    assert listed(url)["sd2"]["family"] == "sd2-v" and len(reads) == 2


# ---- 3. a format note is read only when it is a few bytes


def scaled_per_block(path: Path, note: torch.Tensor) -> Path:
    """A file whose weight has a scale per block, beside the format note `note`."""
    save_file({"x.weight": torch.zeros(4, 4), "x.weight_scale": torch.ones(2), "x.comfy_quant": note}, str(path))
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ImagineError) as refused:
        Catalog(Settings(), {}).family_of(str(path))
    return refused.value.message


def test_a_format_note_is_read_only_when_it_is_a_few_bytes(tmp_path):
    note = b'{"format": "nvfp4"}'
    short = scaled_per_block(tmp_path / "short.safetensors", torch.frombuffer(bytearray(note), dtype=torch.uint8))
    assert "ComfyUI's nvfp4 format" in refusal(short)
    padded = bytearray(note + b" " * 20_000_000)  # the same JSON, 20 MB long
    long = scaled_per_block(tmp_path / "long.safetensors", torch.frombuffer(padded, dtype=torch.uint8))
    floats = scaled_per_block(tmp_path / "floats.safetensors", torch.zeros(5_000_000))
    del padded
    before = rss()
    tracemalloc.start()
    try:
        assert "ComfyUI's unnamed format" in refusal(long)
        assert "ComfyUI's unnamed format" in refusal(floats)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"peak of Python's allocations while refusing: {peak >> 10} KiB")
    assert peak < 5_000_000
    assert_memory_back(before)


# ---- 4. one damaged file in a part folder fails only what names it


def deep_json(levels: int) -> bytes:
    return b'{"x":' * levels + b"{}" + b"}" * levels


def test_damaged_files_beside_the_models_are_listed_with_their_error_and_every_other_model_keeps_drawing(
    comfyui, tiny_configs, make_engine, serve, tmp_path
):
    models = with_parts(comfyui, tmp_path / "models", "diffusion_models/z_image_turbo_bf16.safetensors")
    header_file(models / "vae" / "deep.safetensors", deep_json(100_000))
    header_file(models / "text_encoders" / "list.safetensors", b'[{"dtype": "F16"}]')
    lacking = ae_tensors()
    del lacking["encoder.down.1.block.0.conv2.weight"]
    save(models / "vae" / "ae-lacking.safetensors", lacking)
    z_image = models / "diffusion_models" / "z_image_turbo_bf16.safetensors"
    for name, sidecar in (("z-deep-sidecar", deep_json(100_000)), ("z-damaged-vae", b'{"vae": "vae/deep"}')):
        shutil.copy(z_image, models / "diffusion_models" / f"{name}.safetensors")
        (models / "diffusion_models" / f"{name}.json").write_bytes(sidecar)
    header_file(models / "checkpoints" / "deep-model.safetensors", deep_json(100_000))
    header_file(models / "checkpoints" / "list-model.safetensors", b"[]")
    url = serve(make_engine(model="demo", models_dir=models, configs_dir=tiny_configs))
    for route in LISTINGS:
        assert requests.get(f"{url}{route}", timeout=60).status_code == 200, route
    models_listed = listed(url)
    assert "header is damaged" in models_listed["deep-model"]["error"]
    assert "is not a JSON object" in models_listed["list-model"]["error"]
    assert "not readable JSON" in models_listed["z-deep-sidecar"]["parts"]["missing"]
    assert models_listed["z_image_turbo_bf16"]["parts"] == {"text_encoder": "text_encoders/qwen_3_4b", "vae": "vae/ae"}
    for name, words in (
        ("deep-model", "header is damaged"),
        ("list-model", "is not a JSON object"),
        ("z-deep-sidecar", "z-deep-sidecar.json beside the model is not readable JSON"),
        ("z-damaged-vae", "the sidecar's vae 'vae/deep' cannot be read: the file's .safetensors header is damaged"),
    ):
        answer = draw(url, name)
        assert answer.status_code == 422 and words in answer.json()["error"], (name, answer.json())
    assert draw(url, "z_image_turbo_bf16").status_code == 200


def test_a_missing_part_names_the_damaged_file_found_in_its_place(comfyui, tiny_configs, make_engine, serve, tmp_path):
    models = with_parts(comfyui, tmp_path / "models", "diffusion_models/z_image_turbo_bf16.safetensors")
    whole = (comfyui / "vae" / "ae.safetensors").read_bytes()
    (models / "vae" / "ae.safetensors").unlink()
    (models / "vae" / "ae.safetensors").write_bytes(whole[: len(whole) // 2])  # a download cut short
    url = serve(make_engine(model="demo", models_dir=models, configs_dir=tiny_configs))
    answer = draw(url, "z_image_turbo_bf16")
    assert answer.status_code == 422
    assert "; found, but damaged: vae/ae (the file is truncated: it holds" in answer.json()["error"]
    assert "found, but damaged: vae/ae" in listed(url)["z_image_turbo_bf16"]["parts"]["missing"]


# ---- 5. a header of a million entries is refused after the first MAX_TENSORS, once per version


def test_a_header_of_a_million_entries_is_refused_once_per_version_while_health_answers(
    make_engine, serve, tmp_path, monkeypatch
):
    entry = b'"diffusion_model.blocks.%07d.weight":{"dtype":"F16","shape":[0],"data_offsets":[0,0]},'
    text = b"{" + b"".join(entry % number for number in range(1_150_000))[:-1] + b"}"
    assert len(text) < engine.files.headers.MAX_HEADER_BYTES  # just under it, as safetensors allows
    path = header_file(tmp_path / "huge.safetensors", text)
    del text
    reads = []
    read_header = engine.files.headers.read_header
    monkeypatch.setattr(engine.files.headers, "read_header", lambda path: reads.append(path) or read_header(path))
    url = serve(make_engine(model="demo", models_dir=tmp_path))
    before = rss()
    for attack in (lambda: listed(url), lambda: [draw(url, "huge", **FAST) for _ in range(3)]):
        _, slowest = health_while(url, attack)
        assert slowest < HEALTH_BOUND
    assert_memory_back(before)
    refused = "the file's .safetensors header is damaged: it names more than 50,000 tensors"
    assert listed(url)["huge"]["error"].startswith(refused)
    answer = draw(url, "huge", **FAST)
    assert answer.status_code == 422 and answer.json()["error"].startswith(refused)
    assert reads == [path]


# ---- 6. a sidecar names parts inside the models folders only


def test_a_sidecar_names_parts_inside_the_models_folders_only_and_says_so_alike_of_every_name_outside(
    comfyui, tiny_configs, make_engine, tmp_path
):
    models = with_parts(comfyui, tmp_path / "models", "diffusion_models/z_image_turbo_bf16.safetensors")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(comfyui / "vae" / "ae.safetensors", elsewhere / "ae.safetensors")
    sidecar = models / "diffusion_models" / "z_image_turbo_bf16.json"
    client = imagine.create_app(make_engine(model="demo", models_dir=models, configs_dir=tiny_configs)).test_client()

    def answer(vae: str) -> tuple:
        sidecar.write_text(json.dumps({"vae": vae}))
        response = client.post("/generate", json={"prompt": "p", "model": "z_image_turbo_bf16", **SMALL})
        return response.status_code, response.get_json().get("error", "").replace(repr(vae), "NAME")

    outside = [answer(name) for name in (str(elsewhere / "ae"), "/etc/passwd", "/etc/no-such-file", "/etc")]
    assert outside[0][0] == 422 and "is outside the models folders" in outside[0][1]
    assert all(each == outside[0] for each in outside)  # the answer tells nothing of what is there
    assert answer("../elsewhere/ae")[0] == 422
    assert answer(str(models / "vae" / "ae"))[0] == 200  # an absolute name inside them is one of theirs


# ---- 7. every name in the log is escaped onto its line


def test_a_model_name_holding_a_newline_and_terminal_codes_cannot_forge_a_log_line(make_engine, tmp_path, caplog):
    name = "tiny\nINFO:imagine:loaded forged (Stable Diffusion 1.x) in 0.1 s\x1b[31m"
    save_tiny_folder(tmp_path / name, seed=1)
    client = imagine.create_app(make_engine(model="demo", models_dir=tmp_path, max_loaded=1)).test_client()
    with caplog.at_level("INFO", logger="imagine"):
        assert client.post("/generate", json={"prompt": "a cat", "model": name, **FAST}).status_code == 200
        assert client.post("/generate", json={"prompt": "a cat", **FAST}).status_code == 200  # unloads it
    assert not any("\n" in line or "\x1b" in line for line in caplog.messages)
    for said in ("loaded ", "generating ", "unloading "):
        assert any(said in line and "tiny\\nINFO" in line and "s\\x1b[31m" in line for line in caplog.messages), said
