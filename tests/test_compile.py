"""Compiled kernels (--compile auto|on|off, issue 36): the setting, where auto compiles, and that a compiled UNet draws
the picture the plain one draws, says that it compiles, and leaves LoRAs their effect.

Compiling the tiny model took 200 s on 2 busy cores, so the tests that compile run only with
IMAGINE_TEST_COMPILE=1; bench/bench.py --compile measures the speed.
"""

import os

import numpy as np
import pytest
import torch
from conftest import FAST, pixels
from lora_files import kohya_lora
from safetensors.torch import save_file

import imagine
from engine import compiling
from engine.compiling import compile_pays
from engine.demo import build_demo_pipeline
from engine.settings import CONFIGS_DIR

compiles = pytest.mark.skipif(
    os.environ.get("IMAGINE_TEST_COMPILE") != "1", reason="compiles the tiny model (minutes): IMAGINE_TEST_COMPILE=1"
)


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], None, "auto"),
        (["--compile"], None, "on"),
        (["--compile", "off"], None, "off"),
        (["--compile", "ON"], None, "on"),
        ([], "1", "on"),  # the old switch's spellings, as service files wrote them
        ([], "true", "on"),
        ([], "0", "off"),
        ([], "off", "off"),
    ],
)
def test_compile_takes_auto_on_off_and_the_old_switch_spellings(monkeypatch, argv, env, expected):
    if env is not None:
        monkeypatch.setenv("IMAGINE_COMPILE", env)
    assert imagine.parse_settings(argv).compile == expected


def test_another_compile_value_stops_the_start_naming_it(capsys):
    with pytest.raises(SystemExit):
        imagine.parse_settings(["--compile", "always"])
    assert "--compile must be auto, on or off, not 'always'" in capsys.readouterr().err


def real_sized_unet() -> torch.nn.Module:
    """A module with as many parameters as a real UNet, on the meta device: no memory, only a count."""
    return torch.nn.Linear(10_000, 20_000, device="meta")


CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("device", "dtype", "feature", "expected"),
    [
        (CPU, torch.bfloat16, "avx512_bf16", True),  # measured 0.91x of eager's step time at 512x512
        (CPU, torch.bfloat16, "amx", True),
        (CPU, torch.float32, "avx512_bf16", False),
        (CPU, torch.float32, None, False),  # float32 without native bfloat16: no gain measured
        (CPU, torch.bfloat16, None, False),  # emulated bfloat16 (an explicit -f 16)
        (CUDA, torch.float16, None, True),  # reported 1.2-2x on GPUs
    ],
)
def test_auto_compiles_where_it_was_measured_to_pay(monkeypatch, device, dtype, feature, expected):
    monkeypatch.setattr(compiling, "cpu_bf16_feature", lambda: feature)
    assert compile_pays("auto", device, dtype, real_sized_unet())[0] is expected


def test_auto_leaves_a_tiny_unet_uncompiled_and_on_and_off_decide_alone(monkeypatch):
    monkeypatch.setattr(compiling, "cpu_bf16_feature", lambda: "avx512_bf16")
    tiny = torch.nn.Linear(4, 4)
    assert compile_pays("auto", CPU, torch.bfloat16, tiny)[0] is False
    assert compile_pays("on", CPU, torch.float32, tiny)[0] is True
    assert compile_pays("off", CUDA, torch.float16, real_sized_unet())[0] is False


# ---- the compiled UNet at work (IMAGINE_TEST_COMPILE=1)


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    """A models folder with one LoRA for the demo model."""
    root = tmp_path_factory.mktemp("compile-loras")
    (root / "loras").mkdir()
    save_file(kohya_lora(build_demo_pipeline(CONFIGS_DIR / "sd1"), seed=0), root / "loras" / "detail.safetensors")
    return root


@pytest.fixture(scope="module")
def engines(lora_folder, tmp_path_factory):
    """Two engines on the demo model, one compiling its UNet into a cache folder of its own, one not."""
    from engine.engine import Engine

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("compiled")))
        made = {
            setting: Engine(imagine.Settings(model="demo", models_dir=lora_folder, compile=setting))
            for setting in ("on", "off")
        }
        for engine in made.values():
            engine.start()
        yield made
        for engine in made.values():
            engine.stop()


def answer(engine, **fields) -> dict:
    client = imagine.create_app(engine).test_client()
    response = client.post("/generate", json={"prompt": "a lighthouse", **FAST, **fields})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def mean_levels_apart(one: dict, other: dict) -> float:
    return float(np.abs(pixels(one["img"]) - pixels(other["img"])).mean())


def says_it_compiles(answer: dict) -> bool:
    return any("compiles the UNet" in notice for notice in answer.get("notices", []))


@compiles
def test_the_compiled_unet_draws_the_plain_unets_picture_and_its_first_answer_says_it_compiles(engines):
    first = answer(engines["on"])
    assert says_it_compiles(first)
    assert mean_levels_apart(first, answer(engines["off"])) <= 1
    assert not says_it_compiles(answer(engines["on"], seed=7))


@compiles
def test_a_second_width_compiles_once_more_and_later_widths_not_at_all(engines):
    answer(engines["on"])
    assert says_it_compiles(answer(engines["on"], width=96))  # kernels for any width, from now on
    again = answer(engines["on"], width=128)
    assert not says_it_compiles(again)
    assert mean_levels_apart(again, answer(engines["off"], width=128)) <= 1


@compiles
def test_a_lora_on_a_compiled_model_draws_the_loras_picture(engines):
    answer(engines["on"])  # compiled, frozen weights and all, before the LoRA comes
    with_lora = {"prompt": "a lighthouse <lora:detail:0.8>"}
    compiled, plain = answer(engines["on"], **with_lora), answer(engines["off"], **with_lora)
    assert not says_it_compiles(compiled)  # a LoRA, and each LoRA weight, would otherwise compile again
    assert mean_levels_apart(compiled, plain) <= 1
    assert mean_levels_apart(compiled, answer(engines["off"])) > 0.5  # the LoRA shows
    assert mean_levels_apart(answer(engines["on"]), answer(engines["off"])) <= 1  # and goes again without it
