"""A .ckpt is a pickle: it must never run code, and where torch cannot promise that, it is refused."""

import os

import pytest
import torch
from conftest import FAST

import imagine


def write_evil_ckpt(path, marker):
    """A checkpoint whose pickle creates `marker` if it is ever unpickled unsafely."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, path)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"env": "1"}, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"),
        ({"env": "true"}, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"),
        ({"torch": "2.5.1+cu121"}, "torch 2.6 or newer"),
    ],
)
def test_a_ckpt_is_refused_where_torch_could_run_its_pickle_and_the_server_keeps_serving(
    make_engine, tmp_path, monkeypatch, setting, message
):
    marker = tmp_path / "pwned"
    write_evil_ckpt(tmp_path / "evil.ckpt", marker)
    if "env" in setting:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", setting["env"])
    else:
        monkeypatch.setattr(torch, "__version__", setting["torch"])
    client = imagine.create_app(make_engine(model="demo")).test_client()
    response = client.post("/generate", json={"prompt": "x", "model": "evil"})
    assert response.status_code == 400
    assert message in response.get_json()["error"]
    assert not marker.exists()
    assert client.post("/generate", json={"prompt": "x", **FAST}).status_code == 200


def test_with_the_guard_left_alone_an_evil_ckpt_is_still_read_without_running_it(make_engine, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0")
    marker = tmp_path / "pwned"
    write_evil_ckpt(tmp_path / "evil.ckpt", marker)
    client = imagine.create_app(make_engine(model="demo")).test_client()
    response = client.post("/generate", json={"prompt": "x", "model": "evil"})
    assert response.status_code == 422 and "cannot be read as a checkpoint" in response.get_json()["error"]
    assert not marker.exists()
