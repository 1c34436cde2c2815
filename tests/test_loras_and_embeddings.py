"""LoRA and textual-inversion embeddings, in the file layouts people download (kohya/civitai, diffusers,
AUTOMATIC1111's embeddings), written by the tests for the tiny models."""

import hashlib
import logging

import numpy as np
import pytest
import torch
from conftest import FAST, answer, pixels
from lora_files import diffusers_lora, kohya_lora, token_vectors
from safetensors.torch import save_file
from tiny_pipelines import tiny_sdxl

import imagine
from engine.demo import build_demo_pipeline
from engine.infotext import infotext_strings
from engine.settings import CONFIGS_DIR


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A models folder with loras/ and embeddings/ for the demo model, and some files that must be refused."""
    root = tmp_path_factory.mktemp("with-loras")
    loras, embeddings = root / "loras", root / "embeddings"
    (loras / "styles").mkdir(parents=True)
    embeddings.mkdir()
    demo = build_demo_pipeline(CONFIGS_DIR / "sd1")
    detail = kohya_lora(demo, seed=0)
    save_file(detail, loras / "detail.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    torch.save(detail, loras / "detail_pickled.pt")
    save_file(kohya_lora(demo, seed=1, text=False), loras / "styles" / "unet_only.safetensors")
    save_file(diffusers_lora(demo), loras / "diffusers_format.safetensors")
    save_file(kohya_lora(tiny_sdxl(), sdxl=True), loras / "xl_detail.safetensors")
    save_file({"lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4)}, loras / "loha.safetensors")
    (loras / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    # The embeddings hold the token embeddings of real words, so they must draw what those words draw.
    encoder, tokenizer = demo.text_encoder, demo.tokenizer
    save_file({"emb_params": token_vectors(encoder, tokenizer, "lighthouse")}, embeddings / "beacon.safetensors")
    torch.save(
        {"string_to_param": {"*": token_vectors(encoder, tokenizer, "red lighthouse")}}, embeddings / "redbeacon.pt"
    )
    xl = tiny_sdxl()
    save_file(
        {
            "clip_l": token_vectors(xl.text_encoder, xl.tokenizer, "cat"),
            "clip_g": token_vectors(xl.text_encoder_2, xl.tokenizer_2, "cat"),
        },
        embeddings / "xlcat.safetensors",
    )
    return root


@pytest.fixture
def lora_engine(make_engine, folder):
    return make_engine(model="demo", models_dir=folder)


def post(engine, **fields):
    return (
        imagine.create_app(engine)
        .test_client()
        .post("/generate", json={"prompt": "a lighthouse at dawn", **FAST, **fields})
    )


def picture(engine, **fields):
    response = post(engine, **fields)
    assert response.status_code == 200, response.get_json()
    return pixels(response.get_json()["img"])


def differs(a, b):
    return np.abs(a - b).mean() > 0.5


def adapters(engine):
    model = engine.models.get(engine.catalog.resolve(None))
    return {name for names in model.txt2img.get_list_adapters().values() for name in names}


# ---- LoRA


def test_a_lora_changes_the_picture_and_a_request_without_it_draws_the_base_picture_again(lora_engine):
    base = picture(lora_engine)
    with_lora = picture(lora_engine, prompt="a lighthouse at dawn <lora:detail:0.8>")
    assert differs(base, with_lora)
    assert np.array_equal(picture(lora_engine), base)
    assert np.array_equal(picture(lora_engine, loras=[{"name": "detail", "weight": 0}]), base)
    assert np.array_equal(picture(lora_engine, prompt="a lighthouse at dawn <lora:detail:0.8>"), with_lora)


def test_the_prompt_tag_and_the_loras_field_draw_the_same_picture(lora_engine):
    tagged = picture(lora_engine, prompt="a lighthouse at dawn, <lora:detail:0.7>")
    field = picture(lora_engine, prompt="a lighthouse at dawn,", loras=[{"name": "detail", "weight": 0.7}])
    assert np.array_equal(tagged, field)
    assert np.array_equal(
        picture(lora_engine, prompt="a lighthouse <lora:detail> at dawn"),
        picture(lora_engine, loras=[{"name": "detail"}]),
    )


def test_several_loras_apply_together_and_each_weight_counts(lora_engine):
    one = picture(lora_engine, loras=[{"name": "detail", "weight": 0.8}])
    both = picture(
        lora_engine, prompt="a lighthouse at dawn <lora:styles/unet_only:1>", loras=[{"name": "detail", "weight": 0.8}]
    )
    assert differs(one, both)
    assert differs(
        both,
        picture(
            lora_engine,
            prompt="a lighthouse at dawn <lora:styles/unet_only:-1>",
            loras=[{"name": "detail", "weight": 0.8}],
        ),
    )


def test_a_lora_is_loaded_once_and_kept(lora_engine, caplog):
    with caplog.at_level(logging.INFO, logger="imagine"):
        for _ in range(3):
            picture(lora_engine, loras=[{"name": "detail"}])
            picture(lora_engine)
    assert [record.getMessage() for record in caplog.records].count("loaded lora detail") == 1


def test_the_least_recently_used_lora_is_deleted_beyond_the_bound(lora_engine, monkeypatch):
    monkeypatch.setattr("engine.loras.MAX_LORAS_KEPT", 2)
    for name in ("detail", "styles/unet_only", "diffusers_format"):
        picture(lora_engine, loras=[{"name": name}])
    assert len(adapters(lora_engine)) == 2


@pytest.mark.parametrize("name", ["detail_pickled", "diffusers_format", "styles/unet_only"])
def test_pickled_diffusers_format_and_unet_only_loras_load(lora_engine, name):
    assert differs(picture(lora_engine), picture(lora_engine, loras=[{"name": name}]))


def test_a_pickled_lora_draws_what_the_same_safetensors_lora_draws(lora_engine):
    assert np.array_equal(
        picture(lora_engine, loras=[{"name": "detail_pickled"}]), picture(lora_engine, loras=[{"name": "detail"}])
    )


NOT_IN_LORAS = (
    "not found in loras/ of the models folders (<models>/loras/, as .safetensors, .pt or .ckpt); GET /loras lists them"
)


@pytest.mark.parametrize(
    "fields, status, error",
    [
        (
            {"loras": [{"name": "nope"}]},
            400,
            f"lora 'nope' {NOT_IN_LORAS}",
        ),
        (
            {"prompt": "x <lora:nope:0.5>"},
            400,
            f"lora 'nope' {NOT_IN_LORAS}",
        ),
        ({"loras": [{"name": "detail", "weight": 6}]}, 400, "lora 'detail' weight must be between -5 and 5, not 6.0"),
        ({"prompt": "x <lora:detail:-5.5>"}, 400, "lora 'detail' weight must be between -5 and 5, not -5.5"),
        (
            {"prompt": "x <lora:detail:strong>"},
            400,
            "<lora:detail:strong> must be <lora:name> or <lora:name:weight>, weight a number",
        ),
        (
            {"loras": [{"name": "../embeddings/beacon"}]},
            403,
            "lora '../embeddings/beacon' is outside the loras folder",
        ),
        (
            {"loras": [{"name": "/etc/passwd"}]},
            400,
            f"lora '/etc/passwd' {NOT_IN_LORAS}",
        ),
        ({"loras": [{"name": "a\0b"}]}, 400, "lora name 'a\\x00b' is not a file name"),
        ({"loras": "detail"}, 400, 'loras must be a list like [{"name": "add_detail", "weight": 0.8}]'),
        (
            {"loras": [{"name": "detail", "strength": 1}]},
            400,
            'loras entries have a name and a weight, not {"name": "detail", "strength": 1}',
        ),
        ({"loras": [{"name": "xl_detail"}]}, 422, "lora 'xl_detail' is for SDXL; the model is Stable Diffusion 1.x"),
        (
            {"loras": [{"name": "loha"}]},
            400,
            "lora 'loha' is a LoHa/LoKr (LyCORIS) file; only LoRA files can be loaded",
        ),
        ({"loras": [{"name": "truncated"}]}, 400, "lora 'truncated' cannot be read (SafetensorError)"),
    ],
)
def test_a_bad_lora_is_refused_naming_it_and_why_and_leaves_nothing_behind(lora_engine, fields, status, error):
    base = picture(lora_engine)
    response = post(lora_engine, **fields)
    assert (response.status_code, response.get_json()) == (status, {"error": error})
    assert adapters(lora_engine) == set()
    assert np.array_equal(picture(lora_engine), base)


def test_a_lora_of_another_family_without_metadata_is_refused_and_leaves_no_adapter(tiny_engine, folder, tiny_files):
    models, _, _ = tiny_files
    (models / "loras").mkdir(exist_ok=True)
    (models / "loras" / "sd1.safetensors").write_bytes(
        (folder / "loras" / "styles" / "unet_only.safetensors").read_bytes()
    )
    base = pixels(answer(tiny_engine, model="xl")["img"])
    response = (
        imagine.create_app(tiny_engine)
        .test_client()
        .post("/generate", json={"prompt": "a cat", **FAST, "model": "xl", "loras": [{"name": "sd1"}]})
    )
    assert response.status_code == 422  # its layers are SD 1.x's or 2.x's, which name them alike
    assert response.get_json()["error"] == "lora 'sd1' is for Stable Diffusion 1.x/2.x; the model is SDXL"
    model = tiny_engine.models.get(tiny_engine.catalog.resolve("xl"))
    assert not any(model.txt2img.get_list_adapters().values())
    assert np.array_equal(pixels(answer(tiny_engine, model="xl")["img"]), base)


def test_a_kohya_sdxl_lora_with_both_text_encoders_applies_to_sdxl(tiny_engine, folder, tiny_files):
    models, _, _ = tiny_files
    (models / "loras").mkdir(exist_ok=True)
    (models / "loras" / "xl_detail.safetensors").write_bytes((folder / "loras" / "xl_detail.safetensors").read_bytes())
    base = pixels(answer(tiny_engine, model="xl")["img"])
    with_lora = pixels(answer(tiny_engine, model="xl", prompt="a cat <lora:xl_detail:0.5>")["img"])
    assert differs(base, with_lora)
    model = tiny_engine.models.get(tiny_engine.catalog.resolve("xl"))
    assert set(model.txt2img.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    assert np.array_equal(pixels(answer(tiny_engine, model="xl")["img"]), base)


def test_get_loras_lists_name_size_and_the_family_the_file_tells(lora_engine, folder):
    listing = {
        each["name"]: each for each in imagine.create_app(lora_engine).test_client().get("/loras").get_json()["loras"]
    }
    assert listing["detail"] == {
        "name": "detail",
        "size": (folder / "loras" / "detail.safetensors").stat().st_size,
        "family": "sd1",
    }
    assert listing["xl_detail"]["family"] == "sdxl"
    assert listing["styles/unet_only"]["family"] == "sd"  # SD 1.x and 2.x LoRAs name their layers alike
    assert listing["detail_pickled"]["family"] is None
    assert "truncated" in listing


def test_the_png_keeps_the_lora_tag_in_the_prompt(lora_engine):
    from conftest import decode_png

    response = post(lora_engine, prompt="a lighthouse <lora:detail:0.6>")
    assert decode_png(response.get_json()["img"]).info["parameters"].splitlines()[0] == "a lighthouse <lora:detail:0.6>"


def short_hash(path) -> str:
    """A1111's short hash, computed here from its definition: the sha256 of a .safetensors file after its header
    (kohya's addnet hash), of any other file whole; 12 hex digits."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        data = data[8 + int.from_bytes(data[:8], "little") :]
    return hashlib.sha256(data).hexdigest()[:12]


def test_the_png_names_each_loras_short_hash_as_automatic1111_writes_them(lora_engine, folder):
    from conftest import decode_png

    prompt = "a lighthouse <lora:detail:0.6> <lora:detail_pickled:0.2>"
    response = post(lora_engine, prompt=prompt, loras=[{"name": "styles/unet_only", "weight": 0.5}])
    parameters = decode_png(response.get_json()["img"]).info["parameters"]
    loras = folder / "loras"
    hashes = {
        "styles/unet_only": short_hash(loras / "styles" / "unet_only.safetensors"),
        "detail": short_hash(loras / "detail.safetensors"),
        "detail_pickled": short_hash(loras / "detail_pickled.pt"),
    }
    assert parameters.endswith('Lora hashes: "' + ", ".join(f"{k}: {v}" for k, v in hashes.items()) + '"')
    assert infotext_strings(parameters)["Lora hashes"].startswith('"styles/unet_only: ')
    assert "Lora hashes" not in decode_png(post(lora_engine).get_json()["img"]).info["parameters"]


def test_a_lora_that_carries_its_own_hash_is_named_by_it(lora_engine, folder):
    from conftest import decode_png

    demo = build_demo_pipeline(CONFIGS_DIR / "sd1")
    own = "0123456789abcdef" * 4
    save_file(kohya_lora(demo, seed=5), folder / "loras" / "hashed.safetensors", metadata={"sshs_model_hash": own})
    response = post(lora_engine, prompt="a lighthouse <lora:hashed>")
    assert decode_png(response.get_json()["img"]).info["parameters"].endswith('Lora hashes: "hashed: 0123456789ab"')


# ---- embeddings


def test_an_embedding_draws_what_the_words_it_holds_draw(lora_engine):
    assert np.array_equal(
        picture(lora_engine, prompt="a beacon at dawn"), picture(lora_engine, prompt="a lighthouse at dawn")
    )
    assert np.array_equal(
        picture(lora_engine, prompt="a (redbeacon:1.2) at dawn"),
        picture(lora_engine, prompt="a (red lighthouse:1.2) at dawn"),
    )
    assert np.array_equal(picture(lora_engine, neg="Beacon"), picture(lora_engine, neg="lighthouse"))


def test_a_prompt_without_the_embeddings_name_draws_as_if_it_did_not_exist(lora_engine, make_engine, tmp_path):
    base = picture(make_engine(model="demo", models_dir=tmp_path))  # a models folder with no embeddings
    picture(lora_engine, prompt="a beacon, redbeacon at dawn")
    assert np.array_equal(picture(lora_engine), base)
    assert np.array_equal(
        picture(lora_engine, prompt="a beacons at dawn"),
        picture(make_engine(model="demo", models_dir=tmp_path), prompt="a beacons at dawn"),
    )


def test_an_sdxl_embedding_gives_each_encoder_its_vectors(tiny_engine, folder, tiny_files):
    models, _, _ = tiny_files
    (models / "embeddings").mkdir(exist_ok=True)
    (models / "embeddings" / "xlcat.safetensors").write_bytes(
        (folder / "embeddings" / "xlcat.safetensors").read_bytes()
    )
    assert np.array_equal(
        pixels(answer(tiny_engine, model="xl", prompt="a xlcat")["img"]),
        pixels(answer(tiny_engine, model="xl", prompt="a cat")["img"]),
    )


def test_an_embedding_for_another_family_is_refused_naming_it(lora_engine):
    response = post(lora_engine, prompt="a xlcat")
    assert response.status_code == 400
    assert response.get_json()["error"] == "embedding 'xlcat' is for SDXL; the model is Stable Diffusion 1.x"


def test_a_broken_embedding_file_is_refused_naming_it_only_when_a_prompt_uses_it(make_engine, tmp_path):
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    engine = make_engine(model="demo", models_dir=tmp_path)
    assert post(engine).status_code == 200
    response = post(engine, neg="broken")
    assert (response.status_code, response.get_json()) == (
        400,
        {"error": "embedding 'broken' cannot be read (SafetensorError)"},
    )


def test_get_embeddings_lists_name_and_size(lora_engine, folder):
    listing = imagine.create_app(lora_engine).test_client().get("/embeddings").get_json()["embeddings"]
    assert {each["name"] for each in listing} == {"beacon", "redbeacon", "xlcat"}
    assert {"name": "beacon", "size": (folder / "embeddings" / "beacon.safetensors").stat().st_size} in listing
