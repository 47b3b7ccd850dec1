"""Where and when an update of the averages runs: inline, on a side CUDA stream, or in a background worker.

An update reads θ_t (the live weights after optimizer step t) and writes the averagers' buffers. Two
rules make any schedule give the results of the inline one, bit for bit:

1. **θ_t is read before the next optimizer step writes θ.** The trainer calls
   :meth:`UpdateRunner.before_weights_change` before every optimizer step (``on_pre_optimizer_step``);
   anything else that writes the live weights (an evaluation swap, loading the best checkpoint) calls
   :meth:`UpdateRunner.wait` first.
2. **Nothing reads or writes the averagers' buffers while an update may still run.** Every reader
   (average, evaluation swap, save, load, teacher refresh, DPO reference sync) calls
   :meth:`UpdateRunner.wait` first, and an update starts after everything issued before it.

Schedules (:func:`choose_schedule` picks one):

* ``inline``: the update runs where it is submitted (CPU training, DeepSpeed: its engine writes θ
  inside ``backward``, where no callback can wait).
* ``stream`` (CUDA, shadow on the training device): the update's kernels run on a side stream that
  first waits for an event recorded on the training stream at submission (so θ_t is complete, rule 2
  for writers before it); the training stream waits for the event recorded after θ's last read before
  the next optimizer step (rule 1), and for the end event before any reader (rule 2). Only
  device-side waits: the host never blocks, and the update overlaps the next forward.
* ``worker`` (``offload=True``): at submission, θ_t is copied into a host buffer (pinned, copied
  asynchronously on a side stream from CUDA; the training stream waits for that copy before the next
  optimizer step), then a background thread folds it into the CPU buffers. One update at a time: the
  next submission, and every reader, first joins the previous update (``Future.result``, which also
  re-raises its error), so the host buffer and the averagers' state are never used by two threads
  at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import torch

from .live import STAGING_CHUNK_ELEMENTS, FlatTensors, LiveWeights, TensorSource

Schedule = Literal["inline", "stream", "worker"]
#: an update: called with ``on_read``, to call once it has read the live weights for the last time
Job = Callable[[Callable[[], None]], None]


def _nothing() -> None:
    return None


def choose_schedule(source: TensorSource, offload: bool, engine_steps_in_backward: bool) -> Schedule:
    """``worker`` for an offloaded shadow, ``stream`` on CUDA, ``inline`` otherwise.

    Also ``inline`` under DeepSpeed (``engine_steps_in_backward``: the optimizer step happens inside
    ``backward``, where no callback can make it wait) and when the live weights are spread over several
    devices (a ``device_map`` model: another device's stream would not be ordered by our events).
    """
    devices = {(x.device.type, x.device.index) for x in source.local_tensors()}
    if engine_steps_in_backward or len(devices) > 1:
        return "inline"
    if offload:
        return "worker"
    on_cuda = bool(devices) and next(iter(devices))[0] == "cuda"
    return "stream" if on_cuda else "inline"


def build_runner(schedule: Schedule, source: TensorSource, shadow_device: torch.device) -> UpdateRunner:
    """The runner of ``schedule`` for the live weights of ``source`` and a shadow on ``shadow_device``."""
    if schedule == "worker":
        return WorkerRunner(HostSnapshot(source))
    reader = LiveWeights(source, shadow_device)
    if schedule == "stream":
        return StreamRunner(reader, shadow_device)
    return UpdateRunner(reader)


class UpdateRunner:
    """Runs updates inline. Subclasses move them to a side stream or a worker thread."""

    schedule: Schedule = "inline"

    def __init__(self, reader: LiveWeights) -> None:
        #: θ for the updates' math
        self.reader = reader

    def submit(self, job: Job) -> None:
        """Run ``job`` (an update that reads θ_t through :attr:`reader`)."""
        job(_nothing)

    def before_weights_change(self) -> None:
        """The live weights are about to be written (optimizer step): the last update must have read them."""

    def wait(self) -> None:
        """Every submitted update is complete, as seen by what the caller issues next."""

    def close(self) -> None:
        """Wait, then release threads and streams (a later submission starts them again)."""
        self.wait()


class StreamRunner(UpdateRunner):
    """Updates on a side CUDA stream, ordered with the training stream by events only."""

    schedule: Schedule = "stream"

    def __init__(self, reader: LiveWeights, device: torch.device) -> None:
        super().__init__(reader)
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._ready = torch.cuda.Event()
        self._read = torch.cuda.Event()
        self._done = torch.cuda.Event()
        self._read_pending = False
        self._done_pending = False

    def _current(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def _mark_read(self) -> None:
        self._read.record(self.stream)
        self._read_pending = True

    def submit(self, job: Job) -> None:
        self._ready.record(self._current())  # θ_t and everything issued before is complete at this point
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self._ready)
            job(self._mark_read)
            self._done.record(self.stream)
        self._done_pending = True

    def before_weights_change(self) -> None:
        if self._read_pending:
            self._current().wait_event(self._read)
            self._read_pending = False

    def wait(self) -> None:
        if self._done_pending:
            self._current().wait_event(self._done)
            self._done_pending = self._read_pending = False


class HostSnapshot:
    """θ_t copied to host memory at submission; the worker reads it as fp32 through :attr:`reader`.

    From CUDA: the tensors are packed on the device into a flat buffer of their dtype (one fused copy per
    chunk of at most ``chunk_elements``), then copied asynchronously into a pinned host buffer: half the
    bytes of fp32 for bf16 weights, converted to fp32 by the worker. From the CPU: one fp32 copy.
    """

    def __init__(self, source: TensorSource, chunk_elements: int = STAGING_CHUNK_ELEMENTS) -> None:
        self.source = source
        self.chunk_elements = chunk_elements
        self.host = FlatTensors(torch.empty(0), [])
        self.reader = LiveWeights(self.host, "cpu", chunk_elements)
        self.pack: LiveWeights | None = None
        self.on_cuda = False
        self._key: tuple[int, ...] | None = None

    def _refresh(self) -> None:
        key = self.source.storage_key()
        if key == self._key:
            return
        live = self.source.local_tensors()
        sizes = [x.numel() for x in live]
        total = sum(sizes)
        self.on_cuda = any(x.is_cuda for x in live)
        dtypes = {x.dtype for x in live}
        if self.on_cuda:
            dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
            device = next(x.device for x in live if x.is_cuda)
            self.pack = LiveWeights(self.source, device, self.chunk_elements, allow_direct=False, dtype=dtype)
            flat = torch.empty(total, dtype=dtype, pin_memory=True)
        else:
            self.pack = LiveWeights(self.source, "cpu", max(total, 1), allow_direct=False)
            self.pack.refresh()
            flat = self.pack.staging if self.pack.staging is not None else torch.empty(0)
        self.host.flat, self.host.tensors = flat, list(flat.split(sizes))
        self._key = key

    def take(self) -> None:
        """Copy θ_t (asynchronously from CUDA, on the current stream)."""
        self._refresh()
        assert self.pack is not None
        for lo, hi, part in self.pack.parts():
            if self.on_cuda:
                self.host.flat[lo:hi].copy_(part, non_blocking=True)  # type: ignore[arg-type]

    def memory_bytes(self) -> int:
        """Bytes of the host copy (pinned from CUDA) and of the device packing buffer."""
        device = self.pack.memory_bytes() if self.pack is not None and self.on_cuda else 0
        return self.host.flat.numel() * self.host.flat.element_size() + device + self.reader.memory_bytes()


class WorkerRunner(UpdateRunner):
    """``offload=True``: θ_t is snapshotted at submission, the update runs in a background thread."""

    schedule: Schedule = "worker"

    def __init__(self, snapshot: HostSnapshot) -> None:
        super().__init__(snapshot.reader)
        self.snapshot = snapshot
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future[None] | None = None
        self._stream: torch.cuda.Stream | None = None
        self._ready: torch.cuda.Event | None = None
        self._copied: torch.cuda.Event | None = None
        self._copy_pending = False
        #: updates run by the worker thread, and the names of the threads that ran them (diagnostics)
        self.updates_run = 0
        self.worker_threads: set[str] = set()

    def submit(self, job: Job) -> None:
        self.wait()  # the previous update has released the host copy and the buffers
        self.snapshot._refresh()
        if self.snapshot.on_cuda:
            self._take_async()
        else:
            self.snapshot.take()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trl-ema-plugin-average")
        self._future = self._executor.submit(self._work, job)

    def _take_async(self) -> None:
        assert self.snapshot.pack is not None
        device = self.snapshot.pack.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
            self._ready, self._copied = torch.cuda.Event(), torch.cuda.Event()
        assert self._ready is not None and self._copied is not None
        self._ready.record(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(self._ready)
            self.snapshot.take()
            self._copied.record(self._stream)
        self._copy_pending = True

    def _work(self, job: Job) -> None:
        if self._copied is not None and self.snapshot.on_cuda:
            self._copied.synchronize()  # the host copy is complete (releases the GIL while waiting)
        job(_nothing)
        self.updates_run += 1
        self.worker_threads.add(threading.current_thread().name)

    def before_weights_change(self) -> None:
        if self._copy_pending:
            assert self._copied is not None and self.snapshot.pack is not None
            torch.cuda.current_stream(self.snapshot.pack.device).wait_event(self._copied)
            self._copy_pending = False

    def wait(self) -> None:
        future, self._future = self._future, None
        if future is not None:
            future.result()  # re-raises the update's error here

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
