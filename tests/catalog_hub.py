"""The pull catalog's repos on the hub stand-in (tests/hub_server.py), for the tests that pull (test_pull.py,
test_web_models.py): a tiny SD1 checkpoint to stand in for a real one, each catalog file's bytes, and the stand-in
serving them under the catalog's real repos and paths, FLUX.1-dev gated as on the hub."""

import contextlib
import os
from pathlib import Path

from conftest import save_tiny_folder
from diffusers import StableDiffusionPipeline
from hub_server import HubServer
from ldm_checkpoint import save_ldm_checkpoint

from engine.files.library import Library

LIBRARY = Library()
GATED = {"black-forest-labs/FLUX.1-dev"}
HF_TOKEN = "hf_test"  # the one token the stand-in lets into a gated repo


def tiny_sd1_checkpoint(folder: Path) -> tuple:
    """(a tiny SD1 checkpoint as a file's bytes, the pipeline it was saved from), built in `folder`."""
    pipe = StableDiffusionPipeline.from_pretrained(save_tiny_folder(folder / "tiny", seed=3))
    save_ldm_checkpoint(pipe, folder / "tiny.safetensors")
    return (folder / "tiny.safetensors").read_bytes(), pipe


def catalog_files(made: dict) -> dict:
    """Each catalog file's bytes, by file id: those `made` gives (tiny models where a test draws with them), else a
    few bytes of noise."""
    every = {file.id for entry in LIBRARY.entries.values() for v in entry.variants.values() for file in v.files}
    return {key: made.get(key, os.urandom(1000)) for key in every}


def repos_of(files: dict) -> dict:
    repos = {}
    for entry in LIBRARY.entries.values():
        for variant in entry.variants.values():
            for file in variant.files:
                repos.setdefault(file.repo, {})[file.path] = files[file.id]
    return repos


@contextlib.contextmanager
def catalog_hub(files: dict, monkeypatch):
    """The stand-in serving `files` (catalog_files) while the context is open, huggingface_hub pointed at it and
    HF_TOKEN unset."""
    with HubServer(repos_of(files), gated=GATED, token=HF_TOKEN) as server:
        server.point_huggingface_hub(monkeypatch)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server
