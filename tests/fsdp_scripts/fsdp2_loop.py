"""A plain ``fully_shard`` training loop that drives ``AveragedWeights`` over the layout the plugin picks.

Launched by tests/test_fsdp.py as
``torchrun --nproc_per_node 2 fsdp2_loop.py --output_dir D [--no-reshard] [--bf16] [--full]``
(gloo, CPU). The tiny Llama with LoRA (rank 3, rank 1 on ``q_proj``: uneven shards, and an empty
shard on rank 1) or fully fine-tuned (``--full``: the 259-row embedding splits 130/129) is sharded
with ``fully_shard`` on each decoder layer and on the root. Each rank trains on its own batches.

Rank 0 writes ``D/report.json`` and ``D/trajectory.pt``:

* θ_t gathered with DTensor's own ``full_tensor()`` after every step (float64), independent of
  the layout under test;
* per rank: layout class, shadow bytes per averager, local sizes, the collectives counted inside
  the averaging steps (must be none) and inside one saving gather (must be some: the counter works);
* the averaged tensors and full averager state at ``SAVE_STEP`` and at the end, and ``D/averaged/``
  written by ``write_averaged_weights`` from the sharded model (PEFT adapter, or full model);
* the evaluation swap: eval losses with the raw weights, under the swap (BEMA), and after it, the
  weights gathered under and after the swap, the dtype the forward saw;
* LoRA: the self-distillation teacher (``TeacherAdapter``, a frozen twin adapter sharded with the
  model) refreshed from BEMA: its layout, its bytes per rank, the eval loss of a forward run as the teacher.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from fsdp_common import CollectiveCounter, base_parser, finish, full_weights, layout_facts, prepare_process
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from trl_ema_plugin.config import AveragerSpec
from trl_ema_plugin.demos.tiny import tiny_llama, tiny_tokenizer
from trl_ema_plugin.integrations.parallel import build_layout
from trl_ema_plugin.integrations.trl.teacher import TeacherAdapter
from trl_ema_plugin.model_files import write_averaged_weights
from trl_ema_plugin.shadow import AveragedWeights, trainable_parameters

#: BEMA with non-default settings so that it moves at every step, and an EMA
AVERAGERS: list[dict[str, Any]] = [
    {"method": "bema", "update_every": 1, "update_after": 2, "lag": 2.0, "ema_power": 0.6, "bias_power": 0.3},
    {"method": "ema", "name": "ema", "decay": 0.7, "update_after": 1},
]
STEPS, SAVE_STEP = 6, 3
LEARNING_RATE = 2e-2
BATCH, LENGTH = 2, 16


def lora_model(full: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_llama(tiny_tokenizer(), seed=0)
    if full:
        return model
    torch.manual_seed(1)  # LoRA A initialisation: identical on every rank and in the 1-process twin
    config = LoraConfig(
        r=3, lora_alpha=8, rank_pattern={"q_proj": 1}, target_modules="all-linear", lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, config)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]


def shard(model: torch.nn.Module, reshard_after_forward: bool, bf16: bool) -> None:
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def batch(seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (BATCH, LENGTH), generator=torch.Generator().manual_seed(seed))


EVAL_IDS = batch(10_000)  # the same on every rank


@torch.no_grad()
def eval_loss(model: torch.nn.Module) -> float:
    model.eval()
    try:
        return float(model(input_ids=EVAL_IDS, labels=EVAL_IDS).loss)
    finally:
        model.train()


def run(output_dir: str, reshard_after_forward: bool, bf16: bool, full: bool) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = lora_model(full)
    teacher = None if full else TeacherAdapter(model)  # the self-distillation teacher: a frozen twin adapter
    shard(model, reshard_after_forward, bf16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    forward_dtypes: set[str] = set()
    first_linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad)
    first_linear.register_forward_hook(lambda m, i, o: forward_dtypes.add(str(m.weight.dtype)))

    sharded = trainable_parameters(model)  # the DTensors, between steps
    layout = build_layout(sharded, args=None, model=model)
    weights = {spec.label: AveragedWeights(spec, layout) for spec in map(lambda d: AveragerSpec(**d), AVERAGERS)}
    counter = CollectiveCounter()
    trajectory = {0: full_weights(sharded)}
    with counter.counting():
        for w in weights.values():
            w.step(0)
    saved: dict[str, Any] = {}
    for t in range(1, STEPS + 1):
        ids = batch(1000 * rank + t)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with counter.counting():  # the per-step path: must not communicate
            for w in weights.values():
                w.step(t)
        trajectory[t] = full_weights(sharded)
        if t == SAVE_STEP:
            saved[f"state_{t}"] = {name: w.state_tensors() for name, w in weights.items()}
            saved[f"average_{t}"] = {name: w.averaged_tensors(t) for name, w in weights.items()}
            saved[f"metadata_{t}"] = {name: w.state_metadata() for name, w in weights.items()}
    steps_collectives = counter.count
    saving = CollectiveCounter()
    with saving.counting():
        saved[f"average_{STEPS}"] = {name: w.averaged_tensors(STEPS) for name, w in weights.items()}
    saved[f"state_{STEPS}"] = {name: w.state_tensors() for name, w in weights.items()}
    saved[f"metadata_{STEPS}"] = {name: w.state_metadata() for name, w in weights.items()}
    if rank == 0:  # the export the callback writes: a PEFT adapter, or a full model from the gathered tensors
        (Path(output_dir) / "averaged").mkdir(parents=True, exist_ok=True)
        write_averaged_weights(model, saved[f"average_{STEPS}"]["bema"], Path(output_dir) / "averaged")

    # the evaluation swap: a forward before it (with reshard_after_forward=False it leaves the
    # unsharded parameters allocated), one under it, one after it
    forward_dtypes.clear()
    losses = {"raw": eval_loss(model)}
    with weights["bema"].swapped_in(STEPS):
        losses["bema"] = eval_loss(model)
        under_swap = full_weights(sharded)
    losses["after"] = eval_loss(model)
    teacher_bytes = 0
    if teacher is not None:  # the teacher follows BEMA through its own layout over the twin adapter
        teacher.refresh(weights["bema"], STEPS, None)
        with teacher.active():
            losses["teacher"] = eval_loss(model)
        teacher_bytes = teacher.memory_bytes()
    after_swap = full_weights(sharded)

    # resume on the same layout (2 → 2): each rank's buffers come back bit for bit from the full state
    reloaded_equal = {}
    for name, w in weights.items():
        twin = AveragedWeights(w.spec, layout)
        twin.load_state(saved[f"state_{STEPS}"][name], saved[f"metadata_{STEPS}"][name])
        reloaded_equal[name] = all(
            torch.equal(twin.averager.views(b)[i], w.averager.views(b)[i])
            for b in w.averager.buffers
            for i in range(len(layout.names))
        )
    mine = {
        **layout_facts(rank, weights),
        "local_rows": {n: list(rows) for n, rows in zip(layout.names, getattr(layout, "rows", []), strict=False)},
        "sharded_dtype": str(layout.dtype),
        "forward_dtypes": sorted(forward_dtypes),
        "collectives_in_steps": steps_collectives,
        "collectives_in_one_save": saving.count,
        "reloaded_equal": reloaded_equal,
        "teacher_layout": type(teacher.layout).__name__ if teacher is not None else None,
        "teacher_bytes": teacher_bytes,
    }
    ranks: list[Any] = [None] * world
    dist.all_gather_object(ranks, mine)
    if rank == 0:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = {
            "world_size": world,
            "reshard_after_forward": reshard_after_forward,
            "bf16": bf16,
            "full": full,
            "ranks": ranks,
            "losses": losses,
            "buffers": {name: list(w.averager.buffers) for name, w in weights.items()},
            "row_numels": dict(zip(layout.names, getattr(layout, "row_numels", []), strict=False)),
        }
        (out / "report.json").write_text(json.dumps(report, indent=1))
        torch.save({"trajectory": trajectory, "under_swap": under_swap, "after_swap": after_swap, **saved},
                   out / "trajectory.pt")  # fmt: skip


def main() -> None:
    parser = base_parser()
    parser.add_argument("--bf16", action="store_true", help="MixedPrecisionPolicy(param_dtype=bf16, reduce fp32)")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    args = parser.parse_args()
    prepare_process()
    run(args.output_dir, not args.no_reshard, args.bf16, args.full)
    finish()


if __name__ == "__main__":
    main()
