"""Speed mechanisms (issue 5): previews without the VAE, schedulers built once, 16-bit on every device.

Nothing here is timed (timings on a shared machine are noise); bench/bench.py measures the speed.
"""

import json

import numpy as np
import pytest
import torch
from conftest import FAST, decode_png, pixels, png_data
from PIL import Image

import imagine
from engine.demo import build_demo_pipeline
from engine.devices import cpu_bf16_feature, pick_dtype
from engine.ksampling import KDiffusionScheduler
from engine.models import Models
from engine.pipeline import generate
from engine.previews import latents_to_preview
from engine.request import GenerationRequest, for_family
from engine.samplers import SAMPLER_NAMES
from engine.settings import CONFIGS_DIR, MAX_SIZE


def stream_lines(client, **fields):
    response = client.post("/generate", json={"prompt": "a lighthouse", **FAST, **fields})
    assert response.status_code == 200, response.get_data(as_text=True)
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


@pytest.fixture
def vae_decodes(engine, monkeypatch):
    """Counts the demo model's VAE decodes from here on."""
    vae = engine.models.get("demo").txt2img.vae
    calls = []
    decode = vae.decode

    def counting_decode(*args, **kwargs):
        calls.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", counting_decode)
    return calls


def test_fast_previews_cost_no_vae_decode(client, vae_decodes):
    lines = stream_lines(client, num_steps=6, stream=1)
    assert len(lines) == 6  # five previews, then the picture
    assert len(vae_decodes) == 1  # the final picture's


def test_full_previews_decode_each_preview_with_the_vae(client, vae_decodes):
    lines = stream_lines(client, num_steps=6, stream=2, preview="full")
    assert [line.get("step") for line in lines[:-1]] == [2, 4]
    assert all(decode_png(line["img"]).size == (64, 64) for line in lines)
    assert len(vae_decodes) == 3


def test_full_and_fast_previews_show_different_pictures_of_the_same_run(client):
    fast = stream_lines(client, stream=2)
    full = stream_lines(client, stream=2, preview="full")
    assert not np.array_equal(pixels(fast[0]["img"]), pixels(full[0]["img"]))
    assert np.array_equal(pixels(fast[-1]["img"]), pixels(full[-1]["img"]))  # the final picture is the same


@pytest.mark.parametrize("value", ["FULL", "vae", 1])
def test_preview_must_be_auto_taesd_fast_or_full(client, value):
    response = client.post("/generate", json={"prompt": "x", "preview": value})
    assert response.status_code == 400
    message = response.get_json()["error"]
    assert "preview" in message and str(value) in message
    assert "auto, taesd, fast, full" in message or "must be a string" in message


def preview_correlations(model, sampler, monkeypatch):
    """Per step of a 10-step run: how much the (fast, noisy-latents) previews look like the final latents' one."""

    def run():
        seen = {}
        req = GenerationRequest(prompt="a cat", width=64, height=64, num_steps=10, seed=3, sampler=sampler)
        req = for_family(req, model.family, MAX_SIZE)  # guidance: the family's, as the engine fills it in
        generate(model, req, lambda step, steps, latents: seen.__setitem__(step, latents.clone()))
        return seen

    def picture(latents):
        preview = latents_to_preview(latents, model.family.latent_rgb, (64, 64))
        return np.asarray(preview, dtype=np.float64).ravel()

    predicted = run()
    with monkeypatch.context() as patch:
        # Previews of the noisy latents: the scheduler keeps no prediction.
        forgetful = property(lambda self: None, lambda self, _: None)
        patch.setattr(KDiffusionScheduler, "predicted", forgetful, raising=False)
        noisy = run()
    final = picture(noisy[max(noisy)])  # the last step's latents are what the VAE decodes

    def likeness(latents):
        return np.corrcoef(picture(latents), final)[0, 1]

    return {step: (likeness(predicted[step]), likeness(noisy[step])) for step in sorted(predicted)}


@pytest.mark.parametrize("sampler", ["dpm++ 2m", "ddim"])
def test_fast_previews_look_more_like_the_final_picture_than_the_noisy_latents_do(sampler, monkeypatch):
    model = Models(imagine.Settings(), torch.device("cpu"), torch.float32).get("demo")
    likeness = preview_correlations(model, sampler, monkeypatch)
    for step in (2, 3, 4):
        from_prediction, from_noise = likeness[step]
        assert from_prediction > from_noise, (step, likeness)


# ---- no wasted work


@pytest.mark.parametrize("sampler", list(SAMPLER_NAMES))
def test_a_reused_scheduler_draws_what_a_fresh_one_draws(client, engine, sampler):
    """Reuse leaks no state between runs: after txt2img and img2img with other seeds, the first picture repeats."""
    first = pixels(stream_lines(client, sampler=sampler)[-1]["img"])
    img = png_data(Image.fromarray(first.astype(np.uint8)))
    stream_lines(client, sampler=sampler, seed=1, img=img, strength=0.6)
    stream_lines(client, sampler=sampler, seed=2, stream=1)
    again = pixels(stream_lines(client, sampler=sampler)[-1]["img"])
    assert np.array_equal(first, again)
    fresh = Models(imagine.Settings(), engine.device, engine.dtype).get("demo")
    req = for_family(GenerationRequest(prompt="a lighthouse", sampler=sampler, **FAST), fresh.family, MAX_SIZE)
    assert np.array_equal(first, np.asarray(generate(fresh, req)[0], dtype=np.int16))


# ---- precision


@pytest.mark.parametrize(
    "feature, expected", [("avx512_bf16", torch.bfloat16), ("amx", torch.bfloat16), (None, torch.float32)]
)
def test_auto_precision_on_cpu_is_bfloat16_only_where_the_cpu_runs_it_natively(feature, expected, monkeypatch, caplog):
    monkeypatch.setattr("engine.devices.cpu_bf16_feature", lambda: feature)
    with caplog.at_level("INFO", logger="imagine"):
        assert pick_dtype("auto", torch.device("cpu")) == expected
    assert str(expected).removeprefix("torch.") in caplog.text and str(feature or "no native") in caplog.text


def test_auto_precision_on_gpus_is_float16_whatever_the_cpu(monkeypatch):
    monkeypatch.setattr("engine.devices.cpu_bf16_feature", lambda: None)
    for device in ("cuda", "mps"):
        assert pick_dtype("auto", torch.device(device)) == torch.float16


@pytest.mark.parametrize(
    "flags, feature",
    [("fpu avx512f avx512_bf16 sse", "avx512_bf16"), ("fpu amx_bf16 amx_tile", "amx"), ("fpu avx2", None)],
)
def test_without_torchs_probe_the_bf16_feature_is_read_from_proc_cpuinfo(flags, feature, monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\\t: 0\\nflags\\t\\t: {flags}\\n")
    monkeypatch.setattr("engine.devices.CPUINFO", cpuinfo)
    assert cpu_bf16_feature() == feature


def test_without_torchs_probe_or_proc_cpuinfo_the_cpu_counts_as_lacking_bf16(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.setattr("engine.devices.CPUINFO", tmp_path / "missing")  # macOS, Windows
    assert cpu_bf16_feature() is None


def test_16_bit_on_cpu_runs_unet_text_encoder_and_vae_in_bfloat16(make_engine):
    engine = make_engine(fp_prec="16", device="cpu")
    model = engine.models.get("demo")
    for pipe in (model.txt2img, model.img2img):
        assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.bfloat16


# ---- GPU options


def test_attention_uses_pytorchs_fused_sdpa_by_default(engine):
    model = engine.models.get("demo")
    for module in (model.txt2img.unet, model.txt2img.vae):
        assert {type(p).__name__ for p in module.attn_processors.values()} == {"AttnProcessor2_0"}


def test_compile_wraps_the_unet_that_img2img_shares():
    model = Models(imagine.Settings(compile="on"), torch.device("cpu"), torch.float32).get("demo")
    assert isinstance(model.txt2img.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert model.img2img.unet is model.txt2img.unet


def unet_is_channels_last(pipe) -> bool:
    weight = pipe.unet.conv_in.weight
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_channels_last_only_on_cuda_where_it_helps():
    pipe = build_demo_pipeline(CONFIGS_DIR / "sd1")
    Models(imagine.Settings(), torch.device("cpu"), torch.float32).speed_up_unet(pipe)
    assert not unet_is_channels_last(pipe)  # measured slower on CPUs
    Models(imagine.Settings(), torch.device("cuda"), torch.float16).speed_up_unet(pipe)
    assert unet_is_channels_last(pipe)
