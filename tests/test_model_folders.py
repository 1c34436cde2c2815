"""Models folders as users have them: several, with links and sub-folders; GET /models, GET /health, cuda:N."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, free_port, pixels, read_log_until_listening, save_config_folder, save_tiny_folder
from diffusers import StableDiffusionPipeline
from ldm_checkpoint import save_ldm_checkpoint
from safetensors.torch import save_file

import imagine
from engine.devices import pick_device
from engine.files.folders import find_in_folders, model_folders
from engine.request import GenerationRequest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny SD1 model as one single-file checkpoint in the original layout, outside every models folder,
    and the configs root that fits it (as configs/ fits the real models)."""
    folder = save_tiny_folder(tmp_path_factory.mktemp("source") / "tiny", seed=4)
    path = folder.parent / "dreamshaper_8.safetensors"
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    save_ldm_checkpoint(pipe, path)
    return path, save_config_folder(pipe, folder.parent / "configs" / "sd1").parent


@pytest.fixture
def tiny_checkpoint(tiny_source) -> Path:
    return tiny_source[0]


@pytest.fixture
def make_engine(make_engine, tiny_source):
    """conftest's make_engine, with configs that fit the tiny checkpoints, in float32 so that pictures compare
    exactly."""

    def make(**settings):
        settings.setdefault("fp_prec", "32")
        return make_engine(configs_dir=tiny_source[1], **settings)

    return make


@pytest.fixture
def three_folders(tmp_path, tiny_checkpoint):
    """~/.imagine/models, A1111's Stable-diffusion and ComfyUI's checkpoints, each model linked in, as users do."""
    own, a1111, comfy = (tmp_path / name for name in ("imagine", "webui/models/Stable-diffusion", "comfy/checkpoints"))
    for folder in (own, a1111 / "sd15", comfy):
        folder.mkdir(parents=True)
    (a1111 / "sd15" / "dreamshaper_8.safetensors").symlink_to(tiny_checkpoint)
    save_tiny_folder(comfy / "tiny-folder", seed=5)
    (own / "linked.safetensors").symlink_to(tiny_checkpoint)
    return own, a1111, comfy


def folders_setting(*folders) -> Path:
    return Path(os.pathsep.join(str(folder) for folder in folders))


def post(engine, **fields):
    response = imagine.create_app(engine).test_client().post("/generate", json={"prompt": "a cat", **FAST, **fields})
    return response.status_code, response.get_json()


def test_a_linked_checkpoint_and_three_folders_load_by_name_with_the_network_blocked(
    make_engine, three_folders, no_network
):
    engine = make_engine(models_dir=folders_setting(*three_folders))
    through_link = post(engine, model="linked")
    in_subfolder = post(engine, model="sd15/dreamshaper_8")
    in_third = post(engine, model="tiny-folder")
    assert [through_link[0], in_subfolder[0], in_third[0]] == [200, 200, 200]
    assert np.array_equal(pixels(through_link[1]["img"]), pixels(in_subfolder[1]["img"]))
    assert not np.array_equal(pixels(in_subfolder[1]["img"]), pixels(in_third[1]["img"]))


def test_an_absolute_name_inside_a_models_folder_is_accepted_as_written_before_links(make_engine, three_folders):
    own, a1111, comfy = three_folders
    engine = make_engine(models_dir=folders_setting(own, a1111, comfy))
    assert post(engine, model=str(a1111 / "sd15" / "dreamshaper_8.safetensors"))[0] == 200
    # The same file by the path the link leads to lies outside every folder: refused, naming the setting.
    status, answer = post(engine, model=str((own / "linked.safetensors").resolve()))
    assert status == 403
    assert "--models-dir (IMAGINE_MODELS_DIR)" in answer["error"]
    assert str(own) not in answer["error"] and str(a1111) not in answer["error"]


def test_the_folders_are_searched_in_order(make_engine, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    save_tiny_folder(first / "same", seed=6)
    save_tiny_folder(second / "same", seed=7)
    save_tiny_folder(tmp_path / "alone", seed=7)
    engine = make_engine(models_dir=folders_setting(first, second))
    before, after = make_engine(models_dir=folders_setting(first)), make_engine(models_dir=tmp_path)
    assert np.array_equal(pixels(post(engine, model="same")[1]["img"]), pixels(post(before, model="same")[1]["img"]))
    assert not np.array_equal(
        pixels(post(engine, model="same")[1]["img"]), pixels(post(after, model="alone")[1]["img"])
    )


@pytest.fixture
def listed_folders(three_folders, tmp_path):
    """The three folders plus what a real folder also holds: an unreadable file, a link loop, LoRAs, embeddings."""
    own, a1111, comfy = three_folders
    (own / "broken.safetensors").write_bytes(b"half a download")
    (own / "loop.safetensors").symlink_to(own / "loop.safetensors")
    (own / "again").symlink_to(own)  # a folder linking to its own parent: walking it must end
    for sub in ("loras", "embeddings"):
        (a1111 / sub).mkdir()
        save_file({"lora_unet_x.weight": torch.zeros(1)}, a1111 / sub / "style.safetensors")
    (comfy / "notes.txt").write_text("not a model")
    return own, a1111, comfy


def test_get_models_lists_every_model_with_its_family_size_date_and_whether_it_is_loaded(
    make_engine, listed_folders, tiny_checkpoint
):
    engine = make_engine(models_dir=folders_setting(*listed_folders), model="linked")
    client = imagine.create_app(engine).test_client()
    answer = client.get("/models").get_json()
    models = {model["name"]: model for model in answer["models"]}
    assert answer["default"] == "linked"
    assert sorted(models) == ["broken", "demo", "linked", "sd15/dreamshaper_8", "tiny-folder"]
    assert models["linked"]["family"] == "sd1" and models["tiny-folder"]["family"] == "sd1"
    assert models["linked"]["size"] == tiny_checkpoint.stat().st_size
    assert models["linked"]["modified"].endswith("Z")
    assert models["broken"]["family"] is None
    assert "cannot be read as a checkpoint" in models["broken"]["error"]
    assert not any(model["loaded"] for model in models.values())
    assert client.post("/generate", json={"prompt": "a cat", "model": "tiny-folder", **FAST}).status_code == 200
    loaded = {model["name"]: model["loaded"] for model in client.get("/models").get_json()["models"]}
    assert loaded == {"broken": False, "demo": False, "linked": False, "sd15/dreamshaper_8": False, "tiny-folder": True}
    assert str(listed_folders[0].parent) not in client.get("/models").get_data(as_text=True)


def test_listing_reads_each_header_once_until_the_file_changes(make_engine, listed_folders):
    own, *_ = listed_folders
    engine = make_engine(models_dir=folders_setting(*listed_folders))
    reads = []
    family_of = engine.catalog.family_of
    engine.catalog.family_of = lambda key: reads.append(key) or family_of(key)
    engine.catalog.listing()
    first = len(reads)
    engine.catalog.listing()
    assert first == 3 and len(reads) == first  # linked and sd15/dreamshaper_8 are one file
    (own / "broken.safetensors").write_bytes(b"a longer half of a download")
    engine.catalog.listing()
    assert len(reads) == first + 1


def test_a_link_loop_in_a_folder_is_a_404_by_name_and_the_listing_still_answers(make_engine, listed_folders):
    engine = make_engine(models_dir=folders_setting(*listed_folders))
    status, answer = post(engine, model="loop")
    assert status == 404 and answer["error"].startswith("model 'loop' not found in the models folders")
    assert imagine.create_app(engine).test_client().get("/models").status_code == 200


def test_the_folder_helpers_find_files_of_any_kind_under_a_sub_folder(listed_folders):
    """Used for LoRAs and embeddings too: a file under `loras/` of any folder, by name, with or without suffix."""
    folders = model_folders(folders_setting(*listed_folders))
    found = find_in_folders(folders, "loras/style", (".safetensors",))
    assert found == listed_folders[1] / "loras" / "style.safetensors"
    assert find_in_folders(folders, "loras/missing", (".safetensors",)) is None


def test_a_missing_models_folder_is_a_start_up_warning_not_a_crash(tmp_path):
    missing = tmp_path / "not-there"
    command = [sys.executable, str(ROOT / "imagine.py"), "--port", str(free_port()), "-d", "cpu"]
    env = {**os.environ, "IMAGINE_MODELS_DIR": folders_setting(tmp_path, missing).as_posix()}
    process = subprocess.Popen([*command], env=env, stderr=subprocess.PIPE, text=True)
    try:
        log = "".join(read_log_until_listening(process))
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert f"WARNING models folder {missing} does not exist" in log


def test_health_answers_while_a_generation_runs_and_needs_no_model(make_engine, hold):
    held = hold(1)
    engine = make_engine(generate=held.generate)
    client = imagine.create_app(engine).test_client()
    assert client.get("/health").get_json() == {
        "status": "ok",
        "device": "cpu",
        "loaded": [],
        "queue": 0,
        "running": False,
    }
    job = engine.submit(GenerationRequest(prompt="a cat", width=64, height=64, num_steps=2, seed=1))
    held.reached(1)
    during = client.get("/health")
    held.release()
    list(job)
    assert during.status_code == 200
    assert during.get_json() == {"status": "ok", "device": "cpu", "loaded": ["demo"], "queue": 0, "running": True}


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_cuda_n_picks_that_gpu_and_a_missing_index_is_a_clear_start_up_error(one_gpu):
    assert imagine.parse_settings(["-d", "cuda:1"]).device == "cuda:1"
    assert pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(SystemExit) as missing:
        pick_device("cuda:1")
    assert str(missing.value) == (
        "imagine: device 'cuda:1' is not available: this machine has 1 GPU(s) (cuda:0 to cuda:0)"
    )


def test_a_device_that_is_not_a_device_name_is_refused_at_start_up(capsys):
    with pytest.raises(SystemExit):
        imagine.parse_settings(["-d", "cuda:x"])
    assert "--device must be auto, cpu, cuda, cuda:N or mps, not 'cuda:x'" in capsys.readouterr().err


def test_cli_list_prints_the_servers_models_as_a_table(make_engine, listed_folders):
    engine = make_engine(models_dir=folders_setting(*listed_folders))
    server = imagine.create_server(engine, "127.0.0.1", free_port())
    threading.Thread(target=server.run, daemon=True).start()
    try:
        result = subprocess.run(
            [sys.executable, str(ROOT / "imagine-cli.py"), "--list"],
            env={**os.environ, "IMAGINE_SERVER": f"http://127.0.0.1:{server.effective_port}"},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "SIZE", "LOADED"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["sd15/dreamshaper_8"][0] == "sd1" and rows["sd15/dreamshaper_8"][2] == "MB"
    assert rows["broken"][0] == "unreadable:"


def test_a_model_the_server_may_not_read_is_listed_with_an_error_not_a_500(make_engine, listed_folders, monkeypatch):
    """Tests run as root, whom file permissions do not stop, so the refusal is raised where the listing reads."""
    engine = make_engine(models_dir=folders_setting(*listed_folders))
    describe = engine.catalog.describe

    def refuse_the_folder(real):
        if real.name == "tiny-folder":
            raise PermissionError(13, "Permission denied")
        return describe(real)

    monkeypatch.setattr(engine.catalog, "describe", refuse_the_folder)
    response = imagine.create_app(engine).test_client().get("/models")
    assert response.status_code == 200
    [entry] = [model for model in response.get_json()["models"] if model["name"] == "tiny-folder"]
    assert (entry["family"], entry["error"]) == (None, "cannot be read (Permission denied)")
