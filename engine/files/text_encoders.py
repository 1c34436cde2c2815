"""The text encoders of the newer families, as people download them (ComfyUI's split files, or inside an all-in-one
checkpoint): recognising Qwen3, T5-XXL and CLIP-L in a file's header, and loading one into its transformers model,
built from a shipped config with the architecture numbers read from the file."""

import json
import re
from pathlib import Path

import torch
import transformers
from diffusers.hooks import apply_layerwise_casting_hook

from engine.errors import ImagineError
from engine.files.headers import Part
from engine.files.scaled_fp8 import dequantised, kept_dtype
from engine.files.tensors import FP8_DTYPES, block_count, check_tensors, check_widths, tensor_slices

QWEN3_VOCAB = 151936  # every Qwen3 size shares this vocabulary (151643 BPE tokens, specials, padding)
T5_VOCAB = 32128  # T5 v1.1's 32100 pieces and extra ids, padded to a multiple of 128
CLIP_VOCAB = 49408
CLIP_G_WIDTH = 1280  # OpenCLIP ViT-bigG shares CLIP-L's layout: no family here uses it

# Anchors: the embedding each encoder type starts from (RECOGNISERS), and a tensor its recogniser reads beside it:
# Qwen3's q_norm and T5's gated feed-forward tell them from Qwen2.5 and T5 v1.0, CLIP's attention tells a text
# model from a vision one.
QWEN3_EMBEDDING, QWEN3_QK_NORM = "model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight"
T5_EMBEDDING, T5_GATED_FF = "shared.weight", "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
CLIP_EMBEDDING = "text_model.embeddings.token_embedding.weight"
CLIP_ATTENTION = "text_model.encoder.layers.0.self_attn.q_proj.weight"

# Tensors some published files carry that the encoder model has no place for, and needs none:
# Qwen3's language-model head (tied to the embedding; only the hidden states are used), T5's second copy of the
# embedding (the model ties it to `shared`), CLIP's projection and logit scale (FLUX.1 uses the pooled output).
UNUSED_TENSORS = {
    "qwen3": {"lm_head.weight"},
    "t5-xxl": {"encoder.embed_tokens.weight"},
    "clip-l": {"text_projection.weight", "logit_scale", "text_model.embeddings.position_ids"},
}

# transformers' config names for each number a recogniser reports.
CONFIG_NAMES = {
    "qwen3": {
        "width": "hidden_size",
        "depth": "num_hidden_layers",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "head_dim": "head_dim",
        "intermediate": "intermediate_size",
        "vocab": "vocab_size",
    },
    "t5-xxl": {
        "width": "d_model",
        "depth": "num_layers",
        "heads": "num_heads",
        "head_dim": "d_kv",
        "intermediate": "d_ff",
        "vocab": "vocab_size",
    },
    "clip-l": {
        "width": "hidden_size",
        "depth": "num_hidden_layers",
        "intermediate": "intermediate_size",
        "vocab": "vocab_size",
        "positions": "max_position_embeddings",
    },
}

MODEL_CLASSES = {
    "qwen3": transformers.Qwen3Model,
    "t5-xxl": transformers.T5EncoderModel,
    "clip-l": transformers.CLIPTextModel,
}

# What the strict load says of a file whose tensors do not fit the model (check_tensors), naming each tensor as the
# published file does (_file_name).
REFUSALS = {
    "missing": "the text encoder file lacks the tensor {name}",
    "unexpected": "the text encoder file has an unexpected tensor {name}",
    "shape": "the text encoder file's tensor {name} is {shape}, not {expected}",
}

# Layers kept in the compute dtype even where the file stores them in fp8: embeddings (a model's `.dtype` is its first
# parameter's, which the pipelines cast prompt embeddings to) and T5's `wo` (T5 casts the activations to its dtype).
COMPUTE_DTYPE_LAYERS = re.compile(r"embed_tokens$|shared$|embeddings\.|\.wo$")


def recognise_text_encoders(header: dict) -> list[Part]:
    """Every Qwen3, T5-XXL and CLIP-L text encoder in a header, in a file of its own (prefix "") or in an all-in-one
    checkpoint (ComfyUI's `text_encoders.<name>.transformer.` prefixes); recognised by layout and vocabulary, so a
    file of any width or depth is found, with those numbers read from its shapes. One that lacks a tensor its layout
    has, or has numbers no model has, is refused (422): a damaged file."""
    parts = []
    for name in sorted(header):
        for anchor, recognise in RECOGNISERS:
            prefix = name[: -len(anchor)]
            if name.endswith(anchor) and _is_text_encoder_prefix(prefix):
                part = _recognised(recognise, header, prefix)
                if part is not None:
                    parts.append(part)
    return parts


def _recognised(recognise, header: dict, prefix: str) -> Part | None:
    try:
        part = recognise(header, prefix)
    except KeyError as error:
        raise ImagineError(f"the file's text encoder lacks its tensor {error.args[0]}: a damaged file", 422) from None
    except (ValueError, ZeroDivisionError):  # a shape of other dimensions, a norm of width 0
        shapes = "the file's text encoder has tensors of shapes no text encoder has"
        raise ImagineError(f"{shapes}: a damaged file", 422) from None
    if part is not None:
        check_widths(part.numbers, "text encoder")
    return part


def inner_layers(depth: int) -> tuple:
    """The Qwen3 hidden states FLUX.2 klein conditions on: a quarter, half and three quarters of the way up."""
    return (depth // 4, depth // 2, 3 * depth // 4)


def load_text_encoder(path: Path, part: Part, config_dir: Path, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """The text encoder `part` of the file at `path`, built from the config.json in `config_dir` with every number in
    `part.numbers` put in its place, and loaded strictly (a missing or unexpected tensor is refused, naming it). An
    fp8 file's weights stay fp8 in memory and are cast to `dtype` layer by layer as they run (a scaled fp8 file's
    are multiplied by their scales on loading: engine/files/scaled_fp8.py). T5's
    `encoder.embed_tokens` is tied to the `shared` embedding the file stores (transformers ties it on loading)."""
    config = _config_with_numbers(config_dir, part)
    # Slices, read only as each tensor is put in place (a scaled fp8 weight as it is multiplied out).
    with tensor_slices(path, part.prefix) as tensors:
        state = _model_state(dequantised(tensors, kept_dtype(dtype)), part.type)
        model = _load_strictly(MODEL_CLASSES[part.type], config, state, dtype, part.type)
    _keep_weights_stored(model, _stored_dtypes(state, dtype), dtype)
    return model.eval().requires_grad_(False)


def _is_text_encoder_prefix(prefix: str) -> bool:
    # An SD checkpoint's CLIP (`cond_stage_model.`, `conditioner.`) belongs to its own family's loader.
    return prefix == "" or prefix.startswith("text_encoders.")


def _recognise_qwen3(header: dict, prefix: str) -> Part | None:
    vocab, width = header[prefix + QWEN3_EMBEDDING].shape
    if vocab != QWEN3_VOCAB or prefix + QWEN3_QK_NORM not in header:
        return None  # Qwen2.5 and other Llama-like models have no q_norm
    layer = prefix + "model.layers.0."
    head_dim = header[layer + "self_attn.q_norm.weight"].shape[0]
    numbers = {
        "width": width,
        "depth": block_count(header, prefix + "model.layers.", "self_attn.q_proj.weight"),
        "heads": header[layer + "self_attn.q_proj.weight"].shape[0] // head_dim,
        "kv_heads": header[layer + "self_attn.k_proj.weight"].shape[0] // head_dim,
        "head_dim": head_dim,
        "intermediate": header[layer + "mlp.gate_proj.weight"].shape[0],
        "vocab": vocab,
        "dtype": header[layer + "self_attn.q_proj.weight"].dtype,
    }
    return Part("text_encoder", "qwen3", prefix, numbers)


def _recognise_t5(header: dict, prefix: str) -> Part | None:
    vocab, width = header[prefix + T5_EMBEDDING].shape
    if vocab != T5_VOCAB or prefix + T5_GATED_FF not in header:
        return None  # T5 v1.0 (no gated feed-forward), UMT5 (another vocabulary), or not a T5 at all
    block = prefix + "encoder.block.0.layer."
    heads = header[block + "0.SelfAttention.relative_attention_bias.weight"].shape[1]
    numbers = {
        "width": width,
        "depth": block_count(header, prefix + "encoder.block.", "layer.0.SelfAttention.q.weight"),
        "heads": heads,
        "head_dim": header[block + "0.SelfAttention.q.weight"].shape[0] // heads,
        "intermediate": header[block + "1.DenseReluDense.wi_0.weight"].shape[0],
        "vocab": vocab,
        "dtype": header[block + "0.SelfAttention.q.weight"].dtype,
    }
    return Part("text_encoder", "t5-xxl", prefix, numbers)


def _recognise_clip_l(header: dict, prefix: str) -> Part | None:
    vocab, width = header[prefix + CLIP_EMBEDDING].shape
    if vocab != CLIP_VOCAB or width == CLIP_G_WIDTH or prefix + CLIP_ATTENTION not in header:
        return None
    # CLIP's shapes do not tell its head count (64-wide heads in every released CLIP): the config's stays.
    numbers = {
        "width": width,
        "depth": block_count(header, prefix + "text_model.encoder.layers.", "self_attn.q_proj.weight"),
        "intermediate": header[prefix + "text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "vocab": vocab,
        "positions": header[prefix + "text_model.embeddings.position_embedding.weight"].shape[0],
        "dtype": header[prefix + CLIP_ATTENTION].dtype,
    }
    return Part("text_encoder", "clip-l", prefix, numbers)


RECOGNISERS = (
    (QWEN3_EMBEDDING, _recognise_qwen3),
    (T5_EMBEDDING, _recognise_t5),
    (CLIP_EMBEDDING, _recognise_clip_l),
)


def _config_with_numbers(config_dir: Path, part: Part) -> transformers.PretrainedConfig:
    values = json.loads((Path(config_dir) / "config.json").read_text())
    for number, config_name in CONFIG_NAMES[part.type].items():
        if number in part.numbers:
            values[config_name] = part.numbers[number]
    if part.type == "qwen3":
        # Per-layer lists follow the depth: built afresh from it rather than kept at the shipped config's length.
        values.pop("layer_types", None)
        values["max_window_layers"] = values["num_hidden_layers"]
    # from_dict runs the config's own __init__, which derives what depends on these numbers.
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values)


def _file_name(key: str, encoder_type: str) -> str:
    """The name a model's tensor has in the published file (for messages)."""
    return {"qwen3": "model.", "clip-l": "text_model."}.get(encoder_type, "") + key


def _model_state(tensors: dict, encoder_type: str) -> dict:
    """The file's tensors under the names the transformers model gives them."""
    state = {}
    for name, tensor in tensors.items():
        if name in UNUSED_TENSORS[encoder_type]:
            continue
        if encoder_type == "qwen3" and name.startswith("model."):
            name = name[len("model.") :]
        elif encoder_type == "clip-l" and name.startswith("text_model."):
            name = name[len("text_model.") :]  # transformers 5 dropped CLIPTextModel's `text_model.` level
        state[name] = tensor  # any other name stays as it is, and loading refuses it as unexpected
    return state


def _load_strictly(model_class, config, state: dict, dtype: torch.dtype, encoder_type: str):
    """The model with exactly the tensors in `state`: checked here, before loading, because transformers only warns
    about missing tensors (and leaves them random)."""
    expected = _expected_tensors(model_class, config)
    check_tensors(state, expected, REFUSALS, name=lambda key: _file_name(key, encoder_type))
    return model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)


def _expected_tensors(model_class, config) -> dict:
    """{name: tensor on the meta device} of every tensor the model loads, less those tied to another (T5's
    `encoder.embed_tokens`)."""
    with torch.device("meta"):
        model = model_class(config)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    return {name: tensor for name, tensor in model.state_dict().items() if name not in tied}


def _stored_dtypes(state: dict, compute_dtype: torch.dtype) -> dict:
    """{model name: dtype} of the weights kept narrower than `compute_dtype` in memory: those the file stores in fp8
    (slices), and scaled fp8 weights multiplied out into bfloat16 beside float32 (tensors:
    engine/files/scaled_fp8.py)."""
    stored = {}
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            if tensor.dtype.itemsize < compute_dtype.itemsize:
                stored[name] = tensor.dtype
        elif tensor.get_dtype() in FP8_DTYPES:
            stored[name] = FP8_DTYPES[tensor.get_dtype()]
    return stored


def _keep_weights_stored(model, stored: dict, compute_dtype: torch.dtype) -> None:
    """Store each layer whose weight is kept narrower (_stored_dtypes) in that dtype again (fp8: half the memory of
    bf16), cast to `compute_dtype` only while it runs. The weights passed through `compute_dtype` on loading: exact
    for fp8 and bf16 values."""
    for name, module in model.named_modules():
        storage_dtype = stored.get(name + ".weight")
        if storage_dtype is not None and not COMPUTE_DTYPE_LAYERS.search(name):
            apply_layerwise_casting_hook(module, storage_dtype, compute_dtype, non_blocking=False)
