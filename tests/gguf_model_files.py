"""GGUF files of the tiny diffusion models (tests/diffusion_model_files.py), written with the `gguf` package as
ComfyUI-GGUF's convert.py writes the published ones: the original key names, `general.architecture` "flux" (FLUX.1
and FLUX.2) or "lumina2" (Z-Image), the weight matrices in the quant type asked for where their rows fit its blocks,
everything else (biases, norms, pad tokens, rows too short for the blocks) in F32. gguf-py quantizes Q8_0, Q5_0,
Q4_0, Q5_1, Q4_1, BF16 and F16 itself; the K-quants and IQ4 types, which it only reads, are written as random
blocks with sound scales, so that their values are what gguf-py's own dequantize reads from them."""

from pathlib import Path

import gguf
import numpy as np
import torch

ARCHITECTURES = {"flux1": "flux", "flux2": "flux", "z-image": "lumina2"}
Q = gguf.GGMLQuantizationType
# The types gguf-py reads but does not write, and where each of their blocks keeps its fp16 scales (d, and dmin
# where it has one), as offsets into the block.
K_SCALES = {Q.Q6_K: (208,), Q.Q5_K: (0, 2), Q.Q4_K: (0, 2), Q.Q3_K: (108,), Q.Q2_K: (80, 82), Q.IQ4_XS: (0,),
            Q.IQ4_NL: (0,)}  # fmt: skip
K_SCALE = 2.0**-12  # the blocks' scale: weights of about 0.02 at most, as the tiny models' are


def quantizable(name: str, tensor: torch.Tensor, kind) -> bool:
    """Whether convert.py would quantize this tensor: a weight matrix whose rows fill whole blocks."""
    block, _ = gguf.GGML_QUANT_SIZES[kind]
    return name.endswith(".weight") and tensor.dim() == 2 and min(tensor.shape) > 1 and tensor.shape[1] % block == 0


def k_quant_blocks(rows: int, columns: int, kind, seed: int = 0) -> np.ndarray:
    """Random blocks of a K-quant or IQ4 type for a rows x columns weight, each block's fp16 scales set to K_SCALE
    (random bytes there could be NaN or huge)."""
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    data = np.random.default_rng(seed).integers(0, 256, (rows * columns // block, block_bytes), dtype=np.uint8)
    for offset in K_SCALES[kind]:
        data[:, offset : offset + 2] = np.frombuffer(np.float16(K_SCALE).tobytes(), dtype=np.uint8)
    return data.reshape(rows, columns // block * block_bytes)


def quantized(tensor: torch.Tensor, kind) -> np.ndarray:
    """The tensor's bytes in `kind`, as the file holds them."""
    if kind in K_SCALES:
        return k_quant_blocks(*tensor.shape, kind)
    return gguf.quants.quantize(tensor.float().numpy(), kind)


def write_gguf(path: Path, tensors: dict, family: str, kind=Q.Q8_0, prefix: str = "", architecture=None) -> Path:
    """The tensors as a GGUF file of `kind`, as convert.py writes the family's; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture or ARCHITECTURES[family])
    for name, tensor in tensors.items():
        if quantizable(name, tensor, kind):
            writer.add_tensor(prefix + name, quantized(tensor, kind), raw_dtype=kind)
        else:
            writer.add_tensor(prefix + name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def file_values(path: Path, name: str) -> torch.Tensor:
    """The tensor `name` of a GGUF file as gguf-py itself dequantizes it, in torch's order: what a loaded model's
    weight must equal."""
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
