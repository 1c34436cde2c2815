#!/usr/bin/env python3
"""imagine: generate a picture from the command line, through the Imagine server or in this process.

    imagine 'a lighthouse at dusk, oil painting' -w 768 -h 512 -s 'DPM++ 2M'

Without --local it posts to the server (--server, IMAGINE_SERVER, or http://127.0.0.1:5000); when no
server was named and none answers there, it generates locally instead. The PNG is saved in the
current directory under a name made from the prompt (or at -o), and its path printed on stdout;
progress goes to stderr when stderr is a terminal.

    imagine 'a lighthouse' --detach          # queues it as a job on the server; prints the job's id
    imagine --job 5f0c...                     # waits for that job (even from another machine) and saves it
"""

import argparse
import base64
import contextlib
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent  # through the `imagine` symlink too
VENV = PROJECT / ".venv"  # where the README installs the requirements


def in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def run_in_venv() -> None:
    """Runs this script again on the project's .venv when it exists and another Python runs it: a new terminal,
    or the `imagine` symlink on PATH, starts outside the virtual environment that holds the requirements."""
    python = VENV / "bin" / "python"
    # The variable stops a loop where .venv/bin/python is no virtual environment's (sys.prefix is not .venv).
    if python.is_file() and not in_venv() and "IMAGINE_CLI_IN_VENV" not in os.environ:
        script = str(Path(__file__).resolve())
        os.execve(python, [str(python), script, *sys.argv[1:]], {**os.environ, "IMAGINE_CLI_IN_VENV": "1"})


def missing_module(error: ImportError) -> str:
    """One line for a missing dependency, naming Imagine's virtual environment, where the requirements belong."""
    requirements = PROJECT / "requirements.txt"
    if in_venv():
        fix = f"install its requirements: {sys.executable} -m pip install -r {requirements}"
    elif (VENV / "bin" / "python").is_file():
        fix = f"run the CLI with the Python of Imagine's virtual environment: {VENV / 'bin' / 'python'}"
    else:
        fix = (
            f"create Imagine's virtual environment: python3 -m venv {VENV} && {VENV}/bin/pip install -r {requirements}"
        )
    return f"imagine: this Python ({sys.executable}) has no module {error.name!r}: {fix}"


if __name__ == "__main__":
    run_in_venv()

try:
    from tqdm import tqdm

    from api.client import (
        ClientError,
        NoServer,
        answer_fields,
        detach,
        job_path,
        job_updates,
        pull_lines,
        remote_updates,
        remove_model,
        server_request,
    )
except ImportError as error:
    sys.exit(missing_module(error))

DEFAULT_SERVER = "http://127.0.0.1:5000"
# The server's sampler table (engine/samplers.py) comes with diffusers, too slow to import for --help: its names
# are written out here, and a test checks that they are all of them.
SAMPLER_NAMES = (
    "Euler, Euler a, Heun, LMS, DPM2, DPM2 a, DPM++ 2S a, DPM++ 2M, DPM++ SDE, DPM++ 2M SDE, DPM++ 2M SDE Heun, "
    "DPM++ 3M SDE, DDIM, LCM, with a"
    " schedule type if wanted, such as 'DPM++ 2M Karras' or 'Euler SGM Uniform' (the server's GET /samplers lists them)"
)


def parse_args(argv=None) -> argparse.Namespace:
    # --list, --pull, --rm and --job need no prompt; the prompt stays a required positional, as the spec has it, for
    # the rest.
    listing = argparse.ArgumentParser(add_help=False)
    for flag in ("--job", "--server", "--pull", "--rm"):
        listing.add_argument(flag)
    listing.add_argument("--list", action="store_true")
    listing.add_argument("--all", action="store_true")
    known, _ = listing.parse_known_args(argv)
    if known.list or known.pull or known.rm:
        return known
    # -h is the height, as in the spec, so help is --help only.
    parser = argparse.ArgumentParser(prog="imagine", description="SD image generator", add_help=False)
    parser.add_argument("prompt", nargs="*" if known.job else "+", help="Prompt for model (the words are joined)")
    add_picture_options(parser)
    add_mode_options(parser)
    args = parser.parse_args(argv)
    if args.job is not None and (args.prompt or args.detach or args.local):
        parser.error("--job ID takes no prompt, --detach or --local: the job has its own settings")
    if args.detach and args.local:
        parser.error("--detach queues the job on a server; it cannot be --local")
    return args


def add_picture_options(parser: argparse.ArgumentParser) -> None:
    """What to draw, as /generate's fields: each left out takes the server's default."""
    add = parser.add_argument
    add("-m", "--model", help="SD model: a name in the server's models directory, a path, or 'demo' (default: the "
        "server's --model)")  # fmt: skip
    add("-o", "--output", type=Path, help="Output image (default: a name made from the prompt)")
    add("-w", "--width", type=int, help="Output image width (default: the model's size, 512 for SD1.x; img2img: the "
        "input's)")  # fmt: skip
    add("-h", "--height", type=int, help="Output image height (default: as for the width)")
    add("-n", "--num_steps", type=int, help="Number of steps (default: the model's: 25 for SD, 8 for Z-Image-Turbo)")
    add("-g", "--guidance", type=float, help="Guidance scale (default: the model's: 7.0 for SD, 3.5 for FLUX.1-dev)")
    add("-s", "--sampler", help=f"Sampler, in any case (default: DPM++ 2M for SD, Euler for FLUX): {SAMPLER_NAMES}")
    add("--seed", type=int, help="Seed, 0 to 2**64-1 (default, or -1: random; the seed used is printed on stderr)")
    add("--variation_seed", type=int, metavar="SEED", help="A second seed whose noise is blended in, A1111's variation "
        "seed (default, or -1: random); a batch counts it up: SEED, SEED+1...")  # fmt: skip
    add("--variation_strength", type=float, metavar="S", help="How far towards the variation seed's picture, 0 to 1 "
        "(default 0: off)")  # fmt: skip
    add("--tiling", action="store_true", help="A seamless picture, one that tiles (SD models; default off)")
    add("--neg", help="Negative prompt (default none)")
    add("--stream", type=int, help="Stream steps samples to output image: rewrite it every N steps (default off)")
    add("--img", type=Path, metavar="FILE", help="Input image: turns on image to image")
    add("--strength", type=float, metavar="S", help="Image to image: how much to change the input, 0 to 1 (default "
        "0.8)")  # fmt: skip
    add("--mask", type=Path, metavar="FILE", help="With --img: repaint the mask's white part (default: none, img2img)")
    add("--hires", type=float, metavar="SCALE", help="Hires fix: draw, upscale the latents by SCALE, draw again at "
        "that size (A1111's, strength 0.7; SD models only; default off)")  # fmt: skip
    add("-b", "--batch", type=int, metavar="N", help="Pictures to make, seeds seed, seed+1...: name.png, name-2.png... "
        "(default 1)")  # fmt: skip


def add_mode_options(parser: argparse.ArgumentParser) -> None:
    """Where it is drawn (a server, this process) and what else the command can do."""
    add = parser.add_argument
    add("--list", action="store_true", help="List the server's models and exit; with --all, the catalog of models "
        "--pull fetches by name (default: generate)")  # fmt: skip
    add("--all", action="store_true", help="With --list: the catalog, not the models here (default off)")
    add("--pull", metavar="NAME", help="Fetch a model by name into the server's models folder (no server: the local "
        "one), e.g. dreamshaper-8 or z-image-turbo:bf16; --list --all lists the names (default: none)")  # fmt: skip
    add("--rm", metavar="NAME", help="Remove a pulled model, keeping the files other models use (default: none)")
    add("--server", metavar="URL", help=f"Server URL (IMAGINE_SERVER, default {DEFAULT_SERVER})")
    add("--local", action="store_true", help="Generate in this process instead of on the server")
    add("--detach", action="store_true", help="Queue it as a job on the server, print the job's id and exit "
        "(default: wait for the picture)")  # fmt: skip
    add("--job", metavar="ID", help="Wait for the server's job ID (see --detach), then save it (default: none)")
    add("-d", "--device", help="With --local: auto, cpu, cuda or mps (IMAGINE_DEVICE, default auto)")
    add("-f", "--fp_prec", help="With --local: 16, 32 or auto (IMAGINE_FP_PREC, default auto)")
    add("--help", action="help", help="Show this help and exit")


def request_body(args: argparse.Namespace) -> dict:
    """The /generate body: the prompt and the fields given; the server's defaults fill in the rest."""
    body = {"prompt": " ".join(args.prompt)}
    fields = ("model", "width", "height", "num_steps", "guidance", "sampler", "seed", "neg", "strength")
    for field in (*fields, "variation_seed", "variation_strength"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    if args.tiling:
        body["tiling"] = True
    if args.batch is not None:
        body["n"] = args.batch
    if args.hires is not None:
        body["hires_scale"] = args.hires
    for field, path, what in (("img", args.img, "input image"), ("mask", args.mask, "mask")):
        if path is not None:
            try:
                body[field] = base64.b64encode(path.read_bytes()).decode("ascii")
            except OSError as error:
                raise ClientError(f"cannot read the {what} {path}: {error.strerror}") from None
    return body


# ---------------------------------------------------------------------------------------------
# Output: a file named from the prompt, never overwriting one; every write atomic
# ---------------------------------------------------------------------------------------------


def reserve_output(prompt: str, directory: Path = Path()) -> Path:
    """Creates an empty `<prompt-slug>-<timestamp>.png`, adding -2, -3... if that name is taken."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    if len(slug) > 48:  # cut at the last whole word that fits, if there is one
        slug = slug[:49].rsplit("-", 1)[0][:48]
    slug = slug or "image"
    stem = f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}"
    for number in range(1, 1000):
        path = directory / (f"{stem}.png" if number == 1 else f"{stem}-{number}.png")
        try:
            path.open("x").close()
            return path
        except FileExistsError:
            continue
    raise ClientError(f"cannot find a free file name for {stem}.png in {directory.resolve()}")


def check_output_folder(output: Path | None) -> None:
    if output is not None and not output.parent.is_dir():
        raise ClientError(f"cannot write {output}: the folder {output.parent} does not exist")


@contextlib.contextmanager
def output_file(output: Path | None, prompt: str):
    """Where the picture goes: `output`, or a new file named from the prompt, which a failure removes again (the name
    was ours: no empty or unfinished file stays behind)."""
    path = output or reserve_output(prompt)
    try:
        yield path
    except BaseException:
        if output is None:
            path.unlink(missing_ok=True)
        raise


def write_picture(path: Path, data: bytes) -> None:
    """Writes a regular file (or a new name) atomically; anything else, such as /dev/null or a pipe, is written
    through, since a rename would put a regular file in its place. A symbolic link stays: its target is written."""
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except FileNotFoundError:
        regular = not path.is_symlink()  # a new name; a link to nothing is written through, creating its target
    if regular:
        write_atomically(Path(os.path.realpath(path)), data)
    else:
        with open(path, "wb") as file:
            file.write(data)


def write_atomically(path: Path, data: bytes) -> None:
    """Writes via a temporary file and a rename, so a viewer never sees a half-written picture."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as file:
        try:
            file.write(data)
            file.close()
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(file.name, 0o666 & ~umask)  # a temporary file is private; the picture should not be
            os.replace(file.name, path)
        except BaseException:  # a full disk, a signal: no temporary file is left behind
            os.unlink(file.name)
            raise


def batch_paths(output: Path, count: int) -> tuple[list[Path], int]:
    """name.png, name-2.png, name-3.png...: where the pictures of a batch go."""
    return [output, *(output.with_name(f"{output.stem}-{k}{output.suffix}") for k in range(2, count + 1))]


def save_updates(updates, output: Path, stream: int | None) -> tuple[list[Path], int]:
    """Shows progress on stderr (if it is a terminal) and writes the final picture to `output`, and
    with `stream` N each preview of a step divisible by N before it.

    An update is a dict like a line of the server's stream: `step` and `steps` (progress), `png`
    (bytes of a preview, or with `done` of the final picture, then `pngs` those of every picture), or `error`.
    Returns the paths written (`output`, and for a batch name-2.png and on beside it) and the first seed.
    """
    # Every step is drawn: steps come seconds apart on most machines, and a short run should still show them.
    terminal = sys.stderr.isatty()
    with tqdm(file=sys.stderr, disable=not terminal, unit="step", leave=False, mininterval=0, miniters=1) as bar:
        for update in updates:
            if "error" in update:
                raise ClientError(update["error"])
            if "steps" in update:
                bar.total = update["steps"]
                bar.update(update.get("step", bar.total) - bar.n)  # the final answer has no step: all done
            if update.get("done"):
                pngs = update.get("pngs") or [update["png"]]
                paths = batch_paths(output, len(pngs))
                for path, png in zip(paths, pngs, strict=True):
                    write_picture(path, png)
                return paths, update["seed"]
            if "png" in update and stream and update["step"] % stream == 0:
                write_picture(output, update["png"])
    raise ClientError("the generation ended without a picture")


# ---------------------------------------------------------------------------------------------
# Remote: the server's answer, its stream, or a job's events, saved (api/client.py reads them)
# ---------------------------------------------------------------------------------------------


def follow_job(server: str, job_id: str, args: argparse.Namespace) -> list[Path]:
    """Waits for the job with the progress bar, and saves its pictures as a run of its prompt would."""
    check_output_folder(args.output)
    job = answer_fields(server_request("GET", server, job_path(job_id)).content)
    with output_file(args.output, str(job.get("prompt") or "image")) as output:
        return report_seed(save_updates(job_updates(server, job_id, args.stream), output, args.stream))


# ---------------------------------------------------------------------------------------------
# Local: the engine (engine/, beside this file) in this process
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def local_engine():
    """(imagine, engine): the server's settings and its engine package in this process, for a pull or a removal with
    no server; the engine's refusals as ClientErrors."""
    try:
        import engine.devices
        import engine.files.catalog
        import engine.pull
        import imagine
        from engine.errors import ImagineError
    except ImportError as error:
        raise ClientError(missing_module(error).removeprefix("imagine: ")) from None
    try:
        yield imagine, engine
    except ImagineError as error:
        raise ClientError(error.message) from None


def generate_locally(body: dict, args: argparse.Namespace, output: Path) -> tuple[list[Path], int]:
    """Runs the generation on this (main) thread, where it runs fastest, and saves from another; returns the
    paths written and the seed."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # imagine.py and engine/ sit beside this file
    try:
        # torch and diffusers take seconds to import: only when generating here
        import imagine
        from engine.engine import Engine
        from engine.errors import ImagineError
        from engine.job import Failed, Finished, Preview, Progress
        from engine.previews import png_bytes
        from engine.request import parse_request
    except ImportError as error:
        raise ClientError(missing_module(error).removeprefix("imagine: ")) from None

    flags = [*(["-d", args.device] if args.device else []), *(["-f", args.fp_prec] if args.fp_prec else [])]
    try:
        settings = imagine.parse_settings(flags)
        engine = Engine(settings)
        job = engine.submit(parse_request({**body, "stream": args.stream or 0}, settings.max_size, settings.max_batch))
    except ImagineError as error:
        raise ClientError(error.message) from None

    def updates():
        for event in job:
            if isinstance(event, Progress):
                yield {"step": event.step, "steps": event.steps}
            elif isinstance(event, Preview):
                yield {
                    "png": png_bytes(event.image, compress_level=1),
                    "step": event.step,
                    "steps": event.steps,
                }
            elif isinstance(event, Finished):
                pngs = [png_bytes(image, parameters) for image, parameters in event.pictures]
                yield {"png": pngs[0], "pngs": pngs, "seed": event.seed, "done": True}
            elif isinstance(event, Failed):
                yield {"error": event.error.message}

    failures, saved = [], []

    def save():
        try:
            saved.append(save_updates(updates(), output, args.stream))
        except (ClientError, OSError) as error:
            failures.append(error)

    saver = threading.Thread(target=save, name="save", daemon=True)  # an interrupt must not wait for it
    saver.start()
    engine.run(job)
    saver.join()
    if failures:
        raise failures[0]
    return saved[0]


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def report_seed(saved: tuple[list[Path], int]) -> list[Path]:
    """Tells the seed on stderr, so that stdout stays the paths alone: what repeats a picture someone likes."""
    paths, seed = saved
    print(f"seed {seed}", file=sys.stderr)
    return paths


def human_size(size: int) -> str:
    return f"{size / 2**30:.1f} GB" if size >= 2**30 else f"{size / 2**20:.1f} MB"


def list_models(server: str) -> str:
    """The server's GET /models as a table: name, family (with what a flow model lacks), size, loaded."""
    response = server_request("GET", server, "/models")
    rows = [("NAME", "FAMILY", "SIZE", "LOADED")]
    for model in response.json()["models"]:
        family = model["family"] or f"unreadable: {model.get('error', '')}"
        if "missing" in model.get("parts", {}):
            family = f"{family}, cannot draw: {model['parts']['missing']}"
        size = "built in" if model.get("builtin") else human_size(model["size"])
        rows.append((model["name"], family, size, "yes" if model["loaded"] else ""))
    return table(rows)


def list_catalog(server: str) -> str:
    """The server's GET /catalog as a table: each model and variant, its family, size, licence, whether it is here."""
    rows = [("NAME", "FAMILY", "SIZE", "LICENCE", "HERE")]
    for model in answer_fields(server_request("GET", server, "/catalog").content)["models"]:
        licence = model["license"]["name"] + (", gated" if model["license"].get("gated") else "")
        here = "yes" if model["present"] else "taken by the bare name here" if "taken" in model else ""
        rows.append((model["name"], model["family"], human_size(model["size"]), licence, here))
    return table(rows)


def table(rows: list) -> str:
    """Rows of cells as aligned columns, the last column left ragged."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = (
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]) for row in rows
    )
    return "\n".join(line.rstrip() for line in lines)


def pull(args: argparse.Namespace) -> str:
    """Pulls the model on the server (into its models folder), or with no server named and none running, into the
    local models folder; shows a bar per file, and returns the name it draws by."""
    server = args.server or os.environ.get("IMAGINE_SERVER")
    try:
        return show_pull(pull_lines(server or DEFAULT_SERVER, args.pull))
    except NoServer:
        if server:
            raise
    print(f"imagine: no server at {DEFAULT_SERVER}; pulling into the local models folder", file=sys.stderr)
    with local_engine() as (imagine, engine):
        settings = imagine.parse_settings([])
        memory = engine.devices.device_memory(engine.devices.pick_device(settings.device))
        return show_pull(engine.pull.Puller(settings).pull(args.pull, memory))


def show_pull(lines) -> str:
    """Shows a pull's lines on stderr: what it takes and why, then a bar per file as it comes and is checked."""
    bars = {}
    try:
        for line in lines:
            if "reason" in line:
                print(f"imagine: {line['status']} ({line['reason']}); {human_size(line['total'])} to fetch",
                      file=sys.stderr)  # fmt: skip
            elif "completed" in line:
                key = (line["status"], line["file"])
                if key not in bars:
                    desc = line["file"] if line["status"] == "downloading" else f"sha256 {line['file']}"
                    bars[key] = tqdm(total=line["total"], unit="B", unit_scale=True, desc=desc, file=sys.stderr)
                bars[key].update(line["completed"] - bars[key].n)
            elif line.get("status") == "success":
                print(f"imagine: pulled; draw with: imagine -m {line['model']} 'a prompt'", file=sys.stderr)
                return line["model"]
    finally:
        for bar in bars.values():
            bar.close()
    raise ClientError("the pull ended before it said it succeeded")


def remove(args: argparse.Namespace) -> str:
    """Removes a pulled model on the server, or with no server named and none running, from the local models folder;
    returns what was removed and kept."""
    server = args.server or os.environ.get("IMAGINE_SERVER")
    try:
        removed = remove_model(server or DEFAULT_SERVER, args.rm)
    except NoServer:
        if server:
            raise
        with local_engine() as (imagine, engine):
            settings = imagine.parse_settings([])
            catalog = engine.files.catalog.Catalog(settings, loaded={})
            used = catalog.files_in_use(but=catalog.pulled_model(args.rm))
            removed = engine.pull.Puller(settings).remove(args.rm, used)
    kept = f"; kept, as other models use them: {', '.join(removed['kept'])}" if removed["kept"] else ""
    return f"removed {', '.join(removed['removed']) or 'nothing'}{kept}"


def run(args: argparse.Namespace) -> list[Path]:
    body = request_body(args)
    check_output_folder(args.output)
    with output_file(args.output, body["prompt"]) as output:
        if args.local:
            return report_seed(generate_locally(body, args, output))
        server = args.server or os.environ.get("IMAGINE_SERVER")
        if args.stream or sys.stderr.isatty():
            body["stream"] = 1  # every step's line carries the progress; previews are kept every --stream steps
        try:
            return report_seed(save_updates(remote_updates(server or DEFAULT_SERVER, body), output, args.stream))
        except NoServer:
            if server:
                raise
            print(f"imagine: no server at {DEFAULT_SERVER}; generating in this process", file=sys.stderr)
            return report_seed(generate_locally(body, args, output))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        server = args.server or os.environ.get("IMAGINE_SERVER") or DEFAULT_SERVER
        if args.list:
            print(list_catalog(server) if args.all else list_models(server))
        elif args.pull:
            print(pull(args))
        elif args.rm:
            print(remove(args))
        elif args.detach:
            job_id = detach(server, request_body(args))
            print(job_id)
            print(f"imagine: queued as a job; wait for it and save it with: imagine --job {job_id}", file=sys.stderr)
        elif args.job is not None:
            print(*follow_job(server, args.job, args), sep="\n")
        else:
            print(*run(args), sep="\n")
    except ClientError as error:
        print(f"imagine: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        print(f"imagine: cannot write the picture: {error.strerror or error}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imagine: interrupted", file=sys.stderr)
        return 130
    except Stopped as stopped:
        print(f"imagine: stopped by {stopped.signal.name}", file=sys.stderr)
        return 128 + stopped.signal
    return 0


class Stopped(BaseException):
    """SIGTERM or SIGHUP, raised where the program is, so that it unwinds as for Ctrl-C: no unfinished file stays."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signal = signal.Signals(signum)


def stop_on_signals() -> None:
    def stop(signum, frame):
        raise Stopped(signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


if __name__ == "__main__":
    stop_on_signals()
    sys.exit(main())
