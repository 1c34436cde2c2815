"""One accepted request as the engine runs it (Job), and what it tells while it runs: its events, in the order they
come (Loading, Loaded, Started, a Progress each step, a Preview where someone asked for one, then Finished or
Failed), and when a preview is due: the one rule that the engine builds previews by and every reader reads them by."""

import collections
import dataclasses
import functools
import queue
import threading
import time

from PIL import Image

from engine.errors import ImagineError
from engine.files.families import Family
from engine.previews import png_base64
from engine.request import GenerationRequest

# How long a poll for the latest preview (A1111's /progress, GET /jobs/<id>?preview=1) keeps the engine building one
# at each step: a client that polls again within it sees the step before its poll, however long a step takes.
POLL_SECONDS = 5.0


@dataclasses.dataclass
class Loading:
    """The engine has taken the job: its model loads, or is found loaded."""


@dataclasses.dataclass
class Loaded:
    """The model is ready; a load-only job (Engine.load_model) ends here."""


@dataclasses.dataclass
class Unloaded:
    """The model is unloaded (or was not loaded); an unload job (Engine.unload_model) ends here."""


@dataclasses.dataclass
class Started:
    """The prompts are encoded and the first step begins."""


@dataclasses.dataclass
class Progress:
    """A denoising step is done (every step)."""

    step: int
    steps: int


@dataclasses.dataclass
class Preview:
    """A picture of the latents after `step`, built by the engine where one was asked for (Job.previews_at)."""

    step: int
    steps: int
    image: Image.Image
    index: int = 0  # which picture of a batch

    @functools.cached_property
    def png(self) -> str:
        """The preview as a base64 PNG, encoded once for all its readers. Previews favour speed: the lowest PNG
        compression, still lossless."""
        return png_base64(self.image, compress_level=1)


@dataclasses.dataclass
class Finished:
    image: Image.Image
    parameters: str  # the settings, as stored in the PNG (see generation_parameters)
    seed: int
    model: str
    family: Family  # the model's, which the dialects' answers report in their own terms
    steps: int
    seconds: float
    pictures: list = dataclasses.field(default_factory=list)  # every picture of the batch as (image, parameters)
    seeds: list = dataclasses.field(default_factory=list)
    interrupted: bool = False  # ended early by A1111's interrupt or skip: `steps` is how far it got
    notices: list = dataclasses.field(default_factory=list)  # parts of the request the model did without


@dataclasses.dataclass
class Upscaled:
    """An upscale job's pictures (Engine.upscale), in the order of its request's."""

    images: list
    seconds: float


@dataclasses.dataclass
class Failed:
    error: ImagineError
    cancelled: bool = False  # stopped on purpose (cancelled, its client gone, the server stopping), not broken


def due(step: int, steps: int, every: int) -> bool:
    """Whether a preview is due at `step` for a reader that wants one every `every` steps (0: none), as /generate's
    `stream` and a job stream's `every` ask: none at the last step, where the picture itself comes."""
    return every > 0 and step % every == 0 and step < steps


class Job:
    """One accepted request: the engine puts its events in `events` and keeps where it stands (`step`, `steps`,
    `started`); its readers say what they want to see (a stream's `every`, a poll), and the engine builds those
    previews and no others (previews_at)."""

    def __init__(
        self,
        request: GenerationRequest,
        model_key: str,
        client_gone=None,
        only: str | None = None,
        events=None,
        interruptible: bool = False,
    ):
        self.request = request
        self.model_key = model_key
        # "load" or "unload" the model and nothing else (Engine.load_model, unload_model): it ends with Loaded, or
        # Unloaded; "upscale" pictures (Engine.upscale, its request an UpscaleRequest): it ends with Upscaled.
        self.only = only
        # Where the engine puts the events (it only ever calls put): a queue the caller iterates over, or a
        # held job's record (engine/held_jobs.py), which keeps them for clients that come and go.
        self.events = queue.Queue() if events is None else events
        self.client_gone = client_gone  # a callable saying the client has left, where the server can tell
        self.interruptible = interruptible  # whether A1111's interrupt and skip may end it: only /sdapi/v1/* jobs
        self.cancel_reason = None
        self.stop_early = None  # how it was asked to finish early: "interrupt" or "skip"
        self.started = None  # time.time() when its generation began
        self.step, self.steps = 0, 0
        # What its readers asked to see, beside the previews its request streams.
        self.watching = collections.Counter()  # a job stream's `every` -> how many such streams are open
        self.watchers = threading.Lock()
        self.polled = None  # time.monotonic() of the last poll for the latest preview
        self.latest = None  # the newest Preview of the first picture

    def __iter__(self):
        while True:
            event = self.events.get()
            yield event
            if self.ends_with(event):
                return

    def ends_with(self, event) -> bool:
        ends = {None: Finished, "load": Loaded, "unload": Unloaded, "upscale": Upscaled}[self.only]
        return isinstance(event, (ends, Failed))

    def cancel(self, reason: ImagineError) -> None:
        """Stops the job before its next step, or before it starts; `reason` is what its client is told."""
        self.cancel_reason = reason

    def finish_early(self, how: str) -> None:
        """Ends the pictures at their next step, keeping them as far as they got (AUTOMATIC1111's interrupt and
        skip, which are one here: a batch is drawn in one call, and A1111's skip ends the call being drawn)."""
        self.stop_early = how

    def cancelled(self) -> bool:
        if self.cancel_reason is None and self.client_gone is not None and self.client_gone():
            self.cancel_reason = ImagineError("the client disconnected", 499)
        return self.cancel_reason is not None

    def watch(self, every: int, watching: bool = True) -> None:
        """A job stream that wants a preview every `every` steps opens (or, with `watching` False, closes)."""
        with self.watchers:
            self.watching[every] += 1 if watching else -1
            self.watching += collections.Counter()  # drops the counts that reached 0

    def latest_preview(self) -> Preview | None:
        """The newest preview of the first picture, None before one was built. Asking keeps them coming: the engine
        builds one at each step for POLL_SECONDS after."""
        self.polled = time.monotonic()
        return self.latest

    def previews_at(self, step: int, steps: int) -> int:
        """How many of the batch's pictures are previewed at `step`: all of them where the request streams them
        (every `stream` steps), the first where a job stream watches it or someone polled lately, else none."""
        if due(step, steps, self.request.stream):
            return self.request.n
        with self.watchers:
            watched = any(due(step, steps, every) for every in self.watching)
        polled = self.polled is not None and time.monotonic() - self.polled < POLL_SECONDS and step < steps
        return 1 if watched or polled else 0
