"""The one worker thread that runs every request's sampling steps.

The models are shared by every open tab, so one thread does all their work, one sampling step at a
time, and each step goes to the request that has had the least of the worker's time so far (a new
request starts level with the least served one). Requests are never mixed: each keeps its own
stream (its tokens, its random generator); they only take turns. That makes the time a request's
own steps took (`Job.sampling_seconds`) what it would take alone, which is what a race between
two models measures, while on the wall clock the cheaper model pulls ahead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any, Callable

from ..errors import PGMError

log = logging.getLogger("pgm.serve")


class Busy(Exception):
    """The server holds as many requests as it takes."""


class Job:
    """One request: `start()` opens its stream (the pipeline's checks run there, on the worker),
    `describe(kind, value)` turns what the stream gives into a message and `deliver(kind, message)`
    hands it to whoever waits for it ("start", "step", "done"; "invalid" for a request the pipeline
    refused, "error" for a failure)."""

    def __init__(self, start: Callable[[], Any], describe: Callable[[str, Any, "Job"], dict],
                 deliver: Callable[[str, Any], None]):
        self.start, self.describe, self.deliver = start, describe, deliver
        self.stream = None
        self.submitted = time.perf_counter()
        self.sampling_seconds = 0.0  # the sampling steps of this request alone
        self.share = 0.0  # the worker's time given to it, for taking turns
        self.generated = 0
        self.cancelled = threading.Event()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


class Scheduler:
    """Takes `Job`s (`submit`, at most `capacity` at once) and runs them on one thread, one step at
    a time, the least served first; `cancel` drops one at its next turn. `counts` tallies how the
    jobs ended. With `thread` False the caller runs `work()` itself: on this machine's OpenMP a
    process's main thread samples small batches up to 1.4x faster than another thread does, so
    `pgm serve` gives the main thread to the models and the web server a thread of its own."""

    def __init__(self, capacity: int = 16, thread: bool = True):
        self.capacity = capacity
        self.counts: Counter = Counter()
        self._jobs: list[Job] = []
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self.work, name="pgm-serve-worker", daemon=True) if thread else None
        if self._thread is not None:
            self._thread.start()

    @property
    def active(self) -> int:
        with self._condition:
            return len(self._jobs)

    def submit(self, job: Job) -> None:
        with self._condition:
            if self._closed:
                raise Busy("the server is shutting down")
            if len(self._jobs) >= self.capacity:
                self.counts["refused"] += 1
                raise Busy(f"the server is busy with {len(self._jobs)} requests, its limit: try again in a moment")
            job.share = min((other.share for other in self._jobs), default=0.0)
            self._jobs.append(job)
            self._condition.notify()

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        with self._condition:
            self._condition.notify()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join()

    def work(self) -> None:
        """Run the jobs until `close()`."""
        while True:
            with self._condition:
                while not self._jobs and not self._closed:
                    self._condition.wait()
                if self._closed:
                    jobs, self._jobs = self._jobs, []
                    for job in jobs:
                        job.close()
                    return
                for job in [job for job in self._jobs if job.cancelled.is_set()]:
                    self._end(job, "cancelled")
                if not self._jobs:
                    continue
                job = min(self._jobs, key=lambda candidate: candidate.share)  # the first of equals: arrival order
            started = time.perf_counter()
            ending = self._advance(job)
            job.share += time.perf_counter() - started
            if ending:
                with self._condition:
                    self._end(job, ending)

    def _end(self, job: Job, how: str) -> None:
        job.close()
        self._jobs.remove(job)
        self.counts[how] += 1

    def _advance(self, job: Job) -> str | None:
        """One turn of a job: open its stream, or take its next step; how it ended, if it did."""
        try:
            if job.stream is None:
                job.stream = job.start()
                job.deliver("start", job.describe("start", job.stream.given, job))
                return None
            started = time.perf_counter()
            event = next(job.stream)
            job.sampling_seconds += time.perf_counter() - started
            job.generated += sum(len(row) for row in event.positions)
            kind = "done" if event.done else "step"
            job.deliver(kind, job.describe(kind, event, job))
            return "completed" if event.done else None
        except PGMError as error:
            job.deliver("invalid" if job.stream is None else "error", str(error))
            return "invalid"
        except Exception as error:  # a failure of one request must not stop the server
            log.exception("a request failed")
            job.deliver("error", f"generation failed ({type(error).__name__}: {error})")
            return "failed"
