"""θ_t for the averager math: this rank's live weights as fp32 on the shadow device, read per byte.

* **direct**: the live tensors are already fp32 on the shadow device: θ is the list of their 1-D views,
  used in place (one foreach call per op), or one flat tensor when they are consecutive views of one
  storage (``source.flat``, e.g. after :meth:`~trl_ema_plugin.shadow.LocalLayout.make_contiguous`).
* **staged**: anything else (bf16/fp16 live weights, another device): one conversion per chunk into a
  persistent flat fp32 buffer of at most ``chunk_elements`` (one ``torch._foreach_copy_`` of the
  tensors' pieces, a fused kernel on CUDA), and θ is that buffer: one kernel per averager op.

The 1-D views of the live tensors are made once and remade only when a parameter's storage changes
(:meth:`~trl_ema_plugin.shadow.ShadowLayout.storage_key`); nothing is allocated per read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..averagers.ops import Tensors

#: the staging buffer's size limit (elements): 64 MiB of fp32; a LoRA adapter of a 1 B model fits in one chunk
STAGING_CHUNK_ELEMENTS = 1 << 24


class TensorSource(Protocol):
    """Where θ comes from: a :class:`~trl_ema_plugin.shadow.ShadowLayout`, or a :class:`FlatTensors` copy."""

    def local_tensors(self) -> list[Tensor]: ...

    def storage_key(self) -> tuple[int, ...]: ...


class FlatTensors:
    """Tensors that are views of one flat buffer (e.g. a host copy of the live weights)."""

    def __init__(self, flat: Tensor, sizes: list[int]) -> None:
        self.flat = flat
        self.tensors = list(flat.split(sizes))

    def local_tensors(self) -> list[Tensor]:
        return self.tensors

    def storage_key(self) -> tuple[int, ...]:
        return (self.flat.data_ptr(),)


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device when 0 is the current one."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return a.index == b.index or a.index is None or b.index is None
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


@dataclass
class _Chunk:
    lo: int
    hi: int
    dst: list[Tensor]  # views of the staging buffer
    src: list[Tensor]  # the live tensors' pieces that fill them


class LiveWeights:
    """Reads θ_t from ``source`` as ``dtype`` (fp32) on ``device``: whole (direct) or chunk by chunk (staged)."""

    def __init__(
        self,
        source: TensorSource,
        device: torch.device | str,
        chunk_elements: int = STAGING_CHUNK_ELEMENTS,
        allow_direct: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.source = source
        self.device = torch.device(device)
        self.dtype = dtype
        self.chunk_elements = max(int(chunk_elements), 1)
        self.allow_direct = allow_direct
        self.sizes: list[int] = []
        self.total = 0
        self.live: list[Tensor] = []
        self.pieces: list[Tensor] = []  # what is read: the live tensors, or their one flat tensor
        self.mode = ""  # "flat", "direct" or "staged"
        self.staging: Tensor | None = None
        self.chunks: list[_Chunk] = []
        self._key: tuple[int, ...] | None = None

    # ------------------------------------------------------------------ layout of the read
    def refresh(self) -> None:
        """(Re)build the views when the source's storage changed since the last read (cheap otherwise)."""
        key = self.source.storage_key()
        if key == self._key:
            return
        live = [x.reshape(-1) for x in self.source.local_tensors()]
        sizes = [x.numel() for x in live]
        if self._key is not None and sizes != self.sizes:
            raise RuntimeError(f"the tracked weights changed their sizes during training ({self.sizes} → {sizes})")
        self.live, self.sizes, self.total = live, sizes, sum(sizes)
        flat = getattr(self.source, "flat", None)  # the live weights as one tensor, when they are laid out so
        self.pieces = [flat] if flat is not None else live
        ready = all(x.dtype == self.dtype and same_device(x.device, self.device) for x in self.pieces)
        if ready and self.allow_direct:
            self.mode = "flat" if flat is not None else "direct"
        else:
            self.mode = "staged"
            self._plan_staging()
        self._key = key

    def _plan_staging(self) -> None:
        size = min(self.total, self.chunk_elements)
        if self.staging is None or self.staging.numel() != size:
            self.staging = torch.empty(size, dtype=self.dtype, device=self.device)
        self.chunks = []
        for lo in range(0, self.total, self.chunk_elements):
            hi = min(lo + self.chunk_elements, self.total)
            chunk = _Chunk(lo, hi, [], [])
            offset = 0
            for x in self.pieces:
                n = x.numel()
                a, b = max(lo - offset, 0), min(hi - offset, n)
                if a < b:
                    chunk.src.append(x[a:b])
                    chunk.dst.append(self.staging[offset + a - lo : offset + b - lo])
                offset += n
            self.chunks.append(chunk)

    def memory_bytes(self) -> int:
        """Bytes of the staging buffer (0 when θ is read in place)."""
        return 0 if self.staging is None else self.staging.numel() * self.staging.element_size()

    # ------------------------------------------------------------------------------ reads
    def parts(self, on_read: Callable[[], None] | None = None) -> Iterator[tuple[int, int, Tensors]]:
        """θ_t as ``(lo, hi, θ[lo:hi])``: one part in place (direct), or one per chunk (staged, fp32).

        ``on_read`` is called once the live weights have been read for the last time: after the last
        chunk's conversion (staged), or after the caller is done with the only part (direct).
        """
        self.refresh()
        if self.mode == "staged":
            assert self.staging is not None
            for index, chunk in enumerate(self.chunks):
                torch._foreach_copy_(chunk.dst, chunk.src)
                if on_read is not None and index == len(self.chunks) - 1:
                    on_read()
                yield chunk.lo, chunk.hi, self.staging[: chunk.hi - chunk.lo]
            if not self.chunks and on_read is not None:
                on_read()
            return
        yield 0, self.total, (self.pieces[0] if self.mode == "flat" else self.live)
        if on_read is not None:
            on_read()

    def tensors(self) -> list[Tensor]:
        """θ_t as per-tensor fp32 tensors (for averagers without flat math): the live views, or converted copies."""
        self.refresh()
        if self.mode != "staged":
            return list(self.live)
        return [x.to(device=self.device, dtype=self.dtype) for x in self.live]

    def copy_into(self, out: Tensor) -> None:
        """``out`` (flat fp32, ``total`` elements) ← θ_t."""
        for lo, hi, theta in self.parts():
            if isinstance(theta, list):
                torch._foreach_copy_(list(out.split(self.sizes)), theta)
            else:
                out[lo:hi].copy_(theta)
