"""Text encoders, VAEs and tokenizers of Z-Image, FLUX.2 klein and FLUX.1: the files people download are recognised
(alone or inside an all-in-one checkpoint), load strictly into the models diffusers' pipelines call, and the shipped
tokenizers give the published token ids. Tiny random models in the original layouts stand in for the real files;
full-size shapes are checked on the `meta` device."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from diffusers import AutoencoderKL, AutoencoderKLFlux2, Flux2KleinPipeline, ZImagePipeline
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusion_model_files import nvfp4_tensors, scaled_fp8_tensors
from ldm_checkpoint import _vae_prefixes
from safetensors.torch import save_file

from engine.errors import ImagineError
from engine.files import text_encoders, vaes
from engine.files.headers import Tensor, read_header
from tests import encoder_files

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QWEN3_PREFIX = "text_encoders.qwen3_4b.transformer."
CLIP_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
CHAT_PROMPT = "<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n"

# encoder type -> (its tiny tensors, the folder of its config)
ENCODERS = {
    "qwen3": (encoder_files.qwen3_tensors, "z-image/text_encoder"),
    "t5-xxl": (encoder_files.t5_tensors, "flux1-dev/text_encoder_2"),
    "clip-l": (encoder_files.clip_l_tensors, "flux1-dev/text_encoder"),
}


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("configs")
    encoder_files.write_tiny_encoder_configs(folder)
    return folder


def save(tmp_path: Path, name: str, tensors: dict, prefix: str = "") -> Path:
    path = tmp_path / name
    save_file({prefix + key: value.contiguous() for key, value in tensors.items()}, path)
    return path


def header_of(model_state: dict, rename=lambda name: name) -> dict:
    """A header of full-size shapes, as read_header gives it, from a model built on `meta`."""
    return {rename(name): Tensor(tuple(tensor.shape), "BF16") for name, tensor in model_state.items()}


# Recognition


def test_a_qwen3_file_is_found_alone_and_in_an_all_in_one_checkpoint(tmp_path):
    tensors = encoder_files.qwen3_tensors()
    alone = text_encoders.recognise_text_encoders(read_header(save(tmp_path, "qwen_3_4b.safetensors", tensors)))
    merged = save(tmp_path, "aio.safetensors", tensors | encoder_files.ae_tensors(), QWEN3_PREFIX)
    inside = text_encoders.recognise_text_encoders(read_header(merged))
    numbers = {"width": 32, "depth": 4, "heads": 2, "kv_heads": 1, "head_dim": 16, "intermediate": 64, "vocab": 151936}
    assert [(p.kind, p.type, p.prefix) for p in alone] == [("text_encoder", "qwen3", "")]
    assert [(p.type, p.prefix) for p in inside] == [("qwen3", QWEN3_PREFIX)]
    assert alone[0].numbers == numbers | {"dtype": "BF16"}


def test_flux1_checkpoint_shows_both_its_text_encoders(tmp_path):
    tensors = {CLIP_PREFIX + k: v for k, v in encoder_files.clip_l_tensors().items()}
    tensors |= {T5_PREFIX + k: v for k, v in encoder_files.t5_tensors().items()}
    tensors |= {"vae." + k: v for k, v in encoder_files.ae_tensors().items()}
    parts = text_encoders.recognise_text_encoders(read_header(save(tmp_path, "flux1-dev-aio.safetensors", tensors)))
    assert sorted((p.type, p.prefix) for p in parts) == [("clip-l", CLIP_PREFIX), ("t5-xxl", T5_PREFIX)]
    t5 = next(p for p in parts if p.type == "t5-xxl")
    assert t5.numbers == {"width": 32, "depth": 2, "heads": 2, "head_dim": 16, "intermediate": 64, "vocab": 32128} | {
        "dtype": "BF16"
    }


def test_files_of_other_kinds_show_no_text_encoder(tmp_path):
    sd_clip = save(tmp_path, "sd.safetensors", encoder_files.clip_l_tensors(), "cond_stage_model.transformer.")
    assert text_encoders.recognise_text_encoders(read_header(sd_clip)) == []
    assert (
        text_encoders.recognise_text_encoders(read_header(save(tmp_path, "ae.safetensors", encoder_files.ae_tensors())))
        == []
    )
    no_qk_norm = {k: v for k, v in encoder_files.qwen3_tensors().items() if "_norm" not in k}  # Qwen2.5-like
    assert text_encoders.recognise_text_encoders(read_header(save(tmp_path, "qwen25.safetensors", no_qk_norm))) == []


def test_full_size_encoders_are_recognised_with_their_published_numbers():
    def shipped_config(folder):
        return transformers.AutoConfig.from_pretrained(CONFIGS / folder, local_files_only=True)

    with torch.device("meta"):
        qwen = transformers.Qwen3Model(shipped_config("z-image/text_encoder"))
        qwen_8b_config = shipped_config("z-image/text_encoder")
        qwen_8b_config.hidden_size, qwen_8b_config.intermediate_size = 4096, 12288  # Qwen3-8B, FLUX.2 klein 9B's
        qwen_8b = transformers.Qwen3Model(qwen_8b_config)
        t5 = transformers.T5EncoderModel(shipped_config("flux1-dev/text_encoder_2"))
    (qwen_4b_part,) = text_encoders.recognise_text_encoders(header_of(qwen.state_dict(), lambda n: "model." + n))
    (qwen_8b_part,) = text_encoders.recognise_text_encoders(header_of(qwen_8b.state_dict(), lambda n: "model." + n))
    t5_state = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    (t5_part,) = text_encoders.recognise_text_encoders(header_of(t5_state))
    qwen_numbers = {"depth": 36, "heads": 32, "kv_heads": 8, "head_dim": 128, "vocab": 151936, "dtype": "BF16"}
    assert qwen_4b_part.numbers == qwen_numbers | {"width": 2560, "intermediate": 9728}
    assert qwen_8b_part.numbers == qwen_numbers | {"width": 4096, "intermediate": 12288}
    assert t5_part.numbers == {"width": 4096, "depth": 24, "heads": 64, "head_dim": 64, "intermediate": 10240} | {
        "vocab": 32128,
        "dtype": "BF16",
    }


# Loading


@pytest.mark.parametrize("encoder_type", sorted(ENCODERS))
def test_each_text_encoder_loads_the_file_weights_and_runs(tmp_path, tiny_configs, encoder_type):
    make, folder = ENCODERS[encoder_type]
    tensors = make()
    path = save(tmp_path, f"{encoder_type}.safetensors", tensors)
    (part,) = text_encoders.recognise_text_encoders(read_header(path))
    model = text_encoders.load_text_encoder(path, part, tiny_configs / folder, torch.bfloat16)
    assert type(model) is text_encoders.MODEL_CLASSES[encoder_type]
    state = model.state_dict()
    for name, tensor in tensors.items():
        if name not in text_encoders.UNUSED_TENSORS[encoder_type]:
            loaded = state[text_encoders._model_state({name: tensor}, encoder_type).popitem()[0]]
            assert torch.equal(loaded.float(), tensor.float()), name
    output = model(input_ids=torch.tensor([[5, 17, 300]]), output_hidden_states=True)
    assert output.last_hidden_state.shape == (1, 3, 32)
    assert torch.isfinite(output.last_hidden_state.float()).all()


@pytest.mark.parametrize("encoder_type", sorted(ENCODERS))
def test_a_loaded_text_encoder_computes_what_transformers_own_model_does(tmp_path, tiny_configs, encoder_type):
    make, folder = ENCODERS[encoder_type]
    tensors = make(torch.float32)
    path = save(tmp_path, f"{encoder_type}.safetensors", tensors, f"text_encoders.{encoder_type}.transformer.")
    (part,) = text_encoders.recognise_text_encoders(read_header(path))
    model = text_encoders.load_text_encoder(path, part, tiny_configs / folder, torch.float32)
    config = transformers.AutoConfig.from_pretrained(tiny_configs / folder, local_files_only=True)
    reference = text_encoders.MODEL_CLASSES[encoder_type](config).eval()
    reference.load_state_dict(text_encoders._model_state(tensors, encoder_type), strict=False)  # T5: tied, CLIP: extras
    ids = torch.tensor([[49406, 320, 1125, 49407]]) % config.vocab_size
    with torch.no_grad():
        expected, got = reference(input_ids=ids), model(input_ids=ids)
    assert torch.allclose(got.last_hidden_state, expected.last_hidden_state, atol=1e-6)


def test_t5_looks_up_tokens_in_the_one_stored_embedding(tmp_path, tiny_configs):
    path = save(tmp_path, "t5xxl_fp16.safetensors", encoder_files.t5_tensors(), T5_PREFIX)
    (part,) = text_encoders.recognise_text_encoders(read_header(path))
    model = text_encoders.load_text_encoder(path, part, tiny_configs / "flux1-dev/text_encoder_2", torch.bfloat16)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert model.shared.weight.device.type == "cpu"
    assert torch.equal(model.shared.weight, encoder_files.t5_tensors()["shared.weight"])


def test_a_file_missing_a_tensor_is_refused_naming_it(tmp_path, tiny_configs):
    tensors = encoder_files.qwen3_tensors()
    del tensors["model.layers.1.mlp.up_proj.weight"]
    path = save(tmp_path, "secret-name.safetensors", tensors)
    (part,) = text_encoders.recognise_text_encoders(read_header(path))
    with pytest.raises(ImagineError) as refused:
        text_encoders.load_text_encoder(path, part, tiny_configs / "z-image/text_encoder", torch.bfloat16)
    assert refused.value.status == 422
    assert "model.layers.1.mlp.up_proj.weight" in refused.value.message
    assert "secret-name" not in refused.value.message


def test_a_file_with_an_unknown_tensor_is_refused_naming_it(tmp_path, tiny_configs):
    tensors = encoder_files.t5_tensors() | {"encoder.block.0.layer.0.SelfAttention.extra.weight": torch.zeros(2)}
    path = save(tmp_path, "t5.safetensors", tensors)
    (part,) = text_encoders.recognise_text_encoders(read_header(path))
    with pytest.raises(ImagineError, match="encoder.block.0.layer.0.SelfAttention.extra.weight"):
        text_encoders.load_text_encoder(path, part, tiny_configs / "flux1-dev/text_encoder_2", torch.bfloat16)


def test_klein_conditions_on_three_inner_qwen3_layers():
    assert text_encoders.inner_layers(36) == (9, 18, 27)
    assert text_encoders.inner_layers(4) == (1, 2, 3)


def test_a_deeper_qwen3_loads_with_its_own_depth_from_the_shipped_4b_config(tmp_path):
    tensors = encoder_files.qwen3_tensors()
    for name in [n for n in tensors if n.startswith("model.layers.")]:
        number = int(name.split(".")[2])
        tensors[name.replace(f"model.layers.{number}.", f"model.layers.{number + 4}.")] = tensors[name].clone()
    path = save(tmp_path, "qwen_3_8_layers.safetensors", tensors)
    (part,) = text_encoders.recognise_text_encoders(read_header(path))
    assert part.numbers["depth"] == 8
    model = text_encoders.load_text_encoder(path, part, CONFIGS / "z-image/text_encoder", torch.bfloat16)
    assert len(model.layers) == 8 and model.config.hidden_size == 32
    hidden = model(input_ids=torch.tensor([[1, 2]]), output_hidden_states=True, use_cache=False).hidden_states
    assert len(hidden) == 9
    assert [hidden[i].shape for i in text_encoders.inner_layers(8)] == [(1, 2, 32)] * 3


def test_an_fp8_text_encoder_keeps_its_weights_fp8_and_computes_in_bf16(tmp_path, tiny_configs):
    tensors = {
        name: tensor.to(torch.float8_e4m3fn) if name.endswith("proj.weight") else tensor
        for name, tensor in encoder_files.qwen3_tensors().items()
    }
    path = save(tmp_path, "qwen_3_4b_fp8_e4m3fn.safetensors", tensors)
    (part,) = text_encoders.recognise_text_encoders(read_header(path))
    assert part.numbers["dtype"] == "F8_E4M3"
    model = text_encoders.load_text_encoder(path, part, tiny_configs / "z-image/text_encoder", torch.bfloat16)
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    assert model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert model.dtype == torch.bfloat16
    output = model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
    assert output.dtype == torch.bfloat16 and torch.isfinite(output.float()).all()


def test_an_all_fp8_t5_runs_keeping_its_embedding_and_wo_in_bf16(tmp_path, tiny_configs):
    tensors = {
        name: tensor if "layer_norm" in name else tensor.to(torch.float8_e4m3fn)
        for name, tensor in encoder_files.t5_tensors().items()
    }
    path = save(tmp_path, "t5xxl_fp8_e4m3fn.safetensors", tensors)
    (part,) = text_encoders.recognise_text_encoders(read_header(path))
    model = text_encoders.load_text_encoder(path, part, tiny_configs / "flux1-dev/text_encoder_2", torch.bfloat16)
    feed_forward = model.encoder.block[0].layer[1].DenseReluDense
    assert feed_forward.wi_0.weight.dtype == torch.float8_e4m3fn and feed_forward.wo.weight.dtype == torch.bfloat16
    assert model.dtype == torch.bfloat16 and model.shared.weight.dtype == torch.bfloat16
    output = model(input_ids=torch.tensor([[8774, 296, 1]])).last_hidden_state
    assert output.dtype == torch.bfloat16 and torch.isfinite(output.float()).all()


def test_a_scaled_fp8_t5_loads_with_its_scales_applied(tmp_path, tiny_configs):
    tensors = encoder_files.t5_tensors(torch.float32)
    scaled = scaled_fp8_tensors(tensors, lambda name, _: name.endswith("DenseReluDense.wi_0.weight"), "older")
    path = save(tmp_path, "t5xxl_fp8_e4m3fn_scaled.safetensors", scaled, T5_PREFIX)
    (part,) = text_encoders.recognise_text_encoders(read_header(path))
    model = text_encoders.load_text_encoder(path, part, tiny_configs / "flux1-dev/text_encoder_2", torch.float32)
    loaded = model.encoder.block[1].layer[1].DenseReluDense.wi_0.weight
    assert loaded.dtype == torch.bfloat16  # multiplied out, kept at half the compute dtype's size
    expected = tensors["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"]
    assert torch.allclose(loaded.float(), expected, rtol=0.07, atol=1e-4)
    output = model(input_ids=torch.tensor([[8774, 296, 1]])).last_hidden_state
    assert output.dtype == torch.float32 and torch.isfinite(output).all()


def test_a_comfyui_mixed_precision_qwen3_loads_with_its_scales_applied_and_encodes_as_the_bf16_file(
    tmp_path, tiny_configs
):
    # qwen_3_8b_fp8mixed.safetensors' layout: the layers' matrices in fp8 beside their scales, the embedding in bf16
    tensors = encoder_files.qwen3_tensors()
    mixed = scaled_fp8_tensors(tensors, lambda name, _: ".layers." in name and name.endswith("proj.weight"))
    path = save(tmp_path, "qwen_3_8b_fp8mixed.safetensors", mixed)
    plain = save(tmp_path, "qwen_3_4b.safetensors", tensors)
    config = tiny_configs / "z-image/text_encoder"
    encoders = []
    for file in (path, plain):
        (part,) = text_encoders.recognise_text_encoders(read_header(file))
        encoders.append(text_encoders.load_text_encoder(file, part, config, torch.float32))
    mixed_model, plain_model = encoders
    assert mixed_model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    ids = torch.tensor([[9707, 1879, 151645]])
    mixed_output = mixed_model(input_ids=ids).last_hidden_state
    plain_output = plain_model(input_ids=ids).last_hidden_state
    # fp8 keeps 3 bits of mantissa: near the bf16 file's output, nowhere near another prompt's
    other = plain_model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
    assert (mixed_output - plain_output).abs().mean() < (other - plain_output).abs().mean() / 4


def test_an_nvfp4_qwen3_is_refused_naming_its_format(tmp_path, tiny_configs):
    tensors = encoder_files.qwen3_tensors()
    packed = nvfp4_tensors(tensors, lambda name, _: ".layers." in name and name.endswith("proj.weight"))
    path = save(tmp_path, "qwen_3_4b_nvfp4.safetensors", packed)
    (part,) = text_encoders.recognise_text_encoders(read_header(path))
    with pytest.raises(ImagineError) as refused:
        text_encoders.load_text_encoder(path, part, tiny_configs / "z-image/text_encoder", torch.float32)
    assert refused.value.status == 422 and "one per block (ComfyUI's nvfp4 format)" in refused.value.message


def test_full_size_text_encoder_configs_build_the_published_models():
    def parameters(model_class, folder):
        config = transformers.AutoConfig.from_pretrained(CONFIGS / folder, local_files_only=True)
        with torch.device("meta"):
            return sum(p.numel() for p in model_class(config).parameters())

    assert parameters(transformers.Qwen3Model, "z-image/text_encoder") == 4_022_468_096  # Qwen3-4B, no LM head
    assert parameters(transformers.Qwen3Model, "flux2-klein/text_encoder") == 4_022_468_096
    assert parameters(transformers.T5EncoderModel, "flux1-dev/text_encoder_2") == 4_762_310_656  # T5-XXL encoder
    assert parameters(transformers.CLIPTextModel, "flux1-schnell/text_encoder") == 123_060_480  # CLIP ViT-L/14


# VAEs


@pytest.mark.parametrize("prefix", ["", "vae."])
def test_vaes_are_found_by_their_latent_channels(tmp_path, prefix):
    ae = vaes.recognise_vae(read_header(save(tmp_path, "ae.safetensors", encoder_files.ae_tensors(), prefix)))
    flux2 = vaes.recognise_vae(read_header(save(tmp_path, "f2.safetensors", encoder_files.flux2_vae_tensors(), prefix)))
    assert (ae.kind, ae.type, ae.prefix) == ("vae", "ae", prefix)
    assert (flux2.type, flux2.prefix) == ("flux2-vae", prefix)
    assert ae.numbers == {"latent_channels": 16, "block_out_channels": (16, 32, 32, 32), "layers_per_block": 1} | {
        "dtype": "BF16"
    }
    assert flux2.numbers["latent_channels"] == 32


def test_an_sd_vae_or_a_text_encoder_is_no_vae_of_these_families(tmp_path):
    sd_vae = {"decoder.conv_in.weight": Tensor((512, 4, 3, 3), "F16"), "encoder.down.0.block.0.conv1.weight": None}
    assert vaes.recognise_vae(sd_vae) is None
    assert vaes.recognise_vae(read_header(save(tmp_path, "t5.safetensors", encoder_files.t5_tensors()))) is None


def test_full_size_ae_is_recognised_and_its_config_builds_the_published_model():
    config = AutoencoderKL.load_config(CONFIGS / "flux1-dev/vae")
    with torch.device("meta"):
        ae = AutoencoderKL.from_config(config)
        flux2 = AutoencoderKLFlux2.from_config(AutoencoderKLFlux2.load_config(CONFIGS / "flux2-klein/vae"))
    assert sum(p.numel() for p in ae.parameters()) == 83_819_683
    assert sum(p.numel() for p in flux2.parameters()) == 84_046_115
    assert (ae.config.scaling_factor, ae.config.shift_factor) == (0.3611, 0.1159)
    assert AutoencoderKL.load_config(CONFIGS / "z-image/vae") == config
    pairs = _vae_prefixes(ae.config)
    header = {}
    for name, tensor in ae.state_dict().items():
        old, new, _ = next(p for p in pairs if name.startswith(p[0]))
        header[new + name[len(old) :]] = Tensor(tuple(tensor.shape), "BF16")
    part = vaes.recognise_vae(header)
    assert part.numbers["block_out_channels"] == (128, 256, 512, 512) and part.numbers["layers_per_block"] == 2


def test_ae_loads_as_diffusers_own_converter_reads_it(tmp_path, tiny_configs):
    tensors = encoder_files.ae_tensors(torch.float32)
    path = save(tmp_path, "ae.safetensors", tensors, "vae.")
    part = vaes.recognise_vae(read_header(path))
    vae = vaes.load_vae(path, part, tiny_configs / "z-image/vae", torch.float32)
    assert type(vae) is AutoencoderKL and vae.config.latent_channels == 16
    reference = convert_ldm_vae_checkpoint(tensors, vae.config)
    state = vae.state_dict()
    assert set(reference) == set(state)
    assert all(torch.equal(state[name], tensor.reshape(state[name].shape)) for name, tensor in reference.items())
    picture = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = vae.encode(picture).latent_dist.mode()
    assert latents.shape == (1, 16, 8, 8) and vae.decode(latents).sample.shape == (1, 3, 64, 64)


def test_flux2_vae_loads_with_its_batch_norm_statistics(tmp_path, tiny_configs):
    tensors = encoder_files.flux2_vae_tensors(torch.float32)
    path = save(tmp_path, "flux2-vae.safetensors", tensors)
    part = vaes.recognise_vae(read_header(path))
    vae = vaes.load_vae(path, part, tiny_configs / "flux2-klein/vae", torch.float32)
    assert type(vae) is AutoencoderKLFlux2
    assert torch.equal(vae.bn.running_var, tensors["bn.running_var"]) and vae.bn.running_var.shape == (128,)
    assert torch.equal(vae.quant_conv.weight, tensors["encoder.quant_conv.weight"])
    assert torch.equal(vae.post_quant_conv.weight, tensors["decoder.post_quant_conv.weight"])
    latents = vae.encode(torch.rand(1, 3, 64, 64)).latent_dist.mode()
    assert latents.shape == (1, 32, 8, 8) and vae.decode(latents).sample.shape == (1, 3, 64, 64)


def test_a_vae_file_missing_a_tensor_is_refused(tmp_path, tiny_configs):
    tensors = encoder_files.ae_tensors()
    del tensors["decoder.up.0.block.1.conv2.weight"]
    path = save(tmp_path, "ae.safetensors", tensors)
    with pytest.raises(ImagineError, match="decoder.up_blocks.3.resnets.1.conv2.weight") as refused:
        vaes.load_vae(path, vaes.recognise_vae(read_header(path)), tiny_configs / "flux1-dev/vae", torch.float32)
    assert refused.value.status == 422


# Tokenizers


def test_qwen3_tokenizer_gives_the_published_ids():
    for family in ("z-image", "flux2-klein"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(CONFIGS / family / "tokenizer", local_files_only=True)
        assert tokenizer("Hello world").input_ids == [9707, 1879]
        assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<think>", "</think>"]) == [
            151644,
            151645,
            151667,
            151668,
        ]
        assert tokenizer.pad_token_id == 151643 and len(tokenizer) == 151669


def test_qwen3_chat_template_renders_as_the_pipelines_call_it():
    tokenizer = transformers.AutoTokenizer.from_pretrained(CONFIGS / "z-image/tokenizer", local_files_only=True)
    messages = [{"role": "user", "content": "a red fox"}]
    thinking = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert thinking == CHAT_PROMPT  # Z-Image
    assert plain == thinking + "<think>\n\n</think>\n\n"  # FLUX.2 klein
    assert tokenizer(plain).input_ids[-4:] == [151667, 271, 151668, 271]


def test_the_pipelines_encode_prompts_with_the_shipped_tokenizer_and_a_loaded_qwen3(tmp_path, tiny_configs):
    path = save(tmp_path, "qwen_3_4b.safetensors", encoder_files.qwen3_tensors())
    (part,) = text_encoders.recognise_text_encoders(read_header(path))
    encoder = text_encoders.load_text_encoder(path, part, tiny_configs / "z-image/text_encoder", torch.bfloat16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(CONFIGS / "z-image/tokenizer", local_files_only=True)
    z_image = SimpleNamespace(tokenizer=tokenizer, text_encoder=encoder, _execution_device=torch.device("cpu"))
    (embeddings,) = ZImagePipeline._encode_prompt(z_image, "a red fox", max_sequence_length=64)
    assert embeddings.shape == (len(tokenizer(CHAT_PROMPT).input_ids), 32)  # the prompt's tokens, padding dropped
    klein = Flux2KleinPipeline._get_qwen3_prompt_embeds(
        encoder, tokenizer, "a red fox", max_sequence_length=64, hidden_states_layers=text_encoders.inner_layers(4)
    )
    assert klein.shape == (1, 64, 3 * 32)


def test_flux1_tokenizers_give_the_published_ids():
    for family in ("flux1-dev", "flux1-schnell"):
        t5 = transformers.AutoTokenizer.from_pretrained(CONFIGS / family / "tokenizer_2", local_files_only=True)
        clip = transformers.AutoTokenizer.from_pretrained(CONFIGS / family / "tokenizer", local_files_only=True)
        assert t5("Hello world").input_ids == [8774, 296, 1]
        assert t5("x", padding="max_length", max_length=512).input_ids[-1] == 0  # pads with <pad>, as FluxPipeline
        assert clip("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_shared_config_files_are_one_copy():
    for link in [
        "flux2-klein/tokenizer/vocab.json",
        "flux2-klein/text_encoder/config.json",
        "flux1-dev/tokenizer/merges.txt",
        "flux1-schnell/tokenizer_2/tokenizer.json",
        "flux1-schnell/text_encoder_2/config.json",
        "z-image/vae/config.json",
    ]:
        assert (CONFIGS / link).is_symlink(), link
        assert not Path((CONFIGS / link).readlink()).is_absolute()
    assert json.loads((CONFIGS / "z-image/tokenizer/tokenizer_config.json").read_text())["tokenizer_class"] == (
        "Qwen2Tokenizer"
    )
