"""Prompts as AUTOMATIC1111 reads them: weights, BREAK, prompts longer than 77 tokens, clip skip, and the
lcm sampler; a plain prompt draws exactly what the diffusers pipeline draws from the same text."""

import numpy as np
import pytest
import torch
from conftest import FAST, answer, bare_call, decode_png, pixels

from engine.demo import build_demo_pipeline
from engine.prompts import parse_prompt_attention, prompt_chunks, prompt_embeddings
from engine.settings import CONFIGS_DIR

# The examples in the docstring of AUTOMATIC1111's modules/prompt_parser.py parse_prompt_attention.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize("prompt, parsed", A1111_EXAMPLES)
def test_the_parser_gives_what_automatic1111s_docstring_says(prompt, parsed):
    assert parse_prompt_attention(prompt) == parsed


@pytest.mark.parametrize(
    "prompt, parsed",
    [
        ("((x))", [("x", 1.2100000000000002)]),
        ("[x]", [("x", 1 / 1.1)]),
        ("[unbalanced", [("unbalanced", 1 / 1.1)]),
        ("stray) and ]", [("stray) and ]", 1.0)]),
        ("a:1.2) b", [("a:1.2) b", 1.0)]),
        ("(x : 0.8 )", [("x ", 0.8)]),
        ("a \\\\ b\\", [("a \\ b", 1.0)]),
        ("", [("", 1.0)]),
        ("a BREAK (b BREAK c)", [("a", 1.0), ("BREAK", None), ("b", 1.1), ("BREAK", None), ("c", 1.1)]),
        ("BREAKFAST break", [("BREAKFAST break", 1.0)]),
    ],
)
def test_the_parser_handles_nesting_escapes_strays_and_break(prompt, parsed):
    assert parse_prompt_attention(prompt) == parsed


@pytest.fixture(scope="module")
def demo():
    pipe = build_demo_pipeline(CONFIGS_DIR / "sd1")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def chunks(pipe, prompt):
    return prompt_chunks(pipe.tokenizer, parse_prompt_attention(prompt), {})


def test_a_long_prompt_is_split_into_chunks_of_75_tokens_each_padded_to_77(demo):
    tokenizer = demo.tokenizer
    words = " ".join(f"word{n}" for n in range(100))
    ids = tokenizer(words, add_special_tokens=False).input_ids
    split = chunks(demo, words)
    assert [len(chunk.tokens) for chunk in split] == [77] * (len(ids) // 75 + 1)
    assert split[0].tokens == [tokenizer.bos_token_id, *ids[:75], tokenizer.eos_token_id]
    assert (
        split[1].tokens[: len(ids) - 75 + 2]
        == [tokenizer.bos_token_id, *ids[75:150], tokenizer.eos_token_id][: len(ids) - 75 + 2]
    )


def test_a_full_chunk_ends_at_its_last_comma_within_20_tokens(demo):
    tokenizer = demo.tokenizer
    head = ", ".join(["cat"] * 30)  # 59 tokens: cat , cat , ... cat
    tail = " ".join(["dog"] * 30)
    split = chunks(demo, f"{head}, {tail}")
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    first = split[0].tokens
    # 59 tokens, the comma (60th), then dogs up to 75; the next dog finds the comma 15 back: the dogs move on.
    assert first[60] == comma and first[61] == tokenizer.eos_token_id
    assert split[1].tokens[1:31] == tokenizer("dog " * 30, add_special_tokens=False).input_ids


def test_break_starts_a_new_chunk(demo):
    split = chunks(demo, "a cat BREAK a dog")
    assert len(split) == 2
    assert split[1].tokens[1:3] == demo.tokenizer("a dog", add_special_tokens=False).input_ids


def test_weights_are_applied_per_token_and_the_chunk_keeps_its_mean(demo):
    with torch.inference_mode():
        plain = prompt_embeddings(demo, "a cat", "", 1, {})["prompt_embeds"]
        weighted = prompt_embeddings(demo, "a (cat:1.5)", "", 1, {})["prompt_embeds"]
    assert torch.allclose(plain.mean(), weighted.mean(), atol=1e-5)
    ratio = (weighted / plain)[0, :, 0]
    assert ratio[2] / ratio[1] == pytest.approx(1.5, rel=1e-4)  # "cat" against "a"


def test_the_shorter_of_prompt_and_negative_gets_chunks_of_the_empty_prompt(demo):
    with torch.inference_mode():
        encoded = prompt_embeddings(demo, "cat " * 100, "blurry", 1, {})
        empty = prompt_embeddings(demo, "", "", 1, {})["prompt_embeds"]
    assert encoded["prompt_embeds"].shape == encoded["negative_prompt_embeds"].shape == (1, 154, 32)
    assert torch.equal(encoded["negative_prompt_embeds"][:, 77:], empty)


def test_clip_skip_2_encodes_with_the_penultimate_layer_normalized_as_automatic1111(demo):
    ids = demo.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        output = demo.text_encoder(ids, output_hidden_states=True)
        expected = demo.text_encoder.final_layer_norm(output.hidden_states[-2])
        assert torch.equal(prompt_embeddings(demo, "a cat", "", 2, {})["prompt_embeds"], expected)


def generate(client, **fields):
    response = client.post("/generate", json={"prompt": "a lighthouse at dawn", **FAST, **fields})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def text_call(engine, prompt, neg=""):
    """What the server drew before it parsed prompts: the loaded pipeline called with the text itself."""
    model = engine.models.get(engine.catalog.resolve(None))
    with torch.inference_mode():
        image = model.txt2img(
            prompt,
            negative_prompt=neg,
            width=64,
            height=64,
            num_inference_steps=FAST["num_steps"],
            guidance_scale=7.0,
            generator=torch.Generator("cpu").manual_seed(FAST["seed"]),
        ).images[0]
    return np.asarray(image, dtype=np.int16)


def test_a_plain_sd1_prompt_draws_bit_for_bit_what_diffusers_draws_from_the_text(client, engine):
    prompt, neg = "a lighthouse on a cliff, oil painting", "blurry, low quality"
    served = pixels(generate(client, prompt=prompt, neg=neg)["img"])  # also leaves the default sampler in place
    assert np.array_equal(served, text_call(engine, prompt, neg))


@pytest.mark.parametrize("model", ["xl", "sd2-v"])
def test_a_plain_sdxl_or_sd2_prompt_draws_bit_for_bit_what_diffusers_draws(tiny_engine, tiny_files, model):
    _, _, sources = tiny_files
    pipe = sources["sdxl" if model == "xl" else "sd2"]
    config = dict(pipe.scheduler.config)
    if model == "sd2-v":
        config["prediction_type"] = "v_prediction"
    served = pixels(answer(tiny_engine, model=model)["img"])
    assert np.array_equal(served, bare_call(pipe, config, width=64, height=64))


def test_the_tail_of_a_prompt_longer_than_77_tokens_changes_the_picture(client, engine):
    head = ", ".join(["a lighthouse on a cliff"] * 16)  # over 77 tokens before the tails
    one, other = (
        pixels(generate(client, prompt=f"{head}, red")["img"]),
        pixels(generate(client, prompt=f"{head}, blue")["img"]),
    )
    # The tiny model's random weights make the change small (a mean of 0.1 to 1 level of 255, by CPU); any change
    # shows the tail was read, where diffusers on its own cuts both at 77 tokens and draws the same picture for both.
    assert not np.array_equal(one, other)
    assert np.array_equal(text_call(engine, f"{head}, red"), text_call(engine, f"{head}, blue"))


def test_weights_and_break_change_the_picture_and_a_weight_of_1_does_not(client):
    plain = pixels(generate(client, prompt="a lighthouse at dawn")["img"])
    assert np.array_equal(plain, pixels(generate(client, prompt="a (lighthouse:1) at dawn")["img"]))
    for changed in ("a (lighthouse:1.4) at dawn", "a [lighthouse] at dawn", "a lighthouse BREAK at dawn"):
        assert np.abs(plain - pixels(generate(client, prompt=changed)["img"])).mean() > 0.5, changed


def test_the_png_keeps_the_prompt_as_written(client):
    prompt = "a (lighthouse:1.3) at [dawn] BREAK \\(sea\\)"
    parameters = decode_png(generate(client, prompt=prompt, neg="(blurry:1.2)")["img"]).info["parameters"]
    assert parameters.splitlines()[:2] == [prompt, "Negative prompt: (blurry:1.2)"]


def test_clip_skip_2_changes_the_picture_and_is_written_into_the_png(client):
    plain = generate(client)
    skipped = generate(client, clip_skip=2)
    assert np.abs(pixels(plain["img"]) - pixels(skipped["img"])).mean() > 0.5
    assert "Clip skip: 2" in decode_png(skipped["img"]).info["parameters"]
    assert "Clip skip" not in decode_png(plain["img"]).info["parameters"]


def test_clip_skip_on_sdxl_moves_both_encoders_back_a_layer(tiny_engine):
    plain = pixels(answer(tiny_engine, model="xl")["img"])
    assert np.abs(plain - pixels(answer(tiny_engine, model="xl", clip_skip=2)["img"])).mean() > 0.5


@pytest.mark.parametrize(
    "fields, error",
    [
        ({"clip_skip": 0}, "clip_skip must be between 1 and 12, not 0"),
        ({"clip_skip": 6}, "clip_skip 6 is more than this model's text encoder has (5 layers)"),
        ({"prompt": "a (cat:1.2.3)"}, "prompt weight '1.2.3' is not a number"),
        ({"neg": "(ugly:.)"}, "neg weight '.' is not a number"),
    ],
)
def test_a_bad_clip_skip_or_weight_is_refused_naming_it(client, fields, error):
    response = client.post("/generate", json={"prompt": "a cat", **FAST, **fields})
    assert response.status_code == 400
    assert response.get_json()["error"] == error


@pytest.mark.parametrize(("guidance", "n", "batch"), [(1.0, 1, 1), (0.5, 2, 2), (1.5, 1, 2), (7.0, 2, 4)])
def test_a_guidance_of_1_or_less_runs_no_unconditional_half(client, engine, guidance, n, batch):
    model = engine.models.get(engine.catalog.resolve(None))
    batches = []
    hook = model.txt2img.unet.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    try:
        generate(client, sampler="lcm", guidance=guidance, n=n)
    finally:
        hook.remove()
    assert batches == [batch] * 4  # each of the 4 steps: the pictures, and as many unconditional ones above 1


def test_lcm_is_listed_and_draws_in_four_steps_at_guidance_1(client, engine):
    assert "lcm" in client.get("/samplers").get_json()["samplers"]
    result = generate(client, sampler="lcm", guidance=1.0)
    assert "Sampler: LCM" in decode_png(result["img"]).info["parameters"]
    model = engine.models.get(engine.catalog.resolve(None))
    assert type(model.txt2img.scheduler).__name__ == "LCMScheduler"
