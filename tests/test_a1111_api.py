"""AUTOMATIC1111's API (/sdapi/v1/*): each client's calls, in the order its code makes them, against the real
waitress server on tiny models, checking what that client reads (see /sdapi/v1 in the README)."""

import base64
import hashlib
import io
import json
import threading

import numpy as np
import pytest
import requests
from conftest import decode_png, png_data, save_config_folder, save_tiny_folder, wait_until
from diffusers import StableDiffusionPipeline
from ldm_checkpoint import save_ldm_checkpoint
from PIL import Image

from api.a1111_files import png_info
from engine.schedules import SCHEDULE_NAMES

SMALL = {"width": 64, "height": 64, "steps": 4}
# What Open WebUI sends on every call when its "API Auth" setting is empty.
OPEN_WEBUI_HEADERS = {"authorization": "Basic "}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A models folder with a tiny diffusers folder and a tiny single-file checkpoint, and configs that fit them."""
    folder = tmp_path_factory.mktemp("a1111")
    save_tiny_folder(folder / "tiny", seed=1)
    pipe = StableDiffusionPipeline.from_pretrained(folder / "tiny")
    save_ldm_checkpoint(pipe, folder / "dreamshaper_8.safetensors")
    configs = save_config_folder(pipe, tmp_path_factory.mktemp("configs") / "sd1").parent
    return folder, configs


@pytest.fixture
def server(models, serve, make_engine):
    """A waitress server on its own engine (model switches change its default); yields (url, engine)."""

    def start(**settings):
        folder, configs = models
        engine = make_engine(models_dir=folder, fp_prec="32", configs_dir=configs, **settings)
        return serve(engine), engine

    return start


def in_background(call):
    """Runs `call` on a thread; the returned function waits for and gives its result."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=call()))
    thread.start()

    def answer():
        thread.join(120)
        return result["value"]

    return answer


def file_sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashed_title(url: str, headers=None) -> str:
    """The single-file checkpoint's title, once its hash (computed on a thread of its own) is known."""

    def title():
        titles = [m["title"] for m in requests.get(f"{url}/sdapi/v1/sd-models", headers=headers).json()]
        return next((t for t in titles if t.startswith("dreamshaper_8.safetensors [")), None)

    wait_until(title, "the checkpoint's hash is known")
    return title()


def test_open_webui_verifies_lists_switches_the_model_with_its_whole_options_and_generates(server, models):
    url, engine = server(model="demo")
    folder, _ = models
    # "Verify connection", then the model list and the current model, all with its empty Basic header.
    assert requests.get(f"{url}/sdapi/v1/options", headers=OPEN_WEBUI_HEADERS).status_code == 200
    listed = requests.get(f"{url}/sdapi/v1/sd-models", headers=OPEN_WEBUI_HEADERS).json()
    assert {(m["title"], m["model_name"]) for m in listed} >= {("demo", "demo"), ("tiny", "tiny")}
    title = hashed_title(url, OPEN_WEBUI_HEADERS)
    sha256 = file_sha256(folder / "dreamshaper_8.safetensors")
    assert title == f"dreamshaper_8.safetensors [{sha256[:10]}]"
    options = requests.get(f"{url}/sdapi/v1/options", headers=OPEN_WEBUI_HEADERS).json()
    assert options["sd_model_checkpoint"] == "demo"
    # set_image_model: the whole dict it got, with sd_model_checkpoint replaced, posted back.
    answer = requests.post(
        f"{url}/sdapi/v1/options", json={**options, "sd_model_checkpoint": title}, headers=OPEN_WEBUI_HEADERS
    )
    assert answer.status_code == 200
    assert str(folder / "dreamshaper_8.safetensors") in engine.models.loaded  # loaded before the answer
    options = requests.get(f"{url}/sdapi/v1/options", headers=OPEN_WEBUI_HEADERS).json()
    assert options["sd_model_checkpoint"] == title
    assert options["sd_checkpoint_hash"] == sha256
    body = {"prompt": "a cat", "batch_size": 2, "width": 64, "height": 64, "steps": 4, "negative_prompt": "dog"}
    answer = requests.post(f"{url}/sdapi/v1/txt2img", json=body, headers=OPEN_WEBUI_HEADERS).json()
    assert len(answer["images"]) == 2
    assert all(decode_png(image).size == (64, 64) for image in answer["images"])
    info = json.loads(answer["info"])
    assert info["sd_model_name"] == "dreamshaper_8" and info["sd_model_hash"] == sha256[:10]
    assert info["all_seeds"] == [info["seed"], info["seed"] + 1]


def test_sillytavern_sets_up_switches_waits_for_idle_and_generates_with_its_whole_body(server):
    url, _ = server(model="demo")
    auth = {"Authorization": "Basic "}
    get = lambda path: requests.get(f"{url}/sdapi/v1/{path}", headers=auth)  # noqa: E731
    assert get("options").ok
    upscalers = [x["name"] for x in get("upscalers").json()]
    assert upscalers[0] == "None"
    upscale_modes = [x["name"] for x in get("latent-upscale-modes").json()]
    assert upscale_modes[0] == "Latent" and "Latent (nearest-exact)" in upscale_modes
    assert [x["model_name"] for x in get("sd-vae").json()] == []
    samplers = [x["name"] for x in get("samplers").json()]
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= set(samplers)
    assert [x["name"] for x in get("schedulers").json()] == list(SCHEDULE_NAMES)
    titles = [x["title"] for x in get("sd-models").json()]
    assert get("options").json()["sd_model_checkpoint"] in titles
    # /set-model, then its wait for the server to be idle.
    answer = requests.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}, headers=auth)
    assert answer.ok
    progress = get("progress").json()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    body = {
        "url": url,
        "auth": "",
        "prompt": "a cat",
        "negative_prompt": "",
        "sampler_name": "DDIM",
        "scheduler": "normal",
        "cfg_scale": 7,
        "restore_faces": False,
        "enable_hr": True,
        "hr_upscaler": "Latent",
        "hr_scale": 2.0,
        "denoising_strength": 0.7,
        "hr_second_pass_steps": 0,
        "seed": 123,
        "override_settings": {"CLIP_stop_at_last_layers": 2},
        "override_settings_restore_afterwards": True,
        "clip_skip": 2,
        "save_images": True,
        "send_images": True,
        "do_not_save_grid": False,
        "do_not_save_samples": False,
        **SMALL,
    }
    answer = requests.post(f"{url}/sdapi/v1/txt2img", json=body, headers=auth)
    assert answer.status_code == 200
    data = answer.json()
    assert decode_png(data["images"][0]).size == (128, 128)  # its hires fix: twice the size
    info = json.loads(data["info"])
    assert info["seed"] == 123 and info["sampler_name"] == "DDIM" and info["clip_skip"] == 2
    assert "Size: 64x64" in info["infotexts"][0] and "Hires upscale: 2, Hires upscaler: Latent" in info["infotexts"][0]
    # A1111 draws DDIM on its own timesteps whatever the scheduler: so does Imagine, and info says so.
    assert info["sd_model_name"] == "tiny" and info["imagine_ignored"] == ["scheduler"]
    assert info["scheduler"] == "Automatic" and "Sampler: DDIM, Schedule type: Automatic" in info["infotexts"][0]
    assert "auth" not in data["parameters"]


def test_librechat_reads_seed_size_and_infotext_and_passes_the_key_in_the_url(server):
    url, _ = server(model="demo", api_key="s3cret")
    body = {"prompt": "a cat", "negative_prompt": "blurry", "cfg_scale": 4.5, **SMALL}
    assert requests.post(f"{url}/sdapi/v1/txt2img", json=body).status_code == 401
    with_key = url.replace("http://", "http://user:s3cret@")  # SD_WEBUI_URL with the key: axios sends Basic
    answer = requests.post(f"{with_key}/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200
    info = json.loads(answer.json()["info"])
    assert (info["width"], info["height"]) == (64, 64)
    assert f"Seed: {info['seed']}" in info["infotexts"][0]
    assert info["infotexts"][0].startswith("a cat\nNegative prompt: blurry\n")
    wrong = url.replace("http://", "http://user:wrong@")
    assert requests.get(f"{wrong}/sdapi/v1/options").status_code == 401
    assert requests.get(f"{url}/sdapi/v1/options", headers={"Authorization": "Basic "}).status_code == 401


# What webuiapi's txt2img sends of the hires fix, its defaults with enable_hr switched on.
WEBUIAPI_HIRES = {
    "enable_hr": True, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2,
    "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None,
    "hr_sampler_name": None, "hr_prompt": "", "hr_negative_prompt": "",
}  # fmt: skip


def test_webuiapi_hires_fix_draws_at_twice_the_size_and_its_png_info_reads_the_hires_settings(server):
    url, _ = server(model="demo")
    body = {"prompt": "a cat", "seed": 7, "sampler_name": "Euler a", **SMALL, **WEBUIAPI_HIRES}
    answer = requests.post(f"{url}/sdapi/v1/txt2img", json=body).json()
    assert decode_png(answer["images"][0]).size == (128, 128)
    info = json.loads(answer["info"])
    assert (info["width"], info["height"], info["imagine_ignored"]) == (128, 128, [])
    png = requests.post(f"{url}/sdapi/v1/png-info", json={"image": answer["images"][0]}).json()["parameters"]
    assert (png["Size-1"], png["Hires upscale"], png["Hires upscaler"], png["Denoising strength"]) == (
        "64", "2", "Latent", "0.7")  # fmt: skip


def test_webuiapi_batches_seeds_and_reads_the_pictures_parameters_back(server):
    url, _ = server(model="demo")
    body = {"prompt": "a cat", "seed": 7, "batch_size": 1, "n_iter": 2, "sampler_name": "DPM++ 2M Karras", **SMALL}
    answer = requests.post(f"{url}/sdapi/v1/txt2img", json=body).json()
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [7, 8] and len(answer["images"]) == 2
    assert (info["sampler_name"], info["scheduler"]) == ("DPM++ 2M", "Karras")
    assert answer["parameters"]["n_iter"] == 2
    png = requests.post(f"{url}/sdapi/v1/png-info", json={"image": answer["images"][1]}).json()
    assert png["info"] == info["infotexts"][1]
    assert png["parameters"]["Seed"] == "8" and png["parameters"]["Sampler"] == "DPM++ 2M"
    assert png["parameters"]["Schedule type"] == "Karras"
    assert (png["parameters"]["Size-1"], png["parameters"]["Size-2"]) == ("64", "64")
    nothing = requests.post(f"{url}/sdapi/v1/txt2img", json={**body, "send_images": False}).json()
    assert nothing["images"] == []


def test_a_forge_clients_distilled_cfg_scale_leaves_an_sd_model_drawing_with_its_cfg_scale(server):
    url, _ = server(model="demo")
    body = {"prompt": "a cat", "seed": 5, "cfg_scale": 6, "sampler_name": "Euler", "scheduler": "Simple", **SMALL}
    plain = requests.post(f"{url}/sdapi/v1/txt2img", json=body).json()
    forge = requests.post(f"{url}/sdapi/v1/txt2img", json={**body, "distilled_cfg_scale": 3.5}).json()
    assert forge["images"] == plain["images"] and json.loads(forge["info"])["cfg_scale"] == 6
    assert "distilled_cfg_scale" not in json.loads(forge["info"])
    bad = requests.post(f"{url}/sdapi/v1/txt2img", json={**body, "distilled_cfg_scale": "high"})
    assert bad.status_code == 422 and bad.json()["detail"].startswith("distilled_cfg_scale ")


def test_img2img_with_a_mask_repaints_only_the_white_part_and_an_inverted_mask_the_rest(server):
    url, _ = server(model="demo")
    start = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {
        "prompt": "a cat",
        "init_images": [f"data:image/png;base64,{png_data(start)}"],
        "mask": png_data(mask),
        "mask_blur": 0,
        "inpaint_full_res": False,
        "denoising_strength": 0.75,
        "seed": 3,
        **SMALL,
    }
    kept = np.asarray(mask) == 0
    for invert, unchanged in ((0, kept), (1, ~kept)):
        answer = requests.post(f"{url}/sdapi/v1/img2img", json={**body, "inpainting_mask_invert": invert})
        assert answer.status_code == 200
        painted = np.asarray(decode_png(answer.json()["images"][0]).convert("RGB"))
        assert (painted[unchanged] == np.asarray(start)[unchanged]).all()
        assert (painted[~unchanged] != np.asarray(start)[~unchanged]).any()


def test_progress_during_a_generation_shows_its_step_and_preview_and_interrupt_returns_the_picture_so_far(server, hold):
    held = hold()
    url, engine = server(model="demo", generate=held.generate)
    idle = requests.get(f"{url}/sdapi/v1/progress").json()
    assert (idle["progress"], idle["state"]["job_count"], idle["current_image"]) == (0, 0, None)
    body = {"prompt": "a cat", "seed": 5, "batch_size": 2, "width": 64, "height": 64, "steps": 8}
    full = requests.post(f"{url}/sdapi/v1/txt2img", json={**body, "batch_size": 1}).json()["images"][0]
    held.stop_at(3, 4)
    answer = in_background(lambda: requests.post(f"{url}/sdapi/v1/txt2img", json=body))
    held.reached(3)
    progress = requests.get(f"{url}/sdapi/v1/progress").json()
    assert progress["state"]["job_count"] == 1  # the batch is one pipeline call
    assert progress["state"]["sampling_step"] == 2 and progress["state"]["sampling_steps"] == 8
    assert progress["progress"] == pytest.approx(2 / 8)
    assert progress["current_image"] is None  # nobody had asked for one: the engine previews the next step
    held.release(3)
    held.reached(4)
    progress = requests.get(f"{url}/sdapi/v1/progress").json()
    assert progress["state"]["sampling_step"] == 3 and decode_png(progress["current_image"]).size == (64, 64)
    assert requests.get(f"{url}/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None
    assert requests.post(f"{url}/sdapi/v1/interrupt").status_code == 200
    held.release()
    interrupted = answer()
    assert interrupted.status_code == 200
    images = interrupted.json()["images"]
    assert len(images) == 2  # both pictures of the batch, as far as they got
    assert decode_png(images[0]).size == (64, 64) and images[0] != full  # stopped after 4 of 8 steps
    after = requests.get(f"{url}/sdapi/v1/progress").json()
    assert (after["progress"], after["state"]["job_count"]) == (0, 0)


def test_skip_ends_the_batch_being_drawn_and_keeps_its_pictures_as_far_as_they_got(server, hold):
    held = hold()
    url, engine = server(model="demo", generate=held.generate)
    body = {"prompt": "a cat", "seed": 5, "batch_size": 2, **SMALL}
    full = requests.post(f"{url}/sdapi/v1/txt2img", json=body).json()["images"]
    held.stop_at(3)
    answer = in_background(lambda: requests.post(f"{url}/sdapi/v1/txt2img", json=body))
    held.reached(3)
    assert requests.post(f"{url}/sdapi/v1/skip").status_code == 200
    held.release()
    skipped = answer().json()["images"]
    assert len(skipped) == 2 and skipped[0] != full[0] and skipped[1] != full[1]


def test_unknown_and_unsupported_fields_are_no_error_and_switched_on_features_are_listed_as_ignored(server):
    url, _ = server(model="demo")
    body = {
        "prompt": "a cat",
        "restore_faces": True,
        "alwayson_scripts": {},
        "script_args": [],
        "sampler_index": "Euler",
        "some_future_field": {"x": 1},
        **SMALL,
    }
    answer = requests.post(f"{url}/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200
    assert json.loads(answer.json()["info"])["imagine_ignored"] == ["restore_faces"]


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [("steps", "many", "steps"), ("cfg_scale", 99, "cfg_scale"), ("negative_prompt", 3, "negative_prompt")],
)
def test_a_bad_value_of_a_used_field_is_a_422_naming_the_field(server, field, value, named):
    url, _ = server(model="demo")
    answer = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a cat", field: value})
    assert answer.status_code == 422
    assert answer.json()["detail"].startswith(f"{named} ") and answer.json()["error"]


def test_a_model_override_holds_for_one_request_only(server):
    url, engine = server(model="demo")
    body = {"prompt": "a cat", "override_settings": {"sd_model_checkpoint": "tiny"}, **SMALL}
    info = json.loads(requests.post(f"{url}/sdapi/v1/txt2img", json=body).json()["info"])
    assert info["sd_model_name"] == "tiny"
    assert requests.get(f"{url}/sdapi/v1/options").json()["sd_model_checkpoint"] == "demo"
    unknown = requests.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "nope.safetensors"})
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]


def test_the_loras_list_names_files_by_relative_path_never_a_server_path(server, models):
    folder, _ = models
    (folder / "loras").mkdir(exist_ok=True)
    (folder / "loras" / "style.safetensors").write_bytes(b"")
    url, _ = server(model="demo")
    loras = requests.get(f"{url}/sdapi/v1/loras").json()
    assert [(lora["name"], lora["path"]) for lora in loras] == [("style", "style")]
    assert str(folder) not in json.dumps(requests.get(f"{url}/sdapi/v1/sd-models").json())


def test_the_png_info_of_a_picture_without_parameters_is_empty():
    image = io.BytesIO()
    Image.new("RGB", (8, 8)).save(image, format="PNG")
    assert png_info(base64.b64encode(image.getvalue()).decode()) == {"info": "", "items": {}, "parameters": {}}
