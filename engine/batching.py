"""Concurrent requests drawn as one batch: which queued jobs may share a pipeline call, how long the engine waits for
them (--batch-wait-ms, and where batching pays by default), taking them out of the queue, and what their one call is
given: their requests as one (GenerationRequest.batch), their prompts' conditioning joined row by row, and a record
of which of them still draw (Batch), so that each ends once, with its own last event."""

import dataclasses
import logging
import queue
import time

import torch

from engine.hires import wants_hires
from engine.job import Failed, Job
from engine.request import GenerationRequest

log = logging.getLogger("imagine")

AUTO = "auto"  # --batch-wait-ms's default: batching where it pays (batch_wait)
AUTO_WAIT_MS = 5  # the wait `auto` takes: a few ms, which a request drawn alone loses at most
# On a CPU one call for four requests' pictures pays only for small ones. Measured on 2 cores of an AMD EPYC with
# avx512_bf16 (bf16, SD1.5 architecture, 4 concurrent clients against 4 sequential requests; docs/performance.md,
# Concurrent requests in one batch): 0.80 of the time at 256x256 (UNet alone), 1.02 at 512x512. Above this area a CPU
# draws one request at a time; a GPU batches at any size, its steps being far from full at batch 2.
CPU_BATCH_AREA = 256 * 256
GATHER_POLL_SECONDS = 0.001  # how often the queue is looked at again while the wait lasts

# What each request of a batch keeps its own: its prompts, seeds, pictures and how it is told of them. Every other
# field must be equal for requests to share a call (shared_part); a field added later separates them until it is
# named here.
OWN_FIELDS = {
    "prompt": "",
    "neg": "",
    "seed": None,
    "variation_seed": None,
    "n": 1,
    "stream": 0,
    "preview": "auto",
    "model": None,
    "parameters": None,
    "parameters_ignored": [],
    "notices": [],
}


def batch_wait(setting: str, device: torch.device, job: Job, family) -> float:
    """Seconds the engine waits after taking `job` for others to draw with it: 0 where it draws alone (batching off,
    or a job that may join none: may_join)."""
    if not may_join(job, family):
        return 0.0
    if setting != AUTO:
        return int(setting) / 1000
    if device.type == "cpu" and job.request.width * job.request.height > CPU_BATCH_AREA:
        return 0.0
    return AUTO_WAIT_MS / 1000


def may_join(job: Job, family) -> bool:
    """Whether `job` may share a pipeline call at all: a txt2img of an SD family (whose prompts the engine encodes),
    filled in for its model. img2img, inpainting, the hires fix, an inpainting checkpoint, the flow-matching families
    (which encode their own prompts in the pipeline) and load, unload and upscale jobs draw alone: nothing here
    shows that their pictures would come out the same in a shared call."""
    if job.only is not None or family is None or family.flow or family.unet_channels == 9:
        return False
    req = job.request
    return req.img is None and req.mask is None and not wants_hires(req) and req.width is not None


def shared_part(job: Job) -> tuple:
    """What must be equal for two jobs to share a call: the model, whether A1111's interrupt may end it, and every
    request field but their own (OWN_FIELDS): size, steps, sampler, schedule, guidance, LoRAs and weights, clip
    skip, noise source, variation strength, tiling."""
    return job.model_key, job.interruptible, dataclasses.replace(job.request, **OWN_FIELDS)


def gather(jobs: queue.Queue, first: Job, wait: float, room: int) -> list:
    """`first` and the waiting jobs that may share its call, taken out of the queue `jobs` as they come within `wait`
    seconds, up to `room` pictures in all (--max-batch). Any waiting job that fits joins, not only the next: one
    drawn in the batch is done sooner, and the ones it passes wait for a call only a little longer than `first`'s."""
    shared = shared_part(first)
    batch, pictures = [first], first.request.n
    deadline = time.monotonic() + wait
    while True:
        with jobs.mutex:
            for job in list(jobs.queue):
                fits = isinstance(job, Job) and pictures + job.request.n <= room
                if fits and job.only is None and shared_part(job) == shared:
                    jobs.queue.remove(job)
                    batch.append(job)
                    pictures += job.request.n
        left = deadline - time.monotonic()
        if pictures >= room or left <= 0:
            return batch
        time.sleep(min(left, GATHER_POLL_SECONDS))


def batch_request(requests: list) -> GenerationRequest:
    """The requests as the one the pipeline draws: the first's shared fields, all their pictures (`n`), and each
    request's own prompts and seeds in `batch` (picture_seeds reads them)."""
    return dataclasses.replace(requests[0], n=sum(req.n for req in requests), batch=tuple(requests))


def conditioning_shape(conditioning: dict) -> tuple:
    """The shapes of a request's encoded prompts: prompts of other chunk counts (75 tokens each) cannot share a
    call, as lengthening one's conditioning with padding (A1111's way) changes its picture."""
    return tuple((name, tuple(tensor.shape)) for name, tensor in sorted(conditioning.items()))


def joined_conditioning(conditionings: list, counts: list) -> dict:
    """The requests' encoded prompts as one batch: request i's repeated for each of its `counts[i]` pictures, in
    order, so that the pipeline draws one picture a row."""
    pairs = list(zip(conditionings, counts, strict=True))
    return {name: torch.cat([each[name].repeat_interleave(count, 0) for each, count in pairs]) for name in pairs[0][0]}


def rows(requests: list) -> list:
    """Each request's rows of the batch's latents and pictures, as slices, in order."""
    starts = [sum(req.n for req in requests[:index]) for index in range(len(requests))]
    return [slice(start, start + req.n) for start, req in zip(starts, requests, strict=True)]


class Batch:
    """The jobs of one pipeline call: which still draw (`live`), each ended once with its own last event. A job
    cancelled while the call runs ends at once and its rows are computed to the end with the others'; only when
    every job has ended does the call stop."""

    def __init__(self, jobs: list):
        self.jobs = jobs
        self.ended = set()

    def live(self, among: list | None = None) -> list:
        """The jobs (of `among`, or all) that have not ended."""
        return [job for job in (self.jobs if among is None else among) if job not in self.ended]

    def end(self, job: Job, event) -> None:
        if job not in self.ended:
            self.ended.add(job)
            job.events.put(event)

    def all_cancelled(self, among: list | None = None) -> bool:
        """Ends each live job (of `among`, or all) that was cancelled; whether none is left: the question the cancel
        points of a call drawing `among` ask."""
        for job in self.live(among):
            if job.cancelled():
                log.info("dropped a request from its batch: %s", job.cancel_reason.message)
                self.end(job, Failed(job.cancel_reason, cancelled=True))
        return not self.live(among)
