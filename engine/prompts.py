"""AUTOMATIC1111's prompt syntax (weights, BREAK), prompts longer than 77 tokens, clip skip, and encoding."""

import dataclasses
import re

import torch

from engine.errors import ImagineError, named

# One piece of a prompt each: an escaped bracket or backslash, a lone backslash, an opening bracket, a
# weight closing a round bracket (":1.3)"), a closing bracket, a run of plain text, or a lone colon.
PROMPT_PIECE = re.compile(r"\\[()\[\]\\]|\\|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")


PROMPT_BREAK = re.compile(r"\bBREAK\b")


ATTENTION_STEP = 1.1  # what one pair of () multiplies a weight by, and [] divides it by


CHUNK_TOKENS = 75  # the tokens of one text-encoder pass, between its start and end tokens


# Chunks a prompt may take, each one text-encoder pass and its memory in every step (SD1.5 at n=8: ~9 MB each).
# 16000 characters of English take some 55; 64 BREAKs are far beyond any prompt people write.
MAX_PROMPT_CHUNKS = 64


COMMA_BACKTRACK = 20  # a chunk full in mid-phrase ends at its last comma if that is this close to the end


BREAK = None  # the weight that marks a BREAK in a parsed prompt


def check_chunk_count(text: str, field: str = "prompt") -> None:
    """Refuses, before the queue, a prompt of more BREAKs than CLIP chunks a prompt may have (CLIP models only: the
    flow families' encoders read a prompt whole)."""
    breaks = sum(weight is BREAK for _, weight in parse_prompt_attention(text, field))
    if breaks >= MAX_PROMPT_CHUNKS:
        raise ImagineError(
            f"{named(field)} is at least {breaks + 1} chunks of 75 tokens (each BREAK starts one); "
            f"at most {MAX_PROMPT_CHUNKS} are accepted",
            field=field,
        )


def parse_prompt_attention(text: str, field: str = "prompt") -> list:
    """Splits a prompt into (text, weight) pieces as AUTOMATIC1111 does: `(x)` x1.1, `[x]` /1.1,
    `(x:1.3)`; a bracket left open weighs to the end, a stray closing one is text; `BREAK` becomes
    ("BREAK", BREAK). Neighbours of equal weight are merged."""
    pieces, round_open, square_open = [], [], []

    def multiply(start, factor):
        for index in range(start, len(pieces)):
            if pieces[index][1] is not BREAK:
                pieces[index][1] *= factor

    for match in PROMPT_PIECE.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            pieces.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(pieces))
        elif piece == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            try:
                multiply(round_open.pop(), float(weight))
            except ValueError:
                raise ImagineError(f"{named(field)} weight {weight!r} is not a number", field=field) from None
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ATTENTION_STEP)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), 1 / ATTENTION_STEP)
        else:
            for index, part in enumerate(split_at_breaks(piece)):
                if index:
                    pieces.append(["BREAK", BREAK])
                pieces.append([part, 1.0])
    for start in round_open:
        multiply(start, ATTENTION_STEP)
    for start in square_open:
        multiply(start, 1 / ATTENTION_STEP)
    merged = []
    for piece in pieces:
        if piece[0] == "":  # what BREAK leaves at either side of itself; it tokenizes to nothing
            continue
        if merged and merged[-1][1] == piece[1] and piece[1] is not BREAK:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [tuple(piece) for piece in merged] or [("", 1.0)]


def split_at_breaks(text: str) -> list:
    """The text between its BREAKs, the spaces around each BREAK dropped. Split first and stripped after: a regex
    that took the spaces too (\\s*BREAK\\s*) took quadratic time on long runs of spaces, holding the GIL."""
    parts = PROMPT_BREAK.split(text)
    for index in range(len(parts)):
        if index > 0:
            parts[index] = parts[index].lstrip()
        if index < len(parts) - 1:
            parts[index] = parts[index].rstrip()
    return parts


@dataclasses.dataclass
class Chunk:
    """One text-encoder pass: 77 token ids (start, 75, end or padding), a weight for each, and
    textual-inversion vectors to put in place of the token embeddings at some positions."""

    tokens: list = dataclasses.field(default_factory=list)
    weights: list = dataclasses.field(default_factory=list)
    vectors: dict = dataclasses.field(default_factory=dict)  # position -> vector


def prompt_chunks(tokenizer, pieces: list, embeddings: dict) -> list:
    """Tokenizes parsed pieces into chunks of 75 tokens, as AUTOMATIC1111 does: a chunk that fills up
    in mid-phrase ends after its last comma if that is within 20 tokens of the end; BREAK ends a
    chunk; an embedding (name -> [n, width] vectors) is never split across two chunks."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks, chunk, last_comma = [], Chunk(), -1

    def close(current):
        ids, weights = current.tokens, current.weights
        # Laid out as the tokenizer pads: start, tokens, end, then padding (the end token for CLIP L,
        # "!" for OpenCLIP), so a plain prompt gives exactly the ids diffusers would encode.
        padding = CHUNK_TOKENS - len(ids)
        current.tokens = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding
        current.weights = [1.0, *weights, 1.0] + [1.0] * padding
        current.vectors = {position + 1: vector for position, vector in current.vectors.items()}
        chunks.append(current)

    for text, weight in pieces:
        if weight is BREAK:
            close(chunk)
            chunk, last_comma = Chunk(), -1
            continue
        for word in words_and_embeddings(text, embeddings):
            if isinstance(word, torch.Tensor):
                if len(chunk.tokens) + len(word) > CHUNK_TOKENS:
                    close(chunk)
                    chunk, last_comma = Chunk(), -1
                for vector in word:
                    chunk.vectors[len(chunk.tokens)] = vector
                    chunk.tokens.append(0)  # a stand-in id: its embedding is replaced by the vector
                    chunk.weights.append(weight)
                continue
            for token in tokenizer(word, add_special_tokens=False).input_ids:
                if len(chunk.tokens) == CHUNK_TOKENS:
                    backtrack = token != comma and last_comma >= 0 and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK
                    keep = last_comma + 1 if backtrack else CHUNK_TOKENS
                    moved = Chunk(chunk.tokens[keep:], chunk.weights[keep:])
                    moved.vectors = {p - keep: v for p, v in chunk.vectors.items() if p >= keep}
                    chunk.vectors = {p: v for p, v in chunk.vectors.items() if p < keep}
                    chunk.tokens, chunk.weights = chunk.tokens[:keep], chunk.weights[:keep]
                    close(chunk)
                    chunk, last_comma = moved, -1
                if token == comma:
                    last_comma = len(chunk.tokens)
                chunk.tokens.append(token)
                chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        close(chunk)
    return chunks


def words_and_embeddings(text: str, embeddings: dict) -> list:
    """The text with each embedding's name, as a whole word, replaced by its vectors."""
    if not embeddings:
        return [text]
    names = "|".join(re.escape(name) for name in sorted(embeddings, key=len, reverse=True))
    parts = re.split(rf"(?<![\w-])({names})(?![\w-])", text, flags=re.I)
    return [embeddings[part.lower()] if index % 2 else part for index, part in enumerate(parts) if part]


def encode_chunk(text_encoder, chunk: Chunk, layer: int, final_norm: bool) -> tuple:
    """The hidden states of one chunk at `layer` (-1 the last) and the pooled output, with the
    weights applied as AUTOMATIC1111's default emphasis does: multiplied in, then the chunk scaled
    back to its original mean."""
    device = text_encoder.device
    ids = torch.tensor([chunk.tokens], device=device)
    hook = None
    if chunk.vectors:
        token_embedding = text_encoder.get_input_embeddings()

        def put_vectors(module, inputs, output):
            output = output.clone()
            for position, vector in chunk.vectors.items():
                output[0, position] = vector.to(output.dtype)
            return output

        hook = token_embedding.register_forward_hook(put_vectors)
    try:
        output = text_encoder(ids, output_hidden_states=layer != -1)
    finally:
        if hook is not None:
            hook.remove()
    if layer == -1:
        hidden = output.last_hidden_state
    else:
        hidden = output.hidden_states[layer]
        if final_norm:
            hidden = text_encoder.final_layer_norm(hidden)
    if any(weight != 1.0 for weight in chunk.weights):
        original_mean = hidden.mean()
        hidden = hidden * torch.tensor(chunk.weights, dtype=hidden.dtype, device=device)[None, :, None]
        new_mean = hidden.mean()
        if new_mean != 0:  # a random test model's layer norm can centre every token exactly on 0
            hidden = hidden * (original_mean / new_mean)
    return hidden, output[0] if output[0].ndim == 2 else None


def encode_chunks(text_encoder, chunks: list, layer: int, final_norm: bool) -> tuple:
    """(hidden states of every chunk side by side, pooled output of the first chunk)."""
    encoded = [encode_chunk(text_encoder, chunk, layer, final_norm) for chunk in chunks]
    return torch.cat([hidden for hidden, _ in encoded], dim=1), encoded[0][1]


def prompt_embeddings(pipe, prompt: str, neg: str, clip_skip: int, embeddings: dict) -> dict:
    """The prompt and negative prompt encoded for the pipeline's `prompt_embeds` arguments.

    `clip_skip` N takes the hidden states N-1 layers before the one the family uses by default: SD1
    and SD2 use the last layer (SD2's diffusers text encoder already ends at OpenCLIP's penultimate),
    with its final layer norm applied, as AUTOMATIC1111 does; SDXL uses the penultimate layer of both
    encoders, unnormalized, so N moves both further back (diffusers' clip_skip N-1).
    `embeddings` maps a name to its vectors for each text encoder (see embedding_vectors).
    """
    parsed = [parse_prompt_attention(prompt), parse_prompt_attention(neg, "neg")]
    encoders = [(pipe.tokenizer, pipe.text_encoder, "clip_l")]
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if sdxl:
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2, "clip_g"))
    layer = -clip_skip - 1 if sdxl else -clip_skip
    for _, text_encoder, _ in encoders:
        layers = text_encoder.config.num_hidden_layers
        if clip_skip > layers:
            message = f"{named('clip_skip')} {clip_skip} is more than this model's text encoder has ({layers} layers)"
            raise ImagineError(message, field="clip_skip")
    hidden, pooled = [[], []], [None, None]
    for tokenizer, text_encoder, key in encoders:
        vectors = {name: each[key] for name, each in embeddings.items()}
        chunks = [prompt_chunks(tokenizer, pieces, vectors) for pieces in parsed]
        for field, each in zip(("prompt", "neg"), chunks, strict=True):
            if len(each) > MAX_PROMPT_CHUNKS:
                message = f"{named(field)} is {len(each)} chunks of 75 tokens; at most {MAX_PROMPT_CHUNKS} are accepted"
                raise ImagineError(message, field=field)
        # The shorter of prompt and negative prompt gets chunks of the empty prompt, so that both line up.
        count = max(len(each) for each in chunks)
        for index, each in enumerate(chunks):
            each += prompt_chunks(tokenizer, [("", 1.0)], {}) * (count - len(each))
            states, pooled[index] = encode_chunks(text_encoder, each, layer, not sdxl)
            hidden[index].append(states)
    arguments = {"prompt_embeds": torch.cat(hidden[0], dim=-1), "negative_prompt_embeds": torch.cat(hidden[1], dim=-1)}
    if sdxl:
        arguments |= {"pooled_prompt_embeds": pooled[0], "negative_pooled_prompt_embeds": pooled[1]}
    return arguments
