"""The five checks of ``tools.device_check`` (one GPU, no vLLM / Ray / TE / flash-attn needed).

Each check returns ``(detail, metrics)`` or raises :class:`Skip`; an exception is a FAIL. Sizes
follow the machine: on CUDA the real sizes, on a CPU (``--smoke``, the checks' own CI test) tiny
ones, so that the code a GPU minute runs has run before.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


class Skip(Exception):
    """The machine lacks what the check needs (the check is reported SKIP, not FAIL)."""


@dataclass(frozen=True)
class Sizes:
    """Model and input sizes of the checks on one kind of machine."""

    llama: dict  # the MFU model (GPU: TinyLlama-1.1B's shape with the local ~500-token vocabulary)
    seq_len: int
    micro_batch: int
    num_microbatches: int
    steps: int
    mid: dict  # the packing / LoRA model
    pack_tokens: int  # tokens per packed row
    sample_lengths: tuple[int, int]  # min / max sample length in the packed row
    moe: dict
    small: dict  # the HF-equivalence model
    gemm_n: int
    ring_seq: tuple[int, int]  # ring equivalence length, long length for the memory comparison
    ring_heads: tuple[int, int, int]  # heads, kv heads, head dim


GPU = Sizes(
    llama=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, max_position_embeddings=4096),
    seq_len=2048, micro_batch=4, num_microbatches=2, steps=8,
    mid=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=4096),
    pack_tokens=8192, sample_lengths=(64, 1024),
    moe=dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2),
    small=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=4),
    gemm_n=8192, ring_seq=(2048, 16384), ring_heads=(16, 4, 128),
)
SMOKE = Sizes(
    llama=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2),
    seq_len=64, micro_batch=2, num_microbatches=2, steps=5,
    mid=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    pack_tokens=128, sample_lengths=(8, 48),
    moe=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             num_local_experts=4, num_experts_per_tok=2),
    small=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    gemm_n=256, ring_seq=(64, 256), ring_heads=(4, 2, 16),
)
WARMUP_STEPS = 2


def _cuda() -> bool:
    return torch.cuda.is_available()


def sizes() -> Sizes:
    return GPU if _cuda() else SMOKE


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


# ----- shared pieces --------------------------------------------------------------------------
def gemm_flops_per_s(n: int, *, iters: int = 20) -> float:
    """The dense GEMM rate of this device in the training dtype (bf16 on CUDA), measured now: the
    denominator of MFU, so MFU says how close training comes to what this GPU does here."""
    dtype = torch.bfloat16 if _cuda() else torch.float32
    device = "cuda" if _cuda() else "cpu"
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    iters = iters if _cuda() else 3
    for _ in range(3):
        a @ b
    _sync()
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync()
    return 2.0 * n ** 3 * iters / (time.perf_counter() - start)


def config_only_model(arch: str, path: Path, **overrides) -> str:
    """An HF model directory with config and tokenizer only: the engine initialises the weights
    itself (``load_weights=False``), so a 1B model costs no 4 GB write and read."""
    from transformers import AutoTokenizer

    from models.tiny import build_tokenizer, tiny_config

    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(500).save_pretrained(path)
    config = tiny_config(arch, len(AutoTokenizer.from_pretrained(path)), **overrides)
    config.save_pretrained(path)
    return str(path)


def make_engine(path: str, *, lr: float, steps: int, lora_rank: int = 0, load_weights: bool = False):
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from models.builder import ModelBuildConfig
    from models.lora import LoraConfig

    build = ModelBuildConfig(bf16=_cuda(), transformer_impl="local", lora=LoraConfig(lora_rank=lora_rank))
    config = EngineConfig(pretrain=path, build=build, optim=OptimConfig(learning_rate=lr, lr_warmup_ratio=0.0))
    return TrainingEngine(config, total_steps=steps, load_weights=load_weights)


def lm_loss(logits, data):
    from megatron.core import tensor_parallel

    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), data["labels"])
    loss = (losses * data["loss_mask"]).sum() * data["scale"]
    return loss, {"loss": loss.detach()}


def padded_batch(ids: torch.Tensor, scale: float) -> dict:
    return {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1), "loss_mask": torch.ones(ids.shape),
            "position_ids": torch.arange(ids.shape[1]).expand_as(ids), "scale": scale}


def packed_batch(lengths: list[int], vocab: int, *, seed: int) -> dict:
    """One ``[1, T]`` row of samples kept apart by ``cu_seqlens`` (engine.data.packing's format)."""
    ids = torch.randint(5, vocab, (1, sum(lengths)), generator=torch.Generator().manual_seed(seed))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    mask = torch.ones(ids.shape)
    mask[0, cu[1:] - 1] = 0  # no label across a sample boundary
    return {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1), "loss_mask": mask, "position_ids": positions,
            "cu_seqlens": cu, "scale": 1.0 / float(mask.sum())}


def sample_lengths(total: int, bounds: tuple[int, int], *, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(bounds[0], bounds[1] + 1, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def timed_steps(engine, make_microbatches, steps: int) -> tuple[list[float], float]:
    """Losses of ``steps`` train steps and the seconds of those after the warm-up ones."""
    losses, elapsed = [], 0.0
    for step in range(steps):
        _sync()
        start = time.perf_counter()
        result = engine.train_step(make_microbatches(), lm_loss)
        _sync()
        if step >= WARMUP_STEPS:
            elapsed += time.perf_counter() - start
        losses.append(float(result.metrics["loss"]))
    return losses, elapsed


def _loss_falls(losses: list[float], what: str) -> None:
    if not (all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]):
        raise AssertionError(f"{what}: loss did not fall on one repeated batch: {losses}")


def _device_name() -> str:
    return torch.cuda.get_device_name() if _cuda() else "CPU (smoke sizes)"


# ----- 1. bf16 train step of a ~1B Llama: tokens/s and MFU ------------------------------------
def check_train_step(workdir: Path):
    from tools.gpu_check import train_flops_per_token

    s = sizes()
    gemm = gemm_flops_per_s(s.gemm_n)
    path = config_only_model("llama", workdir / "llama-1b", **s.llama)
    engine = make_engine(path, lr=3e-4, steps=s.steps)
    vocab = engine.adapter.vocab_size
    tokens = s.micro_batch * s.seq_len * s.num_microbatches
    gen = torch.Generator().manual_seed(0)
    batches = [padded_batch(torch.randint(5, vocab, (s.micro_batch, s.seq_len), generator=gen), 1.0 / tokens)
               for _ in range(s.num_microbatches)]
    losses, elapsed = timed_steps(engine, lambda: [dict(b) for b in batches], s.steps)
    _loss_falls(losses, "train_step")
    tokens_per_s = tokens * (s.steps - WARMUP_STEPS) / elapsed
    params = sum(p.numel() for p in engine.model.parameters())
    flops = train_flops_per_token(params=params, num_layers=s.llama["num_hidden_layers"],
                                  hidden=s.llama["hidden_size"], seq_len=s.seq_len) * tokens_per_s
    metrics = {"params": params, "tokens_per_s": tokens_per_s, "model_tflops": flops / 1e12,
               "gemm_tflops": gemm / 1e12, "mfu": flops / gemm, "loss_first": losses[0], "loss_last": losses[-1]}
    return (f"{params / 1e9:.2f}B params, {tokens_per_s:,.0f} tokens/s, {flops / 1e12:.0f} TFLOP/s = MFU "
            f"{flops / gemm:.1%} of the {gemm / 1e12:.0f} TFLOP/s bf16 GEMM measured on {_device_name()}; "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"), metrics


# ----- 2. packing (varlen attention) and a tiny Mixtral step --------------------------------------
def _packed_kernel_numerics() -> float:
    """Packed attention through the kernel chosen here vs one SDPA call per sample: max abs error of
    output and gradients (relative to their scale)."""
    from parallel.attention import core_attention

    device, dtype = ("cuda", torch.bfloat16) if _cuda() else ("cpu", torch.float32)
    lengths = [37, 300, 5, 170]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    gen = torch.Generator().manual_seed(0)
    shapes = ((512, 8, 64), (512, 2, 64), (512, 2, 64), (512, 8, 64))
    q, k, v, w = (torch.randn(*shape, generator=gen).to(device, dtype) for shape in shapes)

    def run(kernel):
        original = core_attention.packed_kernel
        core_attention.packed_kernel = (lambda q_, p: kernel) if kernel else original
        try:
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = core_attention.packed_causal(*leaves, cu, scale=0.125)
            (out.float() * w.float()).sum().backward()
            return [out.detach().float(), *(t.grad.float() for t in leaves)]
        finally:
            core_attention.packed_kernel = original

    chosen, reference = run(None), run("sdpa_per_sample")
    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) for a, b in zip(chosen, reference))


def check_packing_moe(workdir: Path):
    from parallel.attention import core_attention

    s = sizes()
    probe = torch.zeros(1, 1, 64, device="cuda" if _cuda() else "cpu", dtype=torch.bfloat16)
    kernel = core_attention.packed_kernel(probe, 0.0)
    if _cuda() and kernel == "sdpa_per_sample":
        raise AssertionError("packed attention on CUDA bf16 fell back to the per-sample loop "
                             "(torch's flash varlen kernel unavailable here?)")
    error = _packed_kernel_numerics()
    if error > 2e-2:
        raise AssertionError(f"packed attention ({kernel}) differs from per-sample SDPA by {error:.2e} (relative)")
    engine = make_engine(config_only_model("llama", workdir / "llama-mid", **s.mid), lr=1e-3, steps=s.steps + 4)
    vocab = engine.adapter.vocab_size
    lengths = sample_lengths(s.pack_tokens, s.sample_lengths, seed=0)
    packed = packed_batch(lengths, vocab, seed=0)
    losses, packed_s = timed_steps(engine, lambda: [dict(packed)], s.steps)
    _loss_falls(losses, "packed train step")
    # The same samples padded to the longest one: the cost packing saves.
    width = max(lengths)
    rows = torch.full((len(lengths), width), 0)
    for row, (start, n) in enumerate(zip(packed["cu_seqlens"][:-1].tolist(), lengths)):
        rows[row, :n] = packed["input_ids"][0, start:start + n]
    padded = padded_batch(rows, 1.0 / rows.numel())
    _, padded_s = timed_steps(engine, lambda: [dict(padded)], WARMUP_STEPS + 3)
    packed_tps = s.pack_tokens * (s.steps - WARMUP_STEPS) / packed_s
    padded_tps = s.pack_tokens * 3 / padded_s  # real tokens per second
    moe = make_engine(config_only_model("mixtral", workdir / "mixtral", **s.moe), lr=1e-3, steps=6)
    ids = torch.randint(5, moe.adapter.vocab_size, (2, 256 if _cuda() else 32), generator=torch.Generator().manual_seed(1))
    moe_batch = padded_batch(ids, 1.0 / ids.numel())
    moe_losses, _ = timed_steps(moe, lambda: [dict(moe_batch)], 6)
    _loss_falls(moe_losses, "Mixtral EP=1 step")
    metrics = {"packed_kernel": kernel, "kernel_rel_error": error, "packed_tokens_per_s": packed_tps,
               "padded_tokens_per_s": padded_tps, "moe_loss_first": moe_losses[0], "moe_loss_last": moe_losses[-1]}
    return (f"packed attention: {kernel} (rel. error vs per-sample SDPA {error:.1e}); {len(lengths)} samples in "
            f"{s.pack_tokens} tokens: {packed_tps:,.0f} tokens/s packed vs {padded_tps:,.0f} padded "
            f"({packed_tps / padded_tps:.2f}x), loss {losses[0]:.3f} -> {losses[-1]:.3f}; Mixtral "
            f"({s.moe['num_local_experts']} experts, EP=1) loss {moe_losses[0]:.3f} -> {moe_losses[-1]:.3f}"), metrics


# ----- 3. Megatron logits equal HF transformers' on this device ---------------------------------
BF16_REL_TOLERANCE = 0.03  # relative L2 error of bf16 Megatron logits against HF fp32


def _megatron_logits(path: str, ids: torch.Tensor, *, bf16: bool) -> torch.Tensor:
    from engine.runtime.schedule import forward_logits
    from models.builder import ModelBuildConfig, build_model
    from models.registry import load_adapter
    from models.weights import load_hf_weights
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    initialize_parallel(ParallelConfig())
    adapter = load_adapter(path)
    model = build_model(adapter, ParallelConfig(), ModelBuildConfig(bf16=bf16, transformer_impl="local"))
    load_hf_weights(model, adapter, path)
    model.eval()
    batch = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
    return forward_logits(model, [batch], vocab_size=adapter.vocab_size)[0].float()


def check_hf_logits(workdir: Path):
    from transformers import AutoModelForCausalLM

    from models.tiny import build_tiny_model

    s = sizes()
    device = "cuda" if _cuda() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    results, metrics = [], {}
    for arch in ("llama", "mixtral"):
        overrides = {**s.small, **({"num_local_experts": 4, "num_experts_per_tok": 2} if arch == "mixtral" else {})}
        path = build_tiny_model(arch, workdir / f"hf-{arch}", **overrides)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        ids = torch.randint(5, hf.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = hf(ids.to(device)).logits.float()
        del hf
        fp32 = float((_megatron_logits(path, ids, bf16=False) - want).abs().max())
        bf16 = float((_megatron_logits(path, ids, bf16=True) - want).norm() / want.norm())
        metrics[f"{arch}_fp32_max_abs"], metrics[f"{arch}_bf16_rel_l2"] = fp32, bf16
        if not (fp32 < 1e-3 and bf16 < BF16_REL_TOLERANCE):
            raise AssertionError(f"{arch}: fp32 max |diff| {fp32:.2e} (want < 1e-3), bf16 relative L2 {bf16:.2e} "
                                 f"(want < {BF16_REL_TOLERANCE})")
        results.append(f"{arch} fp32 max |diff| {fp32:.1e}, bf16 rel. L2 {bf16:.1e}")
    return "Megatron vs HF on " + _device_name() + ": " + "; ".join(results), metrics


# ----- 4. LoRA step; training state parked in host memory and back --------------------------------
def _pinned_copy_gb_per_s(nbytes: int) -> tuple[float, float]:
    """Device -> pinned host and back for ``nbytes`` in one tensor: the bandwidth parking could reach."""
    if not _cuda():
        return 0.0, 0.0  # a CPU build has no pinned memory (the smoke run only proves the code)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    rates = []
    for dst, src in ((host, device), (device, host)):
        dst.copy_(src, non_blocking=True)  # warm-up
        _sync()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        _sync()
        rates.append(nbytes / (time.perf_counter() - start) / 1e9)
    return rates[0], rates[1]


def _checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _timed(fn):
    _sync()
    start = time.perf_counter()
    result = fn()
    _sync()
    return result, time.perf_counter() - start


def check_lora_offload(workdir: Path):
    s = sizes()
    engine = make_engine(config_only_model("llama", workdir / "llama-lora", **s.mid), lr=1e-3, steps=8, lora_rank=16)
    ids = torch.randint(5, engine.adapter.vocab_size, (4, 512 if _cuda() else 32),
                        generator=torch.Generator().manual_seed(0))
    batch = padded_batch(ids, 1.0 / ids.numel())
    losses, _ = timed_steps(engine, lambda: [dict(batch)], 6)
    _loss_falls(losses, "LoRA step")
    before = _checksum(engine.model)
    engine.park_training_state()  # the first park allocates the pinned host buffers
    engine.restore_training_state()
    parked, park_s = _timed(engine.park_training_state)
    _, restore_s = _timed(engine.restore_training_state)
    if _checksum(engine.model) != before:
        raise AssertionError("the weights changed across park / restore")
    copied = parked["weights"] + parked["optimizer"]  # grads are freed, not copied (zeroed every step)
    after, _ = timed_steps(engine, lambda: [dict(batch)], 1)
    if not math.isfinite(after[0]):
        raise AssertionError(f"the step after a restore gave loss {after[0]}")
    down, up = _pinned_copy_gb_per_s(copied)
    park_rate, restore_rate = copied / park_s / 1e9, copied / restore_s / 1e9
    metrics = {"lora_loss_first": losses[0], "lora_loss_last": losses[-1], "parked_bytes": sum(parked.values()),
               "copied_bytes": copied, "park_gb_per_s": park_rate, "restore_gb_per_s": restore_rate,
               "pinned_d2h_gb_per_s": down, "pinned_h2d_gb_per_s": up}
    return (f"LoRA (rank 16) loss {losses[0]:.3f} -> {losses[-1]:.3f}; parked {sum(parked.values()) / 1e9:.2f} GB "
            f"(copied {copied / 1e9:.2f} GB) at {park_rate:.1f} GB/s, restored at {restore_rate:.1f} GB/s; one pinned "
            f"copy of the same bytes: {down:.1f} / {up:.1f} GB/s"), metrics


# ----- 5. ring attention's kernel path at CP=1 -------------------------------------------------
@contextmanager
def _ring_block_kernel(kind: str | None):
    from parallel.attention import ring

    original = ring.block_kernel
    if kind is not None:
        ring.block_kernel = lambda device, dtype: kind
    try:
        yield
    finally:
        ring.block_kernel = original


def _ring_inputs(seq: int) -> list[torch.Tensor]:
    """q, k, v ``[seq, 1, heads, dim]`` (GQA) and the loss weights."""
    heads, kv_heads, dim = sizes().ring_heads
    device, dtype = ("cuda", torch.bfloat16) if _cuda() else ("cpu", torch.float32)
    gen = torch.Generator().manual_seed(seq)
    return [torch.randn(seq, 1, h, dim, generator=gen).to(device, dtype) for h in (heads, kv_heads, kv_heads, heads)]


def _ring_run(inputs: list[torch.Tensor], kind: str | None, cp_group):
    """Output, gradients, peak memory (bytes over the start) and seconds of ring attention."""
    from parallel.attention.ring import ring_attention

    leaves, weights = [t.detach().clone().requires_grad_() for t in inputs[:3]], inputs[3]
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if _cuda() else 0
    with _ring_block_kernel(kind):
        out, seconds = _timed(lambda: _ring_forward_backward(ring_attention, leaves, weights, cp_group))
    peak = (torch.cuda.max_memory_allocated() - base) if _cuda() else 0
    return [out.float(), *(t.grad.float() for t in leaves)], peak, seconds


def _ring_forward_backward(ring_attention, leaves, weights, cp_group):
    out = ring_attention(*leaves, cp_group=cp_group, scale=leaves[0].shape[-1] ** -0.5)
    (out.float() * weights.float()).sum().backward()
    return out.detach()


def _sdpa_reference(inputs):
    from parallel.attention.core_attention import sdpa_causal

    fresh, weights = [t.detach().clone().requires_grad_() for t in inputs[:3]], inputs[3]
    out = sdpa_causal(*(t.transpose(0, 1) for t in fresh), scale=fresh[0].shape[-1] ** -0.5).transpose(0, 1)
    (out.float() * weights.float()).sum().backward()
    return [out.float(), *(t.grad.float() for t in fresh)]


def check_ring_attention(workdir: Path):
    from megatron.core import parallel_state as ps

    from parallel.attention import ring
    from parallel.config import ParallelConfig
    from parallel.initialize import initialize_parallel

    s = sizes()
    initialize_parallel(ParallelConfig())
    cp_group = ps.get_context_parallel_group()
    kernel = ring.block_kernel(torch.device("cuda" if _cuda() else "cpu"), torch.bfloat16 if _cuda() else torch.float32)
    short, long = s.ring_seq
    inputs = _ring_inputs(short)
    got, _, _ = _ring_run(inputs, None, cp_group)
    want = _sdpa_reference(inputs)
    error = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) for a, b in zip(got, want))
    if error > 2e-2:
        raise AssertionError(f"ring attention ({kernel} blocks) differs from SDPA by {error:.2e} (relative)")
    inputs = _ring_inputs(long)
    fast, fast_peak, fast_s = _ring_run(inputs, None, cp_group)
    slow, slow_peak, slow_s = _ring_run(inputs, "math", cp_group)
    agree = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) for a, b in zip(fast, slow))
    if agree > 2e-2:
        raise AssertionError(f"at {long} tokens the {kernel} and fp32 math block kernels differ by {agree:.2e}")
    metrics = {"block_kernel": kernel, "rel_error_vs_sdpa": error, "long_seq": long, "peak_mb": fast_peak / 2**20,
               "math_peak_mb": slow_peak / 2**20, "seconds": fast_s, "math_seconds": slow_s}
    memory = (f"peak {fast_peak / 2**20:,.0f} MB vs {slow_peak / 2**20:,.0f} MB for the fp32 math fallback, "
              if _cuda() else "")
    return (f"CP=1 ring with {kernel} blocks: rel. error vs SDPA {error:.1e} at {short} tokens; at {long} tokens "
            f"{memory}{fast_s * 1e3:.0f} ms vs {slow_s * 1e3:.0f} ms forward + backward"), metrics


CHECKS = {
    "train_step": (check_train_step, "bf16 train step of a ~1B Llama (TP=1, local spec): tokens/s, MFU against "
                                     "the bf16 GEMM rate measured in the same run, loss falls"),
    "packing_moe": (check_packing_moe, "packed train step (CUDA varlen attention) vs padded, and a tiny Mixtral "
                                       "step at EP=1"),
    "hf_logits": (check_hf_logits, "Megatron logits equal HF transformers' on the GPU (fp32; bf16 within "
                                   f"{BF16_REL_TOLERANCE} relative L2), Llama and Mixtral"),
    "lora_offload": (check_lora_offload, "LoRA step on CUDA; training state parked in host memory and back "
                                         "(offload.py): bytes and GB/s against a pinned copy of the same bytes"),
    "ring_attention": (check_ring_attention, "ring attention's kernel path at CP=1 (LSE merge with torch's "
                                             "attention) vs SDPA, and its memory vs the fp32 fallback"),
}
