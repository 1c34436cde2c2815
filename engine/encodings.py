"""Encoded prompts kept for the next request that sends a model's text encoders the same: a picture of the same
prompt with another seed, size or sampler skips its encoding (Qwen3-4B took 83 s reading a prompt on 2 CPU cores).
Each loaded model keeps its own, so that they go with it (engine/models.py); --prompt-cache bounds them."""

import collections

PROMPT_CACHE = 100  # encoded prompts a loaded model keeps by default; docs/performance.md says what they cost


class Encodings:
    """The encoded prompts of one loaded model, the least recently used dropped first past `size` (0: none kept).

    A key must hold everything the encoders' output depends on beyond the loaded model's own weights: the texts as
    the encoders receive them, the clip skip, the LoRAs that change a text encoder at their weights, and the
    versions of the embedding files the texts use (engine/engine.py and engine/flow.py build them). An entry is
    shared by every request that hits it: its users read it and never change it."""

    def __init__(self, size: int = PROMPT_CACHE):
        self.size = size
        self.entries = collections.OrderedDict()  # key -> encoded prompt, least recently used first

    def get(self, key: tuple, encode):
        """The entry for `key`, or what `encode()` returns, kept as its entry; an encoding that fails keeps nothing."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        encoded = encode()
        if self.size > 0:
            self.entries[key] = encoded
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return encoded

    def clear(self) -> None:
        self.entries.clear()
