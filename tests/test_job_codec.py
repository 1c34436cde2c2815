"""engine/job_codec.py: a request and the engine's events as JSON-able data and back, pictures inline or as files;
a request decoded from its data draws the same pictures, on the tiny demo model."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import FAST, noise_picture, png_data, square_mask
from PIL import Image

from engine.errors import ImagineError, named
from engine.job import Failed, Finished, Loading, Preview, Progress, Started
from engine.job_codec import event_data, event_from_data, request_data, request_from_data
from engine.request import parse_request


def through_json(data: dict) -> dict:
    """The data as another process reads it: written as JSON text and parsed again."""
    return json.loads(json.dumps(data))


def draw(engine, req) -> Finished:
    """The engine's Finished event for `req`; fails the test on a Failed one."""
    events = list(engine.submit(req))
    assert isinstance(events[-1], Finished), events[-1]
    return events[-1]


def inpainting_request():
    body = {"prompt": "a red door", **FAST, "seed": 7, "n": 2, "img": png_data(noise_picture()), "neg": "fog"}
    body |= {"mask": png_data(square_mask()), "sampler": "euler a", "loras": [{"name": "none", "weight": 0.5}]}
    return parse_request(body)


@pytest.mark.parametrize("in_files", [False, True], ids=["inline", "in-files"])
def test_a_request_decoded_from_its_data_draws_the_same_pictures(engine, tmp_path, in_files):
    req = inpainting_request()
    folder = tmp_path if in_files else None
    decoded = request_from_data(through_json(request_data(req, folder)), folder)
    assert decoded.loras == [("none", 0.5)] and decoded.mask.mode == "L" and decoded.img.mode == "RGB"
    no_loras = {"loras": []}  # the demo folder holds no LoRA: the field's round trip is checked above
    drawn = draw(engine, dataclasses.replace(req, **no_loras))
    again = draw(engine, dataclasses.replace(decoded, **no_loras))
    for (one, _), (other, _) in zip(drawn.pictures, again.pictures, strict=True):
        assert np.array_equal(np.asarray(one), np.asarray(other))
    assert [parameters for _, parameters in drawn.pictures] == [parameters for _, parameters in again.pictures]


def test_a_request_in_files_names_them_and_its_data_holds_no_picture(tmp_path):
    data = request_data(inpainting_request(), tmp_path)
    assert data["img"] == {"file": "img.png"} and data["mask"] == {"file": "mask.png"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["img.png", "mask.png"]
    assert len(json.dumps(data)) < 2000


def test_a_finished_event_keeps_its_pictures_their_settings_and_its_numbers(engine, tmp_path):
    finished = draw(engine, parse_request({"prompt": "a boat", **FAST, "n": 2}))
    decoded = event_from_data(through_json(event_data(finished, tmp_path)), tmp_path)
    assert isinstance(decoded, Finished)
    for field in ("parameters", "seed", "seeds", "model", "family", "steps", "seconds", "interrupted", "notices"):
        assert getattr(decoded, field) == getattr(finished, field), field
    for (one, parameters), (other, kept) in zip(finished.pictures, decoded.pictures, strict=True):
        assert np.array_equal(np.asarray(one), np.asarray(other)) and parameters == kept
    with Image.open(tmp_path / "picture-1.png") as saved:  # a file a user may open: it carries its settings
        assert saved.text["parameters"] == finished.pictures[1][1]


def test_a_failure_keeps_its_status_and_names_its_field_in_each_dialect():
    error = ImagineError(f"{named('num_steps')} must be at most 150, not 900", 400, retry_after=3, field="num_steps")
    decoded = event_from_data(through_json(event_data(Failed(error, cancelled=True))))
    assert isinstance(decoded, Failed) and decoded.cancelled
    assert (decoded.error.status, decoded.error.retry_after, decoded.error.field) == (400, 3, "num_steps")
    assert decoded.error.message == "num_steps must be at most 150, not 900"
    assert decoded.error.text({"num_steps": "steps"}) == "steps must be at most 150, not 900"


def test_progress_previews_and_signals_come_back_as_they_were_sent():
    preview = Preview(3, 8, noise_picture(), index=1)
    decoded = [event_from_data(through_json(event_data(event))) for event in (Loading(), Started(), Progress(3, 8))]
    assert decoded == [Loading(), Started(), Progress(3, 8)]
    back = event_from_data(through_json(event_data(preview)))
    assert (back.step, back.steps, back.index) == (3, 8, 1)
    assert np.array_equal(np.asarray(back.image), np.asarray(preview.image))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"version": 99, "prompt": "x"}, "version 1 expected, not 99"),
        ({"version": 1, "prompt": "x", "colour": "red"}, "no fields ['colour']"),
        ({"version": 1, "prompt": "x", "img": {"file": "../../etc/passwd"}}, "with a folder"),
    ],
    ids=["another-version", "unknown-field", "file-outside-its-folder"],
)
def test_request_data_of_another_shape_is_refused_naming_what(tmp_path, data, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        request_from_data(data, tmp_path)
