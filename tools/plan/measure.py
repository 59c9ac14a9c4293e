"""Measured memory of a training step on this machine, to hold the planner's predictions against.

CPU builds of torch keep no allocator statistics, so activations are measured where they live:
every tensor autograd saves for backward passes through :class:`SavedActivationMeter`, which
counts its storage once (a storage saved by several ops, or a view of one, is one allocation) and
uncounts it when autograd lets go of it. The peak over a step is the activation memory the
planner predicts; parameters saved by the linears are weights, not activations, and are skipped.
"""
from __future__ import annotations

from collections import Counter

import torch


class _Held:
    """What autograd keeps in place of a saved tensor; its death releases the storage's count."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor, meter, key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        self.meter._release(self.key)


class SavedActivationMeter:
    """``with SavedActivationMeter(model.parameters()) as meter: step()``; then ``meter.peak_bytes``."""

    def __init__(self, parameters=()):
        self._skip = {p.untyped_storage().data_ptr() for p in parameters}
        self._refs: Counter = Counter()
        self._sizes: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> "SavedActivationMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._skip or tensor.device.type == "meta":
            return tensor
        if self._refs[key] == 0:
            self._sizes[key] = storage.nbytes()
            self.live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._refs[key] += 1
        return _Held(tensor, self, key)

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live_bytes -= self._sizes.pop(key)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (views of one buffer count once)."""
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def optimizer_state_bytes(optimizer) -> int:
    """Adam moments plus fp32 main copies that are not the model's own parameters (Megatron's
    distributed optimizer keeps shards of both; with fp32 weights the main params are views)."""
    tensors = []
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", part)
        tensors += [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
        model_storages = {p.untyped_storage().data_ptr() for p in _model_params(part)}
        tensors += [p for group in inner.param_groups for p in group["params"]
                    if p.untyped_storage().data_ptr() not in model_storages]
    return tensor_bytes(tensors)


def _model_params(optimizer):
    for group in getattr(optimizer, "model_float16_groups", []) + getattr(optimizer, "model_fp32_groups", []):
        yield from group
    for buffer in getattr(optimizer, "buffers", []):
        yield buffer.param_data if buffer.param_data is not None else buffer.grad_data


def measure_training_step(engine, microbatches: list[dict], loss_fn) -> dict[str, int]:
    """One optimizer step of ``engine`` (a ``TrainingEngine``), measured per category in bytes:
    weights, gradient buffers, optimizer state (after the step) and peak saved activations."""
    model = engine.model
    with SavedActivationMeter(model.parameters()) as meter:
        engine.train_step(microbatches, loss_fn)
    ddp = engine.ddp_model
    grad_buffers = [b.grad_data for b in list(ddp.buffers) + list(ddp.expert_parallel_buffers)]
    return {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "grads": tensor_bytes(grad_buffers),
        "optimizer": optimizer_state_bytes(engine.optimizer),
        "activations": meter.peak_bytes,
    }


def random_microbatches(count: int, micro_batch: int, seq_len: int, *, vocab: int = 400, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (micro_batch, seq_len), generator=generator)
        out.append(dict(input_ids=ids, position_ids=torch.arange(seq_len).expand(micro_batch, seq_len).contiguous(),
                        labels=ids.roll(-1, 1), loss_mask=torch.ones(micro_batch, seq_len)))
    return out


def measure_sft_steps(path: str, layout: dict, build: dict, *, micro_batch: int, seq_len: int,
                      num_microbatches: int, timed_steps: int = 0) -> dict:
    """This rank's measured bytes of one SFT step of ``path`` under ``layout`` (a ``ParallelConfig``'s
    fields) and ``build`` (a ``ModelBuildConfig``'s), then ``timed_steps`` more steps' mean seconds."""
    import time

    from megatron.core import parallel_state as ps

    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.trainers.sft import sft_loss_fn
    from models.builder import ModelBuildConfig
    from parallel.config import ParallelConfig

    engine = TrainingEngine(EngineConfig(pretrain=path, parallel=ParallelConfig(**layout),
                                         build=ModelBuildConfig(**build)), total_steps=1 + timed_steps)
    microbatches = random_microbatches(num_microbatches // engine.data_parallel_size, micro_batch, seq_len)
    loss_fn = sft_loss_fn(engine.loss_scale(microbatches))
    measured = measure_training_step(engine, microbatches, loss_fn)
    start = time.perf_counter()
    for _ in range(timed_steps):
        engine.train_step(microbatches, loss_fn)
    seconds = (time.perf_counter() - start) / max(timed_steps, 1)
    return {**measured, "seconds": seconds, "stage": ps.get_pipeline_model_parallel_rank(),
            "dp": engine.data_parallel_size}


def predict_sft_step(path: str, layout: dict, build: dict, *, micro_batch: int, seq_len: int, num_microbatches: int,
                     dp: int, cluster=None) -> list[dict]:
    """The planner's bytes per category for each pipeline stage's rank of the same step (fp32, as
    on CPU), and with ``cluster`` (``tools.plan.timing.Cluster``) its step seconds. Run in a process
    without torch.distributed (the count builds the model in a fake world)."""
    from models.registry import load_adapter
    from parallel.config import ParallelConfig
    from tools.plan import meta
    from tools.plan.memory import Activations, Grid, RoleState, Shape, activation_bytes, state_bytes
    from tools.plan.plan import active_params
    from tools.plan.timing import Work, step_seconds

    adapter = load_adapter(path)
    parallel = ParallelConfig(**layout)
    counts = meta.rank_params(adapter, parallel, bf16=False)
    grid = Grid(tp=parallel.tensor_model_parallel_size, pp=parallel.pipeline_model_parallel_size,
                cp=parallel.context_parallel_size, ep=parallel.expert_model_parallel_size,
                etp=parallel.expert_tensor_parallel, dp=dp, sequence_parallel=parallel.sequence_parallel)
    recompute = build.get("recompute_granularity") or ("full" if build.get("gradient_checkpointing") else "none")
    run = Activations(micro_batch=micro_batch, seq_len=seq_len, num_microbatches=num_microbatches // dp,
                      bytes_per_value=4, recompute=recompute,
                      recompute_modules=tuple(build.get("recompute_modules") or ("core_attn",)))
    shape = Shape.of(adapter, grid.tp)
    stage_layers = parallel.stage_num_layers(adapter.num_layers)
    stages = meta.stage_params(counts, stage_layers)
    out = []
    for stage in stages:
        state = state_bytes(stage, grid, RoleState(trainable=True, bf16=False), counts.param_bytes)
        moe_layers = stage.num_layers if adapter.num_experts else 0
        acts, logits = activation_bytes(stage, shape, grid, run, moe_layers=moe_layers,
                                        last=stage.stage == grid.pp - 1, value_head=False)
        out.append({"weights": state["weights"], "grads": state["grads"], "optimizer": state["optimizer"],
                    "activations": acts + logits})
    if cluster is not None:
        _, active = active_params(adapter, False, False)
        work = Work(tokens_per_microbatch=micro_batch * seq_len, num_microbatches=run.num_microbatches,
                    seq_len=seq_len, bytes_per_value=4, recompute_full=recompute == "full")
        seconds = step_seconds(work, active_params=active, rank_params=stages[0].total, expert_rank_params=0,
                               shape=shape, num_layers=adapter.num_layers, stage_layers=max(stage_layers),
                               num_moe_layers=0, grid=grid, cluster=cluster)
        for entry in out:
            entry["seconds"] = seconds
    return out
