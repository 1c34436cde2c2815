"""Each API dialect as a pure translator, with plain dicts: its body becomes a GenerationRequest, the engine's
events become its answer, an error its error shape. No server and no pipeline: the end-to-end tests do those."""

import base64
import io
import json

import pytest
from PIL import Image

from api import a1111, native, openai
from engine.errors import ImagineError, named
from engine.files.families import FAMILIES
from engine.job import Finished, Job, Preview
from engine.settings import Settings

SETTINGS = Settings()


def finished(n=1, size=(64, 48)) -> Finished:
    pictures = [(Image.new("RGB", size, (10 * k, 0, 0)), f"a cat\nSeed: {7 + k}") for k in range(n)]
    return Finished(
        pictures[0][0], pictures[0][1], 7, "demo", FAMILIES["sd1"], 4, 0.5, pictures, [7 + k for k in range(n)]
    )


def job_for(answer) -> Job:
    return Job(answer.request, "demo")


def decoded(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


# ---- Imagine's own


def test_native_body_becomes_the_request_and_its_answer_names_every_picture_and_seed():
    answer = native.to_answer({"prompt": "a cat", "n": 2, "seed": 7, "width": 64, "height": 72}, SETTINGS)
    assert (answer.request.prompt, answer.request.n, answer.request.seed) == ("a cat", 2, 7)
    assert answer.chunks is None  # not streamed: one JSON answer
    whole = answer.whole(job_for(answer), finished(n=2))
    assert whole["seeds"] == [7, 8] and len(whole["images"]) == 2 and whole["img"] == whole["images"][0]
    assert decoded(whole["img"]).info["parameters"] == "a cat\nSeed: 7"
    assert (whole["width"], whole["height"], whole["steps"], whole["model"]) == (64, 48, 4, "demo")


def test_native_stream_gives_a_preview_line_per_preview_event_then_the_done_line():
    answer = native.to_answer({"prompt": "a cat", "stream": 2, "seed": 7}, SETTINGS)
    job = job_for(answer)
    [preview] = answer.chunks(job, Preview(2, 4, Image.new("RGB", (8, 8)), index=1))
    assert json.loads(preview) | {"img": None} == {"img": None, "step": 2, "steps": 4, "index": 1, "seed": 8,
                                                   "done": False}  # fmt: skip
    [done] = answer.chunks(job, finished())
    assert json.loads(done)["done"] is True
    assert json.loads(answer.error_chunk(ImagineError("boom", 500))) == {"error": "boom", "done": True}


def test_a_variation_batchs_stream_previews_carry_the_batchs_one_seed():
    body = {"prompt": "a cat", "stream": 2, "seed": 7, "n": 2, "variation_seed": 3, "variation_strength": 0.5}
    answer = native.to_answer(body, SETTINGS)
    [preview] = answer.chunks(job_for(answer), Preview(2, 4, Image.new("RGB", (8, 8)), index=1))
    assert json.loads(preview)["seed"] == 7


def test_native_errors_are_one_field():
    assert native.to_error(ImagineError("num_steps must be between 1 and 150, not 0", field="num_steps")) == {
        "error": "num_steps must be between 1 and 150, not 0"
    }


def test_each_dialect_names_the_fields_an_error_names_as_its_clients_send_them():
    error = ImagineError(f"{named('strength')} 0.1 with {named('num_steps')} 4 leaves no step to run", field="strength")
    assert native.to_error(error)["error"] == "strength 0.1 with num_steps 4 leaves no step to run"
    assert a1111.to_error(error)["detail"] == "denoising_strength 0.1 with steps 4 leaves no step to run"
    assert openai.to_error(error)["error"]["message"] == "strength 0.1 with steps 4 leaves no step to run"


# ---- OpenAI's


def test_openai_quality_size_and_knobs_become_generate_fields():
    body = {"prompt": "a cat", "size": "64x72", "quality": "low", "negative_prompt": "dog", "seed": 3, "n": 2}
    answer = openai.to_answer(body, SETTINGS, "image_generation", {}, link=None)
    req = answer.request
    assert (req.width, req.height, req.num_steps, req.neg, req.seed, req.n) == (64, 72, 12, "dog", 3, 2)
    assert answer.default_if_unknown  # dall-e-3 and the like draw with the default model


def test_openai_unknown_parameter_is_refused_naming_it():
    with pytest.raises(ImagineError, match="unknown parameter 'colour'"):
        openai.to_answer({"prompt": "a cat", "colour": "red"}, SETTINGS, "image_generation", {}, link=None)


def test_openai_url_answers_carry_the_link_the_server_keeps():
    kept = []

    def link(data, extension):
        kept.append((data[:8], extension))
        return f"http://localhost:5000/v1/images/files/{len(kept)}.{extension}"

    answer = openai.to_answer({"prompt": "a cat", "response_format": "url"}, SETTINGS, "image_generation", {}, link)
    whole = answer.whole(job_for(answer), finished(n=2))
    assert [each["url"] for each in whole["data"]] == [
        "http://localhost:5000/v1/images/files/1.png",
        "http://localhost:5000/v1/images/files/2.png",
    ]
    assert kept == [(b"\x89PNG\r\n\x1a\n", "png")] * 2 and whole["size"] == "64x48"


def test_openai_stream_spreads_partial_images_over_the_steps_then_completes_each_picture():
    body = {"prompt": "a cat", "stream": True, "partial_images": 2, "size": "64x64"}
    answer = openai.to_answer(body, SETTINGS, "image_generation", {}, link=None)
    assert answer.request.stream == 1 and answer.mimetype == "text/event-stream"
    job = job_for(answer)
    sent = [answer.chunks(job, Preview(step, 9, Image.new("RGB", (8, 8)))) for step in range(1, 10)]
    steps = [step for step, chunks in zip(range(1, 10), sent, strict=True) if chunks]
    assert steps == [3, 6]  # the k-th of p partial images at k/(p+1) of the steps
    [completed] = answer.chunks(job, finished())
    assert completed.startswith("event: image_generation.completed\n")


def test_openai_errors_have_openais_shape_in_answers_and_streams():
    error = ImagineError("prompt is required", field="prompt")
    assert openai.to_error(error) == {
        "error": {"message": "prompt is required", "type": "invalid_request_error", "param": None, "code": None}
    }
    event = openai.error_event(ImagineError("the device ran out of memory", 500))
    assert json.loads(event.split("data: ", 1)[1])["error"]["type"] == "server_error"


# ---- AUTOMATIC1111's


def test_a1111_fields_become_generate_fields_and_the_answer_keeps_what_was_understood():
    body = {"prompt": "a cat", "negative_prompt": "dog", "steps": 6, "cfg_scale": 5, "sampler_name": "DPM++ 2M Karras",
            "batch_size": 2, "n_iter": 2, "seed": 11, "width": 64, "height": 64}  # fmt: skip
    req, understood = a1111.a1111_request(body, False, model_name=None, settings=SETTINGS)
    assert (req.neg, req.num_steps, req.guidance, req.sampler, req.n) == ("dog", 6, 5.0, "dpm++ 2m", 4)
    assert req.schedule == "karras"
    assert understood["sampler_name"] == "DPM++ 2M"


def test_a1111_errors_name_a1111s_field():
    with pytest.raises(ImagineError) as refused:
        a1111.a1111_request({"prompt": "a cat", "cfg_scale": 99}, False, model_name=None, settings=SETTINGS)
    message = "cfg_scale must be between 0.0 and 30.0, not 99"
    assert a1111.to_error(refused.value) == {"error": message, "detail": message}


def test_a1111_progress_reads_where_the_engines_job_stands():
    assert a1111.a1111_progress(None, preview=None)["progress"] == 0
    req, _ = a1111.a1111_request({"prompt": "a cat", "batch_size": 2}, False, model_name=None, settings=SETTINGS)
    job = Job(req, "demo")
    job.step, job.steps, job.started = 5, 20, 0.0
    progress = a1111.a1111_progress(job, preview="PNG")
    assert (progress["progress"], progress["current_image"]) == (0.25, "PNG")
    assert progress["textinfo"] == "Step 5/20, 2 pictures"
    assert (progress["state"]["sampling_step"], progress["state"]["job"]) == (5, "txt2img")
