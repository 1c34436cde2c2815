"""The engine: a queue of jobs, run one at a time on one thread, or several that may share a pipeline call drawn as one
batch (engine/batching.py), each telling its progress as events (engine/job.py), its previews built here, on that
thread, where its readers asked for them."""

import contextlib
import dataclasses
import functools
import logging
import math
import queue
import threading
import time
from pathlib import Path

import torch

from engine.batching import Batch, batch_request, batch_wait, conditioning_shape, gather, joined_conditioning, rows
from engine.compiling import COMPILING, choose_unet, telling_when_compiling
from engine.devices import pick_device, pick_dtype
from engine.errors import Cancelled, ImagineError
from engine.files.folders import model_folders
from engine.files.taesd import TinyDecoders
from engine.flow import flow_conditioning
from engine.hires import DEFAULT_UPSCALER, SECOND_PASS, UPSCALERS, second_pass_prompts, second_pass_steps, wants_hires
from engine.infotext import generation_parameters
from engine.job import Failed, Finished, Job, Loaded, Loading, Preview, Progress, Started, Unloaded, Upscaled
from engine.logs import escaped
from engine.loras import (
    LORA_SUFFIXES,
    embedding_versions,
    find_file,
    prompt_embedding_vectors,
    text_encoder_loras,
    use_loras,
    without_lora_tags,
)
from engine.models import LoadedModel, Models, cancel_check
from engine.pipeline import generate as pipeline_generate
from engine.pipeline import preview_image
from engine.prompts import prompt_embeddings
from engine.request import GenerationRequest, for_family, picture_seeds, with_seeds
from engine.settings import CONFIGS_DIR, Settings
from engine.upscalers import UpscaleRequest, Upscalers, check_upscale_request

log = logging.getLogger("imagine")

PROGRESS_LOG_SECONDS = 10  # a long picture's progress is logged at this pace
LONG_PICTURE_SECONDS = 300  # a picture estimated longer than this is said to take minutes, in the log and its answer
# The most of a generation's time its TAESD previews may take: at 512x512 on 2 CPU cores a decode took 2.3 s beside
# SD1.5 steps of 12-15 s, and one at every step made `stream: 1` 1.36 times `stream: 0`; within this share their own
# time adds at most about 1/(1 - 0.08) = 1.09 (docs/performance.md, TAESD previews). A due preview over it is left
# out, and the next due one is built once the steps have caught up.
TAESD_SHARE = 0.08


class Engine:
    """Owns the models and runs every generation, one at a time, on one long-lived thread.

    One at a time because a device runs one generation well and two badly; requests that may share a pipeline call
    and come within --batch-wait-ms are drawn as one batch, one call (engine/batching.py). One long-lived thread because
    the same diffusers call ran slower on a freshly started thread than on the process's main thread, and
    slower still with a thread per request (docs/performance.md, Figures behind the code); main() therefore
    runs the engine on the main thread.

    `generate` draws the pictures (pipeline.generate, with the upscalers a hires fix may name); tests hand in another
    to hold or fail a generation.
    """

    def __init__(self, settings: Settings, configs_dir: Path = CONFIGS_DIR, generate=None):
        self.settings = settings
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.fp_prec, self.device)
        self.models = Models(settings, self.device, self.dtype, configs_dir)  # what is loaded
        self.catalog = self.models.catalog  # what is on disk: model names, the listing, families
        self.tiny_decoders = TinyDecoders(self.device)  # the TAESD decoders previews use, shared by the models
        self.upscalers = Upscalers(settings.models_dir, self.device, self.dtype)  # the upscalers and the one loaded
        self.generate = generate or functools.partial(pipeline_generate, upscale=self.upscalers.upscale)
        self.jobs = queue.Queue()
        self.accepting = threading.Lock()  # makes "is there room?" and "queue it" one step
        self.stopping = False
        self.running = None  # the job generating now; of a batch, its first
        self.batch = []  # the jobs generating now: the running one, or a batch's
        self.unfinished = 0  # jobs accepted and not yet done: the running one and those waiting
        self.last_seconds = 1.0  # how long the last generation took, for Retry-After

    def submit(
        self,
        req: GenerationRequest,
        client_gone=None,
        default_if_unknown: bool = False,
        events=None,
        interruptible: bool = False,
    ) -> Job:
        """Queues a request; an unknown model, a full queue or a stopping server is refused here, before any work
        (see accept for the arguments)."""
        return self.queue(self.accept(req, client_gone, default_if_unknown, events, interruptible))

    def accept(
        self,
        req: GenerationRequest,
        client_gone=None,
        default_if_unknown: bool = False,
        events=None,
        interruptible: bool = False,
    ) -> Job:
        """The job for a request, checked and its seeds drawn, not yet queued: an unknown model or LoRA is refused
        here. With `default_if_unknown`, a model name the folders lack is drawn by the default model instead;
        `events` is where the job's events go (see Job); with `interruptible`, A1111's interrupt and skip may end it
        early (Job.finish_early). A fleet (engine/fleet.py) queues the job in Redis instead of here."""
        key = self.catalog.resolve_or_default(req.model) if default_if_unknown else self.catalog.resolve(req.model)
        req = self.with_usable_upscaler(self.for_model(req, key))
        job = Job(req, key, client_gone, events=events, interruptible=interruptible)
        for name, _ in req.loras:  # an unknown LoRA is refused before the request waits in the queue
            find_file(self.settings, "loras", "lora", name, LORA_SUFFIXES)
        job.request = with_seeds(job.request)
        return job

    def with_usable_upscaler(self, req: GenerationRequest) -> GenerationRequest:
        """The request, its hires fix's upscaler model checked before it queues: one that cannot be used is refused
        (422 naming hires_upscaler), or, where pasted generation data named it (a picture drawn elsewhere, with an
        upscaler these folders lack), replaced by A1111's default, Latent, and named among the data's ignored."""
        if not wants_hires(req) or req.hires_upscaler in UPSCALERS:
            return req
        try:
            self.catalog.reader.read(lambda: self.upscalers.find(req.hires_upscaler, "hires_upscaler"))
            return req
        except ImagineError:
            if req.parameters is None:
                raise
        ignored = [*req.parameters_ignored, "Hires upscaler"]
        return dataclasses.replace(req, hires_upscaler=DEFAULT_UPSCALER, parameters_ignored=ignored)

    def for_model(self, req: GenerationRequest, key: str) -> GenerationRequest:
        """The request filled in and checked for the model's family (for_family) before it queues, where a glance at
        the model's header (once per version of the file) tells the family; a model that cannot be read fails as it
        loads."""
        family = self.catalog.known_family(key)
        return req if family is None else for_family(req, family, self.settings.max_size)

    def load_model(self, name: str) -> Job:
        """Queues the loading of a model: the job ends with Loaded, or Failed saying why not."""
        return self.queue(Job(GenerationRequest(prompt="", model=name), self.catalog.resolve(name), only="load"))

    def unload_model(self, key: str) -> Job:
        """Queues the unloading of the model `key` (a resolve() key), after the jobs ahead of it: the job ends with
        Unloaded."""
        return self.queue(Job(GenerationRequest(prompt=""), key, only="unload"))

    def upscale(self, req: UpscaleRequest, client_gone=None) -> Job:
        """Queues an upscale, checked first (check_upscale_request): it runs on the engine's thread as a generation
        does, so that no two requests run models at once, and ends with Upscaled."""
        check_upscale_request(req, self.upscalers, self.settings.max_size)
        return self.queue(Job(req, None, client_gone, only="upscale"))

    def queue(self, job: Job) -> Job:
        with self.accepting:
            if self.stopping:
                raise ImagineError("the server is shutting down", 503)
            if self.unfinished > self.settings.max_queue:  # one runs and max_queue wait: no room
                raise self.busy()
            self.unfinished += 1
            self.jobs.put(job)
        return job

    def busy(self) -> ImagineError:
        """The 503 for a request that finds no room."""
        # Every waiting job and the running one are ahead: a rough but honest estimate.
        retry_after = max(1, math.ceil(self.last_seconds * max(self.unfinished, 1)))
        waiting = max(self.unfinished - 1, 0)
        return ImagineError(f"the server is busy: {waiting} requests are waiting; try again", 503, retry_after)

    def withdraw(self, job: Job, reason: ImagineError) -> bool:
        """Takes a waiting job out of the queue, ending it as cancelled with `reason` at once (its place is free
        for another); False if it is not waiting (it runs, or has ended)."""
        with self.accepting, self.jobs.mutex:
            try:
                self.jobs.queue.remove(job)
            except ValueError:
                return False
            self.unfinished -= 1
        job.cancel(reason)
        job.events.put(Failed(reason, cancelled=True))
        return True

    def position(self, job: Job) -> int | None:
        """How many jobs wait ahead of `job` in the queue (any client's), or None if it is not waiting."""
        with self.jobs.mutex:
            waiting = list(self.jobs.queue)
        return waiting.index(job) if job in waiting else None

    def generating(self) -> Job | None:
        """The job whose generation runs now (its model loaded and its prompts encoded), or None; of a batch, the
        first that still draws (all its jobs are at the same step)."""
        drawing = [job for job in self.batch if job.started is not None and job.cancel_reason is None]
        return drawing[0] if drawing else None

    def run_forever(self) -> None:
        """Runs jobs, alone or as a batch, until stop() is called."""
        while (job := self.next_job()) is not None:
            jobs = self.joined(job)
            try:
                self.run(job) if len(jobs) == 1 else self.run_batch(jobs)
            finally:
                with self.accepting:
                    self.unfinished -= len(jobs)

    def joined(self, job: Job) -> list:
        """`job` and the waiting jobs that may share its pipeline call, which arrive within --batch-wait-ms, up to
        --max-batch pictures in all (engine/batching.py); `job` alone where it draws alone."""
        family = None if job.only is not None else self.catalog.known_family(job.model_key)
        wait = batch_wait(self.settings.batch_wait_ms, self.device, job, family)
        if wait <= 0 or job.cancelled():
            return [job]
        return gather(self.jobs, job, wait, self.settings.max_batch)

    def next_job(self) -> Job | None:
        """Waits for the next job (None: stop) in slices of a second. The kernel may hand a signal for the process
        (SIGTERM) to any of its threads, and Python runs its handler only once the main thread runs; a wait without
        end would leave main()'s SIGTERM unheard until the next request came."""
        while True:
            with contextlib.suppress(queue.Empty):
                return self.jobs.get(timeout=1)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run_forever, name="imagine-engine", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Cancels the running job and every waiting one, telling their clients, then ends run_forever; once."""
        shutting_down = ImagineError("the server is shutting down", 503)
        with self.accepting:
            if self.stopping:
                return
            self.stopping = True
            for running in self.batch:
                running.cancel(shutting_down)
            while not self.jobs.empty():
                waiting = self.jobs.get_nowait()
                waiting.cancel(shutting_down)
                waiting.events.put(Failed(shutting_down, cancelled=True))
            self.jobs.put(None)

    def run(self, job: Job) -> None:
        """Runs one job and ends it with its last event (Finished or Failed), whatever happens inside."""
        if job.cancelled():  # its client left while it waited
            log.info("dropped a request: %s", job.cancel_reason.message)
            job.events.put(Failed(job.cancel_reason, cancelled=True))
            return
        self.running, self.batch = job, [job]
        if job.only != "unload":
            job.events.put(Loading())
        token = cancel_check.set(job.cancelled)  # what the cancel points inside every layer ask
        try:
            job.events.put(self.draw(job))
        except Exception as error:  # the server must outlive any failure inside a generation
            job.events.put(self.failed(job, error))
        finally:
            cancel_check.reset(token)
            self.running, self.batch = None, []

    def run_batch(self, jobs: list) -> None:
        """Runs jobs that may share a pipeline call (engine/batching.py) as one batch, each ended with its own last
        event: a job cancelled, or whose own part fails before drawing (its prompts' embeddings, its previews'
        decoder), ends alone and the others draw on; what fails for all (the model, the LoRAs) ends all."""
        batch = Batch(jobs)
        self.running, self.batch = jobs[0], jobs
        for job in jobs:
            job.events.put(Loading())
        try:
            # 1. Load the model (or find it loaded), once for all.
            model = self.models.get(jobs[0].model_key)
            for job in batch.live():
                job.events.put(Loaded())
            # 2.-4. Each request filled in, its previews' decoder found and its prompts encoded, each on its own: one
            # that fails ends alone. The LoRAs, the same for all, are switched once, before any prompt is encoded.
            decoders = self.each_alone(batch, lambda job: self.filled(job, model)[1])
            choose_unet(model, jobs[0].request)
            lora_hashes = use_loras(self.settings, model, jobs[0].request.loras)
            conditionings = self.each_alone(batch, lambda job: self.conditioning(model, job.request))
            # 5. Prompts of other lengths give conditionings of other shapes, which cannot share a call: a call each.
            groups = {}
            for job in batch.live():
                groups.setdefault(conditioning_shape(conditionings[job]), []).append(job)
            for group in groups.values():
                self.draw_group_alone(batch, group, model, decoders, conditionings, lora_hashes)
        except Exception as error:  # the server must outlive any failure inside a generation
            for job in batch.live():
                batch.end(job, self.failed(job, error))
        finally:
            self.running, self.batch = None, []

    def each_alone(self, batch: Batch, work) -> dict:
        """Job -> work(job) for each job of the batch that still draws, each under its own cancel check: a job that
        is cancelled, or that `work` fails for, ends alone."""
        done = {}
        for job in batch.live():
            token = cancel_check.set(job.cancelled)
            try:
                if job.cancelled():
                    raise Cancelled
                done[job] = work(job)
            except Exception as error:
                batch.end(job, self.failed(job, error))
            finally:
                cancel_check.reset(token)
        return done

    def draw_group_alone(self, batch: Batch, jobs: list, *inputs) -> None:
        """draw_group, whose failure (or whose jobs all cancelled) ends its own jobs only, not the next group's."""
        try:
            self.draw_group(batch, jobs, *inputs)
        except Exception as error:
            for job in batch.live(jobs):
                batch.end(job, self.failed(job, error))

    def draw_group(self, batch: Batch, jobs: list, model, decoders: dict, conditionings: dict, lora_hashes) -> None:
        """Draws `jobs` of the batch in one pipeline call, each picture from its own request's prompts and seed, and
        ends each with its own Finished. Each job sees its own rows: its Progress, its previews, its cancel. A job
        cancelled meanwhile ends at once; its rows are computed to the end with the others', and the call stops only
        once none is left."""
        started = time.perf_counter()
        requests = [job.request for job in jobs]
        parts = rows(requests)
        conditioning = joined_conditioning([conditionings[job] for job in jobs], [req.n for req in requests])
        reporters = [
            (job, part, self.step_reporter(job, model, pictures_of(job.request), decoders[job]))
            for job, part in zip(jobs, parts, strict=True)
        ]

        def on_step(step, steps, latents):
            if batch.all_cancelled(jobs):
                raise Cancelled
            drawing = batch.live(jobs)
            # A list, not a generator: every job still drawing is told of the step, whichever asks to finish early.
            return any([report(step, steps, latents[part]) for job, part, report in reporters if job in drawing])

        log.info("drawing %d requests as one batch of %d pictures", len(jobs), sum(req.n for req in requests))
        for job in jobs:
            job.started = time.time()
            job.events.put(Started())
        token = cancel_check.set(lambda: batch.all_cancelled(jobs))
        try:
            with telling_when_compiling(*(req.notices for req in requests)):
                images = self.generate(model, batch_request(requests), on_step, conditioning)
        finally:
            cancel_check.reset(token)
        seconds = time.perf_counter() - started
        self.last_seconds = seconds / len(jobs)  # for Retry-After: what one request of the queue costs
        log.info("generated %d requests in %.1f s", len(jobs), seconds)
        stopped = any(job.stop_early is not None for job in jobs)
        for job, part in zip(jobs, parts, strict=True):
            if not job.cancelled():
                batch.end(job, self.finished(job, model, images[part], lora_hashes, seconds, stopped))
        batch.all_cancelled(jobs)

    def failed(self, job: Job, error: Exception) -> Failed:
        """The last event of a job that `error` ended, logged; running out of memory unloads every model."""
        if isinstance(error, Cancelled):
            log.info("stopped after step %d: %s", job.step, job.cancel_reason.message)
            return Failed(job.cancel_reason, cancelled=True)
        if isinstance(error, ImagineError):
            return Failed(error)
        if isinstance(error, torch.OutOfMemoryError):
            # As ComfyUI does: give the memory back by unloading every model; the next request reloads one.
            log.error("out of memory; unloading every model", exc_info=error)
            for key in list(self.models.loaded):
                self.models.unload(key)
            return Failed(ImagineError("the device ran out of memory; try a smaller picture", 500))
        log.error("generation failed", exc_info=error)
        return Failed(ImagineError(f"generation failed: {type(error).__name__}: {error}", 500))

    def draw(self, job: Job):
        """The job's recipe; returns its last event (Loaded or Unloaded for a load or unload job, else Finished)."""
        started = time.perf_counter()
        if job.only == "unload":
            if job.model_key in self.models.loaded:
                self.models.unload(job.model_key)
            return Unloaded()
        if job.only == "upscale":
            images = self.upscalers.upscale_pictures(job.request)
            seconds = time.perf_counter() - started
            log.info("upscaled %d pictures in %.1f s", len(images), seconds)
            return Upscaled(images, round(seconds, 3))
        # 1. Load the model (or find it loaded); a load job ends here.
        model = self.models.get(job.model_key)
        if job.only == "load":
            return Loaded()
        job.events.put(Loaded())
        # 2. Fill the request in, and find the TAESD decoder its previews take.
        req, decoder = self.filled(job, model)
        # 3. Pick the UNet (compiled or not), switch its LoRAs to the request's.
        choose_unet(model, req)
        lora_hashes = use_loras(self.settings, model, req.loras)
        # 4. Encode the prompts.
        conditioning = self.conditioning(model, req)
        job.started = time.time()
        job.events.put(Started())
        # 5. Draw the batch in one pipeline call, on CPUs too: faster than one by one there as well, in the
        # same peak memory (docs/performance.md, Batches).
        each = pictures_of(req)
        on_step = cancellable(job, self.step_reporter(job, model, each, decoder))
        with telling_when_compiling(req.notices):
            images = self.generate(model, req, on_step, conditioning)
        # 6. Each picture with its settings, as its PNG will carry them.
        seconds = time.perf_counter() - started
        self.last_seconds = seconds
        log.info("generated in %.1f s (seed %d)", seconds, req.seed)
        return self.finished(job, model, images, lora_hashes, seconds, job.stop_early is not None)

    def filled(self, job: Job, model: LoadedModel) -> tuple:
        """(the job's request filled in where it left size, steps, guidance and sampler out: the family's own, within
        --max-size; the TAESD decoder its previews take, or None), its drawing logged. A request for a decoder that
        cannot be had ends here."""
        req = job.request = for_family(job.request, model.family, self.settings.max_size)
        # img2img and inpainting skip the first part of the schedule: int(num_steps * strength) steps run.
        steps = req.num_steps if req.img is None else int(req.num_steps * req.strength)
        if wants_hires(req):  # the hires fix's second pass follows, at its own size
            steps += second_pass_steps(req)[1]
        log.info(
            "generating %d x %dx%d, %d steps, %s, seed %d, model %s",
            req.n, req.width, req.height, steps, req.sampler, req.seed, escaped(model.name),
        )  # fmt: skip
        decoder = self.tiny_decoders.for_previews(model_folders(self.settings.models_dir), model.family, req.preview)
        return req, decoder

    def conditioning(self, model: LoadedModel, req: GenerationRequest) -> dict:
        """The request's prompts encoded (cancellable too: a long prompt is many encoder passes), the hires fix's
        second pass's too where it has its own, or found encoded by an earlier request (engine/encodings.py). The
        flow-matching families' prompts are encoded by their pipelines' encode_prompt, with their chat templates and
        no embeddings."""
        if model.family.flow:
            return flow_conditioning(model, req, model.encodings)
        conditioning = self.encoded(model, req.prompt, req.neg, req.clip_skip)
        second_prompts = second_pass_prompts(req)
        if wants_hires(req) and second_prompts != (req.prompt, req.neg):
            conditioning[SECOND_PASS] = self.encoded(model, *second_prompts, req.clip_skip)
        return conditioning

    def finished(self, job: Job, model, images: list, lora_hashes, seconds: float, stopped: bool) -> Finished:
        """The job's Finished: each picture with its settings, as its PNG will carry them; where the call `stopped`
        early (A1111's interrupt or skip), a picture cut short with the steps it ran."""
        req = job.request
        each = pictures_of(req)
        cut = (job.step, job.steps) if stopped and job.step < job.steps else None
        pictures = [
            (image, generation_parameters(picture, model.name, model.family, lora_hashes, cut))
            for image, picture in zip(images, each, strict=True)
        ]
        seeds = [picture.seed for picture in each]
        image, parameters = pictures[0]
        finished = Finished(
            image, parameters, req.seed, model.name, model.family, job.step, round(seconds, 3), pictures, seeds
        )
        return dataclasses.replace(finished, interrupted=cut is not None, notices=req.notices)

    def encoded(self, model: LoadedModel, prompt: str, neg: str, clip_skip: int) -> dict:
        """A prompt and negative prompt encoded with the embeddings they name; their <lora:...> tags are no text. Kept
        in the model's encodings for the next request that sends its text encoders the same (engine/encodings.py)."""
        prompt, neg = without_lora_tags(prompt), without_lora_tags(neg)
        embeddings = prompt_embedding_vectors(self.settings, model, prompt, neg)
        key = (prompt, neg, clip_skip, text_encoder_loras(model), embedding_versions(model, embeddings))

        def encode():
            with torch.inference_mode():
                return prompt_embeddings(model.txt2img, prompt, neg, clip_skip, embeddings)

        return dict(model.encodings.get(key, encode))  # a copy: the hires fix adds its second pass's to it

    def step_reporter(self, job: Job, model, each: list, decoder=None):
        """The step callback for `job` (its rows of the latents): it records the step, sends Progress and the
        previews the job's readers asked for (Job.previews_at), with the TAESD `decoder` where there is one, within
        TAESD_SHARE of the time, and says when the job should finish early."""
        began = time.perf_counter()
        told = [began]  # when the log last told how far it got
        decoding = [0.0]  # seconds the TAESD previews took so far

        def on_step(step, steps, latents):
            now = time.perf_counter()
            if step == 1 and COMPILING not in job.request.notices:  # a step that compiled says nothing of the rest
                tell_time_left(job, now - began, steps)
            elif now - told[0] >= PROGRESS_LOG_SECONDS and step < steps:
                log.info("step %d/%d; about %.0f s left", step, steps, (now - began) / step * (steps - step))
            if step == 1 or now - told[0] >= PROGRESS_LOG_SECONDS:
                told[0] = now
            job.step, job.steps = step, steps
            job.events.put(Progress(step, steps))
            previews = job.previews_at(step, steps)
            if decoder is not None and decoding[0] > TAESD_SHARE * (now - began):
                previews = 0  # over the TAESD previews' share of the time: this step's are left out
            for index in range(previews):
                image = preview_image(model, each[index], latents[index : index + 1], decoder)
                send_preview(job, Preview(step, steps, image, index))
            if decoder is not None:
                decoding[0] += time.perf_counter() - now
            return job.stop_early is not None

        return on_step


def pictures_of(req: GenerationRequest) -> list:
    """Each picture of a request as a request of its own, with its seeds: what its PNG says drew it."""
    return [
        dataclasses.replace(req, seed=seed, variation_seed=variation_seed, n=1)
        for seed, variation_seed in picture_seeds(req)
    ]


def cancellable(job: Job, on_step):
    """A step callback that stops a cancelled job before it reports the step."""

    def on_step_unless_cancelled(step, steps, latents):
        if job.cancelled():
            raise Cancelled
        return on_step(step, steps, latents)

    return on_step_unless_cancelled


def send_preview(job: Job, preview: Preview) -> None:
    if preview.index == 0:
        job.latest = preview  # what a poll reads (Job.latest_preview)
    job.events.put(preview)


def tell_time_left(job: Job, took: float, steps: int) -> None:
    """One line once the first step is timed, so that someone watching the log knows how long to wait (a 512x512
    picture of a real model takes minutes on a small CPU, and the first request used to sit silent); a picture of
    minutes is said to take them, in the log and in its answer's notices."""
    log.info("step 1/%d took %.1f s; about %.0f s left", steps, took, took * (steps - 1))
    if took * steps >= LONG_PICTURE_SECONDS:
        minutes = max(1, round(took * steps / 60))
        notice = (
            f"this picture takes about {minutes} minutes here ({took:.1f} s a step, {steps} steps): fewer steps are "
            "quicker in proportion, fewer pixels more than that"
        )
        log.warning("%s", notice)
        job.request.notices.append(notice)
