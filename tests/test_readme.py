"""The README's curl examples, run exactly as written against a server started with the demo model."""

import os
import re
import subprocess
import sys
from pathlib import Path

import requests
from conftest import free_port
from PIL import Image

from engine.models import build_demo_pipeline
from engine.settings import CONFIGS_DIR

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)
# The examples of batches, inpainting, /models and /health, each run by its own test below.
NEW_EXAMPLES = {
    "batch": next(block for block in BLOCKS if '"n": 4' in block),
    "inpaint": next(block for block in BLOCKS if "mask.png" in block),
    "models": next(block for block in BLOCKS if "localhost:5000/models" in block),
    "health": next(block for block in BLOCKS if "localhost:5000/health" in block),
}
EXAMPLES = [b for b in BLOCKS if "localhost:5000/generate" in b and b not in NEW_EXAMPLES.values()]


def port_5000_is_free():
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", 5000)) != 0


def test_the_readme_has_the_three_curl_examples():
    assert len(EXAMPLES) == 3


def test_the_readme_curl_examples_work_as_written(start_server, tmp_path):
    port = 5000 if port_5000_is_free() else free_port()
    start_server(port)
    outputs = []
    for example in EXAMPLES:
        script = example.replace("localhost:5000", f"localhost:{port}")
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{script}\n{result.stderr}"
        outputs.append(result.stdout)
    assert Image.open(tmp_path / "astronaut.png").size == (768, 512)
    assert Image.open(tmp_path / "city.png").size == (512, 512)
    progress = [line for line in outputs[2].splitlines() if line]
    assert progress[0] == '{"step":5,"steps":25,"done":false}'
    assert progress[-1] == '{"step":null,"steps":25,"done":true}'
    assert len(progress) == 5


CLI_EXAMPLES = [block for block in re.findall(r"```bash\n(.*?)```", README, re.S) if "./imagine-cli.py" in block]


def test_the_readme_cli_example_works_as_written(live_server, tmp_path):
    """Run in a folder holding imagine-cli.py, as the README's `./imagine-cli.py` assumes."""
    (tmp_path / "imagine-cli.py").symlink_to(Path(__file__).resolve().parent.parent / "imagine-cli.py")
    env = {**os.environ, "IMAGINE_SERVER": live_server, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    [example] = CLI_EXAMPLES
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    saved = Image.open(tmp_path / result.stdout.strip())
    assert saved.size == (768, 512)
    settings = saved.info["parameters"].splitlines()[-1]
    assert settings.startswith("Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: ")


def test_the_readme_keyed_curl_example_works_against_a_server_with_that_key(start_server, tmp_path, monkeypatch):
    [example] = [b for b in re.findall(r"```sh\n(.*?)```", README, re.S) if "Authorization: Bearer" in b]
    monkeypatch.setenv("IMAGINE_API_KEY", "a-key-for-the-test")  # the server and curl both read it
    port = free_port()
    url, _ = start_server(port)
    script = example.replace("localhost:5000", f"localhost:{port}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "cat.png").size == (512, 512)
    wrong_key = {"Authorization": "Bearer a-wrong-key"}
    assert requests.post(f"{url}/generate", json={"prompt": "a cat"}, headers=wrong_key).status_code == 401


def test_the_readme_examples_of_batches_inpainting_models_and_health_work_as_written(start_server, tmp_path):
    port = free_port()
    start_server(port)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # python3 with Pillow
    outputs = {}
    for name, example in NEW_EXAMPLES.items():
        script = example.replace("localhost:5000", f"localhost:{port}")
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{script}\n{result.stderr}"
        outputs[name] = result.stdout
    assert outputs["batch"] == "[100,101,102,103]\n"
    boat, harbour = Image.open(tmp_path / "boat.png"), Image.open(tmp_path / "harbour.png")
    assert boat.size == harbour.size == (512, 512)
    assert boat.info["parameters"].endswith(
        "Denoising strength: 0.75, Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32, RNG: CPU"
    )
    assert boat.getpixel((0, 0)) == harbour.getpixel((0, 0)) and boat.tobytes() != harbour.tobytes()
    assert outputs["models"] == '"demo"\n[]\n'
    assert outputs["health"].startswith('{"device":"cpu","loaded":["demo"],"queue":0,"running":false,"status":"ok"}')


PROMPT_SECTIONS = README[README.index("## Prompt syntax") : README.index("## Use it from other programs")]
PROMPT_EXAMPLES = [
    block for block in re.findall(r"```sh\n(.*?)```", PROMPT_SECTIONS, re.S) if "localhost:5000" in block
]


def test_the_readme_prompt_lora_embedding_and_lcm_examples_work_as_written(start_server, tmp_path):
    """Run against a models folder holding the LoRAs and the embedding the examples name, made for the demo model."""
    import json

    import torch
    from lora_files import kohya_lora, token_vectors
    from safetensors.torch import save_file

    demo = build_demo_pipeline(CONFIGS_DIR / "sd1")
    (tmp_path / "loras").mkdir()
    (tmp_path / "embeddings").mkdir()
    for seed, name in enumerate(("add_detail", "watercolor", "lcm_lora_sd15")):
        save_file(kohya_lora(demo, seed=seed), tmp_path / "loras" / f"{name}.safetensors")
    vectors = token_vectors(demo.text_encoder, demo.tokenizer, "ugly deformed")
    save_file({"emb_params": vectors.to(torch.float32)}, tmp_path / "embeddings" / "easynegative.safetensors")
    port = free_port()
    start_server(port)
    assert len(PROMPT_EXAMPLES) == 5  # with GET /samplers
    outputs = []
    for example in PROMPT_EXAMPLES:
        script = example.replace("localhost:5000", f"localhost:{port}")
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"{script}\n{result.stderr}"
        outputs.append(result.stdout)
    lighthouse = Image.open(tmp_path / "lighthouse.png")
    assert lighthouse.size == (512, 512)
    assert "Clip skip: 2" in lighthouse.info["parameters"]
    assert (
        Image.open(tmp_path / "lighthouse-lora.png")
        .info["parameters"]
        .startswith("a lighthouse on a cliff, <lora:add_detail:0.6>\nNegative prompt: easynegative, blurry\n")
    )
    assert "Sampler: LCM" in Image.open(tmp_path / "cat-lcm.png").info["parameters"]
    loras, embeddings = (json.loads(line) for line in outputs[2].splitlines())
    assert {each["name"] for each in loras["loras"]} == {"add_detail", "watercolor", "lcm_lora_sd15"}
    assert embeddings["embeddings"][0]["name"] == "easynegative"


def test_the_readme_openai_sdk_example_works_as_written(start_server, tmp_path):
    [example] = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if 'OpenAI(base_url="' in b]
    port = 5000 if port_5000_is_free() else free_port()
    start_server(port)
    script = example.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for name in ("lighthouse.png", "partial-0.png", "partial-1.png", "streamed.png", "edited.png"):
        assert Image.open(tmp_path / name).size == (512, 512), name
    assert "Steps: 12," in Image.open(tmp_path / "lighthouse.png").info["parameters"]


def test_the_readme_python_example_for_automatic1111s_api_runs_as_written(live_server, tmp_path):
    [example] = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "/sdapi/v1/txt2img" in b]
    script = example.replace("http://127.0.0.1:5000", live_server)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("seeds [")
    assert [Image.open(tmp_path / f"lighthouse-{n}.png").size for n in (0, 1)] == [(512, 512)] * 2
