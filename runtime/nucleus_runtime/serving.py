"""Serving many requests at once: step-level batching across requests, progress, cancellation, deadlines.

The Triton pipeline model (nucleus_runtime.triton.model) hands every request to a `StepBatcher` and returns at once;
the batcher's one worker thread runs the denoising of all admitted requests, one scheduling round at a time:

1. drop what has to go: requests the client cancelled (or whose client went away), requests past their deadline,
   requests that waited in the queue longer than the queue delay allows; each gets one error naming why;
2. admit waiting requests, first come first served per image grid, while the grid's batch has room: a request's
   rows (its prompts, twice with CFG) join only if the grid's rows stay within the bundle's batch profile (and, with
   `max_requests`, its request count within that). Text requests are tokenized and encoded here, once;
3. step every grid's requests once, all of a grid in one denoiser call (`pipeline.GridStepper`): each request at
   its own step, with its own timestep, guidance and text length. Expert-choice routing is per batch row, so the
   rows of different requests never interact and every request's latents are bitwise the ones it gets alone;
4. report progress, and finish the requests that took their last step: VAE decoding and PNG encoding where asked.

Everything that runs a graph runs on the worker thread, so a backend is only ever used by one thread. Requests join
and leave between steps; text K/V is computed once per set of requests of a grid (GridStepper), from the bounded
text K/V cache for a request that runs alone and whose text was seen before.

Nothing here knows Triton: a request arrives as a `Job` whose `reply` receives progress, the result or the error.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from nucleus_runtime.backends.base import Backend
from nucleus_runtime.bundle import Manifest
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.pipeline import Denoising, GridStepper, start_denoising
from nucleus_runtime.png import encode_png
from nucleus_runtime.scheduler import SchedulerConfig
from nucleus_runtime.text_kv_cache import TextKVCache
from nucleus_runtime.text_to_image import PromptEncoder, decode_images

logger = logging.getLogger("nucleus_runtime")

# Pipeline stages whose time the batcher accounts (ServingStats.stage_seconds).
STAGE_TEXT_ENCODER = "text_encoder"
STAGE_TEXT_KV = "text_kv"
STAGE_DENOISE = "denoise"
STAGE_VAE_DECODER = "vae_decoder"
STAGE_PNG = "png"
STAGES = (STAGE_TEXT_ENCODER, STAGE_TEXT_KV, STAGE_DENOISE, STAGE_VAE_DECODER, STAGE_PNG)


class Failure(str, enum.Enum):
    """Why a request ended without a result (the Triton model maps each to an error code)."""

    INVALID = "invalid"  # the request itself is wrong: the fix is in the request
    CANCELLED = "cancelled"  # the client cancelled it or went away
    DEADLINE = "deadline"  # its timeout passed
    UNAVAILABLE = "unavailable"  # the model cannot take it now (queue full or queue delay passed, unloading)
    INTERNAL = "internal"  # a graph failed


class ServingError(NucleusError):
    """A NucleusError with the reason a request failed."""

    def __init__(self, failure: Failure, problem: str, fix: str | None = None):
        super().__init__(problem, fix)
        self.failure = failure


@dataclasses.dataclass
class Result:
    """A finished request: final packed latents [B, S, C]; with the VAE decoder the pixels [B, H, W, 3] uint8, and
    the PNG bytes of each image where asked for."""

    latents: np.ndarray
    images: np.ndarray | None = None
    pngs: list[bytes] | None = None


class Reply(Protocol):
    """Where a request's outcome goes (a Triton response sender, or a caller waiting in-process)."""

    def cancelled(self) -> bool:
        """Whether the client cancelled the request or went away (checked before every step)."""
        ...

    def progress(self, step: int, total: int, elapsed: float) -> None:
        """`step` of `total` steps are done, `elapsed` seconds after the request arrived."""
        ...

    def done(self, result: Result) -> None: ...

    def failed(self, error: ServingError) -> None: ...


@dataclasses.dataclass(frozen=True)
class TextRequest:
    """A request with text in: the prompt groups to encode at admission (prompts, then with CFG their negative
    prompts) and the rest of `start_denoising`'s arguments."""

    groups: list[list[str]]
    height: int
    width: int
    steps: int
    guidance: float
    seed: int | None
    latents: np.ndarray | None


@dataclasses.dataclass
class Job:
    """One request in the batcher.

    Attributes:
        reply: receives progress and the outcome.
        grid, rows, steps: its latent grid, denoiser rows per step and step count (known before admission).
        height, width: its pixels (for the VAE decoder).
        state: its denoising, ready at submission for embedding requests, made at admission for text requests.
        text: the prompts of a text request, encoded at admission.
        images, pngs: decode the final latents to pixels / also encode them as PNG.
        timeout: seconds from arrival after which it fails (None: no deadline).
    """

    reply: Reply
    grid: tuple[int, int]
    rows: int
    steps: int
    height: int
    width: int
    state: Denoising | None = None
    text: TextRequest | None = None
    images: bool = False
    pngs: bool = False
    timeout: float | None = None
    received: float = dataclasses.field(default_factory=time.monotonic)
    admitted: float | None = None
    checked: float = 0.0  # when its cancellation was last checked

    @property
    def step(self) -> int:
        return self.state.step if self.state is not None else 0


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    """How the batcher admits requests.

    Attributes:
        max_rows: denoiser rows per call (the bundle's batch profile's largest batch).
        max_requests: requests per denoiser call; 0: as many as max_rows allows, 1: one request at a time per grid
            (no batching across requests, the baseline the benchmark compares with).
        max_pending: requests waiting for admission; more are refused at once (the queue is bounded).
        queue_delay: seconds a request may wait for admission before it is refused (0: no limit).
        timeout: default deadline of a request in seconds from its arrival (0: none; a request may bring its own).
        cancel_check_interval: seconds between two cancellation checks of one request. A check is a round trip to
            the server process in Triton; steps shorter than this interval skip it (0: before every step).
    """

    max_rows: int
    max_requests: int = 0
    max_pending: int = 64
    queue_delay: float = 0.0
    timeout: float = 0.0
    cancel_check_interval: float = 0.05


@dataclasses.dataclass
class ServingStats:
    """Counters of one batcher since it started (a snapshot; `StepBatcher.stats`).

    requests: outcome -> count (received, completed and each Failure value); stage_seconds: stage -> seconds;
    text_kv_cache: the cross-request text K/V cache's hits, misses, evictions, entries and bytes; prefix_cache:
    the prompt encoder's template-prefix hits and misses; batch_text_kv: text K/V built for a new set of requests
    of a grid (one per join or leave, each a cache hit or miss); steppers: grids with a live batch text K/V.
    """

    requests: dict[str, int]
    active: int
    pending: int
    denoiser_calls: int
    denoiser_rows: int
    stage_seconds: dict[str, float]
    text_kv_cache: dict[str, int]
    prefix_cache: dict[str, int]
    batch_text_kv: int
    steppers: int

    @property
    def mean_rows(self) -> float:
        return self.denoiser_rows / self.denoiser_calls if self.denoiser_calls else 0.0


class StepBatcher:
    """Runs the denoising of many requests, batched per step across requests (module docstring).

    Args:
        backend: the bundle's graphs (every stage the requests need).
        manifest, scheduler_config: the bundle's.
        settings: admission rules.
        cache: the cross-request text K/V cache (bounded; it keeps the text K/V of requests that ran alone).
        encoder: the prompt encoder, where the bundle has a text encoder (text requests).
    """

    def __init__(
        self,
        backend: Backend,
        manifest: Manifest,
        scheduler_config: SchedulerConfig,
        settings: BatchSettings,
        cache: TextKVCache,
        encoder: PromptEncoder | None = None,
    ):
        self.backend = backend
        self.manifest = manifest
        self.scheduler_config = scheduler_config
        self.settings = settings
        self.cache = cache
        self.encoder = encoder
        self._lock = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._steppers: dict[tuple[int, int], GridStepper] = {}
        self._requests: collections.Counter[str] = collections.Counter()
        self._stage_seconds = dict.fromkeys(STAGES, 0.0)
        self._step_totals = collections.Counter[str]()  # stats of steppers already dropped
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Called on the worker after every round with whether the batcher is now idle (the Triton model publishes
        # its metrics from it).
        self.on_round: Callable[[bool], None] | None = None

    # ---- the caller's side (any thread) ---------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job; refused (ServingError UNAVAILABLE, nothing queued) when the queue is full or the batcher stops."""
        with self._lock:
            self._requests["received"] += 1
            if self._stopping:
                error = ServingError(Failure.UNAVAILABLE, "the model is unloading.", "send the request again later.")
            elif len(self._pending) >= self.settings.max_pending:
                error = ServingError(
                    Failure.UNAVAILABLE,
                    f"{len(self._pending)} requests are already waiting for this model instance (its queue holds "
                    f"{self.settings.max_pending}).",
                    "retry later, or serve with more --instances.",
                )
            else:
                if job.timeout is None and self.settings.timeout > 0:
                    job.timeout = self.settings.timeout
                self._pending.append(job)
                self._lock.notify()
                return
            self._requests[error.failure.value] += 1
        raise error

    def refused(self, failure: Failure) -> None:
        """Count a request refused before it became a Job (it failed validation)."""
        with self._lock:
            self._requests["received"] += 1
            self._requests[failure.value] += 1

    def start(self) -> None:
        """Serve on a worker thread until `stop`."""
        self._thread = threading.Thread(target=self._serve, name="nucleus-step-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the current round, fail every queued and active request (the model is unloading), end the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
        error = ServingError(Failure.UNAVAILABLE, "the model was unloaded before this request finished.",
                             "send the request again once the model is loaded.")  # fmt: skip
        with self._lock:
            jobs, self._pending = [*self._pending, *self._active], collections.deque()
            self._active = []
        for job in jobs:
            self._fail(job, error)
        self._release_steppers(set())

    def stats(self) -> ServingStats:
        with self._lock:
            cache = self.cache.stats
            steps = self._step_totals.copy()
            for stepper in self._steppers.values():
                steps.update(dataclasses.asdict(stepper.stats))
            stage_seconds = dict(self._stage_seconds)
            stage_seconds[STAGE_TEXT_KV] = steps["text_kv_seconds"]
            stage_seconds[STAGE_DENOISE] = steps["denoise_seconds"]
            prefix = {"hits": self.encoder.prefix_hits, "misses": self.encoder.prefix_misses} if self.encoder else {}
            return ServingStats(
                requests=dict(self._requests),
                active=len(self._active),
                pending=len(self._pending),
                denoiser_calls=int(steps["calls"]),
                denoiser_rows=int(steps["rows"]),
                stage_seconds=stage_seconds,
                text_kv_cache=dataclasses.asdict(cache),
                prefix_cache=prefix,
                batch_text_kv=int(steps["text_kv_builds"]),
                steppers=len(self._steppers),
            )

    # ---- the worker's side ----------------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._pending and not self._active:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step_once()
                if self.on_round is not None:
                    with self._lock:
                        idle = not self._pending and not self._active
                    self.on_round(idle)
            except Exception:  # noqa: BLE001 - the worker must outlive any one round; step_once fails the jobs
                logger.exception("step batcher round failed")

    def run_until_idle(self) -> None:
        """Serve on the calling thread until nothing is queued or active (in-process use and tests)."""
        while self.step_once():
            pass

    def step_once(self) -> bool:
        """One scheduling round (module docstring); False when there was nothing to do."""
        self._drop(time.monotonic())
        self._admit()
        if not self._active:
            self._release_steppers(set())
            return bool(self._pending)
        groups: dict[tuple[int, int], list[Job]] = {}
        for job in self._active:
            groups.setdefault(job.grid, []).append(job)
        for grid, jobs in groups.items():
            self._step_grid(grid, jobs)
        self._release_steppers({job.grid for job in self._active})
        return True

    def _drop(self, now: float) -> None:
        """Fail the cancelled, expired and too-long-queued jobs; their rows leave the batch before the next step."""
        with self._lock:
            jobs = [*self._pending, *self._active]
        for job in jobs:
            error = self._why_drop(job, now)
            if error is not None:
                self._remove(job)
                self._fail(job, error)

    def _why_drop(self, job: Job, now: float) -> ServingError | None:
        where = f"after {job.step} of {job.steps} steps" if job.admitted is not None else "before its first step"
        if now - job.checked >= self.settings.cancel_check_interval:
            job.checked = now
            if _safely(job.reply.cancelled, default=True):
                return ServingError(Failure.CANCELLED, f"the request was cancelled by its client {where}.")
        waited = now - job.received
        if job.timeout is not None and waited > job.timeout:
            return ServingError(
                Failure.DEADLINE,
                f"the request's deadline of {job.timeout:.3g} s passed {where} ({waited:.3g} s after it arrived).",
                "send a longer timeout, fewer steps or a smaller image, or serve with more --instances.",
            )
        if job.admitted is None and self.settings.queue_delay > 0 and waited > self.settings.queue_delay:
            return ServingError(
                Failure.UNAVAILABLE,
                f"the request waited {waited:.3g} s for a place in a batch, longer than the model's queue delay "
                f"({self.settings.queue_delay:.3g} s).",
                "retry later, raise --max-queue-delay-us, or serve with more --instances.",
            )
        return None

    def _admit(self) -> None:
        """Admit waiting jobs first come first served per grid, while their grid's batch has room."""
        rows = collections.Counter[tuple[int, int]]()
        count = collections.Counter[tuple[int, int]]()
        for job in self._active:
            rows[job.grid] += job.rows
            count[job.grid] += 1
        blocked: set[tuple[int, int]] = set()  # a grid whose first waiting job did not fit admits no later one
        with self._lock:
            waiting = list(self._pending)
        for job in waiting:
            limit = self.settings.max_requests
            fits = rows[job.grid] + job.rows <= self.settings.max_rows and (limit == 0 or count[job.grid] < limit)
            if job.grid in blocked or not fits:
                blocked.add(job.grid)
                continue
            with self._lock:
                self._pending.remove(job)
            try:
                if job.state is None:
                    job.state = self._encode(job.text)  # type: ignore[arg-type]
            except NucleusError as exc:
                self._fail(job, ServingError(Failure.INVALID, exc.problem, exc.fix))
                continue
            except Exception as exc:  # noqa: BLE001 - a failed graph fails this request only
                self._fail(job, ServingError(Failure.INTERNAL, f"{type(exc).__name__}: {exc}"))
                continue
            job.admitted = time.monotonic()
            rows[job.grid] += job.rows
            count[job.grid] += 1
            with self._lock:
                self._active.append(job)

    def _encode(self, text: TextRequest) -> Denoising:
        """A text request's denoising: its prompt groups through the text encoder, once."""
        if self.encoder is None:
            raise NucleusError("this bundle has no text_encoder stage.", "send prompt_embeds instead of prompt.")
        started = time.perf_counter()
        encoded = self.encoder.encode(text.groups)
        self._stage_seconds[STAGE_TEXT_ENCODER] += time.perf_counter() - started
        (embeds, mask), negative = encoded[0], (encoded[1] if len(encoded) > 1 else (None, None))
        return start_denoising(
            self.manifest, self.scheduler_config, embeds, mask, *negative, height=text.height, width=text.width,
            steps=text.steps, guidance=text.guidance, latents=text.latents,
            seed=None if text.latents is not None else (text.seed or 0),
        )  # fmt: skip

    def _step_grid(self, grid: tuple[int, int], jobs: list[Job]) -> None:
        stepper = self._steppers.get(grid)
        if stepper is None:
            stepper = self._steppers[grid] = GridStepper(self.backend, self.manifest, grid, self.cache)
        try:
            stepper.step([job.state for job in jobs])  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - a failed call fails its batch, not the batcher
            error = exc if isinstance(exc, ServingError) else ServingError(Failure.INTERNAL, f"{type(exc).__name__}: {exc}")
            stepper.release()
            for job in jobs:
                self._remove(job)
                self._fail(job, error)  # type: ignore[arg-type]
            return
        now = time.monotonic()
        for job in jobs:
            state = job.state
            _safely(lambda: job.reply.progress(state.step, state.steps, now - job.received))  # type: ignore[union-attr]
            if state.done:  # type: ignore[union-attr]
                self._remove(job)
                self._finish(job)

    def _finish(self, job: Job) -> None:
        result = Result(job.state.latents)  # type: ignore[union-attr]
        try:
            if job.images or job.pngs:
                started = time.perf_counter()
                result.images = decode_images(self.backend, self.manifest, result.latents, job.height, job.width)
                self._stage_seconds[STAGE_VAE_DECODER] += time.perf_counter() - started
            if job.pngs:
                started = time.perf_counter()
                result.pngs = [encode_png(image) for image in result.images]  # type: ignore[union-attr]
                self._stage_seconds[STAGE_PNG] += time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001
            self._fail(job, ServingError(Failure.INTERNAL, f"{type(exc).__name__}: {exc}"))
            return
        with self._lock:
            self._requests["completed"] += 1
        _safely(lambda: job.reply.done(result))

    def _remove(self, job: Job) -> None:
        with self._lock:
            if job in self._active:
                self._active.remove(job)
            elif job in self._pending:
                self._pending.remove(job)

    def _fail(self, job: Job, error: ServingError) -> None:
        with self._lock:
            self._requests[error.failure.value] += 1
        logger.info("request failed (%s): %s", error.failure.value, error)
        _safely(lambda: job.reply.failed(error))

    def _release_steppers(self, keep: set[tuple[int, int]]) -> None:
        """Drop the steppers (and their batch text K/V) of grids with no active request: at most one batch text K/V
        per grid in use stays alive besides the cache's bounded entries."""
        with self._lock:
            for grid in [g for g in self._steppers if g not in keep]:
                stepper = self._steppers.pop(grid)
                self._step_totals.update(dataclasses.asdict(stepper.stats))
                stepper.release()


def _safely(call: Callable[[], object], default: object = None) -> object:
    """A reply call that must not stop the batcher: a client that went away makes its sender raise."""
    try:
        return call()
    except Exception:  # noqa: BLE001
        logger.debug("reply call failed", exc_info=True)
        return default



class WaitingReply:
    """A Reply for a caller in the same process: keeps the progress reports and the outcome, and lets it wait."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, float]] = []
        self.result: Result | None = None
        self.error: ServingError | None = None
        self.cancel = False
        self._done = threading.Event()

    def cancelled(self) -> bool:
        return self.cancel

    def progress(self, step: int, total: int, elapsed: float) -> None:
        self.steps.append((step, total, elapsed))

    def done(self, result: Result) -> None:
        self.result = result
        self._done.set()

    def failed(self, error: ServingError) -> None:
        self.error = error
        self._done.set()

    def wait(self, timeout: float | None = None) -> Result:
        """The result; raises the request's ServingError, or TimeoutError when it is still running after `timeout`."""
        if not self._done.wait(timeout):
            raise TimeoutError("the request is still running")
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]
