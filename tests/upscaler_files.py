"""Upscaler model files in the layouts people download (Real-ESRGAN's RRDBNet, Real-ESRGAN Compact), tiny and with
random weights."""

import torch


def conv(state: dict, name: str, out_channels: int, in_channels: int, generator) -> None:
    state[f"{name}.weight"] = torch.randn(out_channels, in_channels, 3, 3, generator=generator) * 0.1
    state[f"{name}.bias"] = torch.randn(out_channels, generator=generator) * 0.01


def esrgan(features=8, blocks=1, scale=4, seed=0) -> dict:
    """RealESRGAN_x4plus's layout (basicsr's RRDBNet: conv_first, body.N.rdbM.convK, conv_up1...), with `blocks` RRDB
    blocks of `features` channels (the real one: 23 of 64); spandrel reads the growth channels as 32."""
    generator, state, growth = torch.Generator().manual_seed(seed), {}, 32
    conv(state, "conv_first", features, 3, generator)
    for block in range(blocks):
        for rdb in (1, 2, 3):
            for k in range(1, 5):
                conv(state, f"body.{block}.rdb{rdb}.conv{k}", growth, features + (k - 1) * growth, generator)
            conv(state, f"body.{block}.rdb{rdb}.conv5", features, features + 4 * growth, generator)
    conv(state, "conv_body", features, features, generator)
    for up in range(1, {2: 1, 4: 2, 8: 3}[scale] + 1):  # one 2x nearest upsampling and conv each
        conv(state, f"conv_up{up}", features, features, generator)
    conv(state, "conv_hr", features, features, generator)
    conv(state, "conv_last", 3, features, generator)
    return state


def compact(features=8, convs=2, scale=2, seed=0) -> dict:
    """realesr-general-x4v3's layout (SRVGGNetCompact: body.N, convs with PReLUs between, then a pixel shuffle)."""
    generator, state = torch.Generator().manual_seed(seed), {}
    channels = [3] + [features] * (convs + 1)
    for index in range(convs + 1):
        conv(state, f"body.{2 * index}", features, channels[index], generator)
        state[f"body.{2 * index + 1}.weight"] = torch.full((features,), 0.25)
    conv(state, f"body.{2 * convs + 2}", 3 * scale * scale, features, generator)
    return state
