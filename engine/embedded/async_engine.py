"""The bridge between asyncio and the engine thread.

One thread owns the runner and the scheduler and loops: run queued commands (new requests,
aborts, adapter loads and unloads), then one scheduler step, then hand that step's outputs to the
event loop in one ``call_soon_threadsafe`` (new requests' first tokens go sooner, straight after
their prefill). The event loop never waits on torch; the thread never
touches asyncio objects directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from engine.embedded.lora import AdapterInfo, AdapterSet, validate_adapter
from engine.embedded.scheduler import Scheduler, Sequence, StepOutput
from engine.embedded.token_sampling import SamplingParams
from engine.errors import BadRequestError, EngineInternalError

log = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_WAIT_S = 0.5  # how long the idle thread blocks on its command queue per turn
HANDOVER_WAIT_S = 0.005  # most the engine thread waits for the event loop to send a step's output


def settle(fut: concurrent.futures.Future[T], fn: Callable[[], T]) -> None:
    """Run ``fn`` and put its result, or what it raised, in ``fut`` (awaited on another thread)."""
    try:
        fut.set_result(fn())
    except BaseException as exc:
        fut.set_exception(exc)


class AsyncEngine:
    def __init__(self, runner: Any, *, max_num_seqs: int, max_model_len: int, max_loras: int,
                 max_lora_rank: int, base_names: list[str],
                 decode: Callable[[list[int]], str], metrics: Any = None,
                 threads: int | None = None) -> None:
        self.runner = runner
        self.threads = threads  # torch threads of the engine thread (None: torch's default)
        self.scheduler = Scheduler(runner, max_num_seqs=max_num_seqs,
                                   max_model_len=max_model_len, decode=decode)
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.base_names = base_names
        self.adapters = AdapterSet(max_loras)
        self.metrics = metrics
        if metrics is not None:
            self.scheduler.on_step = metrics.on_step
        self.tracing: Any = None  # engine.tracing.EngineTracing when tracing is on
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[StepOutput | BaseException]] = {}
        self._in_use: Counter[str] = Counter()  # adapter key -> requests not yet finished
        self._pending_unloads: set[str] = set()
        self._lora_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._next_id = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._commands.put(lambda: None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        if self.threads is not None:
            import torch

            # OpenMP's thread count is per calling thread: set it where the forwards run.
            torch.set_num_threads(self.threads)
        while not self._stopping:
            try:
                self._turn()
            except Exception:  # the thread must outlive any one failure
                log.exception("engine loop error")

    def _turn(self) -> None:
        """Queued commands, then one step; its outputs go to the event loop in one call."""
        self._drain(block=not self.scheduler.has_work())
        if self._stopping or not self.scheduler.has_work():
            return
        outputs: list[StepOutput | tuple[str, BaseException]]
        try:
            outputs = list(self.scheduler.step(emit=self._emit))
        except Exception as exc:  # a failed forward fails its batch, not the server
            log.exception("engine step failed")
            outputs = [(s.request_id, exc) for s in
                       (*self.scheduler.running, *self.scheduler.waiting)]
            self.scheduler.running.clear()
            self.scheduler.waiting.clear()
        if outputs and self._loop is not None:
            self._hand_over(outputs)
        if self._pending_unloads:
            self._unload_idle()

    def _emit(self, outputs: list[StepOutput]) -> None:
        """Hand outputs produced mid-step (first tokens from a prefill) to the event loop now."""
        if self._loop is not None:
            self._hand_over(list(outputs))

    def _hand_over(self, outputs: list[StepOutput | tuple[str, BaseException]]) -> None:
        """Give ``outputs`` to the event loop and wait (briefly) until it has sent them on.

        The wait keeps the event loop's per-token work (waking streams, encoding and writing SSE
        chunks) out of the next forward: on a machine with as many cores as torch threads, a
        core taken by the event loop mid-matmul stalls the whole OpenMP team until it gets the
        core back."""
        assert self._loop is not None
        done = threading.Event()
        self._loop.call_soon_threadsafe(self._dispatch, outputs, done)
        done.wait(HANDOVER_WAIT_S)

    def _drain(self, *, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            cmd()
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _unload_idle(self) -> None:
        in_use = self.scheduler.adapters_in_use()
        for key in list(self._pending_unloads):
            if key not in in_use:
                self._pending_unloads.discard(key)
                self.runner.unload_adapter(key)

    def _unload_or_defer(self, key: str) -> None:
        if key in self.scheduler.adapters_in_use():
            self._pending_unloads.add(key)  # its last request finishes first
        else:
            self.runner.unload_adapter(key)

    def _dispatch(self, outputs: list[StepOutput | tuple[str, BaseException]],
                  done: threading.Event | None = None) -> None:
        for out in outputs:
            item: StepOutput | BaseException
            if isinstance(out, tuple):
                rid, item = out
            else:
                rid, item = out.request_id, out
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put_nowait(item)
        if done is not None:
            # The streams woken above run before callbacks queued after them; two turns let
            # each write its chunk (uvicorn writes to the socket within the turn) first.
            assert self._loop is not None
            self._loop.call_soon(self._loop.call_soon, done.set)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between two steps and return its result."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._commands.put(lambda: settle(fut, fn))
        return await asyncio.wrap_future(fut)

    # -- requests ------------------------------------------------------------------------------

    def new_request_id(self, prefix: str) -> str:
        self._next_id += 1
        return f"{prefix}-{self._next_id}-{time.time_ns() % 10**9}"

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       adapter_key: str | None = None, arrival: float | None = None,
                       trace: Any = None) -> AsyncIterator[StepOutput]:
        """Stream a request's outputs; leaving early (client gone) aborts it."""
        stream: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        if request_id in self._streams:
            # Clients choose X-Request-ID, so two live requests may share one (a gateway's shadow
            # copy, a retry racing its original): each gets its own stream, or one would hang.
            request_id = self.new_request_id(request_id)
        self._streams[request_id] = stream
        seq = Sequence(request_id, prompt_ids, params, adapter_key)
        seq.trace = trace
        if arrival is not None:
            seq.arrival = arrival
        if adapter_key:
            self._in_use[adapter_key] += 1
        finished = False
        self._commands.put(lambda: self.scheduler.add(seq))
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise EngineInternalError(f"generation failed: {item}") from item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if adapter_key:
                self._in_use[adapter_key] -= 1
                if self._in_use[adapter_key] <= 0:
                    del self._in_use[adapter_key]
            if not finished:
                self._commands.put(lambda: self.scheduler.abort(request_id))

    # -- adapters ------------------------------------------------------------------------------

    def adapter_key(self, name: str) -> str | None:
        """The runner key of a resident adapter (marking it recently used), or None."""
        info = self.adapters.get(name)
        if info is None:
            return None
        self.adapters.touch(name)
        return info.key

    async def load_lora(self, name: str, path: Path) -> AdapterInfo:
        async with self._lora_lock:
            self.adapters.check_new(name)
            cfg = validate_adapter(name, path, base_names=self.base_names,
                                   max_rank=self.max_lora_rank,
                                   module_names=getattr(self.runner, "module_names", set()))
            busy = {a.name for a in self.adapters.list() if a.key in self._in_use}
            victim = self.adapters.victim(busy)
            if victim is not None:
                old = self.adapters.remove(victim)
                log.info("unloading least recently used adapter %s", victim)
                await self.call(lambda: self._unload_or_defer(old.key))
            try:
                key = await self.call(lambda: self.runner.load_adapter(path))
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise BadRequestError(f"Loading LoRA adapter '{name}' failed: {exc}",
                                      param="lora_path") from exc
            info = AdapterInfo(name=name, path=path, rank=int(cfg["r"]), key=key,
                               created=int(time.time()))
            self.adapters.add(info)
            return info

    async def unload_lora(self, name: str) -> None:
        async with self._lora_lock:
            info = self.adapters.remove(name)
            await self.call(lambda: self._unload_or_defer(info.key))
