"""The first-GPU-run check: one PASS / FAIL / SKIP line per GPU path, under 10 minutes on one GPU.

    bash scripts/gpu_check.sh            # installs the GPU extras if missing, then this
    python -m tools.gpu_check [--only train_step,vllm_nccl] [--workdir runs/gpu_check]

Checks (each in its own process group with its own timeout, so one failure cannot poison the next
and a timed-out check takes everything it started with it, Ray's workers included):

- ``train_step``: a Llama-shaped model trains in bf16 (flash-attn / TE spec when installed; the
  CPU-tensor metric reductions cross the cpu:gloo,cuda:nccl backend); loss falls; MFU printed.
- ``tp2_sp``: SFT with TP=2 and --sequence_parallel (needs two GPUs).
- ``vllm_nccl``: a vLLM GPU engine, another model's weights pushed over NCCL, greedy equals HF (needs
  two GPUs: NCCL refuses two ranks on one device, so the sender takes the last GPU, the engine GPU 0).
- ``vllm_ipc_sleep``: the same over CUDA IPC from a process on the engine's GPU, across sleep / wake.
- ``grpo``: the main job (engine.cli.demo: SFT then GRPO on the tiny task) for 3 rollouts (needs two
  GPUs: one for the actor, one for the engine; on one GPU ``grpo_colocated`` is the GRPO check).
- ``grpo_colocated``: GRPO with actor and engine on one GPU (--colocate_all_models): CUDA IPC sync,
  staged sleep / wake of the engine, the actor's state parked while it generates.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from tools.device_check import run_in_group

# Peak dense bf16 tensor-core FLOP/s by device name (datasheets, without sparsity): MFU's denominator.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}
CHECK_TIMEOUT_S = 420
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def peak_flops(device_name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in device_name), None)


def train_flops_per_token(*, params: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """6 N for the dense matmuls (forward + backward) plus causal attention's scores and values
    (12 L h s, halved for the causal mask), as Megatron's and PaLM's MFU formulas count them."""
    return 6.0 * params + 6.0 * num_layers * hidden * seq_len


# ----- the checks (each runs in a child process) -------------------------------------------------
def check_train_step(workdir: Path) -> str:
    from megatron.core import tensor_parallel

    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from models.builder import ModelBuildConfig
    from models.tiny import build_tiny_model

    cuda = torch.cuda.is_available()
    # A CPU run is the check's own test (tests/test_device_defaults.py): a much smaller model.
    hidden, layers, seq_len, batch, steps = (1024, 8, 1024, 8, 12) if cuda else (128, 2, 32, 2, 5)
    path = build_tiny_model("llama", workdir / "llama-mfu", hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                            num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                            num_hidden_layers=layers)
    engine = TrainingEngine(EngineConfig(pretrain=path, build=ModelBuildConfig(bf16=cuda),
                                         optim=OptimConfig(learning_rate=1e-3, lr_warmup_ratio=0.0)),
                            total_steps=steps)

    def loss_fn(logits, data):
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), data["labels"])
        loss = (losses * data["loss_mask"]).sum() * data["scale"]
        return loss, {"loss": loss.detach()}

    vocab = engine.adapter.vocab_size
    ids = torch.randint(5, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1), "loss_mask": torch.ones(batch, seq_len),
            "position_ids": torch.arange(seq_len).expand_as(ids), "scale": 1.0 / (batch * seq_len)}
    losses, elapsed = [], 0.0
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for step in range(steps):
        sync()
        start = time.perf_counter()
        result = engine.train_step([dict(data)], loss_fn)
        sync()
        if step >= 2:
            elapsed += time.perf_counter() - start
        losses.append(result.metrics["loss"])
    tokens_per_s = batch * seq_len * (steps - 2) / elapsed
    params = sum(p.numel() for p in engine.model.parameters())
    flops = train_flops_per_token(params=params, num_layers=layers, hidden=hidden, seq_len=seq_len) * tokens_per_s
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = peak_flops(name)
    mfu = f"{flops / peak:.1%}" if peak else "n/a (unknown peak)"
    if not losses[-1] < losses[0]:
        raise AssertionError(f"loss did not fall over {steps} steps on one repeated batch: {losses}")
    return (f"{tokens_per_s:,.0f} tokens/s, {flops / 1e12:.1f} TFLOP/s, MFU {mfu} on {name}; "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def check_tp2_sp(workdir: Path) -> str:
    from engine.tasks.arithmetic import make_rows, write_jsonl
    from models.tiny import build_tiny_model

    model = build_tiny_model("llama", workdir / "tiny-sp", **TINY)
    write_jsonl(make_rows(256, max_operand=9, seed=0), workdir / "sp-data" / "train.jsonl")
    _run([sys.executable, "-m", "engine.cli.train_sft", "--pretrain", model,
          "--dataset", f"json@{workdir / 'sp-data'}", "--input_key", "prompt", "--output_key", "answer",
          "--input_template", "", "--max_len", "32", "--max_epochs", "1", "--train_batch_size", "32",
          "--micro_train_batch_size", "8", "--bf16", "--tensor_model_parallel_size", "2", "--sequence_parallel",
          "--nproc_per_node", "2", "--save_path", str(workdir / "sp-out")])
    return "TP=2 + SP SFT ran to its HF export"


def _vllm_sync(workdir: Path, backend: str, *, sleep: bool) -> str:
    import ray

    from engine.ray.vllm_engine import SamplingConfig, VLLMEngineConfig, create_engines, generate, shutdown_engines
    from engine.ray.weight_sync import connect_transport, sync_weights
    from models.tiny import EOS_ID, build_tiny_model

    paths = {name: build_tiny_model("llama", workdir / f"vllm-{name}", seed=seed, **TINY)
             for name, seed in (("a", 0), ("b", 1))}
    # Ray hands the engine GPU 0. NCCL needs the sender on another GPU (the last one); CUDA IPC
    # needs it on the engine's own.
    sender_gpu = torch.cuda.device_count() - 1 if backend == "nccl" else 0
    torch.cuda.set_device(sender_gpu)
    ray.init(num_gpus=max(1, sender_gpu))
    engines = create_engines(VLLMEngineConfig(pretrain=paths["a"], dtype="float32", enforce_eager=True,
                                              max_model_len=256, seed=0, enable_sleep_mode=sleep,
                                              gpu_memory_utilization=0.3))
    try:
        if sleep:
            ray.get([e.sleep.remote() for e in engines])
            ray.get([e.wake_up.remote() for e in engines])
        group = connect_transport(engines, backend=backend, timeout_s=120)
        sync_weights(engines, _stream_to_cuda(paths["b"]), transport=group)
        prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=16, logprobs=False)
        got = [s.response_token_ids for s in generate(engines, prompts, greedy)]
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(paths["b"], dtype=torch.float32).eval()
        want = [hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=EOS_ID,
                            pad_token_id=0)[0, len(p):].tolist() for p in prompts]
        if got != want:
            raise AssertionError(f"greedy after the {backend} sync differs from HF: {got} vs {want}")
        group.close()
    finally:
        shutdown_engines(engines)
        ray.shutdown()
    return f"{backend} sync{' after sleep / wake' if sleep else ''}: greedy equals HF"


def _stream_to_cuda(path: str):
    from safetensors import safe_open

    with safe_open(f"{path}/model.safetensors", framework="pt") as reader:
        for name in reader.keys():
            yield name, reader.get_tensor(name).cuda()


def check_vllm_nccl(workdir: Path) -> str:
    return _vllm_sync(workdir, "nccl", sleep=False)


def check_vllm_ipc_sleep(workdir: Path) -> str:
    return _vllm_sync(workdir, "cuda_ipc", sleep=True)


def check_grpo(workdir: Path) -> str:
    _run([sys.executable, "-m", "engine.cli.demo", "--workdir", str(workdir / "demo"),
          "--tensor_model_parallel_size", "1", "--max_epochs", "1", "--rl_steps", "3"])
    return "SFT then 3 GRPO rollouts on GPU"


def check_grpo_colocated(workdir: Path) -> str:
    """--colocate_all_models on one GPU: engine and actor share it, the sync goes over CUDA IPC (the
    default there), the engine sleeps and wakes in stages and the actor parks its state meanwhile."""
    from engine.cli import train_ppo_ray
    from engine.cli.demo import prepare
    from engine.tasks import arithmetic

    model, data = prepare(workdir / "colocated")
    history = train_ppo_ray.main([
        "--pretrain", model, "--prompt_data", f"json@{data}", "--input_key", "prompt", "--label_key", "label",
        "--remote_rm_url", arithmetic.__file__, "--advantage_estimator", "grpo", "--n_samples_per_prompt", "4",
        "--rollout_batch_size", "8", "--train_batch_size", "32", "--micro_train_batch_size", "8",
        "--generate_max_len", "6", "--max_steps", "3", "--init_kl_coef", "0", "--learning_rate", "1e-4",
        "--colocate_all_models", "--vllm_enable_sleep", "--vllm_gpu_memory_utilization", "0.3",
        "--fp32", "--vllm_dtype", "float32", "--enforce_eager",
    ])
    worst = max(h["rollout_logprob_abs_diff"] for h in history)
    parked = min(h.get("memory/actor_parked_gb", 0.0) for h in history)
    if not (worst < 1e-3 and parked > 0):
        raise AssertionError(f"log-prob mismatch {worst} (engine without the actor's weights?), actor parked "
                             f"{parked} GB per rollout")
    return f"3 colocated GRPO rollouts, CUDA IPC sync, log-prob mismatch {worst:.1e}, actor parked {parked:.3f} GB"


# GPUs each check needs; with fewer it is skipped with the reason.
NEEDS_GPUS = {
    "tp2_sp": (2, "TP=2 needs two GPUs"),
    "vllm_nccl": (2, "NCCL refuses two ranks on one GPU: the sender and the engine need a GPU each "
                     "(vllm_ipc_sleep checks the one-GPU sync)"),
    "grpo": (2, "the demo puts the actor and the engine on a GPU each (grpo_colocated runs GRPO on one GPU)"),
}


def skip_reason(name: str, *, device_count: int) -> str | None:
    """Why ``name`` cannot run with ``device_count`` GPUs (None: it can)."""
    needed, why = NEEDS_GPUS.get(name, (1, ""))
    if device_count < needed:
        return f"needs {needed} GPUs, {device_count} visible: {why}"
    return None


CHECKS = {
    "train_step": check_train_step,
    "tp2_sp": check_tp2_sp,
    "vllm_nccl": check_vllm_nccl,
    "vllm_ipc_sleep": check_vllm_ipc_sleep,
    "grpo": check_grpo,
    "grpo_colocated": check_grpo_colocated,
}


def _run(command: list[str]) -> None:
    code, output = run_in_group(command, CHECK_TIMEOUT_S)
    if code != 0:
        ended = "ran over its time (process group killed)" if code is None else f"exited {code}"
        raise RuntimeError(f"{' '.join(command[:3])} {ended}:\n{output[-3000:]}")


# ----- driver ----------------------------------------------------------------------------------
def _child(name: str, workdir: str) -> None:
    reason = skip_reason(name, device_count=torch.cuda.device_count()) if torch.cuda.is_available() else None
    if reason:
        print(f"SKIP {name}: {reason}", flush=True)
        return
    detail = CHECKS[name](Path(workdir))
    print(f"PASS {name}: {detail}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(CHECKS), help="comma-separated checks to run")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_check_")
    if args.child:
        _child(args.child, workdir)
        return 0
    from tools.cuda_preflight import diagnose, facts_here

    verdict = diagnose(facts_here())
    if not verdict.usable:
        print(f"FAIL setup: {verdict.message}")
        return 1
    failed = 0
    for name in args.only.split(","):
        start = time.perf_counter()
        code, output = run_in_group([sys.executable, "-m", "tools.gpu_check", "--child", name, "--workdir", workdir],
                                    CHECK_TIMEOUT_S)
        lines = [line for line in output.splitlines() if line.startswith(("PASS", "SKIP"))]
        ok = code == 0 and lines
        if code is None:
            print(f"FAIL {name}: over {CHECK_TIMEOUT_S} s (its process group killed)\n{output[-2000:]}", flush=True)
        else:
            print(lines[-1] if ok else f"FAIL {name}: exit {code}\n{output[-4000:]}", flush=True)
        failed += not ok
        print(f"     ({time.perf_counter() - start:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
