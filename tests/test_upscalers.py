"""Upscalers: the listing (built-ins, model files, a broken file with its error), A1111's Extras routes and Imagine's
/upscale, tiling without seams, the engine's queue, and bad input refused before any work."""

import pickle
import threading

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import decode_png, noise_picture, png_data
from PIL import Image
from upscaler_files import compact, esrgan

import imagine
from engine import upscalers
from engine.job import Upscaled
from engine.upscalers import UpscaleRequest, imported_spandrel

FAST = {"width": 64, "height": 64, "num_steps": 2, "seed": 1}


class RunsCode:
    """A pickle that runs a command when it is loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def upscale_dir(tmp_path_factory):
    """A models folder with upscalers where ComfyUI and A1111 keep them: a 4x ESRGAN (.safetensors, which a models
    folder would otherwise list as a model), a 2x Compact (.pth, in params_ema as Real-ESRGAN publishes it), a
    truncated file, a file of other tensors, and a pickle that would run code."""
    path = tmp_path_factory.mktemp("upscale-models")
    for folder in ("upscale_models", "ESRGAN", "RealESRGAN"):
        (path / folder).mkdir()
    safetensors.torch.save_file(esrgan(), path / "RealESRGAN" / "tiny-esrgan-4x.safetensors")
    torch.save({"params_ema": compact()}, path / "ESRGAN" / "tiny-compact-2x.pth")
    data = (path / "RealESRGAN" / "tiny-esrgan-4x.safetensors").read_bytes()
    (path / "upscale_models" / "broken.safetensors").write_bytes(data[: len(data) // 2])
    safetensors.torch.save_file(
        {"something.else": torch.zeros(3)}, path / "upscale_models" / "not-an-upscaler.safetensors"
    )
    with open(path / "ESRGAN" / "runs-code.pth", "wb") as file:
        pickle.dump(RunsCode(path / "ran"), file, protocol=2)
    return path


@pytest.fixture
def upscale_engine(make_engine, upscale_dir):
    """An engine in float32, as model_output runs the models (bfloat16 would move pixels by more than rounding)."""
    return make_engine(models_dir=upscale_dir, model="demo", max_size=512, fp_prec="32")


@pytest.fixture
def upscale_client(upscale_engine):
    return imagine.create_app(upscale_engine).test_client()


def model_output(state: dict, image: Image.Image) -> np.ndarray:
    """The picture through the model whole, untiled, as spandrel runs it."""
    model = imported_spandrel().ModelLoader().load_from_state_dict(state).eval()
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.inference_mode():
        out = model(pixels)
    return (out[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy().astype(int)


def assert_close(one: np.ndarray, other: np.ndarray) -> None:
    """Equal up to float rounding: the same sums in another order (a tile is another shape for the convolution's
    algorithm) move a pixel by at most one level of 255; a seam or another model moves many by tens."""
    assert one.shape == other.shape
    difference = np.abs(one.astype(int) - other.astype(int))
    assert difference.max() <= 1, difference.max()


def test_upscalers_lists_the_builtins_and_each_model_with_its_scale_and_a_broken_file_with_its_error(upscale_client):
    listing = {each["name"]: each for each in upscale_client.get("/upscalers").get_json()["upscalers"]}
    assert list(listing)[:3] == ["None", "Lanczos", "Nearest"]
    assert listing["tiny-esrgan-4x"]["scale"] == 4 and listing["tiny-esrgan-4x"]["architecture"] == "ESRGAN"
    assert listing["tiny-esrgan-4x"]["file"] == "RealESRGAN/tiny-esrgan-4x.safetensors"
    assert listing["tiny-compact-2x"]["scale"] == 2 and listing["tiny-compact-2x"]["error"] is None
    assert "'upscale_models/broken.safetensors' cannot be read" in listing["broken"]["error"]
    assert "no model architecture spandrel knows" in listing["not-an-upscaler"]["error"]
    assert "'ESRGAN/runs-code.pth' cannot be read" in listing["runs-code"]["error"]


def test_a_pickle_that_would_run_code_is_read_only_as_weights(upscale_client, upscale_dir):
    upscale_client.get("/upscalers")
    answer = upscale_client.post("/upscale", json={"img": png_data(noise_picture(8, 8)), "upscaler": "runs-code"})
    assert answer.status_code == 422 and "runs-code.pth" in answer.get_json()["error"]
    assert not (upscale_dir / "ran").exists()


def test_a1111_lists_the_usable_upscalers_in_its_fields(upscale_client):
    listing = upscale_client.get("/sdapi/v1/upscalers").get_json()
    names = [each["name"] for each in listing]
    assert names == ["None", "Lanczos", "Nearest", "tiny-compact-2x", "tiny-esrgan-4x"]
    assert listing[4] == {
        "name": "tiny-esrgan-4x",
        "model_name": "ESRGAN",
        "model_path": "RealESRGAN/tiny-esrgan-4x.safetensors",
        "model_url": None,
        "scale": 4,
    }


def test_upscaler_folders_hold_no_models_to_draw_with(upscale_client):
    names = [each["name"] for each in upscale_client.get("/models").get_json()["models"]]
    assert not any("tiny-" in name or "broken" in name for name in names)


def test_extra_single_image_is_the_models_own_picture(upscale_client):
    image = noise_picture(40, 24)
    body = {"image": png_data(image), "upscaler_1": "tiny-esrgan-4x", "upscaling_resize": 4}
    answer = upscale_client.post("/sdapi/v1/extra-single-image", json=body).get_json()
    assert answer["html_info"] == "Postprocess upscale by: 4, Postprocess upscaler: tiny-esrgan-4x"
    assert_close(np.asarray(decode_png(answer["image"])), model_output(esrgan(), image))


def test_tiles_meet_without_seams(upscale_engine, monkeypatch):
    # The tiny ESRGAN sees 19 input pixels around each one (17 convolutions, then 4 at 2x and 4x): with tiles of 16
    # padded by 20, every pixel is computed from what the whole picture gives it.
    image = noise_picture(48, 40, seed=3)
    whole = model_output(esrgan(), image)
    monkeypatch.setattr(upscalers, "TILE", 16)
    monkeypatch.setattr(upscalers, "TILE_PAD", 20)
    assert_close(np.asarray(upscale_engine.upscalers.upscale(image, "tiny-esrgan-4x", 4)), whole)
    # Without the padding, each tile's edge sees zeros where its neighbour's pixels are: seams.
    monkeypatch.setattr(upscalers, "TILE_PAD", 0)
    seams = np.asarray(upscale_engine.upscalers.upscale(image, "tiny-esrgan-4x", 4)).astype(int)
    assert np.abs(seams - whole).max() > 10


def test_extra_batch_images_upscales_each_picture_with_a_pth_model(upscale_client):
    images = [noise_picture(24, 16, seed=1), noise_picture(16, 24, seed=2)]
    body = {"imageList": [{"data": png_data(image), "name": f"{i}.png"} for i, image in enumerate(images)]}
    answer = upscale_client.post("/sdapi/v1/extra-batch-images", json={**body, "upscaler_1": "tiny-compact-2x"})
    pictures = [np.asarray(decode_png(data)) for data in answer.get_json()["images"]]
    for picture, image in zip(pictures, images, strict=True):
        assert_close(picture, model_output(compact(), image))


def test_upscaler_2_is_blended_over_the_first_by_its_visibility(upscale_client):
    image = noise_picture(24, 16)
    body = {
        "image": png_data(image),
        "upscaler_1": "tiny-esrgan-4x",
        "upscaler_2": "Nearest",
        "extras_upscaler_2_visibility": 0.25,
        "upscaling_resize": 4,
    }
    answer = upscale_client.post("/sdapi/v1/extra-single-image", json=body).get_json()
    nearest = np.asarray(image.resize((96, 64), Image.Resampling.NEAREST)).astype(int)
    expected = model_output(esrgan(), image) * 0.75 + nearest * 0.25
    assert np.abs(np.asarray(decode_png(answer["image"])) - expected).max() <= 1.5


def test_resize_mode_1_covers_the_size_and_cuts_it_in_the_middle(upscale_client):
    image = noise_picture(40, 20)
    body = {"image": png_data(image), "upscaler_1": "Lanczos", "resize_mode": 1}
    answer = upscale_client.post(
        "/sdapi/v1/extra-single-image", json={**body, "upscaling_resize_w": 120, "upscaling_resize_h": 120}
    ).get_json()
    covered = np.asarray(image.resize((240, 120), Image.Resampling.LANCZOS))
    assert np.array_equal(np.asarray(decode_png(answer["image"])), covered[:, 60:180])


def test_native_upscale_answers_the_picture_scaled(upscale_client):
    image = noise_picture(16, 16)
    answer = upscale_client.post("/upscale", json={"img": png_data(image), "upscaler": "tiny-compact-2x", "scale": 3})
    fields = answer.get_json()
    assert (fields["width"], fields["height"]) == (48, 48)
    # 2x by the model twice (64x64), then Lanczos down to 3x, as A1111 does.
    once = model_output(compact(), image).astype(np.uint8)
    twice = Image.fromarray(model_output(compact(), Image.fromarray(once)).astype(np.uint8))
    expected = np.asarray(twice.resize((48, 48), Image.Resampling.LANCZOS))
    assert_close(np.asarray(decode_png(fields["img"])), expected)


@pytest.mark.parametrize(
    ("route", "body", "says"),
    [
        ("/upscale", {"img": "x", "upscaler": "Lanczos"}, "img is not valid base64"),
        ("/upscale", {"upscaler": "Lanczos"}, "img is required"),
        ("/upscale", {"img": "IMG", "upscaler": "nope"}, "upscaler: no upscaler 'nope'"),
        ("/upscale", {"img": "IMG", "upscaler": "broken"}, "'upscale_models/broken.safetensors' cannot be read"),
        ("/upscale", {"img": "IMG", "upscaler": "Lanczos", "scale": 8}, "scale makes picture 0 (80x80) 640x640"),
        ("/upscale", {"img": "IMG", "upscaler": "Lanczos", "size": 2}, "unknown field 'size'"),
        ("/sdapi/v1/extra-single-image", {"image": "IMG", "upscaler_1": "nope"}, "upscaler_1: no upscaler 'nope'"),
        ("/sdapi/v1/extra-single-image", {"image": "IMG", "upscaling_resize": 7}, "upscaling_resize makes picture 0"),
        ("/sdapi/v1/extra-single-image", {"image": "IMG", "upscaling_resize": 9}, "upscaling_resize must be between"),
        (
            "/sdapi/v1/extra-single-image",
            {"image": "IMG", "upscaler_1": "Lanczos", "upscaler_2": "broken", "extras_upscaler_2_visibility": 0.5},
            "upscaler_2: upscaler file 'upscale_models/broken.safetensors'",
        ),
        ("/sdapi/v1/extra-batch-images", {"imageList": []}, "imageList must be a list of 1 to"),
    ],
)
def test_bad_upscale_requests_are_refused_naming_the_field(upscale_client, route, body, says):
    body = {key: png_data(noise_picture(80, 80)) if value == "IMG" else value for key, value in body.items()}
    answer = upscale_client.post(route, json=body)
    assert answer.status_code in (400, 422)
    assert says in answer.get_json()["error"]


def test_an_upscale_waits_in_the_queue_behind_a_generation(make_engine, upscale_dir, hold):
    held = hold(1)
    engine = make_engine(models_dir=upscale_dir, model="demo", generate=held.generate)
    client = imagine.create_app(engine).test_client()
    generation = threading.Thread(target=client.post, args=("/generate",), kwargs={"json": {"prompt": "a", **FAST}})
    generation.start()
    held.reached(1)
    job = engine.upscale(UpscaleRequest([noise_picture(16, 16)], "tiny-compact-2x"))
    assert engine.position(job) == 0  # the generation runs; the upscale waits for it
    held.release()
    events = list(job)
    generation.join()
    assert isinstance(events[-1], Upscaled) and events[-1].images[0].size == (32, 32)
