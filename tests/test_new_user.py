"""What a new user following the README met (issue 22): field names shared with the other dialects, the model
lists, the health check behind a key, the words of errors and logs, and what the CLI and server say first."""

from conftest import FAST, decode_png, pixels


def test_generate_takes_negative_prompt_and_steps_as_the_other_dialects_name_them(client):
    seed_names = client.post("/generate", json={"prompt": "x", **FAST, "neg": "blur", "num_steps": 3}).get_json()
    fast = {key: value for key, value in FAST.items() if key != "num_steps"}
    aliases = client.post("/generate", json={"prompt": "x", **fast, "negative_prompt": "blur", "steps": 3})
    assert aliases.status_code == 200, aliases.get_json()
    assert aliases.get_json()["steps"] == 3
    assert "Negative prompt: blur\nSteps: 3," in decode_png(aliases.get_json()["img"]).info["parameters"]
    assert (pixels(aliases.get_json()["img"]) == pixels(seed_names["img"])).all()


def test_an_alias_and_its_field_given_with_different_values_answer_400_naming_both(client):
    fast = {key: value for key, value in FAST.items() if key != "num_steps"}
    response = client.post("/generate", json={"prompt": "x", **fast, "steps": 3, "num_steps": 4})
    assert response.status_code == 400
    assert response.get_json()["error"] == "steps and num_steps are one field; give one of them, not 3 and 4"
    response = client.post("/generate", json={"prompt": "x", **FAST, "negative_prompt": "a", "neg": "b"})
    assert response.status_code == 400
    assert "negative_prompt and neg" in response.get_json()["error"]
    same = client.post("/generate", json={"prompt": "x", **FAST, "negative_prompt": "a", "neg": "a"})
    assert same.status_code == 200
