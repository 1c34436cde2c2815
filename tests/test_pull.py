"""Models by name (POST /pull, GET /catalog, DELETE /models/<name>): pulled from a local stand-in of the Hugging Face
hub (tests/hub_server.py) that serves the test suite's tiny models under the catalog's real repos and paths, placed
where they belong, checked, resumed, shared between models, removed; and drawn by the name they were pulled as."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch
from catalog_hub import HF_TOKEN, LIBRARY, catalog_files, catalog_hub, tiny_sd1_checkpoint
from conftest import FAST, free_port, run_cli, save_config_folder
from diffusion_model_files import flux1_tensors, flux2_tensors, z_image_tensors
from encoder_files import ae_tensors, clip_l_tensors, flux2_vae_tensors, qwen3_tensors, t5_tensors
from gguf_model_files import Q, write_gguf
from hub_server import HubServer
from huggingface_hub import constants
from PIL import Image
from safetensors.torch import save
from taesd_files import original_layout, tiny_autoencoder

import engine.pull
import imagine

BIG = 10 * 2**20 + 300_000  # over huggingface_hub's 10 MiB chunk, which a resumed download starts from
SMALL = {"width": 64, "height": 64, "seed": 7, "num_steps": 2}


@pytest.fixture(scope="module")
def sd1_checkpoint(tmp_path_factory) -> tuple:
    """(a tiny SD1 checkpoint as a file's bytes, configs that fit it and the tiny flow models)."""
    return tiny_sd1_checkpoint(tmp_path_factory.mktemp("tiny-sd1"))


@pytest.fixture(scope="module")
def pull_configs(tiny_configs, sd1_checkpoint) -> object:
    """The tiny flow models' configs, with the tiny SD1 checkpoint's in place of SD 1.5's."""
    shutil.rmtree(tiny_configs / "sd1")
    save_config_folder(sd1_checkpoint[1], tiny_configs / "sd1")
    return tiny_configs


def tensors_file(tensors: dict) -> bytes:
    return save({name: tensor.contiguous() for name, tensor in tensors.items()})


@pytest.fixture(scope="module")
def files(sd1_checkpoint, tmp_path_factory) -> dict:
    """Each catalog file's bytes on the stand-in: tiny models of its kind where a test draws with it."""
    return catalog_files(
        {
            "dreamshaper_8": sd1_checkpoint[0],
            "z_image_turbo_bf16": tensors_file(z_image_tensors()),
            "z_image_turbo_q5_0": gguf_bytes(tmp_path_factory.mktemp("gguf"), z_image_tensors(), kind=Q.Q5_0),
            "qwen_3_4b": tensors_file(qwen3_tensors()),
            "ae": tensors_file(ae_tensors()),
            "flux_2_klein_4b": tensors_file(flux2_tensors()),
            "flux2_vae": tensors_file(flux2_vae_tensors()),
            "flux1_dev": tensors_file(flux1_tensors(guidance=True)),
            "flux1_schnell": tensors_file(flux1_tensors(guidance=False)),
            "clip_l": tensors_file(clip_l_tensors()),
            "t5xxl_fp16": tensors_file(t5_tensors()),
            "taesd_decoder": tensors_file(original_layout(tiny_autoencoder(4))),
            "taef1_decoder": tensors_file(original_layout(tiny_autoencoder(16))),
        }
    )


@pytest.fixture
def hub(files, monkeypatch):
    """The stand-in, serving the catalog's repos (FLUX.1-dev gated, as on the hub), huggingface_hub pointed at it."""
    with catalog_hub(files, monkeypatch) as server:
        yield server


@pytest.fixture
def server(make_engine, pull_configs, tmp_path):
    """An engine on an empty models folder, the tiny configs; and a test client on it."""
    engine = make_engine(model="demo", models_dir=tmp_path / "models", configs_dir=pull_configs, fp_prec="32")
    return engine, imagine.create_app(engine).test_client()


def pull(client, name: str, **body) -> list:
    """The lines of a streamed pull (the last one an error, where it failed once streaming)."""
    response = client.post("/pull", json={"model": name, **body})
    assert response.status_code == 200, response.get_json()
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


def key(remote) -> str:
    return f"{remote.repo}/{remote.path}"


def file_of(name: str, variant: str | None = None, index: int = 0):
    entry = LIBRARY.entries[name]
    return (entry.variants[variant] if variant else next(iter(entry.variants.values()))).files[index]


def resolve_path(remote) -> str:
    return f"/{remote.repo}/resolve/main/{remote.path}"


# ---- the catalog


def test_the_catalog_names_each_model_and_variant_with_its_licence_size_and_whether_it_is_here(server, hub):
    _, client = server
    models = {model["name"]: model for model in client.get("/catalog").get_json()["models"]}
    for name in ("z-image-turbo:bf16", "flux2-klein-4b:bf16", "flux2-klein-4b:fp8", "flux1-schnell:bf16",
                 "flux1-dev:bf16", "dreamshaper-8:fp16", "sdxl:fp16"):  # fmt: skip
        assert name in models
    dev = models["flux1-dev:bf16"]
    assert dev["license"] == {"name": "FLUX.1 [dev] Non-Commercial License", "non_commercial": True, "gated": True}
    folders = ["diffusion_models", "text_encoders", "text_encoders", "vae", "vae_approx"]  # and its TAESD decoder
    assert [file["folder"] for file in dev["files"]] == folders
    assert dev["size"] == sum(file["size"] for file in dev["files"]) and not dev["present"]
    assert sum("taken" in model for model in models.values() if model["name"].startswith("flux2-klein-4b:")) == 1
    pull(client, "dreamshaper-8")
    assert client.get("/catalog").get_json()["models"][-3]["present"]  # dreamshaper-8's one variant


def test_a_bare_name_takes_the_largest_variant_that_fits_and_says_why():
    variants = LIBRARY.entries["flux2-klein-4b"].variants
    big, gguf, small = variants["bf16"], variants["q8_0"], variants["fp8"]
    assert LIBRARY.variant("flux2-klein-4b", big.memory)[0] is big
    taken, why = LIBRARY.variant("flux2-klein-4b", big.memory - 1)
    assert taken is gguf and why.startswith("flux2-klein-4b:q8_0 (the largest that fits): it needs about")
    assert LIBRARY.variant("flux2-klein-4b", gguf.memory - 1)[0] is small
    taken, why = LIBRARY.variant("flux2-klein-4b", 10**9)
    assert taken is small and "the smallest" in why
    assert LIBRARY.variant("flux2-klein-4b:bf16", 10**9)[0] is big  # asked for by name: taken whatever the memory
    choices = "flux2-klein-4b:bf16, flux2-klein-4b:fp8, flux2-klein-4b:q8_0"
    with pytest.raises(Exception, match=f"has no variant 'q4'; choose one of: {choices}"):
        LIBRARY.variant("flux2-klein-4b:q4", 10**12)


def test_on_a_machine_of_16_gib_the_bare_names_of_z_image_and_flux1_take_their_gguf_variants():
    for name, variant in (("z-image-turbo", "q5_0"), ("flux1-schnell", "q4_k_s"), ("flux1-dev", "q4_k_s")):
        taken, why = LIBRARY.variant(name, 16 * 2**30)
        assert taken.name == variant and taken.files[0].destination.endswith(".gguf"), why


def test_a_name_the_catalog_lacks_is_a_404_listing_the_names(server, hub):
    response = server[1].post("/pull", json={"model": "dreamshaper-9"})
    assert response.status_code == 404
    assert "not in the catalog; the names are: z-image-turbo" in response.get_json()["error"]


# ---- a pull


def test_a_pull_streams_its_progress_then_the_model_draws_by_its_name_in_every_dialect(server, hub, files):
    engine, client = server
    lines = pull(client, "dreamshaper-8")
    first, *progress, last = lines
    size, decoder = len(files["dreamshaper_8"]), len(files["taesd_decoder"])
    assert first["status"] == "pulling dreamshaper-8:fp16" and "needs about" in first["reason"]
    assert first["total"] == size + decoder
    assert first["files"] == [
        {"file": "checkpoints/dreamshaper_8.safetensors", "size": size, "present": False},
        {"file": "vae_approx/taesd_decoder.safetensors", "size": decoder, "present": False},  # its previews'
    ]
    assert {"status": "downloading", "file": "checkpoints/dreamshaper_8.safetensors", "total": size,
            "completed": size} in progress  # fmt: skip
    assert any(line["status"] == "verifying sha256" for line in progress)
    assert last == {"status": "success", "model": "dreamshaper-8"}
    models = engine.settings.models_dir
    assert (models / "checkpoints" / "dreamshaper_8.safetensors").read_bytes() == files["dreamshaper_8"]
    assert not list((models / ".pulling").rglob("*.part"))
    assert client.post("/generate", json={"prompt": "a cat", "model": "dreamshaper-8", **FAST}).status_code == 200
    [listed] = [model for model in client.get("/models").get_json()["models"] if model["name"] == "dreamshaper-8"]
    assert (listed["file"], listed["family"], listed["pulled"]) == ("dreamshaper_8", "sd1", "dreamshaper-8:fp16")
    assert "dreamshaper-8" in [model["model_name"] for model in client.get("/sdapi/v1/sd-models").get_json()]
    assert "dreamshaper-8" in [model["id"] for model in client.get("/v1/models").get_json()["data"]]
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64,
            "override_settings": {"sd_model_checkpoint": "dreamshaper-8"}}  # fmt: skip
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200


def test_stream_false_answers_once_at_the_end(server, hub):
    answer = server[1].post("/pull", json={"model": "dreamshaper-8", "stream": False})
    assert answer.status_code == 200 and answer.get_json() == {"status": "success", "model": "dreamshaper-8"}


def test_a_flow_model_comes_with_its_parts_each_where_it_belongs_and_draws(server, hub):
    engine, client = server
    assert pull(client, "z-image-turbo:bf16")[-1] == {"status": "success", "model": "z-image-turbo"}
    models = engine.settings.models_dir
    for file in ("diffusion_models/z_image_turbo_bf16", "text_encoders/qwen_3_4b", "vae/ae"):
        assert (models / f"{file}.safetensors").is_file()
    answer = client.post("/generate", json={"prompt": "a cat", "model": "z-image-turbo", **SMALL})
    assert answer.status_code == 200, answer.get_json()


def test_a_gguf_variant_comes_with_its_safetensors_parts_and_draws(server, hub):
    engine, client = server
    assert pull(client, "z-image-turbo:q5_0")[-1] == {"status": "success", "model": "z-image-turbo"}
    assert (engine.settings.models_dir / "diffusion_models" / "z_image_turbo-Q5_0.gguf").is_file()
    answer = client.post("/generate", json={"prompt": "a cat", "model": "z-image-turbo", **SMALL})
    assert answer.status_code == 200, answer.get_json()
    assert client.get("/models").get_json()["models"][1]["quant"] == "Q5_0"


def test_a_part_two_models_use_is_fetched_once_kept_once_and_kept_when_one_is_removed(server, hub):
    engine, client = server
    qwen = resolve_path(file_of("z-image-turbo", index=1))
    pull(client, "z-image-turbo:bf16")
    second = pull(client, "flux2-klein-4b:bf16")
    assert {"file": "text_encoders/qwen_3_4b.safetensors", "size": second[0]["files"][1]["size"], "present": True} in (
        second[0]["files"]
    )
    assert hub.count("GET", qwen) == 1
    removed = client.delete("/models/z-image-turbo")
    assert removed.status_code == 200
    assert removed.get_json() == {
        "model": "z-image-turbo",
        "removed": [
            "diffusion_models/z_image_turbo_bf16.safetensors",
            "vae/ae.safetensors",
            "vae_approx/taef1_decoder.safetensors",  # klein's previews take none
        ],
        "kept": ["text_encoders/qwen_3_4b.safetensors"],
    }
    assert (engine.settings.models_dir / "text_encoders" / "qwen_3_4b.safetensors").is_file()
    assert client.post("/generate", json={"prompt": "a cat", "model": "flux2-klein-4b", **SMALL}).status_code == 200
    assert client.post("/generate", json={"prompt": "a cat", "model": "z-image-turbo"}).status_code == 404


def test_removing_a_pulled_model_unloads_it_and_only_pulled_models_are_removed(server, hub):
    engine, client = server
    pull(client, "dreamshaper-8")
    client.post("/generate", json={"prompt": "a cat", "model": "dreamshaper-8", **FAST})
    assert any(
        model["name"] == "dreamshaper-8" and model["loaded"] for model in client.get("/models").get_json()["models"]
    )
    assert client.delete("/models/dreamshaper-8").status_code == 200
    assert (
        not engine.models.loaded
        and not (engine.settings.models_dir / "checkpoints" / "dreamshaper_8.safetensors").exists()
    )
    refused = client.delete("/models/demo")
    assert (
        refused.status_code == 404
        and refused.get_json()["error"] == "no pulled model 'demo'; the pulled models are: none"
    )


def test_a_file_already_there_under_another_size_is_not_replaced(server, hub):
    engine, client = server
    mine = engine.settings.models_dir / "checkpoints" / "dreamshaper_8.safetensors"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own model")
    response = client.post("/pull", json={"model": "dreamshaper-8"})
    assert response.status_code == 409 and "move it away, then pull again" in response.get_json()["error"]
    assert mine.read_bytes() == b"my own model"


# ---- what a pull must get right


@pytest.fixture
def big(hub):
    """DreamShaper's file on the stand-in made BIG (noise: these tests only fetch it), and its key there."""
    remote = file_of("dreamshaper-8")
    hub.repos[remote.repo][remote.path] = os.urandom(BIG)
    return key(remote), resolve_path(remote)


def test_a_download_cut_off_is_resumed_by_the_next_pull_from_where_it_stopped(server, hub, big):
    engine, client = server
    # A first whole chunk comes, then nothing, more times than huggingface_hub retries within one call.
    hub.cut_after(big[0], 10 * 2**20 + 1000, *[0] * 6)
    failed = pull(client, "dreamshaper-8")
    assert "pull it again to resume" in failed[-1]["error"]
    part = engine.settings.models_dir / ".pulling" / "checkpoints" / "dreamshaper_8.safetensors.part"
    assert part.stat().st_size == 10 * 2**20  # what came in whole chunks, kept
    assert pull(client, "dreamshaper-8")[-1]["status"] == "success"
    assert ("GET", big[1], f"bytes={10 * 2**20}-") in hub.requests  # asked for the rest, not from 0
    pulled = (engine.settings.models_dir / "checkpoints" / "dreamshaper_8.safetensors").read_bytes()
    assert pulled == hub.repos["Lykon/DreamShaper"]["DreamShaper_8_pruned.safetensors"] and not part.exists()


def test_a_damaged_download_is_refused_and_nothing_of_it_is_left(server, hub):
    engine, client = server
    hub.corrupt(key(file_of("dreamshaper-8")))
    lines = pull(client, "dreamshaper-8")
    assert "came damaged" in lines[-1]["error"] and lines[-1]["error"].endswith("it is deleted: pull again")
    models = engine.settings.models_dir
    assert not (models / "checkpoints").exists() and not list((models / ".pulling").rglob("*.part"))
    assert not (models / ".pulled").exists()


def test_two_pulls_of_one_file_at_once_fetch_it_once(make_engine, pull_configs, tmp_path, serve, hub, big):
    url = serve(make_engine(model="demo", models_dir=tmp_path / "models", configs_dir=pull_configs))
    hub.cut_after(big[0], 10 * 2**20 + 1000)  # the first fetch pauses a second before it resumes
    first = requests.post(f"{url}/pull", json={"model": "dreamshaper-8"}, stream=True, timeout=60)
    lines = first.iter_lines()
    assert json.loads(next(lines))["status"] == "pulling dreamshaper-8:fp16"
    second = requests.post(f"{url}/pull", json={"model": "dreamshaper-8"}, timeout=60)
    assert [json.loads(line) for line in lines][-1]["status"] == "success"
    seconds = [json.loads(line) for line in second.text.splitlines()]
    assert seconds[-1]["status"] == "success"
    assert hub.count("GET", big[1]) == 2  # the first fetch and its resumption; nothing for the second pull


def test_a_gated_model_needs_a_token_and_says_where_to_accept_its_licence(server, hub, monkeypatch, caplog):
    client = server[1]
    refused = client.post("/pull", json={"model": "flux1-dev:bf16"})
    assert refused.status_code == 403
    message = refused.get_json()["error"]
    assert "black-forest-labs/FLUX.1-dev is gated" in message and "HF_TOKEN" in message
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev" in message
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    assert pull(client, "flux1-dev:bf16")[-1]["status"] == "success"
    assert HF_TOKEN not in caplog.text


def test_a_pull_the_disk_cannot_hold_is_refused_before_the_first_byte(server, hub, monkeypatch):
    monkeypatch.setattr(engine.pull.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 10**6))
    response = server[1].post("/pull", json={"model": "dreamshaper-8"})
    assert (
        response.status_code == 507 and "free space there, or choose a smaller variant" in response.get_json()["error"]
    )
    assert not any(method == "GET" for method, _, _ in hub.requests)


def test_with_the_hub_out_of_reach_a_pull_says_so_at_once_and_drawing_goes_on(server, hub, monkeypatch):
    client = server[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    response = client.post("/pull", json={"model": "dreamshaper-8"})
    assert response.status_code == 503 and "HF_HUB_OFFLINE is set" in response.get_json()["error"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}"
    )
    response = client.post("/pull", json={"model": "dreamshaper-8"})
    assert response.status_code == 503 and "cannot reach the hub" in response.get_json()["error"]
    assert client.post("/generate", json={"prompt": "a cat", **FAST}).status_code == 200


@pytest.mark.parametrize(
    "settings, status, words",
    [
        ({"no_pull": True}, 403, "switched off on this server (--no-pull)"),
        ({"host": "0.0.0.0"}, 403, "set one (IMAGINE_API_KEY) to pull"),
        ({"api_key": "k"}, 401, "API key"),
    ],
)
def test_who_may_pull_and_remove(make_engine, tmp_path, hub, settings, status, words):
    client = imagine.create_app(make_engine(model="demo", models_dir=tmp_path, **settings)).test_client()
    for response in (client.post("/pull", json={"model": "dreamshaper-8"}), client.delete("/models/dreamshaper-8")):
        assert response.status_code == status and words in response.get_json()["error"]
    assert not (tmp_path / "checkpoints").exists()


# ---- a file named by its URL


LORA = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}


def gguf_bytes(folder: Path, tensors: dict, architecture: str = "lumina2", kind=Q.Q8_0) -> bytes:
    """A Z-Image GGUF's bytes (or, with another `architecture`, an LLM's)."""
    return write_gguf(folder / "model.gguf", tensors, "z-image", kind, architecture=architecture).read_bytes()


@pytest.fixture
def civitai(files, monkeypatch, tmp_path):
    """A Civitai-like site: download links that redirect to the file, named by Content-Disposition."""
    served = {
        "/api/download/models/101": (files["dreamshaper_8"], "civitai_model.safetensors"),
        "/api/download/models/102": (save(LORA), "detail_slider.safetensors"),
        "/api/download/models/103": (b"<!DOCTYPE html><html>log in</html>", "model.safetensors"),
        "/api/download/models/104": (b"\x80\x02pickle", "old_model.ckpt"),
        "/api/download/models/105": (b"GGUF\x03\x00\x00\x00", "flux1-dev-Q4_K_S.gguf"),
        "/api/download/models/106": (gguf_bytes(tmp_path, z_image_tensors()), "z_image_turbo-Q8_0.gguf"),
        "/api/download/models/107": (
            gguf_bytes(tmp_path, {"token_embd.weight": torch.zeros(64, 32)}, "qwen3"),
            "Qwen3-4B-Q8_0.gguf",
        ),
    }
    with HubServer(files=served, redirect_files=True) as server:
        yield server


def test_a_file_from_a_url_goes_where_its_header_says_and_a_model_draws_by_its_name(server, civitai):
    engine, client = server
    lines = pull(client, f"{civitai.url}/api/download/models/101?token=secret")
    assert lines[-1] == {"status": "success", "model": "civitai_model", "folder": "checkpoints"}
    assert all("secret" not in json.dumps(line) for line in lines)
    assert client.post("/generate", json={"prompt": "a cat", "model": "civitai_model", **FAST}).status_code == 200
    assert pull(client, f"{civitai.url}/api/download/models/102")[-1]["folder"] == "loras"
    assert (engine.settings.models_dir / "loras" / "detail_slider.safetensors").is_file()
    again = pull(client, f"{civitai.url}/api/download/models/101?token=secret")  # the same file: it stays
    assert again[-1] == {"status": "success", "model": "civitai_model", "folder": "checkpoints"}


def test_a_gguf_diffusion_model_from_a_url_goes_to_diffusion_models(server, civitai):
    engine, client = server
    lines = pull(client, f"{civitai.url}/api/download/models/106")
    assert lines[-1] == {"status": "success", "model": "z_image_turbo-Q8_0", "folder": "diffusion_models"}
    assert (engine.settings.models_dir / "diffusion_models" / "z_image_turbo-Q8_0.gguf").is_file()


@pytest.mark.parametrize(
    "number, words",
    [
        (103, "is a web page, not a model file"),
        (104, "is not a .safetensors file"),
        (105, "the file cannot be read as GGUF"),
        (107, "holds a 'qwen3' model, not the diffusion model"),
    ],
)
def test_a_url_to_what_imagine_cannot_load_is_refused_saying_why_and_nothing_is_kept(server, civitai, number, words):
    engine, client = server
    lines = pull(client, f"{civitai.url}/api/download/models/{number}")
    assert words in lines[-1]["error"]
    assert [path.name for path in engine.settings.models_dir.rglob("*") if path.is_file()] == []


def test_a_hub_file_named_as_hf_co_is_pulled_checked_and_placed(server, hub):
    engine, client = server
    remote = file_of("z-image-turbo", index=2)  # ae.safetensors
    lines = pull(client, f"hf.co/{remote.repo}/{remote.path}")
    assert any(line["status"] == "verifying sha256" for line in lines)
    assert lines[-1] == {"status": "success", "model": "ae", "folder": "vae"}
    assert (engine.settings.models_dir / "vae" / "ae.safetensors").is_file()


# ---- the CLI


def test_the_cli_pulls_on_the_running_server_lists_the_catalog_and_removes(server, serve, hub, tmp_path):
    url = serve(server[0])
    pulled = run_cli("--pull", "dreamshaper-8", cwd=tmp_path, server=url)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout == "dreamshaper-8\n"
    assert "pulling dreamshaper-8:fp16 (" in pulled.stderr and "draw with: imagine -m dreamshaper-8" in pulled.stderr
    catalog = run_cli("--list", "--all", cwd=tmp_path, server=url).stdout.splitlines()
    assert catalog[0].split() == ["NAME", "FAMILY", "SIZE", "LICENCE", "HERE"]
    assert any(row.startswith("dreamshaper-8:fp16 ") and row.endswith("yes") for row in catalog)
    assert any(row.startswith("flux1-dev:bf16 ") and "gated" in row for row in catalog)
    listed = run_cli("--list", cwd=tmp_path, server=url).stdout
    assert "\ndreamshaper-8 " in listed
    removed = run_cli("--rm", "dreamshaper-8", cwd=tmp_path, server=url)
    assert removed.returncode == 0 and removed.stdout == (
        "removed checkpoints/dreamshaper_8.safetensors, vae_approx/taesd_decoder.safetensors\n"
    )


def test_the_cli_with_no_server_pulls_into_the_local_models_folder(cli, hub, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("IMAGINE_SERVER", raising=False)
    monkeypatch.setenv("IMAGINE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setattr(cli, "DEFAULT_SERVER", f"http://127.0.0.1:{free_port()}")
    assert cli.main(["--pull", "dreamshaper-8"]) == 0
    out, err = capsys.readouterr()
    assert out == "dreamshaper-8\n" and err.startswith(f"imagine: no server at {cli.DEFAULT_SERVER}; pulling into")
    assert (tmp_path / "models" / "checkpoints" / "dreamshaper_8.safetensors").is_file()
    assert cli.main(["--rm", "dreamshaper-8"]) == 0
    assert not (tmp_path / "models" / "checkpoints" / "dreamshaper_8.safetensors").exists()


def run_docs_example(mark: str, url: str, cwd: Path) -> subprocess.CompletedProcess:
    """The example of README.md or docs/*.md holding `mark`, as written, in a folder holding imagine-cli.py (as its
    `./imagine-cli.py` assumes), against the server at `url`."""
    root = Path(imagine.__file__).parent
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    blocks = [block for page in pages for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)]
    [example] = {block for block in blocks if mark in block}
    (cwd / "imagine-cli.py").symlink_to(root / "imagine-cli.py")
    env = {**os.environ, "IMAGINE_SERVER": url, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", example], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_readmes_first_real_model_is_one_pull_then_a_picture_by_that_name(server, serve, hub, tmp_path):
    result = run_docs_example("--pull dreamshaper-8", serve(server[0]), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "dreamshaper-8\nlighthouse-dusk.png\n"
    assert "Model: dreamshaper_8" in Image.open(tmp_path / "lighthouse-dusk.png").info["parameters"]


def test_the_models_pages_example_lists_the_catalog_then_pulls_a_flow_model(server, serve, hub, tmp_path):
    result = run_docs_example("--pull z-image-turbo", serve(server[0]), tmp_path)
    assert result.returncode == 0, result.stderr
    table, pulled = result.stdout.rsplit("\n", 2)[:2]
    assert table.startswith("NAME ") and "z-image-turbo:bf16" in table and pulled == "z-image-turbo"


def test_the_models_page_lists_every_catalog_variant_with_each_files_source():
    page = (Path(imagine.__file__).parent / "docs" / "models.md").read_text()
    for entry in LIBRARY.entries.values():
        for variant in entry.variants.values():
            [row] = [line for line in page.splitlines() if line.startswith(f"| `{variant.label}` |")]
            assert f"{variant.size / 1e9:.1f} GB" in row
            for file in variant.files:
                assert f"`{file.destination}` from `{file.repo}`" in row
