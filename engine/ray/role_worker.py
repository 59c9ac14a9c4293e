"""One rank of a Megatron role (actor, critic, reference, reward) as a Ray actor.

The ranks of a role form their own torch.distributed world with Megatron parallel state inside
it; the model is a ``TrainingEngine`` (trainable, or frozen with optional offload). The driver
hands every rank the same ``Experience`` (an object reference); each data-parallel group takes
its contiguous share, and the rank at the head of a share (last pipeline stage, TP rank 0, CP
rank 0) returns the results for it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import ray
import torch

from engine.data.packing import pack_padded_rows, unpack_to_rows
from engine.data.token_budget import balanced_microbatches
from engine.ray.calls import split_evenly
from engine.ray.devices import ray_device_index
from engine.rl.experience import Experience
from engine.rl.train_losses import LossKind, TrainSettings
from engine.runtime.engine import EngineConfig, TrainingEngine
from parallel.ports import free_port
from parallel.weight_transfer import SyncStats


@dataclass(kw_only=True)
class RoleConfig:
    name: str  # actor | critic | ref | reward0 ...
    engine: EngineConfig  # the model, its grid, its optimizer
    num_ranks: int = 1
    trainable: bool = False
    offload: bool = False  # --ref_reward_offload: frozen weights in host memory between forwards
    total_steps: int = 1  # optimizer steps of the whole run (LR schedule)
    ema_beta: float | None = None  # --enable_ema (actor): keep an EMA of the weights, exported by save_hf
    router_replay: bool = False  # --router_replay (actor, MoE): route rollout tokens as the engines did

    def __post_init__(self) -> None:
        self.engine.parallel.data_parallel_size(self.num_ranks)  # raises naming the flags
        if self.offload and self.trainable:
            raise ValueError(f"--ref_reward_offload applies to frozen roles, not the trainable {self.name}")
        if self.router_replay and not self.trainable:
            raise ValueError(f"--router_replay applies to the actor, not the frozen {self.name}")


@dataclass
class ShardResult:
    """Per-sample outputs of one data-parallel share: rows ``start:stop`` of the batch, or the rows
    ``rows`` in that order (token-budget shares are balanced by tokens, not contiguous)."""

    start: int
    stop: int
    values: torch.Tensor | None  # None: the share was empty
    rows: list[int] | None = None  # the rows of values, when not start..stop (--use_dynamic_batch_size)
    metrics: dict | None = None  # whole-batch metrics of the call (every share head holds the same)

    def row_indices(self) -> list[int]:
        return list(range(self.start, self.stop)) if self.rows is None else self.rows


def routing_mismatch(counts: dict) -> float:
    """rollout/routing_mismatch: the share of recorded tokens routed otherwise than the engines did."""
    return counts["routing_mismatch_tokens"] / max(counts["routing_recorded_tokens"], 1.0)


class MegatronRoleWorker:
    """Methods run on every rank of the role; results come back from share heads only."""

    def __init__(self, config: RoleConfig, rank: int):
        self.config = config
        self.rank = rank
        self.engine: TrainingEngine | None = None
        self._sender = None  # this rank's side of the weight sync (engine.ray.weight_senders)

    # ----- start-up -----------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """Rank 0 offers the rendezvous address of the role's process group."""
        return ray.util.get_node_ip_address(), free_port("")

    def setup(self, rendezvous: tuple[str, int]) -> bool:
        master_addr, master_port = rendezvous
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
            WORLD_SIZE=str(self.config.num_ranks), LOCAL_RANK=str(self._local_rank()),
        )
        self.engine = TrainingEngine(self.config.engine, total_steps=self.config.total_steps,
                                     trainable=self.config.trainable, offload=self.config.offload,
                                     ema_beta=self.config.ema_beta)
        if self.config.router_replay:
            self.start_router_replay()
        return True

    def start_router_replay(self) -> None:
        """--router_replay: from now on the forwards route the recorded tokens as the engines did."""
        replay = self._routing_replay()
        if replay is None:
            raise ValueError(f"--router_replay: {self.config.engine.pretrain} is a dense model (no MoE routers)")
        replay.replay = True

    def _routing_replay(self):
        from models.router_replay import routing_replay_of

        return routing_replay_of(self.engine.model)

    def _local_rank(self) -> int:
        index = ray_device_index(gpu_ids=ray.get_gpu_ids(), env=dict(os.environ),
                                 device_count=torch.cuda.device_count(),
                                 cluster_has_gpus=ray.cluster_resources().get("GPU", 0) > 0,
                                 who=f"{self.config.name} rank {self.rank}")
        return self.rank if index is None else index

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def placement_group_id(self) -> str | None:
        """The placement group Ray put this rank in (colocated roles share one)."""
        from engine.ray.colocation import current_placement_group_id

        return current_placement_group_id()

    def weights_device(self) -> str:
        return self.engine.weights_device()

    def machine_id(self) -> str:
        """The machine this rank runs on (Ray nodes started on one machine share its cores)."""
        from engine.ray.cpu_threads import machine_id

        return machine_id()

    def use_machine_cores(self, ranks_on_machine: int) -> int:
        """CPU ranks: compute with this machine's cores split between ``ranks_on_machine`` ranks
        (``engine.ray.cpu_threads``); the torch thread count in effect."""
        from engine.ray.cpu_threads import rank_threads

        if self.engine.device.type == "cpu":
            cores = len(os.sched_getaffinity(0))
            torch.set_num_threads(rank_threads(machine_cores=cores, ranks_on_machine=ranks_on_machine))
        return torch.get_num_threads()

    # ----- where this rank sits -----------------------------------------------------------
    def _share(self, num_items: int) -> tuple[int, int]:
        ctx = self.engine.ctx
        return split_evenly(num_items, ctx.data_parallel_size)[ctx.dp_rank]

    def _is_share_head(self) -> bool:
        ctx = self.engine.ctx
        return ctx.is_last_stage and ctx.tp_rank == 0 and ctx.cp_rank == 0

    # ----- forward passes -----------------------------------------------------------------
    def _layout(self, micro: list[dict], packed: bool) -> list[dict]:
        """Padded micro-batches as they are, or each packed into one row (``--packing_samples``)."""
        if not packed:
            return micro
        return [pack_padded_rows(batch, multiple=self.engine.sequence_multiple()) for batch in micro]

    def _token_budget_share(self, experience: Experience, max_tokens: int, *, equal_counts: bool) -> list[list[int]]:
        """This DP rank's micro-batches (row indices) under --max_tokens_per_gpu (``engine.data.token_budget``)."""
        ctx = self.engine.ctx
        return balanced_microbatches(experience.lengths, max_tokens=max_tokens, num_ranks=ctx.data_parallel_size,
                                     equal_counts=equal_counts)[ctx.dp_rank]

    def _per_token(self, experience: Experience, micro_batch_size: int, compute, packed: bool = False,
                   max_tokens: int | None = None, measure_routing: bool = False) -> ShardResult | None:
        """``compute(output, micro_batch) -> [b, s_local]`` on this rank's share, rows padded to L.
        ``max_tokens``: micro-batches of at most that many tokens, packed (--use_dynamic_batch_size);
        ``measure_routing``: also count the tokens whose routing differs from the engines' record."""
        start, stop = self._share(experience.batch_size)
        multiple, rows = self.engine.sequence_multiple(), None
        if max_tokens is not None:
            plan = self._token_budget_share(experience, max_tokens, equal_counts=False)
            rows, packed = [row for group in plan for row in group], True
            micro = self._layout(experience.microbatches_of(plan, multiple=multiple), packed)
        else:
            micro = self._layout(experience.microbatches(start, stop, micro_batch_size, multiple=multiple), packed)
        with self._measuring_routing(measure_routing and experience.routed_experts is not None) as routing:
            outputs = (self.engine.forward_outputs(micro, lambda out, mb: compute(out, mb).float(),
                                                   gather_context_parallel=True) if micro else None)
        if not self._is_share_head():
            return None
        if outputs is None:
            return ShardResult(start, stop, None, rows, routing)
        width = experience.input_ids.shape[1]
        if packed:
            outputs = [unpack_to_rows(out.cpu(), batch["cu_seqlens"], width) for out, batch in zip(outputs, micro)]
        else:
            outputs = [torch.nn.functional.pad(out, (0, width - out.shape[1])) for out in outputs]
        return ShardResult(start, stop, torch.cat(outputs).cpu(), rows, routing)

    @contextmanager
    def _measuring_routing(self, on: bool):
        """Inside: the routers count their disagreements with the record; after: the counts of the
        whole batch (collective over the role: every rank enters, also with an empty share)."""
        replay = self._routing_replay() if on else None
        counts: dict = {}
        if replay is None:
            yield counts
            return
        replay.clear()
        replay.measure = True
        try:
            yield counts
        finally:
            replay.measure = False
        counts.update(replay.drain_counts(dp_group=self.engine.ctx.dp_group))

    def compute_log_probs(self, experience: Experience, micro_batch_size: int,
                          temperature: float = 1.0, packed: bool = False, max_tokens: int | None = None,
                          measure_routing: bool = False) -> ShardResult | None:
        """log p(labels) at every position (read them where ``action_mask`` is 1); ``measure_routing``
        (MoE, a batch with the engines' routing): the routing mismatch counts in ``metrics``."""
        from engine.runtime.vocab_parallel import token_log_probs

        return self._per_token(experience, micro_batch_size,
                               lambda logits, mb: token_log_probs(logits, mb["labels"], temperature=temperature),
                               packed, max_tokens, measure_routing)

    def compute_values(self, experience: Experience, micro_batch_size: int, packed: bool = False,
                       max_tokens: int | None = None) -> ShardResult | None:
        """Critic values per position (``[b, s, 1]`` head output squeezed)."""
        return self._per_token(experience, micro_batch_size, lambda values, mb: values[..., 0], packed, max_tokens)

    def compute_rewards(self, experience: Experience, micro_batch_size: int, packed: bool = False,
                        max_tokens: int | None = None) -> ShardResult | None:
        """Reward model score at each row's last real token."""
        result = self.compute_values(experience, micro_batch_size, packed, max_tokens)
        if result is None or result.values is None:
            return result
        last = experience.last_index[result.row_indices()]
        return ShardResult(result.start, result.stop, result.values.gather(1, last[:, None])[:, 0], result.rows)

    def probe_layers(self, sequences: list[list[int]]) -> list[dict] | None:
        """The mismatch doctor's forward (``engine.runtime.layer_probe``): every rank runs all of
        ``sequences`` (one micro-batch); per sequence, this pipeline stage's per-layer records and,
        on the last stage, ``log_probs`` ``[len - 1]`` of tokens 2... Returned by the head of each
        stage (TP, CP and DP rank 0), None elsewhere."""
        from engine.rl.sequences import build_rollout_batch
        from engine.runtime.layer_probe import MegatronLayerProbe
        from engine.runtime.vocab_parallel import token_log_probs

        engine, ctx = self.engine, self.engine.ctx
        batch = build_rollout_batch([s[:1] for s in sequences], [s[1:] for s in sequences], pad_id=0)
        micro = Experience.from_rollout(batch).microbatches(0, len(sequences), len(sequences),
                                                           multiple=engine.sequence_multiple())
        with MegatronLayerProbe(engine.model, sequence_parallel=engine.config.parallel.sequence_parallel,
                                tp_group=ctx.tp_group, cp_group=ctx.cp_group) as probe:
            log_probs = engine.forward_outputs(micro, lambda logits, mb: token_log_probs(logits, mb["labels"]),
                                               gather_context_parallel=True)
        if ctx.tp_rank or ctx.cp_rank or ctx.dp_rank:
            return None
        records = probe.per_sequence([len(s) for s in sequences])
        for record in records:
            record["dtype"] = str(engine.config.build.params_dtype).removeprefix("torch.")
        if log_probs:
            for i, (record, sequence) in enumerate(zip(records, sequences)):
                record["log_probs"] = log_probs[0][i, :len(sequence) - 1].cpu()
        return records

    # ----- training -----------------------------------------------------------------------
    def train(self, experience: Experience, loss: LossKind, settings: TrainSettings,
              ptx: dict | None = None) -> dict:
        """PPO epochs over ``experience`` (this step's rollout), one optimizer step per
        ``settings.train_batch_size`` samples; returns the metrics averaged over the steps.

        ``ptx`` (actor only): padded pretraining rows, ``train_batch_size`` per optimizer step in
        step order; each step's rows join its rollout micro-batches (``engine.rl.ptx``)."""
        generator = torch.Generator().manual_seed(settings.seed)
        history = []
        with self._measuring_routing(settings.measure_routing and experience.routed_experts is not None) as routing:
            self._train_epochs(experience, loss, settings, ptx, generator, history)
        if not history:
            return {}
        # skipped_steps is the engine's running count: its last value, not a mean. checkpoint/*: the
        # background checkpoint a step published (--async_save), on that step only.
        published = {k: v for h in history for k, v in h.items() if k.startswith("checkpoint/")}
        metrics = {**{k: sum(h[k] for h in history) / len(history) for k in history[0] if k not in published},
                   "skipped_steps": history[-1]["skipped_steps"], **published}
        if routing:
            metrics["rollout/routing_mismatch"] = routing_mismatch(routing)
        return metrics

    def _train_epochs(self, experience: Experience, loss: LossKind, settings: TrainSettings, ptx, generator,
                      history: list) -> None:
        from engine.rl.policy_losses.aggregation import annotate_microbatches
        from engine.rl.ptx import attach_ptx, finish_ptx_metrics
        from engine.rl.train_losses import LossGroups, make_loss_fn

        engine, total, per_step = self.engine, experience.batch_size, settings.train_batch_size
        ctx = engine.ctx
        groups = LossGroups(tp_group=ctx.tp_group, cp_group=ctx.cp_group, dp_group=ctx.dp_group)
        multiple = engine.sequence_multiple()  # (the ptx rows' layout)
        for _ in range(settings.max_epochs):
            order = torch.randperm(total, generator=generator)
            for lo in range(0, total - per_step + 1, per_step):
                start, stop = self._share(per_step)
                micro = self.step_microbatches(experience.select(order[lo:lo + per_step]), settings)
                ptx_scale = 0.0
                if ptx is not None:
                    # len(history) optimizer steps are done: this step's ptx rows, this rank's share of them
                    first = len(history) * per_step + start
                    micro = attach_ptx(micro, {k: v[first:first + stop - start] for k, v in ptx.items()},
                                       micro_batch_size=settings.micro_train_batch_size,
                                       pad_id=settings.pad_token_id, multiple=multiple)
                    ptx_scale = engine.loss_scale(micro, key="loss_mask")
                aggregation = self._aggregation(micro, loss, settings)
                packed = settings.packing_samples or settings.max_tokens_per_gpu is not None
                micro = self._layout(annotate_microbatches(micro, mode=aggregation.mode), packed)
                loss_fn = make_loss_fn(loss, settings, aggregation=aggregation, groups=groups, ptx_scale=ptx_scale)
                result = engine.train_step(micro, loss_fn, normaliser_key="num_tokens")
                history.append({**finish_ptx_metrics(result.metrics), "grad_norm": result.grad_norm})

    def step_microbatches(self, step: Experience, settings: TrainSettings) -> list[dict]:
        """This DP rank's padded micro-batches of one optimizer step's rows: its contiguous share in
        micro-batches of ``micro_train_batch_size`` rows, or (--use_dynamic_batch_size) its token-balanced
        share in micro-batches of at most ``max_tokens_per_gpu`` tokens, as many on every rank."""
        multiple = self.engine.sequence_multiple()
        if settings.max_tokens_per_gpu is None:
            start, stop = self._share(step.batch_size)
            return step.microbatches(start, stop, settings.micro_train_batch_size, multiple=multiple)
        if settings.ptx_coef > 0:
            raise ValueError("--use_dynamic_batch_size with --pretrain_data is not supported: the ptx rows ride in "
                             "the rollout's fixed micro-batches")
        plan = self._token_budget_share(step, settings.max_tokens_per_gpu, equal_counts=True)
        return step.microbatches_of(plan, multiple=multiple)

    def _aggregation(self, micro: list[dict], loss: LossKind, settings: TrainSettings):
        """This optimizer step's ``--loss_agg_mode`` normalisers, counted once over its padded
        micro-batches on every DP rank (the critic's value loss: the token mean)."""
        from engine.rl.policy_losses.aggregation import Aggregation, step_counts

        engine = self.engine
        mode = settings.loss_agg_mode if loss == "policy" else "token-mean"
        return Aggregation.for_step(mode, step_counts(micro, dp_group=engine.ctx.dp_group),
                                    num_microbatches=len(micro), data_parallel_size=engine.data_parallel_size,
                                    context_parallel_size=engine.config.parallel.context_parallel_size,
                                    max_response_len=settings.max_response_len)

    # ----- weights out --------------------------------------------------------------------
    def open_weight_sync(self, world_size: int, backend: str) -> dict | None:
        """Open this rank's side of the sync (collective over the role); the spec engines join, if it sends."""
        from engine.ray.weight_senders import open_sender

        if self._sender is not None:
            self._sender.close()
        self._sender = open_sender(self.engine.model, self.engine.adapter, world_size=world_size, backend=backend)
        return self._sender.spec

    def connect_weight_sync(self) -> None:
        """Wait until every engine worker joined this rank's group (while the engines join)."""
        self._sender.connect()

    def send_weights(self, bucket_bytes: int) -> SyncStats | None:
        """One update: every rank takes part (the exporter's TP gathers are collective); senders' stats."""
        with self.engine.weights_on_device():
            return self._sender.send(bucket_bytes)

    # ----- training state in host memory while the engines generate (--megatron_enable_sleep) ----
    def park_training_state(self, parts: tuple[str, ...]) -> dict[str, int]:
        return self.engine.park_training_state(parts)

    def restore_training_state(self) -> dict[str, int]:
        return self.engine.restore_training_state()

    # ----- persistence --------------------------------------------------------------------
    def save_checkpoint(self, ckpt_config, step: int, state: dict, wait: bool = False) -> str:
        return str(self.engine.save_checkpoint(ckpt_config, step, state, wait=wait))

    def finish_checkpoint(self) -> None:
        self.engine.checkpoint_writer.wait()

    def resume(self, ckpt_config) -> dict | None:
        return self.engine.resume(ckpt_config)

    def save_hf(self, path: str) -> None:
        self.engine.save_hf(path)


RemoteRoleWorker = ray.remote(MegatronRoleWorker)
