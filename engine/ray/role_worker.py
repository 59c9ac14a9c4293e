"""One rank of a Megatron role (actor, critic, reference, reward) as a Ray actor.

The ranks of a role form their own torch.distributed world with Megatron parallel state inside
it. The driver hands every rank the same batch (an object reference); each data-parallel group
takes its contiguous share, and the rank at the head of a share (last pipeline stage, TP rank 0,
CP rank 0) returns the results for it.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import ray
import torch

from engine.runtime.optimizer import OptimConfig
from parallel.config import ParallelConfig


@dataclass(kw_only=True)
class RoleConfig:
    name: str  # actor | critic | ref | reward
    pretrain: str
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    num_ranks: int = 1
    trainable: bool = False
    value_head: bool = False
    optim: OptimConfig | None = None
    total_steps: int = 1  # optimizer steps of the whole run (LR schedule)
    params_dtype: torch.dtype = torch.float32
    gradient_checkpointing: bool = False
    seed: int = 42

    def __post_init__(self) -> None:
        self.parallel.data_parallel_size(self.num_ranks)  # raises naming the flags
        if self.trainable and self.optim is None:
            raise ValueError(f"the {self.name} role is trainable but has no optimizer config")


@dataclass
class ShardResult:
    """Per-sample outputs of one data-parallel share: rows ``start:stop`` of the batch."""

    start: int
    stop: int
    values: dict[str, torch.Tensor]


def split_evenly(num_items: int, num_parts: int, part: int) -> tuple[int, int]:
    base, extra = divmod(num_items, num_parts)
    start = part * base + min(part, extra)
    return start, start + base + (part < extra)


class MegatronRoleWorker:
    """Methods run on every rank of the role; results come back from share heads only."""

    def __init__(self, config: RoleConfig, rank: int):
        self.config = config
        self.rank = rank
        self.engine = None
        self.model = None

    # ----- start-up -----------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """Rank 0 offers the rendezvous address of the role's process group."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int) -> bool:
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
            WORLD_SIZE=str(self.config.num_ranks), LOCAL_RANK=str(self._local_rank()),
        )
        from models.builder import ModelBuildConfig

        build = ModelBuildConfig(
            params_dtype=self.config.params_dtype,
            value_head=self.config.value_head,
            recompute_granularity="full" if self.config.gradient_checkpointing else None,
        )
        if self.config.trainable:
            from engine.runtime.engine import EngineConfig, TrainingEngine

            self.engine = TrainingEngine(
                EngineConfig(pretrain=self.config.pretrain, parallel=self.config.parallel, optim=self.config.optim,
                             build=build, seed=self.config.seed),
                total_steps=self.config.total_steps,
            )
            self.model, self.ctx = self.engine.model, self.engine.ctx
        else:
            self._setup_frozen(build)
        return True

    def _local_rank(self) -> int:
        if torch.cuda.is_available():
            visible = ray.get_gpu_ids()
            return 0 if visible else self.rank % max(torch.cuda.device_count(), 1)
        return self.rank

    def _setup_frozen(self, build) -> None:
        from models.builder import build_model
        from models.registry import load_adapter
        from models.weights import load_hf_weights
        from parallel.initialize import initialize_parallel

        self.ctx = initialize_parallel(self.config.parallel, seed=self.config.seed)
        self.adapter = load_adapter(self.config.pretrain)
        self.model = build_model(self.adapter, self.config.parallel, build)
        load_hf_weights(self.model, self.adapter, self.config.pretrain)
        self.model.eval()

    def placement_group_id(self) -> str | None:
        """The placement group Ray put this rank in (colocated roles share one)."""
        from engine.ray.colocation import current_placement_group_id

        return current_placement_group_id()

    # ----- --ref_reward_offload -------------------------------------------------------------
    def offload_weights(self) -> str:
        """Move a frozen role's weights to host memory until ``onload_weights``; returns where they
        are. On a CPU build host memory is their home already: nothing moves."""
        if self.engine is not None:
            raise RuntimeError(f"--ref_reward_offload applies to frozen roles, not the trainable {self.config.name}")
        if torch.cuda.is_available():
            self.model.to("cpu")
            torch.cuda.empty_cache()
        return self.weights_device()

    def onload_weights(self) -> str:
        if torch.cuda.is_available():
            self.model.to(torch.device("cuda", torch.cuda.current_device()))
        return self.weights_device()

    def weights_device(self) -> str:
        return str(next(self.model.parameters()).device)

    # ----- where this rank sits -----------------------------------------------------------
    def _share(self, num_items: int) -> tuple[int, int]:
        return split_evenly(num_items, self.ctx.data_parallel_size, self.ctx.dp_rank)

    def _is_share_head(self) -> bool:
        return self.ctx.is_last_stage and self.ctx.tp_rank == 0 and self.ctx.cp_rank == 0

    def _sequence_multiple(self) -> int:
        parallel = self.config.parallel
        tp = parallel.tensor_model_parallel_size if parallel.sequence_parallel else 1
        cp = parallel.context_parallel_size
        return tp * 2 * cp if cp > 1 else tp

    def _forward_model(self):
        return self.engine.ddp_model if self.engine is not None else self.model

    # ----- forward passes -----------------------------------------------------------------
    def _microbatches(self, batch: dict, start: int, stop: int, size: int) -> list[dict]:
        from engine.rl.sequences import trim_to_content

        multiple = self._sequence_multiple()
        out = []
        for lo in range(start, stop, size):
            hi = min(lo + size, stop)
            piece = {k: v[lo:hi] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == len(batch["input_ids"]) else v
                     for k, v in batch.items()}
            out.append(trim_to_content(piece, multiple=multiple))
        return out

    def _gather_context_parallel(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.config.parallel.context_parallel_size == 1:
            return tensor
        from parallel.context_parallel import zigzag_gather

        return zigzag_gather(tensor, dim=1, cp_group=self.ctx.cp_group)

    @torch.no_grad()
    def _per_token(self, batch: dict, micro_batch_size: int, compute) -> ShardResult | None:
        """Run ``compute(output, micro_batch) -> [b, s_local]`` on this rank's share; rows padded to L."""
        from engine.runtime.schedule import run_microbatches

        start, stop = self._share(len(batch["input_ids"]))
        width = batch["input_ids"].shape[1]
        micro = self._microbatches(batch, start, stop, micro_batch_size)
        if not micro:
            return ShardResult(start, stop, {}) if self._is_share_head() else None
        model = self._forward_model()
        model.eval()

        def keep(output, mb):
            return output.new_zeros(()), {"out": self._gather_context_parallel(compute(output, mb).float())}

        results = run_microbatches(model, micro, keep, num_microbatches=len(micro), forward_only=True,
                                   seq_length=max(m["input_ids"].shape[1] for m in micro),
                                   micro_batch_size=micro_batch_size)
        if not self._is_share_head():
            return None
        rows = [torch.nn.functional.pad(r["out"], (0, width - r["out"].shape[1])) for r in results]
        return ShardResult(start, stop, {"out": torch.cat(rows).cpu()})

    def compute_log_probs(self, batch: dict, micro_batch_size: int, temperature: float = 1.0) -> ShardResult | None:
        """log p(labels) at every position (read them where ``action_mask`` is 1)."""
        from engine.rl.vocab_parallel import token_log_probs

        return self._per_token(batch, micro_batch_size,
                               lambda logits, mb: token_log_probs(logits, mb["labels"], temperature=temperature))

    def compute_values(self, batch: dict, micro_batch_size: int) -> ShardResult | None:
        """Critic values per position (``[b, s, 1]`` head output squeezed)."""
        return self._per_token(batch, micro_batch_size, lambda values, mb: values[..., 0])

    def compute_rewards(self, batch: dict, micro_batch_size: int) -> ShardResult | None:
        """Reward model score at each row's last real token."""
        result = self.compute_values(batch, micro_batch_size)
        if result is None or not result.values:
            return result
        last = batch["last_index"][result.start:result.stop]
        scores = result.values["out"].gather(1, last[:, None])[:, 0]
        return ShardResult(result.start, result.stop, {"out": scores})

    # ----- training -----------------------------------------------------------------------
    def train(self, batch: dict, *, loss: str, settings: dict, ptx: dict | None = None) -> dict:
        """PPO epochs over ``batch`` (already this step's rollout), one optimizer step per
        ``settings['train_batch_size']`` samples; returns averaged metrics.

        ``ptx`` (actor only): padded pretraining rows, ``train_batch_size`` per optimizer step in
        step order; each step's rows join its rollout micro-batches (``engine.rl.ptx``)."""
        from engine.rl.ptx import attach_ptx, finish_ptx_metrics
        from engine.rl.train_losses import make_loss_fn

        total = len(batch["input_ids"])
        per_step, epochs = settings["train_batch_size"], settings["max_epochs"]
        micro_size = settings["micro_train_batch_size"]
        generator = torch.Generator().manual_seed(settings["seed"])
        history = []
        for _ in range(epochs):
            order = torch.randperm(total, generator=generator) if settings.get("shuffle", True) else torch.arange(total)
            for lo in range(0, total - per_step + 1, per_step):
                rows = order[lo:lo + per_step]
                step_batch = {k: v[rows] if torch.is_tensor(v) and v.shape[:1] == (total,) else v for k, v in batch.items()}
                start, stop = self._share(per_step)
                micro = self._microbatches(step_batch, start, stop, micro_size)
                ptx_scale = 0.0
                if ptx is not None:
                    # len(history) optimizer steps are done: this step's ptx rows, this rank's share of them
                    first = len(history) * per_step + start
                    micro = attach_ptx(micro, {k: v[first:first + stop - start] for k, v in ptx.items()},
                                       micro_batch_size=micro_size, pad_id=settings["pad_token_id"],
                                       multiple=self._sequence_multiple())
                    ptx_scale = self.engine.loss_scale(micro, key="loss_mask")
                loss_fn = make_loss_fn(loss, settings, scale=self.engine.loss_scale(micro, key="action_mask"),
                                       tp_group=self.ctx.tp_group, ptx_scale=ptx_scale)
                result = self.engine.train_step(micro, loss_fn, normaliser_key="num_tokens")
                history.append({**finish_ptx_metrics(result.metrics), "grad_norm": result.grad_norm})
        return {k: sum(h[k] for h in history) / len(history) for k in history[0]} if history else {}

    # ----- weights out --------------------------------------------------------------------
    def owns_weights(self) -> bool:
        """Whether this rank yields any HF tensor (one rank per distinct tensor does)."""
        from models.weights import _is_owner

        return any(_is_owner(name) for name, _ in self.model.named_parameters())

    def connect_weight_sync(self, engines: list, backend: str) -> str | None:
        from parallel.weight_transfer import connect_transport

        if not self.owns_weights():
            return None
        self._transport = connect_transport(engines, backend=backend)
        return self._transport.group_id

    def send_weights(self, bucket_bytes: int) -> dict:
        """Stream this rank's HF tensors to the engines (all ranks iterate: TP gathers are collective)."""
        from models.weights import iter_hf_weights
        from parallel.weight_transfer import stream_weights

        tensors = iter_hf_weights(self.model, self.engine.adapter, dtype=self.engine.adapter.export_dtype())
        if getattr(self, "_transport", None) is None:
            for _ in tensors:
                pass
            return {}
        stats = stream_weights(self._transport, tensors, bucket_bytes=bucket_bytes)
        return {"num_bytes": stats.num_bytes, "seconds": stats.seconds, "num_tensors": stats.num_tensors}

    # ----- persistence --------------------------------------------------------------------
    def save_checkpoint(self, ckpt_config, step: int, state: dict) -> str:
        return str(self.engine.save_checkpoint(ckpt_config, step, state))

    def resume(self, ckpt_config) -> dict | None:
        return self.engine.resume(ckpt_config)

    def save_hf(self, path: str) -> None:
        self.engine.save_hf(path)


RemoteRoleWorker = ray.remote(MegatronRoleWorker)
