"""PyTorch FSDP2 (``fully_shard``): the shadow covers this rank's dim-0 shard of each parameter.

FSDP2 keeps every parameter as a ``DTensor`` with placement ``Shard(0)`` on a 1-D device mesh of
``world`` ranks. With ``c = ⌈rows / world⌉`` rows per chunk (``rows = shape[0]``), rank ``r``
holds rows ``[min(r·c, rows), min((r+1)·c, rows))`` in ``p.to_local()``: the last ranks may hold
fewer rows, or none (a LoRA A of rank 3 on 2 ranks: 2 rows and 1 row; on 4 ranks the 4th has 0).

* ``local_tensors``: ``p.to_local()`` flattened, in place: no copy and no collective per step.
* ``write_local``: copies into those tensors (the base class casts to their dtype and device), then calls
  ``FSDPModule.reshard()`` on the FSDP modules that manage them: with ``reshard_after_forward=False``
  a forward without backward (evaluation) leaves the unsharded parameters allocated, and the next
  forward would reuse them and never see the new shards. Resharding frees them, so the next
  forward (or backward) all-gathers the written values. ``reshard()`` is local (no collective).
* ``gather``: pads each rank's rows to ``c`` rows, one all-gather, concatenates in rank order and
  trims to ``rows``; collective, used when saving and for evaluation, never per step.
* ``local_part``: the same rule on a full tensor, so a state saved at any world size loads here.

Mixed precision: ``MixedPrecisionPolicy(param_dtype=bf16)`` casts only the unsharded copy used in
forward/backward; the sharded parameter that this layout reads and writes keeps its own dtype (the
fp32 master weights the optimizer steps on). The shadow therefore averages the fp32 weights (unlike
DeepSpeed's bf16 mode, whose parameters are the bf16 copies), and ``write_local`` writes fp32 shards
that the next all-gather casts again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...distributed import all_gather_rows
from ...model_helpers import is_dtensor
from ...shadow.layout import ShadowLayout


def fsdp2_modules(model: nn.Module | None) -> list[nn.Module]:
    """Every module of ``model`` that ``fully_shard`` wrapped (``FSDPModule``), root first."""
    if model is None or not dist.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(modules: Sequence[nn.Module]) -> None:
    """Free FSDP2's unsharded parameters where they are allocated (a no-op on sharded modules)."""
    for module in modules:
        module.reshard()


def own_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters ``fully_shard(module)`` manages: those of ``module`` outside its nested FSDP modules."""
    nested = {id(p) for sub in fsdp2_modules(module) if sub is not module for p in sub.parameters()}
    return [p for p in module.parameters() if id(p) not in nested]


def unshard_above(model: nn.Module, inner: nn.Module) -> None:
    """Gather the parameters of the FSDP2 modules of ``model`` that contain ``inner``, before calling ``inner``
    directly (or a sibling of it, such as the LM head beside the decoder stack).

    ``fully_shard`` gathers a module's parameters in its own forward hook; a direct call of ``inner`` runs
    only the hooks inside it, so the parameters its ancestors manage (the embeddings, final norm or LM head
    left in the root) may still be shards. They stay gathered until that module's next reshard (after its
    backward). Collective: every rank calls it at the same point. A no-op without FSDP2.
    """
    for module in fsdp2_modules(model):
        if module is not inner and any(sub is inner for sub in module.modules()):
            module.unshard()


def _check_sharded(named_params: list[tuple[str, nn.Parameter]]) -> None:
    from torch.distributed.tensor import Shard

    plain = [n for n, p in named_params if not is_dtensor(p)]
    if plain:
        raise ValueError(
            f"FSDP2 layout: parameter(s) {plain[:3]} are not sharded by fully_shard (not DTensors); wrap the root "
            "module with fully_shard too, so that every trained parameter is sharded"
        )
    for name, p in named_params:
        placements = tuple(p.placements)
        if p.device_mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
            raise ValueError(
                f"FSDP2 layout: parameter {name!r} has placements {placements} on a {p.device_mesh.ndim}-D mesh; "
                "weight averaging supports FSDP2 sharding on dim 0 over a 1-D mesh (fully_shard without HSDP, "
                "tensor parallelism or a shard_placement_fn)"
            )
        if p.dim() == 0:
            raise ValueError(f"FSDP2 layout: parameter {name!r} is a scalar; it cannot be sharded on dim 0")
    meshes = {(p.device_mesh.device_type, tuple(p.device_mesh.mesh.flatten().tolist())) for _, p in named_params}
    if len(meshes) > 1:
        raise ValueError(f"FSDP2 layout: the tracked parameters are sharded over different device meshes: {meshes}")


class Fsdp2Layout(ShadowLayout):
    """This rank's FSDP2 shard (``p.to_local()``, rows of dim 0) of every tracked ``DTensor`` parameter.

    ``model``: the module the parameters belong to. When a forward left its FSDP modules unsharded
    (``named_params`` then holds the unsharded tensors), they are resharded and the parameters looked
    up again by name. ``write_local`` reshards the FSDP modules that manage a tracked parameter.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], model: nn.Module | None = None) -> None:
        modules = fsdp2_modules(model)
        if modules and not all(is_dtensor(model.get_parameter(n)) for n, _ in named_params):
            reshard(modules)
        if modules:
            named_params = [(n, model.get_parameter(n)) for n, _ in named_params]
        super().__init__(named_params)
        _check_sharded(named_params)
        tracked = {id(p) for p in self.params}
        self.modules = [m for m in modules if any(id(p) in tracked for p in own_parameters(m))]
        mesh = self.params[0].device_mesh
        self.group = mesh.get_group()
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.row_numels = [math.prod(p.shape[1:]) for p in self.params]
        self.chunk_rows = [math.ceil(p.shape[0] / self.world_size) for p in self.params]
        self.rows: list[tuple[int, int]] = []  # this rank's [first, last) rows of each parameter
        for name, p, chunk in zip(self.names, self.params, self.chunk_rows, strict=True):
            first = min(self.rank * chunk, p.shape[0])
            last = min(first + chunk, p.shape[0])
            local = p.to_local()
            if tuple(local.shape) != (last - first, *p.shape[1:]) or not local.is_contiguous():
                raise ValueError(
                    f"FSDP2 layout: parameter {name!r} of shape {tuple(p.shape)} holds a local shard of shape "
                    f"{tuple(local.shape)} on rank {self.rank}, not rows [{first}, {last}) of torch.chunk's dim-0 rule"
                )
            self.rows.append((first, last))

    @property
    def shapes(self) -> list[torch.Size]:
        return [p.shape for p in self.params]

    @property
    def device(self) -> torch.device:
        return self.params[0].to_local().device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].to_local().dtype

    def local_tensors(self) -> list[Tensor]:
        with torch.no_grad():  # to_local() without autograd: the local tensor itself (DTensor.detach() costs 8x)
            return [p.to_local().view(-1) for p in self.params]

    def _write_live(self, values: list[Tensor]) -> None:
        """Copy ``values`` into this rank's shards, then reshard: the next forward all-gathers them."""
        torch._foreach_copy_(self.local_tensors(), values)
        reshard(self.modules)

    @torch.no_grad()
    def gather(self, local: list[Tensor]) -> list[Tensor]:
        """Full tensors from every rank's shards: one all-gather of the row chunks padded to ``c`` rows."""
        padded = []
        for x, chunk, row_numel in zip(local, self.chunk_rows, self.row_numels, strict=True):
            part = torch.zeros(chunk * row_numel, dtype=x.dtype, device=x.device)
            part[: x.numel()] = x.reshape(-1)
            padded.append(part)
        rows = all_gather_rows(torch.cat(padded), self.group)  # [world, Σ c_i·row_i]
        full, offset = [], 0
        for part, shape in zip(padded, self.shapes, strict=True):
            size = part.numel()
            flat = rows[:, offset : offset + size].reshape(-1)[: shape.numel()]
            full.append(flat.reshape(shape).clone())  # separate storages: safetensors refuses shared memory
            offset += size
        return full

    def local_part(self, full: list[Tensor]) -> list[Tensor]:
        return [
            t.reshape(-1)[first * row_numel : last * row_numel]
            for t, (first, last), row_numel in zip(full, self.rows, self.row_numels, strict=True)
        ]
