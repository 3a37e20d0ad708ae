"""The engine in a process of its own: ``edgekv serve``'s HTTP side never waits for it.

::

    server process                                engine process (spawned)
    --------------                                ------------------------
    EngineProcess.submit(Job) ── ("add", id, ids, params) ──> EngineLoop.submit(_Remote)
    EngineProcess.cancel(Job) ── ("cancel", id) ────────────> EngineLoop.cancel
    reader thread <── ("round", events, released, stats) ──── after every round of the loop
      └─> each Job's event loop (one call per event loop per round)

Why two processes: in one, the engine's Python (a step's ~100 calls into torch, each of
which lets go of the interpreter lock and must take it back) and the HTTP side's Python
(a chunk per token per client) take turns on one lock. Measured on the demo model with
16 streaming clients on 2 CPUs: a step took 13.6 ms in the server against 6 ms alone.

``EngineProcess`` has ``EngineLoop``'s handler side (submit, cancel, stats, alive, start,
stop, tokenizer, max_position), so app.py serves either. The child builds the model from
the command's options (``edgekv.cli.options.build``); a user's mistake there (a bad path, a bad
value) comes back as ``InputError``, one line. The child ignores Ctrl-C (the server shuts
it down in order) and exits when the server's end of its pipe closes, however the server
went. If it dies, every live request fails with 503 and ``/health`` says so.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import signal
import threading
import traceback
from collections import defaultdict

from edgekv.cli.errors import InputError, one_line

from .loop import Busy, EngineLoop, Event, Job, Request, Stopped

log = logging.getLogger("edgekv.serve")


class EngineFailed(Exception):
    """The engine process could not start (not a user's mistake: its traceback is on
    stderr)."""


class EngineProcess:
    """The handler side of an ``EngineLoop`` that runs in a spawned process."""

    def __init__(self, opts: dict, llm_options: dict, threads: int, attention_threads: int,
                 max_live: int):
        self.max_live = max_live
        self._args = (opts, llm_options, threads, attention_threads)
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count()
        self._accepted = 0
        self._alive = False
        self._snapshot: dict = {}
        self.info: dict = {}
        self.tokenizer = None
        self.max_position = 0
        self._proc = self._reader = None

    # ---- life ----------------------------------------------------------------------------
    def launch(self) -> dict:
        """Start the engine process and wait until its model is loaded. Returns what it
        reports of itself (``model_dir``, ``device``, ``threads``, ``stats``). Raises
        InputError for a user's mistake, EngineFailed for anything else."""
        ctx = multiprocessing.get_context("spawn")
        to_child, self._to = ctx.Pipe(duplex=False)
        self._from, from_child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child, args=(*self._args, to_child, from_child),
                                 name="edgekv-engine", daemon=True)
        # the child inherits Ctrl-C ignored (an ignored signal stays so across exec, and
        # Python then installs no KeyboardInterrupt): from its first import on, the server
        # alone stops it. Only the main thread may set a handler.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self._proc.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        to_child.close()  # the child holds its own copies of its ends
        from_child.close()
        try:
            msg = self._from.recv()
        except (EOFError, OSError):
            self._proc.join(timeout=5)
            raise EngineFailed(f"the engine process exited while loading the model "
                               f"(exit code {self._proc.exitcode})") from None
        if msg[0] == "failed":
            _, message, user_error = msg
            self._proc.join(timeout=30)
            raise (InputError if user_error else EngineFailed)(message)
        self.info = msg[1]
        self._snapshot = self.info["stats"]
        self.max_position = self.info["max_position"]
        if self.info["has_tokenizer"]:  # (the engine loaded it: it reads)
            from pathlib import Path

            from edgekv.llm import _load_tokenizer

            try:
                self.tokenizer = _load_tokenizer(Path(self.info["model_dir"]))
            except BaseException:
                self._alive = True  # so that stop() asks the engine to finish
                self.stop()
                raise
        self._alive = True
        self._reader = threading.Thread(target=self._read, name="edgekv-engine-reader",
                                        daemon=True)
        self._reader.start()
        return self.info

    def start(self) -> None:
        """(The app's startup: the process runs since ``launch``.)"""

    def stop(self) -> None:
        """Take no more requests, ask the engine process to finish and wait for it (then
        end it if it hangs). Safe to call twice, or after a failed launch."""
        with self._lock:
            if self._alive:
                self._alive = False
                try:
                    self._to.send(("stop",))
                except OSError:
                    pass
        if self._proc is not None:
            self._proc.join(timeout=30)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)

    def alive(self) -> bool:
        return self._alive and self._proc is not None and self._proc.is_alive()

    def stats(self) -> dict:
        return self._snapshot

    # ---- requests --------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Send ``job`` to the engine; Busy when ``max_live`` jobs are already live,
        Stopped when the engine process is gone."""
        with self._lock:
            if not self._alive:
                raise Stopped("the engine has stopped: the server must be restarted")
            if self._accepted >= self.max_live:
                raise Busy(f"{self._accepted} requests are in progress (the server takes "
                           f"{self.max_live}); retry shortly")
            jid = next(self._ids)
            try:  # (the engine reads its pipe all the time: a send does not wait long)
                self._to.send(("add", jid, job.prompt_ids, job.params))
            except OSError:  # the engine just died; the reader will see its pipe close
                self._alive = False
                raise Stopped("the engine has stopped: the server must be restarted") \
                    from None
            job.rid = jid
            self._jobs[jid] = job
            self._accepted += 1

    def cancel(self, job: Job) -> None:
        """The client went away: the engine aborts the job's sequences before its next
        step."""
        with self._lock:
            if job.finished or job.cancelled or not self._alive:
                return
            job.cancelled = True
            try:
                self._to.send(("cancel", job.rid))
            except OSError:  # the engine is gone: the reader fails the job
                pass

    # ---- the reader thread -------------------------------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                kind, events, released, snapshot = self._from.recv()
                self._deliver(events, released)
                self._snapshot = snapshot
        except (EOFError, OSError):  # the engine process is gone (stopped or died)
            pass
        except Exception:  # noqa: BLE001 - a bug: fail the live jobs rather than hang them
            log.exception("reading the engine's events")
        self._gone()

    def _deliver(self, events: list[tuple[int, Event]], released: list[int]) -> None:
        """Hand a round's events to their jobs (one call per event loop), free the slots
        of the jobs the engine is done with."""
        by_loop: dict[object, list[tuple[Job, Event]]] = defaultdict(list)
        with self._lock:
            for jid, event in events:
                job = self._jobs.get(jid)
                if job is None:
                    continue
                if event.done or event.error is not None:
                    job.finished = True
                by_loop[job._aio].append((job, event))
            for jid in released:
                if self._jobs.pop(jid, None) is not None:
                    self._accepted -= 1
        for aio, pairs in by_loop.items():
            try:
                aio.call_soon_threadsafe(_deliver_all, pairs)
            except RuntimeError:  # that event loop has closed: nobody waits for these
                pass

    def _gone(self) -> None:
        """The engine process ended: every live job fails (503), nothing more is taken."""
        with self._lock:
            was_alive, self._alive = self._alive, False
            jobs, self._jobs, self._accepted = list(self._jobs.values()), {}, 0
        if was_alive:  # not stopped by us: it died
            self._proc.join(timeout=1)
            log.error("the engine process exited (code %s)", self._proc.exitcode)
        by_loop: dict[object, list[tuple[Job, Event]]] = defaultdict(list)
        for job in jobs:
            if not job.finished:
                job.finished = True
                error = Stopped("the engine has stopped: the server must be restarted")
                by_loop[job._aio].append((job, Event(error=error)))
        for aio, pairs in by_loop.items():
            try:
                aio.call_soon_threadsafe(_deliver_all, pairs)
            except RuntimeError:
                pass


def _deliver_all(pairs: list[tuple[Job, Event]]) -> None:
    for job, event in pairs:
        job.deliver(event)


# ---- the engine process ------------------------------------------------------------------------
class _Remote(Request):
    """A request in the engine process: its events and its release go to the round's
    outbox, sent to the server after the round."""

    def __init__(self, jid: int, prompt_ids: list[int], params, outbox: _Outbox):
        super().__init__(prompt_ids, params)
        self.jid, self._outbox = jid, outbox

    def _post(self, event: Event) -> None:
        if event.error is not None:
            event.error = _portable(event.error)
        self._outbox.events.append((self.jid, event))

    def _released(self) -> None:
        self._outbox.released.append(self.jid)
        self._outbox.requests.pop(self.jid, None)


class _Outbox:
    def __init__(self):
        self.events: list[tuple[int, Event]] = []
        self.released: list[int] = []
        self.requests: dict[int, _Remote] = {}


def _portable(e: Exception) -> Exception:
    """``e`` as an exception the server can unpickle: a ValueError (the engine refused
    the request: 400) stays one; anything else becomes a RuntimeError with its words."""
    if isinstance(e, Stopped):
        return Stopped(str(e))
    if isinstance(e, ValueError):
        return ValueError(str(e))
    return RuntimeError(f"{type(e).__name__}: {e}")


def _child(opts: dict, llm_options: dict, threads: int, attention_threads: int, inbox,
           outbox) -> None:
    """The engine process: build the model, report, then take requests until told to
    stop or until the server's end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (inherited so; the server stops us)
    try:
        import click
        import torch

        from edgekv.cli.options import build
        from edgekv.kernels import cpu_jit

        llm, _ = build(opts, **llm_options)
        if llm.device.type == "cpu":
            torch.set_num_threads(threads)
            cpu_jit.set_attention_threads(attention_threads)
        llm.warm_up()  # the first batch would wait for the batched kernel to load
    except click.ClickException as e:
        outbox.send(("failed", e.format_message(), True))
        return
    except BaseException as e:  # noqa: BLE001 - a bug: its traceback, then one line
        traceback.print_exc()
        outbox.send(("failed", one_line(f"{type(e).__name__}: {e}"), False))
        return

    box = _Outbox()

    def send_round() -> None:
        events, box.events = box.events, []
        released, box.released = box.released, []
        try:
            outbox.send(("round", events, released, loop.stats()))
        except OSError:  # the server is gone; the main thread sees the pipe close
            pass

    def crashed() -> None:  # the loop thread failed (logged): the server must see us go
        os._exit(1)

    # (the server counts live requests against --max-num-seqs + --max-queue, not us)
    loop = EngineLoop(llm, max_live=1 << 30, on_step=send_round, on_crash=crashed)
    outbox.send(("ready", {
        "model_dir": str(llm.model_dir), "device": llm.device.type,
        "threads": torch.get_num_threads(), "attention_threads": cpu_jit.attention_threads(),
        "max_position": llm.model_config.max_position,
        "has_tokenizer": llm.tokenizer is not None, "stats": loop.stats()}))
    loop.start()
    try:
        while True:
            msg = inbox.recv()
            if msg[0] == "add":
                _, jid, ids, params = msg
                box.requests[jid] = req = _Remote(jid, ids, params, box)
                loop.submit(req)
            elif msg[0] == "cancel":
                req = box.requests.get(msg[1])
                if req is not None:
                    loop.cancel(req)
            else:  # "stop"
                break
    except (EOFError, OSError):  # the server went away
        pass
    loop.stop()
