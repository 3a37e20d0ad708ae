"""One thread owns the engine; HTTP handlers only submit requests and read their events.

::

    handler (event loop)          EngineLoop thread
    --------------------          -----------------
    submit(Job) ─────────────────> inbox ──> validate, engine.add
    await job.next()  <─── events <───────── after every step: text deltas per choice,
                                             finish reasons, usage
    job.cancel() ────────────────> cancels ─> engine.abort before the next step

Requests join and leave between steps (continuous batching): the thread drains its inbox
and its cancellations, runs one ``engine.step()`` while any request is live, publishes
each live job's news, and sleeps when there is nothing to do. A client that goes away
cancels its job; its sequences are aborted (their blocks freed) before the next step.

Backpressure: at most ``max_live`` jobs are accepted at once (running plus waiting in the
engine); ``submit`` refuses more with ``Busy`` and the server answers 429.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from edgekv.engine.sampling import SamplingParams
from edgekv.engine.sequence import Sequence

log = logging.getLogger("edgekv.serve")


class Busy(Exception):
    """Too many requests are live: the caller should retry later (HTTP 429)."""


class Stopped(Exception):
    """The engine is not running (it failed or is shutting down): HTTP 503."""


@dataclass
class Choice:
    """What one output (sample) of a job produced since the last event."""

    index: int
    text: str
    num_tokens: int  # tokens generated so far by this choice
    finish_reason: str | None = None
    # with logprobs asked for: the new tokens' (text, log-prob, [(text, log-prob)] best)
    logprobs: list[tuple[str, float, list[tuple[str, float]]]] | None = None


@dataclass
class Event:
    """A step's news for one job: its choices' deltas; ``done`` when every choice has
    finished (``usage`` then set); ``error`` when the engine refused the request."""

    choices: list[Choice] = field(default_factory=list)
    done: bool = False
    usage: dict | None = None
    error: Exception | None = None
    gone: bool = False  # the client went away (posted by the server, not the engine)


class Request:
    """The engine loop's view of one request: prompt token ids and sampling parameters in,
    events out through ``_post`` (a subclass says where they go)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams):
        self.prompt_ids, self.params = prompt_ids, params
        self.seq: Sequence | None = None  # set by the loop thread
        self._sent: dict[int, int] = {}  # choice index -> tokens already counted
        self._ended: set[int] = set()  # choices whose finish was reported
        self._lp_sent: dict[int, int] = {}  # choice index -> logprob entries reported
        self.cancelled = False
        self.finished = False

    def _post(self, event: Event) -> None:  # from the loop thread
        raise NotImplementedError

    def _released(self) -> None:  # from the loop thread: its slot is free again
        pass


class Job(Request):
    """One HTTP request, its events delivered on the event loop that created it (``next``
    awaits them)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams):
        super().__init__(prompt_ids, params)
        self._aio = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    async def next(self) -> Event:
        return await self._events.get()

    def _post(self, event: Event) -> None:  # from another thread
        self._aio.call_soon_threadsafe(self._events.put_nowait, event)

    def deliver(self, event: Event) -> None:
        """Queue ``event`` (on the job's event loop)."""
        self._events.put_nowait(event)

    def gone(self) -> None:
        """Wake ``next`` with a ``gone`` event (on the job's event loop)."""
        self._events.put_nowait(Event(gone=True))


class EngineLoop:
    """Drives ``llm.engine`` from one thread for every client. ``stats()`` is a snapshot
    the thread refreshes after each step (``/metrics`` reads it, never the engine).
    ``on_step``, if given, is called by the thread after each round (a step, or requests
    taken or dropped without one): process.py sends the round's events from there.
    ``on_crash``, if given, is called should the thread itself fail (a bug): process.py
    ends the engine process then, so that the server sees it gone."""

    def __init__(self, llm, max_live: int, on_step=None, on_crash=None):
        self.llm, self.engine = llm, llm.engine
        self.tokenizer, self.max_position = llm.tokenizer, llm.model_config.max_position
        self.max_live = max_live
        self._on_step, self._on_crash = on_step, on_crash
        self._inbox: deque[Request] = deque()
        self._cancels: deque[Request] = deque()
        self._live: list[Request] = []
        self._accepted = 0  # jobs submitted and not yet finished (guarded by _cv)
        self._cv = threading.Condition()
        self._stop = False
        self._crashed = False
        self._thread = threading.Thread(target=self._run, name="edgekv-engine", daemon=True)
        self.tokens_generated = 0
        self.requests_finished = 0
        self._snapshot: dict = {}
        self._refresh()

    # ---- handler side ------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def submit(self, job: Request) -> None:
        """Queue ``job``; Busy when ``max_live`` jobs are already live, Stopped when the
        loop is not running."""
        with self._cv:
            if self._stop or self._crashed:
                raise Stopped("the engine has stopped: the server must be restarted")
            if self._accepted >= self.max_live:
                raise Busy(f"{self._accepted} requests are in progress (the server takes "
                           f"{self.max_live}); retry shortly")
            self._accepted += 1
            self._inbox.append(job)
            self._cv.notify()

    def cancel(self, job: Request) -> None:
        """The client went away: abort the job's sequences before the next step."""
        with self._cv:
            if not job.finished and not job.cancelled:
                job.cancelled = True
                self._cancels.append(job)
                self._cv.notify()

    def stats(self) -> dict:
        return self._snapshot

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._crashed

    # ---- the loop thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # a bug in the loop itself: nothing is taken any more
            log.exception("the engine loop stopped")
            with self._cv:
                self._crashed = True
                waiting = list(self._inbox)
                self._inbox.clear()
            error = Stopped("the engine has stopped: the server must be restarted")
            for job in waiting + list(self._live):
                try:
                    self._finish(job, Event(error=error))
                except Exception:  # noqa: BLE001 - best effort; the rest still hear
                    pass
            if self._on_crash is not None:
                self._on_crash()

    def _loop(self) -> None:
        eng = self.engine
        while True:
            with self._cv:
                while not (self._stop or self._inbox or self._cancels
                           or eng.has_unfinished()):
                    self._cv.wait()
                if self._stop:
                    return
                inbox, self._inbox = list(self._inbox), deque()
                cancels, self._cancels = list(self._cancels), deque()
            try:
                with eng.hold():
                    for job in cancels:
                        self._abort(job)
                    for job in inbox:
                        self._add(job)
                    if eng.has_unfinished():
                        eng.step()
                    self._publish()
            except Exception as e:  # noqa: BLE001 - a bug: fail the live jobs, keep serving
                log.exception("engine step failed")  # the step was rolled back (rollback.py)
                self._fail_live(e)
            self._refresh()
            if self._on_step is not None:
                self._on_step()

    def _fail_live(self, error: Exception) -> None:
        """Abort every live job and tell its client why (a 500 or an error chunk)."""
        for job in list(self._live):
            try:
                with self.engine.hold():
                    self.engine.abort(job.seq)
            except Exception:  # noqa: BLE001 - its client still hears of the failure
                log.exception("aborting a failed request")
            self._finish(job, Event(error=error))

    def _add(self, job: Request) -> None:
        if job.cancelled:
            self._release(job)
            return
        eng = self.engine
        try:
            seq = eng.new_sequence(job.prompt_ids, job.params)
            eng.add(seq)  # validates first: a refusal changes nothing
        except Exception as e:  # noqa: BLE001 - ValueError: refused (400); else a bug (500)
            if not isinstance(e, ValueError):
                log.exception("adding a request")
            job.finished = True
            self._release(job)
            job._post(Event(done=True, error=e))
            return
        job.seq = seq
        self._live.append(job)

    def _abort(self, job: Request) -> None:
        if job.seq is not None and job in self._live:
            self.engine.abort(job.seq)
            self._live.remove(job)
            job.finished = True
            self._release(job)

    def _release(self, job: Request) -> None:
        with self._cv:
            self._accepted -= 1
        job._released()

    def _finish(self, job: Request, event: Event) -> None:
        if job in self._live:
            self._live.remove(job)
        job.finished = True
        self.requests_finished += 1
        self._release(job)  # first: a client told it is done may come straight back
        job._post(event)

    def _publish(self) -> None:
        """Post each live job its choices' new text and finish reasons."""
        for job in list(self._live):
            seq = job.seq
            outs = seq.samples or [seq]
            event = Event()
            for s in outs:
                i, n = s.sample_index, s.num_outputs
                text = "".join(s.new_text)
                s.new_text.clear()
                ends = s.finished and i not in job._ended
                lps = self._new_logprobs(job, s)
                if text or ends or lps:
                    reason = _reason(s.finish_reason) if ends else None
                    event.choices.append(Choice(i, text, n, reason, lps))
                if ends:
                    job._ended.add(i)
                self.tokens_generated += n - job._sent.get(i, 0)
                job._sent[i] = n
            if len(job._ended) == seq.params.n:
                event.done = True
                event.usage = {"prompt_tokens": seq.num_prompt,
                               "completion_tokens": sum(s.num_outputs for s in outs),
                               "cached_tokens": seq.num_prefix_hit}
                self._finish(job, event)
            elif event.choices:
                job._post(event)

    def _new_logprobs(self, job: Request, s: Sequence) -> list | None:
        """The log-probs of ``s``'s tokens not yet reported, their ids as text."""
        if s.logprobs is None:
            return None
        start = job._lp_sent.get(s.sample_index, 0)
        if start == len(s.logprobs):
            return None
        job._lp_sent[s.sample_index] = len(s.logprobs)
        ids = s.output_ids
        text = self._token_text
        return [(text(ids[j]), lp, [(text(t), v) for t, v in alts])
                for j, (lp, alts) in enumerate(s.logprobs[start:], start)]

    def _token_text(self, token: int) -> str:
        tok = self.llm.tokenizer
        return tok.decode([token]) if tok is not None else str(token)

    def _refresh(self) -> None:
        eng = self.engine
        try:
            s = dict(eng.kv_stats())
        except Exception:  # noqa: BLE001 - a snapshot is best effort
            return
        sch = eng.scheduler
        s.update(running=len(sch.running), waiting=len(sch.waiting),
                 tokens_generated=self.tokens_generated,
                 requests_finished=self.requests_finished, time=time.time())
        self._snapshot = s


def _reason(engine_reason: str | None) -> str:
    """The engine's finish reason in the OpenAI API's words."""
    return {"stop": "stop", "length": "length", "context": "length",
            "abort": "abort"}.get(engine_reason or "", "stop")
