"""Concurrent requests drawn as one batch (engine/batching.py): requests that may share a pipeline call and wait in the
queue together are drawn in one call, and each client still gets its own pictures, seeds, events, cancel and error.

Concurrency is made deterministic with a Hold: a first request is held at its only step while the others queue, so
that they all wait when the engine takes the next; no test depends on how fast anything runs."""

import numpy as np
import pytest
import torch
from conftest import noise_picture, png_data, save_tiny_folder, wait_until

import imagine
from engine.batching import batch_wait
from engine.errors import ImagineError
from engine.job import Failed, Finished, Job, Preview, Progress
from engine.request import GenerationRequest

# A batched call computes in other matrix shapes, so its sums may round differently in the last bit (test_batches.py).
MAX_BATCH_DIFFERENCE = 4
SIZE = {"width": 64, "height": 64}


def request(prompt="a cat", seed=1, **fields) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, seed=seed, **{**SIZE, "num_steps": 3, **fields})


def recorded(generate, calls: list):
    """`generate`, recording each call's pictures (its request's n) and the requests it draws together."""

    def recording(model, req, on_step=None, conditioning=None):
        calls.append((req.n, len(req.batch) or 1))
        return generate(model, req, on_step, conditioning)

    return recording


def queued_behind_a_held_one(make_engine, hold, requests: list, **settings) -> tuple:
    """An engine drawing a one-step request held at its step while `requests` queue behind it, then released:
    (the engine, the Hold, the pipeline calls recorded after the held one, the queued jobs)."""
    held, calls = hold(1), []
    engine = make_engine(model="demo", generate=recorded(held.generate, calls), **settings)
    first = engine.submit(request(prompt="the first", seed=99, num_steps=1))
    held.reached(1)
    jobs = [engine.submit(req) for req in requests]
    return engine, held, calls, jobs, first


def last_event(job: Job):
    return list(job)[-1]


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def drawn_alone(engine, req: GenerationRequest) -> Finished:
    """`req` drawn with nothing else waiting: alone."""
    finished = last_event(engine.submit(req))
    assert isinstance(finished, Finished), finished
    return finished


def test_requests_waiting_together_are_drawn_in_one_call_each_picture_as_it_is_drawn_alone(make_engine, hold):
    requests = [request("a cat", 1), request("a red house by the sea", 7, n=2), request("a dog", 3, neg="blurry")]
    engine, held, calls, jobs, first = queued_behind_a_held_one(make_engine, hold, requests)
    held.release()
    finished = [last_event(job) for job in jobs]
    assert calls[1:] == [(4, 3)]  # after the held one: one call of the three requests' four pictures
    for req, batched in zip(requests, finished, strict=True):
        assert isinstance(batched, Finished), batched
        alone = drawn_alone(engine, req)
        assert batched.seeds == alone.seeds == list(range(req.seed, req.seed + req.n))
        assert [parameters for _, parameters in batched.pictures] == [parameters for _, parameters in alone.pictures]
        for (image, _), (single, _) in zip(batched.pictures, alone.pictures, strict=True):
            assert np.abs(pixels(image) - pixels(single)).max() <= MAX_BATCH_DIFFERENCE
    assert len({png_data(image) for each in finished for image, _ in each.pictures}) == 4
    assert calls[-3:] == [(1, 1), (2, 1), (1, 1)]  # and those drawn alone were each a call of their own


def test_each_client_gets_its_own_seed_and_infotext(make_engine, hold):
    requests = [request("a cat", 5), request("a dog", 11, neg="ugly")]
    _, held, calls, jobs, _ = queued_behind_a_held_one(make_engine, hold, requests)
    held.release()
    cat, dog = (last_event(job) for job in jobs)
    assert calls[1:] == [(2, 2)]
    assert (cat.seed, dog.seed) == (5, 11)
    assert cat.parameters.startswith("a cat\nSteps: 3") and "Seed: 5," in cat.parameters
    assert dog.parameters.startswith("a dog\nNegative prompt: ugly\nSteps: 3") and "Seed: 11," in dog.parameters


@pytest.mark.parametrize(
    "other",
    [{"width": 72}, {"num_steps": 4}, {"guidance": 3.0}, {"sampler": "euler"}, {"model": "tiny"}, {"img": "noise"}],
    ids=["size", "steps", "guidance", "sampler", "model", "img2img"],
)
def test_requests_that_differ_in_what_they_share_are_drawn_apart(make_engine, hold, tmp_path, other):
    if "model" in other:
        save_tiny_folder(tmp_path / "tiny", seed=1)
    fields = {**other, "img": noise_picture()} if "img" in other else other
    requests = [request("a cat", 1), request("a dog", 2, **fields)]
    _, held, calls, jobs, _ = queued_behind_a_held_one(make_engine, hold, requests)
    held.release()
    assert all(isinstance(last_event(job), Finished) for job in jobs)
    assert calls[1:] == [(1, 1), (1, 1)]


def test_each_client_gets_its_own_progress_and_the_previews_of_its_own_pictures(make_engine, hold):
    requests = [request("a cat", 1, n=2, stream=1), request("a dog", 2), request("a bird", 3, stream=1)]
    _, held, calls, jobs, _ = queued_behind_a_held_one(make_engine, hold, requests)
    held.release()
    events = [list(job) for job in jobs]
    assert calls[1:] == [(4, 3)]
    for each in events:
        assert [(e.step, e.steps) for e in each if isinstance(e, Progress)] == [(1, 3), (2, 3), (3, 3)]
    previews = [[(e.step, e.index) for e in each if isinstance(e, Preview)] for each in events]
    assert previews == [[(1, 0), (1, 1), (2, 0), (2, 1)], [], [(1, 0), (2, 0)]]
    # A preview shows the client's own picture: the bird's is not the cat's, at the same step.
    cat, bird = (next(e for e in each if isinstance(e, Preview)) for each in (events[0], events[2]))
    assert np.abs(pixels(cat.image) - pixels(bird.image)).max() > 20


def test_cancelling_one_request_of_a_batch_ends_it_at_once_and_the_others_finish(make_engine, hold):
    requests = [request("a cat", 1, num_steps=4), request("a dog", 2, num_steps=4), request("a bird", 3, num_steps=4)]
    engine, held, calls, jobs, _ = queued_behind_a_held_one(make_engine, hold, requests)
    held.stop_at(2, 3)
    held.release(1)
    held.reached(2)  # the batch is held before its step 2 callback
    cancelled = ImagineError("cancelled by DELETE /jobs/x", 499)
    assert not engine.withdraw(jobs[1], cancelled)  # it draws: as DELETE /jobs/<id>, cancel it
    jobs[1].cancel(cancelled)
    held.release(2)
    held.reached(3)  # the others draw on, and the cancelled one has been told already
    dog = list(jobs[1])
    assert isinstance(dog[-1], Failed) and dog[-1].cancelled and dog[-1].error is cancelled
    held.release(3)
    cat, bird = last_event(jobs[0]), last_event(jobs[2])
    assert isinstance(cat, Finished) and isinstance(bird, Finished)
    assert (cat.seed, bird.seed, cat.steps, bird.steps) == (1, 3, 4, 4)
    assert calls[1:] == [(3, 3)]
    assert np.abs(pixels(cat.image) - pixels(drawn_alone(engine, requests[0]).image)).max() <= MAX_BATCH_DIFFERENCE
    wait_until(lambda: engine.unfinished == 0, "the queue's count is back to none")


def test_cancelling_every_request_of_a_batch_stops_its_call(make_engine, hold):
    requests = [request("a cat", 1, num_steps=8), request("a dog", 2, num_steps=8)]
    engine, held, calls, jobs, _ = queued_behind_a_held_one(make_engine, hold, requests)
    held.stop_at(2)
    held.release(1)
    held.reached(2)
    for job in jobs:
        job.cancel(ImagineError("the client disconnected", 499))
    held.release(2)
    ends = [last_event(job) for job in jobs]
    assert all(isinstance(end, Failed) and end.cancelled for end in ends)
    wait_until(lambda: engine.unfinished == 0, "the batch ends")
    assert max(held.steps) <= 3  # stopped at the next cancel point, not drawn to step 8
    assert calls[1:] == [(2, 2)]


def test_a_request_whose_own_part_fails_fails_alone_and_the_others_draw(make_engine, hold, tmp_path):
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    requests = [request("a cat", 1), request("a dog", 2, neg="broken"), request("a bird", 3)]
    _, held, calls, jobs, _ = queued_behind_a_held_one(make_engine, hold, requests, models_dir=tmp_path)
    held.release()
    cat, dog, bird = (last_event(job) for job in jobs)
    assert isinstance(dog, Failed) and dog.error.message == "embedding 'broken' cannot be read (SafetensorError)"
    assert isinstance(cat, Finished) and isinstance(bird, Finished)
    assert calls[1:] == [(2, 2)]


def test_prompts_of_other_chunk_counts_are_drawn_in_calls_of_their_own(make_engine, hold):
    long_prompt = ", ".join(f"a red house number {n} by the sea" for n in range(12))  # over 75 tokens: 2 chunks
    requests = [request("a cat", 1), request(long_prompt, 2), request("a dog", 3)]
    _, held, calls, jobs, _ = queued_behind_a_held_one(make_engine, hold, requests)
    held.release()
    assert all(isinstance(last_event(job), Finished) for job in jobs)
    assert calls[1:] == [(2, 2), (1, 1)]


def test_batch_wait_ms_0_draws_every_request_alone(make_engine, hold):
    requests = [request("a cat", 1), request("a dog", 2), request("a bird", 3)]
    _, held, calls, jobs, _ = queued_behind_a_held_one(make_engine, hold, requests, batch_wait_ms="0")
    held.release()
    assert all(isinstance(last_event(job), Finished) for job in jobs)
    assert calls[1:] == [(1, 1), (1, 1), (1, 1)]


def test_max_batch_caps_the_pictures_of_one_call(make_engine, hold):
    requests = [request("a cat", 1), request("a dog", 2, n=2), request("a bird", 3), request("a cow", 4)]
    engine, held, calls, jobs, _ = queued_behind_a_held_one(make_engine, hold, requests, max_batch=3)
    held.release()
    assert all(isinstance(last_event(job), Finished) for job in jobs)
    assert calls[1:] == [(3, 2), (2, 2)]  # the cat and the dog's two; then the bird and the cow
    wait_until(lambda: engine.unfinished == 0, "the queue's count is back to none")


def test_auto_batches_on_a_gpu_at_any_size_and_on_a_cpu_only_small_pictures(make_engine):
    family = make_engine(model="demo").catalog.known_family("demo")

    def job(size):
        return Job(request(width=size, height=size), "demo")

    assert batch_wait("auto", torch.device("cpu"), job(256), family) > 0
    assert batch_wait("auto", torch.device("cpu"), job(512), family) == 0
    assert batch_wait("auto", torch.device("cuda"), job(1024), family) > 0
    assert batch_wait("0", torch.device("cuda"), job(256), family) == 0
    assert batch_wait("20", torch.device("cpu"), job(512), family) == 0.02


def test_batch_wait_ms_is_a_flag_and_a_variable_and_refuses_what_is_not_a_number(monkeypatch, capsys):
    assert imagine.parse_settings([]).batch_wait_ms == "auto"
    assert imagine.parse_settings(["--batch-wait-ms", "0"]).batch_wait_ms == "0"
    monkeypatch.setenv("IMAGINE_BATCH_WAIT_MS", "12")
    assert imagine.parse_settings([]).batch_wait_ms == "12"
    with pytest.raises(SystemExit):
        imagine.parse_settings(["--batch-wait-ms", "soon"])
    assert "--batch-wait-ms must be auto or a whole number of milliseconds, not 'soon'" in capsys.readouterr().err
