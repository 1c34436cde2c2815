"""k-diffusion's sampling and discrete-denoiser code, loaded on its own as the reference for AUTOMATIC1111's sampling.

k-diffusion's package __init__ imports its training code (torchvision, clean-fid, wandb ...), so install it with
`pip install --no-deps k-diffusion` and load only sampling.py and external.py here, with the one helper they take
from its utils module; torchdiffeq (used only by its log-likelihood function) is stubbed.
"""

import importlib.util
import sys
import types

import pytest

PACKAGE = "_k_diffusion_reference"  # a private name: the real package's __init__ never runs


def append_dims(x, target_dims):
    """k-diffusion's utils.append_dims: x with trailing singleton dimensions up to target_dims."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def _load(name: str, folder: str):
    spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{name}", f"{folder}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load() -> tuple:
    """(sampling, external): k-diffusion's modules, or the test is skipped saying how to install it."""
    if PACKAGE in sys.modules:
        return sys.modules[f"{PACKAGE}.sampling"], sys.modules[f"{PACKAGE}.external"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed: pip install --no-deps k-diffusion")
    folder = spec.submodule_search_locations[0]
    package = types.ModuleType(PACKAGE)
    package.__path__ = [folder]
    sys.modules[PACKAGE] = package
    utils = types.ModuleType(f"{PACKAGE}.utils")
    utils.append_dims = append_dims
    sys.modules[utils.__name__] = package.utils = utils
    if importlib.util.find_spec("torchdiffeq") is None:
        sys.modules["torchdiffeq"] = types.SimpleNamespace(odeint=None)
    sampling = _load("sampling", folder)
    return sampling, _load("external", folder)
