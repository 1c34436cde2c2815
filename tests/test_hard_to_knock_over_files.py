"""Hard to knock over, round three (issue 25), second half: what the models folder and the disk could do to the whole
server, each through the real server (waitress): LoRA and embedding files changed on disk, links in loras/, the same
LoRA named twice, FIFOs and folders slow to read, a temporary folder too full for an upload or an answer, a LoRA of
other sizes, a missing default model. What one client's requests could do: test_hard_to_knock_over."""

import contextlib
import json
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from conftest import FAST, HEALTH_BOUND, count_loads, decode_png, health_while

import api.native
import engine.demo
import engine.files.catalog
import imagine
from engine.settings import CONFIGS_DIR

# ---- 10. a changed LoRA or embedding file is read again


def demo_pipe():
    return engine.demo.build_demo_pipeline(CONFIGS_DIR / "sd1")


def replace_file(path, write) -> None:
    """Writes a file anew under the same name, with another size and date, as a new download would."""
    import os

    stat = path.stat() if path.exists() else None
    path.unlink(missing_ok=True)
    write(path)
    if stat is not None:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def drawn(engine, **fields) -> tuple:
    answer = (
        imagine.create_app(engine).test_client().post("/generate", json={"prompt": "a lighthouse", **FAST, **fields})
    )
    assert answer.status_code == 200, answer.get_json()
    image = decode_png(answer.get_json()["img"])
    return image.tobytes(), image.info["parameters"]


def test_a_lora_file_changed_on_disk_is_loaded_again_with_its_new_hash(make_engine, tmp_path):
    from lora_files import kohya_lora
    from safetensors.torch import save_file

    (tmp_path / "loras").mkdir()
    path = tmp_path / "loras" / "style.safetensors"
    pipe = demo_pipe()
    save_file(kohya_lora(pipe, seed=0), path)
    engine = make_engine(model="demo", models_dir=tmp_path)
    first, first_parameters = drawn(engine, prompt="a lighthouse <lora:style:1>")
    replace_file(path, lambda p: save_file(kohya_lora(pipe, seed=1, rank=8), p))
    second, second_parameters = drawn(engine, prompt="a lighthouse <lora:style:1>")
    fresh, fresh_parameters = drawn(
        make_engine(model="demo", models_dir=tmp_path), prompt="a lighthouse <lora:style:1>"
    )
    assert second != first and second == fresh
    assert second_parameters == fresh_parameters != first_parameters  # the new file's hash


def test_an_embedding_file_changed_on_disk_is_read_again(make_engine, tmp_path):
    from lora_files import token_vectors
    from safetensors.torch import save_file

    (tmp_path / "embeddings").mkdir()
    path = tmp_path / "embeddings" / "thing.safetensors"
    pipe = demo_pipe()
    save_file({"emb_params": token_vectors(pipe.text_encoder, pipe.tokenizer, "lighthouse")}, path)
    engine = make_engine(model="demo", models_dir=tmp_path)
    first, _ = drawn(engine, prompt="a thing")
    replace_file(
        path, lambda p: save_file({"emb_params": token_vectors(pipe.text_encoder, pipe.tokenizer, "red cat")}, p)
    )
    second, _ = drawn(engine, prompt="a thing")
    fresh, _ = drawn(make_engine(model="demo", models_dir=tmp_path), prompt="a thing")
    assert second != first and second == fresh


# ---- 11. links in loras/ follow the models' rule


def test_a_link_in_loras_to_a_file_elsewhere_is_followed_as_for_models_and_a_name_still_cannot_climb_out(
    make_engine, tmp_path
):
    from lora_files import kohya_lora
    from safetensors.torch import save_file

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_file(kohya_lora(demo_pipe(), seed=0), elsewhere / "style.safetensors")
    models = tmp_path / "models"
    (models / "loras").mkdir(parents=True)
    (models / "loras" / "linked.safetensors").symlink_to(elsewhere / "style.safetensors")
    client = imagine.create_app(make_engine(model="demo", models_dir=models)).test_client()
    assert [lora["name"] for lora in client.get("/loras").get_json()["loras"]] == ["linked"]
    assert client.post("/generate", json={"prompt": "a cat <lora:linked>", **FAST}).status_code == 200
    climbing = client.post("/generate", json={"prompt": "a cat <lora:../../elsewhere/style>", **FAST})
    assert climbing.status_code == 403


def test_the_docs_state_the_one_rule_for_links_in_loras():
    models_doc = (Path(imagine.__file__).parent / "docs" / "models.md").read_text()
    assert "links pointing out: 403" not in models_doc
    assert "links inside it are followed, wherever they point" in models_doc


# ---- 12. the same LoRA named twice


def test_the_same_lora_named_twice_draws_with_the_sum_of_its_weights_as_automatic1111_does(make_engine, tmp_path):
    from lora_files import kohya_lora
    from safetensors.torch import save_file

    (tmp_path / "loras").mkdir()
    save_file(kohya_lora(demo_pipe(), seed=0), tmp_path / "loras" / "style.safetensors")
    engine = make_engine(model="demo", models_dir=tmp_path)
    twice, _ = drawn(engine, prompt="a lighthouse <lora:style:0.4> <lora:style:0.6>")
    field_and_tag, _ = drawn(engine, prompt="a lighthouse <lora:style:0.4>", loras=[{"name": "style", "weight": 0.6}])
    once, _ = drawn(engine, prompt="a lighthouse <lora:style:1>")
    assert twice == once and field_and_tag == once


# ---- 7. files that block on open, and folders slow to read


FOLDER_ROUTES = (
    "/models",
    "/loras",
    "/embeddings",
    "/v1/models",
    "/sdapi/v1/sd-models",
    "/sdapi/v1/options",
    "/sdapi/v1/loras",
    "/sdapi/v1/embeddings",
    "/upscalers",
    "/sdapi/v1/upscalers",
)


@pytest.fixture
def fifos(tmp_path):
    """A models folder holding FIFOs named as models, LoRAs, embeddings and a diffusers folder's config; on leaving,
    each is opened for writing once, so that a thread a broken server left waiting on one can end."""
    import os

    (tmp_path / "loras").mkdir()
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "upscale_models").mkdir()
    (tmp_path / "folder" / "unet").mkdir(parents=True)
    (tmp_path / "folder" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    paths = [
        tmp_path / name
        for name in (
            "x.safetensors",
            "y.ckpt",
            "loras/z.safetensors",
            "embeddings/e.pt",
            "upscale_models/u.pth",
            "folder/unet/config.json",
        )
    ]
    for path in paths:
        os.mkfifo(path)
    yield tmp_path
    for path in paths:
        with contextlib.suppress(OSError):  # no reader waits on it: nothing to free
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_fifos_in_the_folders_are_never_opened_and_every_listing_answers_while_health_stays_quick(
    make_engine, serve, fifos
):
    url = serve(make_engine(model="demo", models_dir=fifos))
    for route in FOLDER_ROUTES:
        answer, slowest = health_while(url, lambda route=route: requests.get(f"{url}{route}", timeout=30))
        assert answer.status_code == 200, route
        assert slowest < HEALTH_BOUND
    listed = {model["name"]: model for model in requests.get(f"{url}/models", timeout=30).json()["models"]}
    assert "x" not in listed and "y" not in listed  # only regular files are models
    assert "folder" in listed  # its UNet's config is no regular file: read as missing, never waited on
    assert requests.get(f"{url}/loras", timeout=30).json()["loras"] == []
    refused = requests.post(f"{url}/generate", json={"prompt": "a cat", "model": "x", **FAST}, timeout=30)
    assert refused.status_code == 400


def test_a_models_folder_that_blocks_holds_none_of_the_threads_that_answer_health(
    make_engine, serve, monkeypatch, tmp_path
):
    (tmp_path / "x.safetensors").write_bytes(b"not read")
    release = threading.Event()
    # a stalled mount
    monkeypatch.setattr(engine.files.catalog.Catalog, "describe", lambda self, real: release.wait(60) and {})
    url = serve(make_engine(model="demo", models_dir=tmp_path, folder_timeout=1))
    statuses = []

    def list_models():
        statuses.append(requests.get(f"{url}/models", timeout=120).status_code)

    listers = [threading.Thread(target=list_models) for _ in range(20)]
    try:
        for lister in listers:
            lister.start()
        time.sleep(0.5)
        _, slowest = health_while(url, lambda: time.sleep(3))
    finally:
        release.set()
        for lister in listers:
            lister.join(120)
    assert slowest < HEALTH_BOUND
    assert set(statuses) == {503}


# ---- 9. a temporary folder that cannot hold an upload or an answer


def test_an_answer_the_temporary_folder_cannot_hold_is_a_507_before_the_work(live_server, engine, monkeypatch, caplog):
    monkeypatch.setattr(api.native, "spool_free_bytes", lambda: 1000)
    loads = count_loads(engine, monkeypatch)
    body = {"prompt": "a cat", "width": 512, "height": 512, "num_steps": 1}
    for route, fields in [("/generate", body), ("/sdapi/v1/txt2img", {**body, "steps": 1})]:
        answer = requests.post(f"{live_server}{route}", json=fields, timeout=120)
        assert answer.status_code == 507, route
        assert "temporary folder" in answer.text and "TMPDIR" in answer.text
    openai = {"prompt": "a cat", "size": "512x512", "steps": 1}
    assert requests.post(f"{live_server}/v1/images/generations", json=openai, timeout=120).status_code == 507
    assert loads == []
    assert requests.post(f"{live_server}/generate", json={"prompt": "a cat", **FAST}, timeout=120).status_code == 200
    assert not any(record.exc_info for record in caplog.records)


def test_an_upload_the_temporary_folder_cannot_hold_is_a_507_before_it_is_received(live_server, monkeypatch, caplog):
    monkeypatch.setattr(api.native, "spool_free_bytes", lambda: 1000)
    body = {"prompt": "a cat", "neg": "a" * 600_000}
    answer = requests.post(f"{live_server}/generate", json=body, timeout=120)
    assert answer.status_code == 507
    assert "X-Content-Type-Options" in answer.headers
    refusals = [record for record in caplog.records if "upload" in record.getMessage()]
    assert len(refusals) == 1 and refusals[0].exc_info is None


def test_a_client_that_waits_for_100_continue_gets_the_507_instead_and_sends_no_body(live_server, monkeypatch):
    import socket

    monkeypatch.setattr(api.native, "spool_free_bytes", lambda: 1000)
    host, port = live_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        headers = "Content-Type: application/json\r\nContent-Length: 600000\r\nExpect: 100-continue"
        connection.sendall(f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n\r\n".encode())
        answer = connection.recv(65536)  # the body is never sent: the answer must come without it
    assert answer.startswith(b"HTTP/1.1 507")


# ---- 13a. peft's words for a LoRA of other sizes


def test_a_lora_of_other_layer_sizes_is_refused_in_words_of_its_own(make_engine, tmp_path):
    from lora_files import kohya_lora
    from safetensors.torch import save_file

    (tmp_path / "loras").mkdir()
    lora = kohya_lora(demo_pipe(), seed=0)
    name = next(key for key in lora if key.endswith("lora_down.weight") and key.startswith("lora_te"))
    lora[name] = torch.zeros(lora[name].shape[0], lora[name].shape[1] + 1)
    save_file(lora, tmp_path / "loras" / "misfit.safetensors")
    client = imagine.create_app(make_engine(model="demo", models_dir=tmp_path)).test_client()
    answer = client.post("/generate", json={"prompt": "a cat <lora:misfit>", **FAST})
    assert answer.status_code == 400
    message = answer.get_json()["error"]
    assert "lora 'misfit' does not fit" in message and "report" not in message


# ---- 13e. the A1111 options while the default model's file is missing


def test_the_a1111_options_answer_while_the_default_models_file_is_missing(make_engine, tmp_path):
    client = imagine.create_app(make_engine(model="gone", models_dir=tmp_path)).test_client()
    answer = client.get("/sdapi/v1/options")
    assert answer.status_code == 200
    assert answer.get_json()["sd_model_checkpoint"] == "gone"
