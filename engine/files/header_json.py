"""A .safetensors header's JSON, read as hostile input: the header is text from a file anyone may have made. It is
read in place (the file mapped, never copied or decoded whole) one member at a time, each name and entry from at most
MAX_ENTRY_BYTES, at most MAX_TENSORS entries, each entry's dtype and shape checked against the bytes it claims: no
step holds the interpreter long. Read whole by json.loads, a header of a million entries just under safetensors'
100 MiB held the interpreter (and so every other thread: /health) for seconds and took a GB of memory, and one nested
100,000 deep raised RecursionError where an answer was due (issue 35). The refusals of a damaged file and of one cut
short (Truncated) are here too, for the GGUF reader's use as well."""

import codecs
import json
import math
import re

from engine.errors import ImagineError

# The most tensors a header may name: the largest files here hold a few thousand (an all-in-one FLUX.1 checkpoint
# about 3,000 with its text encoders and VAE; an SDXL LoRA about 7,000).
MAX_TENSORS = 50_000
# The longest name, and the longest entry, read: a real one is about 100 bytes (a dtype, a shape of a few numbers and
# two offsets).
MAX_ENTRY_BYTES = 4096
# Bits per value of each dtype safetensors knows: a tensor's bytes are its values times these, over 8.
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2": 8, "F8_E5M2FNUZ": 8,
              "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64}  # fmt: skip

DECODER = json.JSONDecoder()
UTF8 = codecs.getincrementaldecoder("utf-8")  # decodes the whole characters of a piece, holding back one cut at its end
WHITESPACE = re.compile(rb"[ \t\n\r]*")
# A JSON string, its escapes and all, found in one linear pass: a metadata text is skipped, never decoded.
STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)


class Damaged(ImagineError):
    """A .safetensors file whose header no sound file has (more tensors than any model, an entry that is no tensor's,
    a shape its bytes do not fill): refused as it is, not handed to another reader to try again."""


class Header:
    """The header's bytes, `data[start:stop]` of a buffer (the mapped file, or bytes), and how each piece of its JSON
    is read there."""

    def __init__(self, data, start: int, stop: int):
        self.data, self.start, self.stop = data, start, stop

    def at(self, index: int, mark: bytes) -> bool:
        return index < self.stop and self.data[index : index + 1] == mark

    def space(self, index: int) -> int:
        """The index after the whitespace at `index`."""
        return WHITESPACE.match(self.data, index, self.stop).end()

    def expect(self, index: int, mark: bytes) -> int:
        """The index after `mark` and the whitespace around it at `index`."""
        index = self.space(index)
        if not self.at(index, mark):
            raise damaged(f"{mark.decode()!r} is expected at byte {index - self.start}")
        return self.space(index + 1)

    def value(self, index: int, what: str) -> tuple:
        """(the JSON value at `index`, the index after it), read from at most MAX_ENTRY_BYTES: no name or entry of a
        sound header is longer, and the bound keeps a nested or endless one from costing more."""
        try:
            text = UTF8().decode(self.data[index : min(index + MAX_ENTRY_BYTES, self.stop)])  # invalid UTF-8: refused
            value, end = DECODER.raw_decode(text)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise damaged(f"{what} at byte {index - self.start} is not one a safetensors header holds") from None
        return value, index + len(text[:end].encode())

    def string_end(self, index: int) -> int | None:
        """The index after the JSON string at `index`, None where there is none."""
        found = STRING.match(self.data, index, self.stop)
        return None if found is None else found.end()

    def object(self, index: int, member) -> int:
        """Reads the JSON object at `index`, calling member(name, index of its value) for each member, which reads
        the value and returns the index after it; returns the index after the object."""
        index = self.expect(index, b"{")
        if self.at(index, b"}"):
            return index + 1
        while True:
            name, after = self.value(index, "a name")
            if not isinstance(name, str):
                raise damaged(f"a name is expected at byte {index - self.start}")
            index = self.space(member(name, self.expect(after, b":")))
            if self.at(index, b"}"):
                return index + 1
            index = self.expect(index, b",")


def parse_entries(data, start: int = 0, stop: int | None = None) -> dict:
    """{name: (dtype, shape, where its bytes end)} from a header's JSON, `data[start:stop]` (bytes, or a mapped
    file), its `__metadata__` skipped; what no sound header holds is refused (Damaged)."""
    header = Header(data, start, len(data) if stop is None else stop)
    entries = {}

    def entry(name: str, index: int) -> int:
        if name == "__metadata__":
            return skip_metadata(header, index)
        if len(entries) == MAX_TENSORS:
            raise damaged(f"it names more than {MAX_TENSORS:,} tensors, more than any model file holds")
        entries[name], index = tensor_entry(header, index, name)
        return index

    if not header.at(header.space(start), b"{"):
        raise damaged("it is not a JSON object")
    end = header.object(start, entry)
    if header.space(end) != header.stop:
        raise damaged(f"more follows it at byte {end - start}")
    return entries


def skip_metadata(header: Header, index: int) -> int:
    """The index after the `__metadata__` object at `index`: names given texts, at most MAX_TENSORS of them."""
    count = 0

    def text(name: str, at: int) -> int:
        nonlocal count
        count += 1
        end = header.string_end(at)
        if count > MAX_TENSORS or end is None:
            raise damaged("its __metadata__ is not a few names given texts")
        return end

    return header.object(index, text)


def tensor_entry(header: Header, index: int, name: str) -> tuple:
    """((dtype, shape, where its bytes end), the index after it) of the entry at `index`: a dtype safetensors knows,
    a shape, and two offsets as far apart as the shape's values take."""
    shown = repr(name[:80])
    entry, index = header.value(index, f"the entry of {shown}")
    if not isinstance(entry, dict):
        raise damaged(f"the entry of {shown} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise damaged(f"{shown} has the dtype {str(dtype)[:20]!r}, which safetensors has not")
    if not (naturals(shape) and naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise damaged(f"{shown} has no shape and offsets of whole numbers")
    if math.prod(shape) * DTYPE_BITS[dtype] != 8 * (offsets[1] - offsets[0]):
        raise damaged(f"{shown} spans {offsets[1] - offsets[0]} bytes, not what its shape of {dtype} takes")
    return (dtype, tuple(shape), offsets[1]), index


def naturals(value) -> bool:
    """Whether `value` is a list of whole numbers of 0 or more (JSON's true and false are not)."""
    return isinstance(value, list) and all(type(each) is int and each >= 0 for each in value)


class Truncated(Damaged):
    """A file whose header promises more bytes than it holds: a download cut short."""


def truncated(size: int, promised: int) -> Truncated:
    return Truncated(
        f"the file is truncated: it holds {size} bytes where its header says {promised}: a download that did not "
        "finish? Download it again (or pull it again: a pull resumes)",
        422,
    )


def damaged(why: str) -> Damaged:
    return Damaged(f"the file's .safetensors header is damaged: {why}", 422)
