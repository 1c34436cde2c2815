"""A prompt is encoded once: a picture of a prompt drawn before (another seed, the same texts) skips the text
encoders and draws what a fresh encoding draws; whatever changes what the encoders give (a negative prompt, clip skip,
a text-encoder LoRA, an embedding file, the encoder itself) encodes anew. SD on the tiny demo model, the flow families
on tiny models of their real architectures."""

import contextlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import answer, pixels
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusion_model_files import z_image_tensors
from flow_models import SMALL, generate, save
from lora_files import kohya_lora, token_vectors
from safetensors.torch import load_file, save_file

import imagine
from engine.demo import build_demo_pipeline
from engine.engine import Engine
from engine.files.text_encoders import inner_layers
from engine.settings import CONFIGS_DIR

WEIGHTED = "a (lighthouse:1.3) at [dawn] BREAK calm sea"  # A1111's weights and BREAK (a second chunk)


@contextlib.contextmanager
def encoder_calls(model):
    """The list of the text-encoder passes the model runs while open (one per chunk and encoder for SD)."""
    calls, hooks = [], []
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(model.txt2img, name, None)
        if encoder is not None:
            hooks.append(encoder.register_forward_pre_hook(lambda module, args, name=name: calls.append(name)))
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def loaded(engine, name=None):
    return engine.models.loaded[engine.catalog.resolve(name)]


# ---- SD: the demo model with a LoRA of its text encoder and UNet, one of its UNet alone, and an embedding


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-cache")
    (root / "loras").mkdir()
    (root / "embeddings").mkdir()
    demo = build_demo_pipeline(CONFIGS_DIR / "sd1")
    save_file(kohya_lora(demo, seed=0), root / "loras" / "detail.safetensors")
    save_file(kohya_lora(demo, seed=1, text=False), root / "loras" / "unet_only.safetensors")
    beacon = token_vectors(demo.text_encoder, demo.tokenizer, "lighthouse")
    save_file({"emb_params": beacon}, root / "embeddings" / "beacon.safetensors")
    return root


@pytest.fixture
def cached(make_engine, folder):
    """An engine with the prompt cache on, as it is by default."""
    return make_engine(model="demo", models_dir=folder)


@pytest.fixture
def uncached(make_engine, folder):
    """An engine with --prompt-cache 0: every prompt encoded afresh."""
    return make_engine(model="demo", models_dir=folder, prompt_cache=0)


def picture(engine, **fields):
    return pixels(answer(engine, **fields)["img"])


@pytest.mark.parametrize("prompt", ["a cat", WEIGHTED], ids=["plain", "weights-and-break"])
def test_a_prompt_drawn_again_with_another_seed_skips_the_text_encoder_and_draws_what_a_fresh_encoding_draws(
    cached, uncached, prompt
):
    first = picture(cached, prompt=prompt, neg="blurry", seed=1)
    with encoder_calls(loaded(cached)) as calls:
        again = picture(cached, prompt=prompt, neg="blurry", seed=2)
    assert calls == []
    assert np.array_equal(again, picture(uncached, prompt=prompt, neg="blurry", seed=2))
    assert np.array_equal(first, picture(uncached, prompt=prompt, neg="blurry", seed=1))
    assert not np.array_equal(first, again)  # the seed still counts


def test_an_sdxl_prompt_drawn_again_skips_both_text_encoders_and_draws_what_a_fresh_encoding_draws(
    tiny_engine, tiny_files, make_engine
):
    models, configs, _ = tiny_files
    uncached = make_engine(model="xl", models_dir=models, fp_prec="32", configs_dir=configs, prompt_cache=0)
    fields = {"model": "xl", "prompt": WEIGHTED, "neg": "blurry", "clip_skip": 2}
    picture(tiny_engine, **fields, seed=1)
    with encoder_calls(loaded(tiny_engine, "xl")) as calls:
        again = picture(tiny_engine, **fields, seed=2)
    assert calls == []
    assert np.array_equal(again, picture(uncached, **fields, seed=2))


def test_weights_and_break_still_change_the_picture_once_prompts_are_kept(cached):
    plain = picture(cached, prompt="a lighthouse at dawn calm sea")
    assert not np.array_equal(plain, picture(cached, prompt=WEIGHTED))
    assert np.array_equal(plain, picture(cached, prompt="a lighthouse at dawn calm sea"))


def test_prompt_cache_0_encodes_every_prompt_again(uncached):
    picture(uncached)
    with encoder_calls(loaded(uncached)) as calls:
        picture(uncached, seed=5)
    assert calls == ["text_encoder", "text_encoder"]  # the prompt's chunk and the negative prompt's


@pytest.mark.parametrize(
    "changed",
    [{"neg": "fog"}, {"clip_skip": 2}, {"loras": [{"name": "detail", "weight": 0.8}]}, {"prompt": "a cat, at night"}],
    ids=["negative", "clip-skip", "text-encoder-lora", "prompt"],
)
def test_what_changes_the_encoders_output_encodes_anew_and_draws_what_a_fresh_encoding_draws(cached, uncached, changed):
    picture(cached, prompt="a cat")
    with encoder_calls(loaded(cached)) as calls:
        drawn = picture(cached, **{"prompt": "a cat", **changed})
    assert calls != []
    assert np.array_equal(drawn, picture(uncached, **{"prompt": "a cat", **changed}))


def test_a_text_encoder_loras_weight_is_part_of_what_was_encoded(cached, uncached):
    picture(cached, prompt="a cat <lora:detail:0.8>")
    with encoder_calls(loaded(cached)) as calls:
        drawn = picture(cached, prompt="a cat <lora:detail:0.4>")
        picture(cached, prompt="a cat <lora:detail:0.4>", seed=9)
    assert calls == ["text_encoder", "text_encoder"]  # once for the new weight, then found
    assert np.array_equal(drawn, picture(uncached, prompt="a cat <lora:detail:0.4>"))


def test_a_lora_of_the_unet_alone_reuses_the_encoded_prompt_and_still_changes_the_picture(cached, uncached):
    base = picture(cached, prompt="a cat")
    with encoder_calls(loaded(cached)) as calls:
        with_lora = picture(cached, prompt="a cat", loras=[{"name": "unet_only", "weight": 1}])
        tagged = picture(cached, prompt="a cat <lora:unet_only:0.5>")  # the text "a cat ", encoded once
        stronger = picture(cached, prompt="a cat <lora:unet_only:1.5>")
    assert calls == ["text_encoder", "text_encoder"]
    assert not np.array_equal(base, with_lora) and not np.array_equal(tagged, stronger)
    assert np.array_equal(with_lora, picture(uncached, prompt="a cat", loras=[{"name": "unet_only", "weight": 1}]))
    assert np.array_equal(stronger, picture(uncached, prompt="a cat <lora:unet_only:1.5>"))


def test_an_embedding_file_saved_again_encodes_anew_with_its_new_vectors(make_engine, folder, tmp_path):
    shutil.copytree(folder, tmp_path / "models")
    engine = make_engine(model="demo", models_dir=tmp_path / "models")
    demo = build_demo_pipeline(CONFIGS_DIR / "sd1")
    picture(engine, prompt="a beacon at dawn")
    path = tmp_path / "models" / "embeddings" / "beacon.safetensors"
    save_file({"emb_params": token_vectors(demo.text_encoder, demo.tokenizer, "cat")}, path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a newer file, whatever the clock
    with encoder_calls(loaded(engine)) as calls:
        drawn = picture(engine, prompt="a beacon at dawn")
    assert calls != []
    assert np.array_equal(drawn, picture(engine, prompt="a cat at dawn"))  # the words its vectors now hold


def test_the_hires_fixs_second_pass_prompt_is_kept_too(cached, uncached):
    hires = {"prompt": "a cat", "hires_scale": 1.5, "hires_steps": 2, "hires_prompt": "a cat, detailed"}
    picture(cached, **hires)
    with encoder_calls(loaded(cached)) as calls:
        drawn = picture(cached, **hires, seed=3)
    assert calls == []
    assert np.array_equal(drawn, picture(uncached, **hires, seed=3))


def test_past_the_bound_the_least_recently_used_prompt_is_encoded_again(make_engine, folder):
    engine = make_engine(model="demo", models_dir=folder, prompt_cache=2)
    for prompt in ("one", "two", "one", "three"):  # "two" is the least recently used when "three" comes
        picture(engine, prompt=prompt)
    with encoder_calls(loaded(engine)) as calls:
        picture(engine, prompt="one")
        picture(engine, prompt="three")
    assert calls == []
    with encoder_calls(loaded(engine)) as calls:
        picture(engine, prompt="two")
    assert calls != []


def test_unloading_a_model_frees_its_encoded_prompts(cached):
    picture(cached, prompt="a cat")
    model = loaded(cached)
    assert len(model.encodings.entries) == 1
    list(cached.unload_model(cached.catalog.resolve(None)))
    assert len(model.encodings.entries) == 0
    picture(cached, prompt="a cat")  # loads it again, with nothing encoded yet
    with encoder_calls(loaded(cached)) as calls:
        picture(cached, prompt="a dog")
    assert calls != []


def test_prompt_cache_is_a_flag_and_a_variable_and_may_not_be_negative(monkeypatch, capsys):
    assert imagine.parse_settings([]).prompt_cache == 100
    assert imagine.parse_settings(["--prompt-cache", "0"]).prompt_cache == 0
    monkeypatch.setenv("IMAGINE_PROMPT_CACHE", "7")
    assert imagine.parse_settings([]).prompt_cache == 7
    with pytest.raises(SystemExit):
        imagine.parse_settings(["--prompt-cache", "-1"])
    assert "--prompt-cache must be 0 or more, not -1" in capsys.readouterr().err


# ---- the flow families: Z-Image (with classifier-free guidance, so its negative prompt is read), klein, FLUX.1


FLOW_CASES = {
    "z_image_turbo_bf16": {"guidance": 2.0, "neg": "blurry"},
    "flux-2-klein-4b": {},
    "flux1-schnell": {},
}


@pytest.fixture(scope="module")
def uncached_flow(comfyui, tiny_configs):
    """An engine on the tiny flow models with --prompt-cache 0."""
    settings = imagine.Settings(model="demo", models_dir=comfyui, prompt_cache=0)
    engine = Engine(settings, configs_dir=tiny_configs)
    engine.start()
    yield imagine.create_app(engine).test_client()
    engine.stop()


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", FLOW_CASES)
def test_a_flow_models_prompt_drawn_again_skips_its_encoders_and_draws_what_a_fresh_encoding_draws(
    flow_client, flow_engine, uncached_flow, name
):
    fields = {"model": name, "prompt": "a lighthouse (at dusk:1.2)", **FLOW_CASES[name]}  # the emphasis unread
    generate(flow_client, **fields, seed=1)
    with encoder_calls(loaded(flow_engine, name)) as calls:
        again = generate(flow_client, **fields, seed=2, n=2)["images"]
    assert calls == []
    assert again == generate(uncached_flow, **fields, seed=2, n=2)["images"]


@pytest.mark.usefixtures("offline")
def test_z_images_negative_prompt_is_part_of_what_was_encoded_only_where_guidance_reads_it(flow_client, flow_engine):
    z = {"model": "z_image_turbo_bf16", "prompt": "a red door"}
    generate(flow_client, **z, guidance=2.0, neg="blurry")
    with encoder_calls(loaded(flow_engine, "z_image_turbo_bf16")) as calls:
        generate(flow_client, **z, guidance=2.0, neg="fog")
    assert calls == ["text_encoder"]  # the new negative prompt; the prompt and its batch of one
    generate(flow_client, **z, guidance=0.0, neg="one")
    with encoder_calls(loaded(flow_engine, "z_image_turbo_bf16")) as calls:
        generate(flow_client, **z, guidance=0.0, neg="another")  # unread at guidance 0
    assert calls == []


@pytest.mark.usefixtures("offline")
@pytest.mark.parametrize("name", FLOW_CASES)
def test_a_flow_models_picture_is_what_its_pipeline_draws_encoding_the_prompt_itself(flow_client, flow_engine, name):
    fields = {"model": name, "prompt": "a lighthouse at dusk", **FLOW_CASES[name], "n": 2}
    generate(flow_client, **fields)  # loads the model and keeps the prompt
    drawn = [pixels(image) for image in generate(flow_client, **fields)["images"]]
    model = loaded(flow_engine, name)
    pipe, req = model.txt2img, {**SMALL, **fields}
    own = {"negative_prompt": req["neg"], "guidance_scale": req["guidance"]} if "neg" in req else {}
    if model.family.transformer == "flux2":
        own = {"text_encoder_out_layers": inner_layers(pipe.text_encoder.config.num_hidden_layers)}
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
    with torch.inference_mode():
        images = pipe(
            prompt=req["prompt"],
            num_inference_steps=model.family.default_steps,
            generator=[torch.Generator("cpu").manual_seed(req["seed"] + k) for k in range(2)],
            num_images_per_prompt=2,
            width=req["width"],
            height=req["height"],
            max_sequence_length=model.family.prompt_tokens,
            **{"guidance_scale": 1.0 if model.family.transformer == "flux2" else 0.0, **own},
        ).images
    for image, expected in zip(drawn, images, strict=True):
        assert np.array_equal(image, np.asarray(expected.convert("RGB"), dtype=np.int16))


@pytest.mark.usefixtures("offline")
def test_a_sidecar_naming_another_text_encoder_encodes_with_it_and_frees_what_the_old_one_encoded(
    comfyui, tiny_configs, tmp_path
):
    # The tiny transformers' pictures hardly depend on the prompt's values (they normalise it): what is kept is
    # compared instead of the pictures.
    models = tmp_path / "models"
    save(models / "diffusion_models" / "z.safetensors", z_image_tensors())
    save(models / "vae" / "ae.safetensors", load_file(comfyui / "vae" / "ae.safetensors"))
    encoder = load_file(comfyui / "text_encoders" / "qwen_3_4b.safetensors")
    save(models / "text_encoders" / "mine.safetensors", encoder)
    # Each token's embedding moved to the next token: the same prompt reads as another.
    other = {name: t.roll(1, 0) if "embed_tokens" in name else t for name, t in encoder.items()}
    save(models / "text_encoders" / "other.safetensors", other)
    sidecar = models / "diffusion_models" / "z.json"
    sidecar.write_text(json.dumps({"text_encoder": "text_encoders/mine"}))
    engine = Engine(imagine.Settings(model="demo", models_dir=models), configs_dir=tiny_configs)
    engine.start()
    client = imagine.create_app(engine).test_client()
    try:
        generate(client, model="z")
        first = loaded(engine, "z")
        (kept,) = first.encodings.entries.values()
        sidecar.write_text(json.dumps({"text_encoder": "text_encoders/other"}))
        generate(client, model="z")
        model = loaded(engine, "z")
    finally:
        engine.stop()
    assert model is not first and first.encodings.entries == {}
    (encoded,) = model.encodings.entries.values()
    fresh = model.txt2img.encode_prompt("a lighthouse at dusk", do_classifier_free_guidance=False)[0]
    assert torch.equal(encoded["prompt_embeds"][0], fresh[0])
    assert not torch.equal(encoded["prompt_embeds"][0], kept["prompt_embeds"][0])
