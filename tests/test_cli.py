"""imagine-cli.py as a user runs it: against a live server on a free port, and with --local."""

import json
import os
import pty
import re
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from conftest import CLI, FAST, TINY, decode_png, free_port, png_data, run_cli, serving
from PIL import Image

from engine.samplers import SAMPLER_NAMES, sampler_label


def saved_image(result, cwd: Path) -> Image.Image:
    """The picture whose path the CLI printed; stdout holds that path and nothing else."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    image = Image.open(cwd / lines[0])
    image.load()
    return image


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_cli_saves_the_servers_picture_named_from_the_prompt(live_server, client, tmp_path):
    result = run_cli("a", "red", "fox", *TINY, "-s", "EULER A", cwd=tmp_path, server=live_server)
    image = saved_image(result, tmp_path)
    assert result.stdout.startswith("a-red-fox-") and result.stdout.strip().endswith(".png")
    assert result.stderr == "seed 42\n"  # stderr is not a terminal: no progress bar; the seed, to repeat it
    answer = client.post("/generate", json={"prompt": "a red fox", "sampler": "euler a", **FAST}).get_json()
    assert (as_array(image) == as_array(decode_png(answer["img"]))).all()


def test_cli_png_carries_its_settings_in_the_parameters_chunk(live_server, tmp_path):
    result = run_cli(
        "an astronaut", *TINY, "-g", "7.5", "-s", "DPM++ 2M", "--neg", "ugly, blurry", cwd=tmp_path, server=live_server
    )
    assert saved_image(result, tmp_path).info["parameters"] == (
        "an astronaut\n"
        "Negative prompt: ugly, blurry\n"
        "Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: demo, "
        "RNG: CPU"
    )


def test_cli_variation_seed_and_tiling_flags_draw_what_the_api_draws_and_are_recorded(live_server, client, tmp_path):
    flags = ("--variation_seed", "7", "--variation_strength", "0.5", "--tiling")
    image = saved_image(run_cli("a wall", *TINY, *flags, cwd=tmp_path, server=live_server), tmp_path)
    body = {"prompt": "a wall", **FAST, "variation_seed": 7, "variation_strength": 0.5, "tiling": True}
    answer = client.post("/generate", json=body).get_json()
    assert (as_array(image) == as_array(decode_png(answer["img"]))).all()
    assert "Variation seed: 7, Variation seed strength: 0.5" in image.info["parameters"]
    assert image.info["parameters"].endswith("Tiling: True")


def test_local_mode_draws_the_same_picture_as_the_server_without_one(live_server, tmp_path):
    remote = saved_image(run_cli("a lighthouse", *TINY, cwd=tmp_path, server=live_server), tmp_path)
    nowhere = f"http://127.0.0.1:{free_port()}"
    local = saved_image(run_cli("a lighthouse", *TINY, "--local", "-d", "cpu", cwd=tmp_path, server=nowhere), tmp_path)
    assert (as_array(local) == as_array(remote)).all()
    assert local.info["parameters"] == remote.info["parameters"]


def test_output_goes_where_o_says(live_server, tmp_path):
    result = run_cli("a boat", *TINY, "-o", "out/boat.png", cwd=tmp_path, server=live_server, check=False)
    assert result.returncode == 1 and "out/boat.png" in result.stderr  # no such folder: one clear line
    (tmp_path / "out").mkdir()
    result = run_cli("a boat", *TINY, "-o", "out/boat.png", cwd=tmp_path, server=live_server)
    assert result.stdout == "out/boat.png\n"
    assert Image.open(tmp_path / "out" / "boat.png").size == (64, 64)


def test_file_names_are_safe_slugs_and_never_overwrite(cli, tmp_path):
    first = cli.reserve_output("A cat / on ../the roof: 100% *cute*!", tmp_path)
    second = cli.reserve_output("A cat / on ../the roof: 100% *cute*!", tmp_path)
    assert first.name.startswith("a-cat-on-the-roof-100-cute-") and first.suffix == ".png"
    assert first != second and first.exists() and second.exists()
    assert second.parent == first.parent == tmp_path
    assert len(cli.reserve_output("word " * 100, tmp_path).name) < 80
    cut = cli.reserve_output("a photo of an astronaut riding a horse on mars, epic, cinematic", tmp_path)
    assert cut.name.startswith("a-photo-of-an-astronaut-riding-a-horse-on-mars-2")  # whole words, then the time
    assert cli.reserve_output("🙂", tmp_path).name.startswith("image-")


@pytest.mark.parametrize("where", ["server", "local"])
def test_stream_rewrites_the_output_with_each_preview_then_the_final_picture(
    where, cli, live_server, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMAGINE_SERVER", live_server)
    written = []
    replace = os.replace

    def watch(source, target):
        image = Image.open(source)
        image.load()  # each rename brings a whole picture
        written.append((Path(target).name, image))
        replace(source, target)

    monkeypatch.setattr(os, "replace", watch)
    extra = ["--local", "-d", "cpu"] if where == "local" else []
    args = ["a", "tree", "-w", "64", "-h", "64", "-n", "6", "--seed", "3", "--stream", "2", "-o", "tree.png", *extra]
    assert cli.main(args) == 0
    assert [name for name, _ in written] == ["tree.png"] * 3  # previews at steps 2 and 4, then the final
    previews, final = [image for _, image in written[:2]], written[2][1]
    assert "parameters" not in previews[0].info and final.info["parameters"].startswith("a tree\n")
    assert not (as_array(previews[0]) == as_array(final)).all()
    assert (as_array(Image.open(tmp_path / "tree.png")) == as_array(final)).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree.png"]  # no temporary files left
    assert capsys.readouterr().out == "tree.png\n"


def test_img2img_from_a_file_keeps_its_size_and_records_the_strength(live_server, tmp_path):
    Image.new("RGB", (96, 64), (200, 30, 30)).save(tmp_path / "red.png")
    result = run_cli("a red wall", "--img", "red.png", "--strength", "0.5", "-n", "4", cwd=tmp_path, server=live_server)
    image = saved_image(result, tmp_path)
    assert image.size == (96, 64)
    assert image.info["parameters"].endswith("Size: 96x64, Model: demo, Denoising strength: 0.5, RNG: CPU")


def test_hires_draws_again_at_the_scale_and_records_the_hires_settings(live_server, tmp_path):
    result = run_cli("a red wall", *TINY, "--hires", "1.5", cwd=tmp_path, server=live_server)
    image = saved_image(result, tmp_path)
    assert image.size == (96, 96)
    assert (
        "Size: 64x64, Model: demo, Denoising strength: 0.7, Hires upscale: 1.5, Hires upscaler: Latent"
        in (image.info["parameters"])
    )


def test_a_missing_input_image_is_one_line_and_exit_1(live_server, tmp_path):
    result = run_cli("a wall", "--img", "nothing.png", cwd=tmp_path, server=live_server, check=False)
    assert result.returncode == 1
    assert result.stderr == "imagine: cannot read the input image nothing.png: No such file or directory\n"
    assert list(tmp_path.iterdir()) == []  # no empty output left behind


def test_a_server_error_is_one_line_and_exit_1(live_server, tmp_path):
    result = run_cli("a wall", "-w", "100", cwd=tmp_path, server=live_server, check=False)
    assert result.returncode == 1
    assert result.stderr == "imagine: the server answered 400: width must be a multiple of 8, not 100\n"
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_a_named_server_that_is_not_there_is_an_error_not_a_fallback(tmp_path):
    server = f"http://127.0.0.1:{free_port()}"
    result = run_cli("a wall", *TINY, "--server", server, cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr == f"imagine: cannot connect to the server at {server}; is it running?\n"
    assert list(tmp_path.iterdir()) == []


def test_without_a_server_named_or_running_it_generates_locally(cli, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IMAGINE_SERVER", raising=False)
    monkeypatch.setattr(cli, "DEFAULT_SERVER", f"http://127.0.0.1:{free_port()}")
    assert cli.main(["a", "quiet", "lake", *TINY, "-d", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert err == f"imagine: no server at {cli.DEFAULT_SERVER}; generating in this process\nseed 42\n"
    assert Image.open(tmp_path / out.strip()).info["parameters"].startswith("a quiet lake\n")


def run_with_terminal_stderr(*args, cwd, server) -> tuple[str, str]:
    """Runs the CLI with stderr on a pseudo-terminal, as in an interactive shell; returns stdout, stderr."""
    leader, follower = pty.openpty()
    termios.tcsetwinsize(follower, (24, 100))  # a new pseudo-terminal is 0 columns wide
    env = {**os.environ, "IMAGINE_SERVER": server}
    process = subprocess.Popen(
        [sys.executable, str(CLI), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=follower, text=True
    )
    os.close(follower)
    stderr = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        stderr += chunk
    stdout = process.stdout.read()
    assert process.wait(timeout=60) == 0
    os.close(leader)
    return stdout, stderr.decode(errors="replace")


def test_progress_bar_with_step_and_total_appears_on_a_terminal_only(live_server, tmp_path):
    args = ["a", "mountain", "-w", "64", "-h", "64", "-n", "6", "--seed", "1"]
    stdout, stderr = run_with_terminal_stderr(*args, cwd=tmp_path, server=live_server)
    assert re.search(r"\| [1-6]/6 \[", stderr) and "step/s" in stderr  # e.g. " 50%|█████     | 3/6 [00:01<00:01, ..."
    assert stdout.strip().endswith(".png") and "/6" not in stdout
    piped = run_cli(*args, cwd=tmp_path, server=live_server)
    assert piped.stderr == "seed 1\n"


def test_help_is_double_dash_help_because_h_is_the_height(live_server, tmp_path):
    helped = run_cli("--help", cwd=tmp_path)
    assert helped.returncode == 0
    assert "[-h HEIGHT]" in helped.stdout and "[--help]" in helped.stdout and "prompt [prompt ...]" in helped.stdout
    result = run_cli("tall", "-h", "128", "-w", "64", "-n", "2", cwd=tmp_path, server=live_server)
    assert saved_image(result, tmp_path).size == (64, 128)


def test_the_servers_png_carries_its_parameters_for_txt2img_img2img_and_streams(client):
    answer = client.post("/generate", json={"prompt": "p", "sampler": "dpm2 a", **FAST}).get_json()
    expected = (
        "p\nSteps: 4, Sampler: DPM2 a, Schedule type: Karras, CFG scale: 7.0, Seed: 42, Size: 64x64, Model: demo, "
        "RNG: CPU"
    )
    assert decode_png(answer["img"]).info["parameters"] == expected
    streamed = client.post("/generate", json={"prompt": "p", "sampler": "dpm2 a", "stream": 1, **FAST}).get_data()
    last = json.loads(streamed.splitlines()[-1])
    assert decode_png(last["img"]).info["parameters"] == expected
    source = png_data(Image.new("RGB", (64, 64), "white"))
    answer = client.post("/generate", json={"prompt": "p", "img": source, "strength": 0.75, **FAST}).get_json()
    assert decode_png(answer["img"]).info["parameters"].endswith(", Denoising strength: 0.75, RNG: CPU")


def test_sampler_names_are_written_as_automatic1111_spells_them():
    spec = ["DDIM", "Euler", "Euler a", "Heun", "LMS", "DPM++ 2M", "DPM++ 2S a", "DPM++ SDE", "DPM2", "DPM2 a"]
    a1111 = [*spec, "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "LCM"]
    assert all(name.lower() in SAMPLER_NAMES for name in a1111)
    assert [sampler_label(name.lower()) for name in a1111] == a1111


def test_the_cli_sends_the_api_key_from_imagine_api_key(make_engine, tmp_path):
    engine = make_engine(api_key="s3cret")
    with serving(engine) as url:
        refused = run_cli("a key", *TINY, cwd=tmp_path, server=url)
        assert refused.returncode == 1 and refused.stderr.startswith("imagine: the server answered 401: ")
        accepted = run_cli("a key", *TINY, cwd=tmp_path, server=url, env_extra={"IMAGINE_API_KEY": "s3cret"})
        assert saved_image(accepted, tmp_path).size == (64, 64)
