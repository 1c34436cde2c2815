"""A request names a model; the name must never reach a file outside the models directory."""

import pytest
from conftest import FAST, count_loads, save_tiny_folder

import imagine
from engine.errors import ImagineError


@pytest.fixture
def layout(tmp_path):
    """A models directory holding a tiny model and a link out, next to a loadable model that lies outside it."""
    models = tmp_path / "models"
    save_tiny_folder(models / "tiny", seed=1)
    save_tiny_folder(tmp_path / "outside", seed=2)
    (tmp_path / "secret.safetensors").write_bytes(b"not for clients")
    (models / "link-out").symlink_to(tmp_path / "outside")
    (models / "link-out.safetensors").symlink_to(tmp_path / "secret.safetensors")
    (models / "notes.txt").write_text("a file of another type")
    return tmp_path, models


def post(engine, model):
    return imagine.create_app(engine).test_client().post("/generate", json={"prompt": "x", "model": model, **FAST})


@pytest.mark.parametrize(
    "model, status, message",
    [
        ("../outside", 403, "must not contain '..'"),
        ("../secret.safetensors", 403, "must not contain '..'"),
        ("a/../../x", 403, "must not contain '..'"),
        ("tiny/../tiny", 403, "must not contain '..'"),
        ("{root}/outside", 403, "outside the models folders; add its folder to --models-dir (IMAGINE_MODELS_DIR)"),
        ("/etc/passwd", 403, "add its folder to --models-dir"),
        ("C:\\x", 400, "must not contain a backslash"),
        ("tiny\\..\\..\\outside", 400, "must not contain a backslash"),
        ("~root/x", 404, "not found"),
        ("tiny\0", 400, "NUL byte"),
        ("missing", 404, "not found"),
        ("notes.txt", 400, "not a .safetensors, .gguf or .ckpt file or a diffusers folder"),
        ("link-out.safetensors", 422, "cannot be read as a checkpoint"),
        ("x" * 5000, 400, "at most 512 are accepted"),
    ],
)
def test_a_model_name_cannot_reach_outside_the_models_directory(
    make_engine, monkeypatch, layout, model, status, message
):
    root, models = layout
    engine = make_engine(models_dir=models)
    loads = count_loads(engine, monkeypatch)
    response = post(engine, model.format(root=root))
    assert response.status_code == status
    error = response.get_json()["error"]
    assert message in error
    assert str(root) not in error.replace(model.format(root=root), "")  # only the client's own words come back
    assert loads == []


def test_a_name_inside_the_models_directory_loads_by_name_and_by_path(make_engine, layout):
    _, models = layout
    engine = make_engine(models_dir=models)
    for model in ("tiny", str(models / "tiny")):
        assert post(engine, model).status_code == 200, model


def test_a_link_inside_the_models_directory_is_followed_wherever_it_leads(make_engine, layout):
    _, models = layout
    engine = make_engine(models_dir=models)
    assert post(engine, "link-out").status_code == 200


def test_the_configured_default_model_may_live_outside_the_models_directory(make_engine, layout):
    root, models = layout
    engine = make_engine(models_dir=models, model=str(root / "outside"))
    client = imagine.create_app(engine).test_client()
    assert client.post("/generate", json={"prompt": "x", **FAST}).status_code == 200
    assert post(engine, str(root / "outside")).status_code == 200


def test_a_hub_name_that_is_really_a_path_is_never_downloaded(make_engine, layout):
    _, models = layout
    engine = make_engine(models_dir=models, allow_downloads=True)
    for model in ("../outside", "./x", "a/..", "/x"):
        with pytest.raises(ImagineError) as refused:
            engine.catalog.resolve(model)
        assert refused.value.status in (403, 404), model
