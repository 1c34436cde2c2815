"""AUTOMATIC1111's API (/sdapi/v1/*) for the programs written for that server (Open WebUI, SillyTavern, LibreChat,
webuiapi): a translator to and from GenerationRequest around native.respond, plus A1111's options, progress,
lists and png-info (api/a1111_files.py). Its state (model hashes) is its own."""

import json
import logging
import time
from pathlib import Path

from flask import Blueprint, current_app, jsonify, request
from PIL import Image

from api.a1111_extras import EXTRAS_FIELD_NAMES, a1111_upscaler, extras_images, extras_request
from api.a1111_files import ModelHashes, a1111_model_name, a1111_titles, png_info
from api.a1111_hires import A1111_STRENGTH, a1111_hires_fields, a1111_subseeds, a1111_variation
from api.guard import has_one_owner, is_loopback
from api.native import (
    Answer,
    current_engine,
    current_settings,
    generation_slot,
    last_event,
    read_json_body,
    respond,
    upscaled,
)
from engine.errors import ImagineError
from engine.fields import decode_image, integer, rounded_size, text
from engine.hires import LATENT_UPSCALERS, UPSCALERS, wants_hires
from engine.job import Finished, Job
from engine.loras import embedding_listing, lora_listing
from engine.previews import png_base64
from engine.request import MAX_NAME_CHARS, parse_request
from engine.samplers import SAMPLER_NAMES, sampler_label, schedule_label, schedules_for, split_sampler
from engine.schedules import AUTOMATIC, LABELS, SCHEDULE_NAMES, SCHEDULES, schedule_name
from engine.settings import Settings

log = logging.getLogger("imagine")


A1111_VERSION = "imagine"  # `version` in info; A1111 writes its git tag there


# A1111's sampler names (GET /sdapi/v1/samplers) -> ours.
A1111_SAMPLERS = {sampler_label(name): name for name in SAMPLER_NAMES}


A1111_SAMPLER = "Euler"  # what A1111 draws with when a request names no sampler


# Our field -> A1111's, so that an error names the field the client sent.
A1111_FIELD_NAMES = {
    "neg": "negative_prompt",
    "num_steps": "steps",
    "guidance": "cfg_scale",
    "distilled_guidance": "distilled_cfg_scale",
    "strength": "denoising_strength",
    "img": "init_images[0]",
    "inpaint_padding": "inpaint_full_res_padding",
    "n": "batch_size",
    "variation_seed": "subseed",
    "variation_strength": "subseed_strength",
    "seed_resize_from_width": "seed_resize_from_w",
    "seed_resize_from_height": "seed_resize_from_h",
    "model": "override_settings.sd_model_checkpoint",
    "hires_scale": "hr_scale",
    "hires_width": "hr_resize_x",
    "hires_height": "hr_resize_y",
    "hires_upscaler": "hr_upscaler",
    "hires_steps": "hr_second_pass_steps",
    "hires_strength": "denoising_strength",
    "hires_sampler": "hr_sampler_name",
    "hires_schedule": "hr_scheduler",
    "hires_prompt": "hr_prompt",
    "hires_neg": "hr_negative_prompt",
    "hires_guidance": "hr_cfg",
    **EXTRAS_FIELD_NAMES,
}


# Features of A1111 that Imagine lacks, and how a request switches each on: they are ignored, logged once,
# and named in info's imagine_ignored, so that a client sending its full form never fails.
A1111_UNSUPPORTED = {
    "restore_faces": lambda value: value is True,
    "script_name": lambda value: bool(value),
    "alwayson_scripts": lambda value: bool(value),
    "styles": lambda value: bool(value),
    "refiner_checkpoint": lambda value: bool(value),
}


A1111_LOGGED = set()  # the unsupported features already logged once


def a1111_sampler(body: dict) -> tuple:
    """(our sampler, our schedule, A1111's sampler name, what was left out) for sampler_name (or the older
    sampler_index) and scheduler; combined names such as "DPM++ 2M Karras" are split. An unknown sampler falls back
    to A1111's default, and a schedule unknown or one the sampler cannot use to "automatic", as A1111 does, so a
    client's names from another server still draw; what was dropped is named in info's imagine_ignored."""
    name = text(body, "sampler_name", None) or text(body, "sampler_index", None) or A1111_SAMPLER
    sampler, schedule = split_sampler(name)
    sampler, dropped = sampler or A1111_SAMPLERS[A1111_SAMPLER], [] if sampler else ["sampler_name"]
    asked = text(body, "scheduler", None)
    if asked is not None and asked.lower() != AUTOMATIC:
        schedule = schedule_name(asked)
    if schedule is not None and schedule not in schedules_for(sampler):
        schedule = None
    if asked is not None and schedule is None and asked.lower() != AUTOMATIC:
        dropped.append("scheduler")
    return sampler, schedule or AUTOMATIC, sampler_label(sampler), dropped


A1111_RNG = {"GPU": "gpu", "CPU": "cpu", "NV": "nv"}  # override_settings.randn_source -> our rng


def a1111_rng(overrides: dict) -> str | None:
    source = overrides.get("randn_source")
    if source is None:
        return None
    if source not in A1111_RNG:
        raise ImagineError(f"override_settings.randn_source must be GPU, CPU or NV, not {json.dumps(source)[:80]}")
    return A1111_RNG[source]


def a1111_overrides(body: dict) -> dict:
    overrides = body.get("override_settings")
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise ImagineError(f"override_settings must be an object, not {json.dumps(overrides)[:80]}")
    return overrides


def a1111_mask(body: dict) -> Image.Image | None:
    """The img2img mask as our mask field takes it (white repaints): an RGBA mask whose alpha is used is read by its
    alpha, as A1111 does, and inpainting_mask_invert 1 swaps what is kept and what is repainted."""
    data = text(body, "mask", None)
    invert = integer(body, "inpainting_mask_invert", 0, 0, 1)
    if data is None:
        return None
    mask = decode_image(data, "mask", "RGBA")
    alpha = mask.getchannel("A")
    mask = alpha if alpha.getextrema() != (255, 255) else mask.convert("L")
    if invert:
        mask = Image.eval(mask, lambda value: 255 - value)
    return mask


def a1111_ignored(body: dict) -> list:
    ignored = [field for field, switched_on in A1111_UNSUPPORTED.items() if switched_on(body.get(field))]
    for field in ignored:
        if field not in A1111_LOGGED:
            A1111_LOGGED.add(field)
            log.warning("AUTOMATIC1111 API: %s is not supported and is ignored", field)
    return ignored


def a1111_request(body: dict, img2img: bool, model_name, settings: Settings, upscalers: tuple = UPSCALERS) -> tuple:
    """An A1111 txt2img/img2img body as (GenerationRequest, what else the answer needs). Its fields become a
    /generate body that parse_request checks; an error names A1111's field. `model_name(checkpoint)` finds the
    model a checkpoint title names; `upscalers` are the hires fix's upscalers that can be used."""
    overrides = a1111_overrides(body)
    sampler, schedule, sampler_name, dropped = a1111_sampler(body)
    batch_size = integer(body, "batch_size", 1, 1, settings.max_batch)
    n_iter = integer(body, "n_iter", 1, 1, settings.max_batch)
    if batch_size * n_iter > settings.max_batch:
        raise ImagineError(f"batch_size x n_iter is {batch_size * n_iter}; at most {settings.max_batch} pictures")
    clip_skip = overrides.get("CLIP_stop_at_last_layers", body.get("clip_skip"))
    generate_body = {
        "prompt": body.get("prompt") or "",
        "neg": body.get("negative_prompt"),
        "width": rounded_size(body.get("width")),  # info tells the size drawn
        "height": rounded_size(body.get("height")),
        "num_steps": body.get("steps"),
        "guidance": body.get("cfg_scale"),
        "distilled_guidance": body.get("distilled_cfg_scale"),
        "sampler": sampler,
        "schedule": schedule,
        "rng": a1111_rng(overrides),
        "seed": body.get("seed"),
        **a1111_variation(body),
        "n": batch_size * n_iter,
        "clip_skip": clip_skip,
        "tiling": body.get("tiling"),
    }
    if overrides.get("sd_model_checkpoint"):
        generate_body["model"] = model_name(text(overrides, "sd_model_checkpoint", None, MAX_NAME_CHARS))
    if img2img:
        generate_body |= a1111_img2img_fields(body)
    elif body.get("enable_hr") is True:
        hires, hires_dropped = a1111_hires_fields(body, sampler, upscalers)
        generate_body |= hires
        dropped += hires_dropped
    req = parse_request(generate_body, settings.max_size, settings.max_batch, settings.rng)
    understood = {
        "sampler_name": sampler_name,
        "batch_size": batch_size,
        "n_iter": n_iter,
        "send_images": body.get("send_images", True) is not False,
        "restore_afterwards": body.get("override_settings_restore_afterwards", True) is not False,
        "ignored": a1111_ignored(body) + dropped,
    }
    return req, understood


def a1111_img2img_fields(body: dict) -> dict:
    """img2img's own fields as /generate's: the picture to start from, the strength, and inpainting's mask."""
    images = body.get("init_images")
    if not isinstance(images, list) or not images or images[0] is None:
        raise ImagineError("init_images must be a list holding the picture to start from, as base64")
    only_masked = body.get("inpaint_full_res", True)
    return {
        "img": images[0],
        "strength": A1111_STRENGTH if body.get("denoising_strength") is None else body["denoising_strength"],
        "mask": a1111_mask(body),
        "mask_blur": body.get("mask_blur"),
        "inpaint_area": "masked" if only_masked not in (False, 0) else "whole",
        "inpaint_padding": body.get("inpaint_full_res_padding"),
    }


def a1111_answer(body: dict, event: Finished, job: Job, understood: dict, title: dict) -> dict:
    """txt2img's and img2img's answer: the pictures as bare base64 PNGs, the request as understood, and
    `info`, a JSON string in A1111's layout (long: two flat lists of A1111's fields, as its clients read them)."""
    req, seeds, family = job.request, event.seeds, event.family
    prompts = [req.prompt] * len(seeds)
    scheduler = schedule_label(req.sampler, req.schedule, family.flow)
    info = {
        "prompt": req.prompt,
        "all_prompts": prompts,
        "negative_prompt": req.neg,
        "all_negative_prompts": [req.neg] * len(seeds),
        "seed": event.seed,
        "all_seeds": seeds,
        **a1111_subseeds(req, seeds),
        "width": event.image.width,
        "height": event.image.height,
        "sampler_name": understood["sampler_name"],
        "scheduler": scheduler,
        **a1111_guidance(req, family),
        "steps": event.steps if event.interrupted else req.num_steps,
        "interrupted": event.interrupted,
        "batch_size": understood["batch_size"],
        "restore_faces": False,
        "sd_model_name": Path(event.model).stem,
        "sd_model_hash": title.get("hash"),
        "denoising_strength": req.strength if req.img is not None else req.hires_strength if wants_hires(req) else None,
        "index_of_first_image": 0,
        "infotexts": [parameters for _, parameters in event.pictures],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(time.time() - event.seconds)),
        "clip_skip": req.clip_skip,
        "version": A1111_VERSION,
        "imagine_ignored": understood["ignored"],
    }
    images = [png_base64(image, parameters) for image, parameters in event.pictures]
    parameters = {key: value for key, value in body.items() if key not in ("auth", "init_images", "mask")}
    parameters |= {
        "prompt": req.prompt,
        "negative_prompt": req.neg,
        "seed": event.seed,
        "width": event.image.width,
        "height": event.image.height,
        "steps": info["steps"],
        **a1111_guidance(req, family),
        "sampler_name": understood["sampler_name"],
        "scheduler": scheduler,
        "batch_size": understood["batch_size"],
        "n_iter": understood["n_iter"],
        "denoising_strength": info["denoising_strength"],
    }
    return {"images": images if understood["send_images"] else [], "parameters": parameters, "info": json.dumps(info)}


def a1111_guidance(req, family) -> dict:
    """The guidance drawn with, as Forge reports it: FLUX.1-dev's distilled guidance beside a cfg_scale of 1."""
    if family.guidance == "distilled":
        return {"cfg_scale": 1.0, "distilled_cfg_scale": req.guidance}
    return {"cfg_scale": req.guidance}


def a1111_progress(job: Job | None, preview: str | None) -> dict:
    """GET /sdapi/v1/progress of the generating job (None: nothing runs), with its latest `preview` (base64 PNG)."""
    state = {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": "",
        "job_count": 0,
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    if job is None:
        return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None}
    step, steps, started = job.step, job.steps, job.started
    done = min(1.0, step / steps if steps else 0)
    elapsed = time.time() - started
    state |= {
        "skipped": job.stop_early == "skip",
        "interrupted": job.stop_early == "interrupt",
        "job": "img2img" if job.request.img is not None else "txt2img",
        "job_count": 1,  # A1111 counts pipeline calls; a batch is one
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
        "sampling_step": step,
        "sampling_steps": steps,
    }
    return {
        "progress": done,
        "eta_relative": elapsed / done - elapsed if done else 0,
        "state": state,
        "current_image": preview,  # the batch's first picture's, as A1111 shows
        "textinfo": f"Step {step}/{steps}" + (f", {job.request.n} pictures" if job.request.n > 1 else ""),
    }


# ---------------------------------------------------------------------------------------------
# The routes
# ---------------------------------------------------------------------------------------------

blueprint = Blueprint("a1111", __name__, url_prefix="/sdapi/v1")


@blueprint.record_once
def keep_model_hashes(state):
    state.app.extensions["imagine.hashes"] = ModelHashes()


def titles() -> dict:
    return a1111_titles(current_engine().catalog, current_app.extensions["imagine.hashes"])


def to_error(error: ImagineError) -> dict:
    """An error as A1111 answers it (its clients read `detail`), naming each field as the client sent it; its status,
    422 for every bad value, is set where errors of every dialect are answered (imagine.py)."""
    message = error.text(A1111_FIELD_NAMES)
    return {"error": message, "detail": message}


def to_answer(body: dict, img2img: bool, settings: Settings, titles: dict, upscalers: tuple = UPSCALERS) -> Answer:
    """An A1111 txt2img or img2img body as the engine's request and the way to answer it; `titles` are the models as
    sd-models lists them (a1111_titles), by which a body names its checkpoint and the answer gives its hash;
    `upscalers` the hires fix's upscalers that can be used (usable_upscalers)."""

    def model_name(checkpoint: str) -> str:
        return a1111_model_name(titles, checkpoint)

    req, understood = a1111_request(body, img2img, model_name, settings, upscalers)

    def whole(job: Job, event: Finished) -> dict:
        return a1111_answer(body, event, job, understood, titles.get(job.model_key, {}))

    keep = req.model if req.model is not None and not understood["restore_afterwards"] else None
    return Answer(req, whole, interruptible=True, default_after=keep)


@blueprint.post("/txt2img")
def txt2img_route():
    return respond(lambda: to_answer(read_json_body(), False, current_settings(), titles(), usable_upscalers()))


@blueprint.post("/img2img")
def img2img_route():
    return respond(lambda: to_answer(read_json_body(), True, current_settings(), titles()))


@blueprint.get("/sd-models")
def models_route():
    return jsonify([{**listed, "config": None} for listed in titles().values()])


def current_model() -> dict:
    """The default model as sd-models lists it; only its name while its file is missing (moved, not yet copied)."""
    try:
        key = current_engine().catalog.resolve(None)
    except ImagineError:
        return {}
    return titles().get(key, {})


@blueprint.get("/options")
def options_route():
    current = current_model()
    return jsonify(
        sd_model_checkpoint=current.get("title", current_engine().catalog.default),
        sd_checkpoint_hash=current.get("sha256"),
        CLIP_stop_at_last_layers=1,
        sd_checkpoints_limit=current_settings().max_loaded,
        sd_vae="Automatic",
        samples_format="png",
        enable_pnginfo=True,
        show_progress_every_n_steps=1,
        live_previews_enable=True,
    )


@blueprint.post("/options")
def set_options_route():
    with generation_slot():  # the load waits in the engine's queue as a generation does
        body = read_json_body()
        if body.get("sd_model_checkpoint") is not None:
            engine = current_engine()
            name = a1111_model_name(titles(), text(body, "sd_model_checkpoint", None, MAX_NAME_CHARS))
            last_event(engine.load_model(name))
            engine.catalog.default = name  # for this run of the server; --model stays the default after a restart
    return jsonify(None)


@blueprint.get("/progress")
def progress_route():
    job = current_engine().generating()
    # A keyless server open to other machines shows no stranger another's picture (see has_one_owner).
    skip = request.args.get("skip_current_image", "false").lower() == "true" or not has_one_owner(current_settings())
    latest = None if job is None or skip else job.latest_preview()  # asking keeps previews coming (Job.latest_preview)
    progress = a1111_progress(job, None if latest is None else latest.png)
    if (fleet := current_app.extensions.get("imagine.fleet")) is not None:
        progress["fleet"] = fleet.health()  # beside this server's own generation: the shared queue (engine/fleet.py)
    return jsonify(progress)


def finish_early(how: str):
    # Only a generation asked for through this API: an interrupt from one A1111 client (a SillyTavern Stop)
    # must not cut the picture of a client of /generate or /v1 that knows nothing of it.
    # A batch's jobs are all of this API or none (engine/batching.py): A1111's interrupt ends the batch, as in A1111.
    for running in current_engine().batch:
        if running.interruptible:
            running.finish_early(how)


@blueprint.post("/interrupt")
def interrupt_route():
    finish_early("interrupt")
    return jsonify({})


@blueprint.post("/skip")
def skip_route():
    finish_early("skip")
    return jsonify(None)


@blueprint.get("/samplers")
def samplers_route():
    return jsonify([{"name": name, "aliases": [], "options": {}} for name in A1111_SAMPLERS])


@blueprint.get("/schedulers")
def schedulers_route():
    return jsonify(
        [
            {
                "name": name,
                "label": LABELS[name],
                "aliases": list(SCHEDULES[name].aliases) if name in SCHEDULES else None,
                "default_rho": {"karras": 7.0, "polyexponential": 1.0}.get(name, -1),
                "need_inner_model": name in ("uniform", "sgm_uniform", "simple", "normal", "ddim", "beta"),
            }
            for name in SCHEDULE_NAMES
        ]
    )


@blueprint.get("/loras")
def loras_route():
    settings = current_settings()
    return jsonify(
        [
            {
                "name": lora["name"],
                "alias": lora["name"],
                "path": lora["name"],
                "metadata": {},
                "family": lora["family"],  # Imagine's own: which family the LoRA is for (None where it cannot tell)
            }
            for lora in current_engine().catalog.reader.read(lambda: lora_listing(settings))
        ]
    )


@blueprint.get("/embeddings")
def embeddings_route():
    settings = current_settings()
    files = current_engine().catalog.reader.read(lambda: embedding_listing(settings))
    loaded = {
        each["name"]: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": None}
        for each in files
    }
    return jsonify(loaded=loaded, skipped={})


@blueprint.get("/upscalers")
def upscalers_route():
    # Those that can be used: a broken file is listed, with why, by Imagine's own GET /upscalers.
    return jsonify([a1111_upscaler(upscaler) for upscaler in usable_upscaler_listing()])


def usable_upscaler_listing() -> list:
    engine = current_engine()
    return [upscaler for upscaler in engine.catalog.reader.read(engine.upscalers.listing) if upscaler.error is None]


def usable_upscalers() -> tuple:
    """The names a hires fix can upscale with: the latent modes and every upscaler that can be used."""
    return (*LATENT_UPSCALERS, *(upscaler.name for upscaler in usable_upscaler_listing()))


@blueprint.post("/extra-single-image")
def extra_single_image_route():
    info, event = extras(single=True)
    return jsonify(html_info=info, image=png_base64(event.images[0]))


@blueprint.post("/extra-batch-images")
def extra_batch_images_route():
    info, event = extras(single=False)
    return jsonify(html_info=info, images=[png_base64(image) for image in event.images])


def extras(single: bool) -> tuple:
    """(html_info, Upscaled) of an Extras request, read and run through the engine (native.upscaled)."""
    said = {}

    def read():
        body, settings = read_json_body(), current_settings()
        req, said["info"] = extras_request(body, extras_images(body, single, settings), settings)
        return req

    event = upscaled(read)
    return said["info"], event


@blueprint.get("/latent-upscale-modes")
def latent_upscale_modes_route():
    return jsonify([{"name": name} for name in LATENT_UPSCALERS])


# sd-modules is Forge's list of extra text encoders and VAEs, which SillyTavern 1.19 asks for on every Connect.
for _name in ("sd-vae", "sd-modules", "face-restorers", "prompt-styles", "hypernetworks"):
    blueprint.add_url_rule(f"/{_name}", f"{_name}_route", lambda: jsonify([]))


@blueprint.get("/scripts")
def scripts_route():
    return jsonify(txt2img=[], img2img=[])


@blueprint.get("/cmd-flags")
def cmd_flags_route():
    # Only what a client may know: the models folder and the key are not told.
    settings = current_settings()
    return jsonify(api=True, nowebui=True, listen=not is_loopback(settings.host), port=settings.port)


@blueprint.post("/png-info")
def png_info_route():
    return jsonify(png_info(text(read_json_body(), "image", "")))
