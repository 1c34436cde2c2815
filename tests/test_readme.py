"""The examples of README.md and docs/*.md, run exactly as written against a server started with the demo model."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import requests
from conftest import free_port
from PIL import Image

from engine.demo import build_demo_pipeline
from engine.settings import CONFIGS_DIR

ROOT = Path(__file__).resolve().parent.parent
PAGES = {
    path.relative_to(ROOT).as_posix(): path.read_text()
    for path in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))]
}
README = PAGES["README.md"]


def fenced(language: str) -> list:
    """Every block of code fenced as `language` in README.md and docs/*.md, each once, in page order."""
    found = [block for text in PAGES.values() for block in re.findall(rf"```{language}\n(.*?)```", text, re.S)]
    return list(dict.fromkeys(found))


SHELL = fenced("bash") + fenced("sh")
PYTHON = fenced("python")


def example(*marks: str) -> str:
    """The one shell example holding every one of `marks` (the same example on two pages counts once)."""
    [block] = [block for block in SHELL if all(mark in block for mark in marks)]
    return block


# Examples that talk to a running server; each is run by a test below, and those no test names by the last one.
# docs/jobs.md's examples follow one job from block to block: tests/test_jobs.py runs them in one shell.
JOB_EXAMPLES = re.findall(r"```bash\n(.*?)```", PAGES["docs/jobs.md"], re.S)
TALKS_TO_THE_SERVER = [
    block
    for block in SHELL
    if ("localhost:5000" in block or "./imagine-cli.py " in block) and block not in JOB_EXAMPLES
]
# What the other shell examples do instead: set up, start a server, or configure another program.
SETUP_MARKS = (
    "pip install",
    "python imagine.py",
    ". .venv/bin/activate",
    "sudo ",
    "systemctl",
    "bench/bench.py",
    "bench/flow_step.py",
    "bench/gguf_memory.py",
)

EXAMPLES = [example("> astronaut.png"), example("> city.png"), example('"stream": 5')]
NEW_EXAMPLES = {
    "batch": example('"n": 4'),
    "inpaint": example("mask.png"),
    "models": example("localhost:5000/models"),
    "health": example("localhost:5000/health"),
}
ERROR_EXAMPLE = example('"width": 100')
KEYED_EXAMPLE = example("Authorization: Bearer")
CLI_EXAMPLE = example("./imagine-cli.py 'a photo of an astronaut")
# Run by tests/test_pull.py, against a stand-in of the hub.
PULL_EXAMPLES = [example("--pull dreamshaper-8"), example("--pull z-image-turbo")]
PROMPT_EXAMPLES = [
    example("> lighthouse.png"),
    example("> lighthouse-lora.png"),
    example("localhost:5000/loras"),
    example("localhost:5000/samplers"),
    example("> cat-lcm.png"),
]
NAMED = [*EXAMPLES, *NEW_EXAMPLES.values(), ERROR_EXAMPLE, KEYED_EXAMPLE, CLI_EXAMPLE, *PULL_EXAMPLES, *PROMPT_EXAMPLES]
OTHER_EXAMPLES = [block for block in TALKS_TO_THE_SERVER if block not in NAMED]


def port_5000_is_free():
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", 5000)) != 0


def run_example(script: str, port: int, cwd: Path, **options) -> subprocess.CompletedProcess:
    """Runs a shell example as written, against the server on `port`, failing on any failing command."""
    script = script.replace("localhost:5000", f"localhost:{port}")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # python3 with Pillow
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, **options
    )


def is_setup_step(block: str) -> bool:
    settings_only = all(re.fullmatch(r"[A-Z_0-9]+=\S.*|#.*", line) for line in block.strip().splitlines())
    return settings_only or any(mark in block for mark in SETUP_MARKS)


def test_every_shell_example_is_run_by_a_test_or_is_a_setup_step():
    run_elsewhere = TALKS_TO_THE_SERVER + JOB_EXAMPLES  # tests/test_jobs.py runs docs/jobs.md's in one shell
    assert [block for block in SHELL if block not in run_elsewhere and not is_setup_step(block)] == []
    assert len(set(NAMED)) == len(NAMED)  # no example is claimed twice


def test_every_python_example_is_run_by_a_test():
    """One for OpenAI's SDK and one for AUTOMATIC1111's API, each run by its own test below."""
    kinds = [
        ('OpenAI(base_url="' in block, "/sdapi/v1/txt2img" in block) for block in PYTHON if block not in JOB_EXAMPLES
    ]
    assert sorted(kinds) == [(False, True), (True, False)]


def test_every_picture_an_example_decodes_fails_when_the_answer_holds_none():
    """`jq -r .img` prints "null" for an error, which base64 turns into a 3-byte file; `jq -e` fails instead."""
    for block in SHELL:
        for line in block.splitlines():
            if "base64 -d" in line and "jq" in line:
                assert "jq -er .img | base64 -d" in line, line


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_pages_leads_to_a_page_and_heading_that_exist():
    anchors = {page: {slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)} for page, text in PAGES.items()}
    for page, text in PAGES.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (Path(page).parent / path).as_posix() if path else page
            linked = os.path.normpath(linked)
            assert (ROOT / linked).exists(), f"{page}: {target}"
            if anchor:
                assert anchor in anchors.get(linked, set()), f"{page}: {target}"


def test_the_readme_stays_a_short_front_door():
    assert len(README.splitlines()) <= 200


def test_the_readme_curl_examples_work_as_written(start_server, tmp_path):
    port = 5000 if port_5000_is_free() else free_port()
    start_server(port)
    outputs = []
    for script in EXAMPLES:
        result = run_example(script, port, tmp_path, timeout=300)
        assert result.returncode == 0, f"{script}\n{result.stderr}"
        outputs.append(result.stdout)
    assert Image.open(tmp_path / "astronaut.png").size == (768, 512)
    assert Image.open(tmp_path / "city.png").size == (512, 512)
    progress = [line for line in outputs[2].splitlines() if line]
    assert progress[0] == '{"step":5,"steps":25,"done":false}'
    assert progress[-1] == '{"step":null,"steps":25,"done":true}'
    assert len(progress) == 5


def test_an_example_whose_answer_is_an_error_fails_and_the_error_example_shows_the_servers_message(
    start_server, tmp_path
):
    port = free_port()
    start_server(port)
    mistyped = EXAMPLES[0].replace('"width": 768', '"width": 100')
    assert mistyped != EXAMPLES[0]
    assert run_example(mistyped, port, tmp_path, timeout=300).returncode != 0
    shown = run_example(ERROR_EXAMPLE, port, tmp_path, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"error": "width must be a multiple of 8, not 100"}


def test_the_readme_cli_example_works_as_written(live_server, tmp_path):
    """Run in a folder holding imagine-cli.py, as the README's `./imagine-cli.py` assumes."""
    (tmp_path / "imagine-cli.py").symlink_to(ROOT / "imagine-cli.py")
    env = {**os.environ, "IMAGINE_SERVER": live_server, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", CLI_EXAMPLE],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    saved = Image.open(tmp_path / result.stdout.strip())
    assert saved.size == (768, 512)
    settings = saved.info["parameters"].splitlines()[-1]
    assert settings.startswith("Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: ")


def test_the_readme_keyed_curl_example_works_against_a_server_with_that_key(start_server, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGINE_API_KEY", "a-key-for-the-test")  # the server and curl both read it
    port = free_port()
    url, _ = start_server(port)
    result = run_example(KEYED_EXAMPLE, port, tmp_path)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "cat.png").size == (512, 512)
    wrong_key = {"Authorization": "Bearer a-wrong-key"}
    assert requests.post(f"{url}/generate", json={"prompt": "a cat"}, headers=wrong_key).status_code == 401


def test_the_readme_examples_of_batches_inpainting_models_and_health_work_as_written(start_server, tmp_path):
    port = free_port()
    start_server(port)
    outputs = {}
    for name, script in NEW_EXAMPLES.items():
        result = run_example(script, port, tmp_path, timeout=600)
        assert result.returncode == 0, f"{script}\n{result.stderr}"
        outputs[name] = result.stdout
    assert outputs["batch"] == "[100,101,102,103]\n"
    boat, harbour = Image.open(tmp_path / "boat.png"), Image.open(tmp_path / "harbour.png")
    assert boat.size == harbour.size == (512, 512)
    assert boat.info["parameters"].endswith(
        "Denoising strength: 0.75, Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32, RNG: CPU"
    )
    assert boat.getpixel((0, 0)) == harbour.getpixel((0, 0)) and boat.tobytes() != harbour.tobytes()
    demo = '{"builtin":true,"family":"sd1","loaded":true,"modified":null,"name":"demo","size":0}'
    assert outputs["models"] == f'"demo"\n[{demo}]\n'
    assert outputs["health"].startswith('{"device":"cpu","loaded":["demo"],"queue":0,"running":false,"status":"ok"}')


def test_the_readme_prompt_lora_embedding_and_lcm_examples_work_as_written(start_server, tmp_path):
    """Run against a models folder holding the LoRAs and the embedding the examples name, made for the demo model."""
    import torch
    from lora_files import kohya_lora, token_vectors
    from safetensors.torch import save_file

    demo = build_demo_pipeline(CONFIGS_DIR / "sd1")
    (tmp_path / "loras").mkdir()
    (tmp_path / "embeddings").mkdir()
    for seed, name in enumerate(("add_detail", "lcm_lora_sd15")):
        save_file(kohya_lora(demo, seed=seed), tmp_path / "loras" / f"{name}.safetensors")
    vectors = token_vectors(demo.text_encoder, demo.tokenizer, "ugly deformed")
    save_file({"emb_params": vectors.to(torch.float32)}, tmp_path / "embeddings" / "easynegative.safetensors")
    port = free_port()
    start_server(port)
    outputs = []
    for script in PROMPT_EXAMPLES:
        result = run_example(script, port, tmp_path, timeout=600)
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
    assert {each["name"] for each in loras["loras"]} == {"add_detail", "lcm_lora_sd15"}
    assert embeddings["embeddings"][0]["name"] == "easynegative"


def test_every_other_example_runs_as_written(start_server, tmp_path):
    """An example that talks to the server and that no test above names (one added later) still runs here."""
    if OTHER_EXAMPLES:
        port = free_port()
        start_server(port)
    for script in OTHER_EXAMPLES:
        result = run_example(script, port, tmp_path, timeout=600)
        assert result.returncode == 0, f"{script}\n{result.stderr}"


def test_the_readme_openai_sdk_example_works_as_written_without_replacing_other_examples_pictures(
    start_server, tmp_path
):
    [script] = [block for block in PYTHON if 'OpenAI(base_url="' in block]
    port = 5000 if port_5000_is_free() else free_port()
    start_server(port)
    script = script.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    written = {path.name for path in tmp_path.glob("*.png")}
    assert written == {
        f"openai-{name}.png" for name in ("lighthouse", "partial-0", "partial-1", "streamed", "edited", "mask")
    }
    for name in written:
        assert Image.open(tmp_path / name).size == (512, 512), name
    assert "Steps: 12," in Image.open(tmp_path / "openai-lighthouse.png").info["parameters"]
    other_pictures = {name for block in SHELL for name in re.findall(r"> ([\w.-]+\.png)", block)}
    assert not written & (other_pictures | {"mask.png"})


def test_the_readme_python_example_for_automatic1111s_api_runs_as_written(live_server, tmp_path):
    [script] = [block for block in PYTHON if "/sdapi/v1/txt2img" in block]
    script = script.replace("http://127.0.0.1:5000", live_server)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("seeds [")
    assert [Image.open(tmp_path / f"lighthouse-{n}.png").size for n in (0, 1)] == [(512, 512)] * 2
