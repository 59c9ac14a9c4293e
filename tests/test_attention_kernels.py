"""Which attention kernel runs on which machine (decided on CPU with the facts faked), what counts as
an installed optional package, and torch's CUDA varlen kernel's glue against the per-sample path."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from parallel.attention import core_attention, kernels
from parallel.attention.core_attention import packed_causal
from parallel.optional_deps import block, probe
from tests.fake_cuda_attention import cuda_kernels_on_cpu

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize("device,dtype,dropout,flash_attn,torch_varlen,expected", [
    ("cuda", BF16, 0.0, True, True, "flash_attn_varlen"),
    ("cuda", BF16, 0.0, False, True, "torch_flash_varlen"),  # the GPU machine: no flash-attn wheel
    ("cuda", BF16, 0.1, False, True, "sdpa_per_sample"),  # dropout: torch's varlen is called without
    ("cuda", BF16, 0.0, False, False, "sdpa_per_sample"),  # pre-sm80 GPU
    ("cuda", FP32, 0.0, True, True, "sdpa_per_sample"),  # FlashAttention is half precision only
    ("cpu", BF16, 0.0, True, True, "sdpa_per_sample"),
])
def test_packed_kernel_choice(device, dtype, dropout, flash_attn, torch_varlen, expected):
    assert kernels.choose_packed_kernel(device_type=device, dtype=dtype, dropout_p=dropout, flash_attn=flash_attn,
                                        torch_flash_varlen=torch_varlen) == expected


def test_dense_and_ring_kernel_choices():
    assert kernels.choose_dense_kernel(device_type="cuda", dtype=BF16, flash_attn=True) == "flash_attn"
    assert kernels.choose_dense_kernel(device_type="cuda", dtype=BF16, flash_attn=False) == "sdpa"
    assert kernels.choose_dense_kernel(device_type="cpu", dtype=BF16, flash_attn=True) == "sdpa"
    assert kernels.choose_ring_flash_attn(device_type="cuda", dtype=BF16, ring_flash_attn=True)
    assert not kernels.choose_ring_flash_attn(device_type="cuda", dtype=BF16, ring_flash_attn=False)
    assert not kernels.choose_ring_flash_attn(device_type="cuda", dtype=FP32, ring_flash_attn=True)
    def block(device, dtype=BF16, **have):
        return kernels.choose_ring_block_kernel(device_type=device, dtype=dtype,
                                                **{"cpu_flash": True, "cuda_efficient": True, **have})

    assert block("cuda") == block("cuda", FP32) == "cuda_efficient"
    assert block("cuda", torch.float64) == block("cuda", cuda_efficient=False) == "math"
    assert block("cpu") == "cpu_flash" and block("cpu", cpu_flash=False) == "math"
    # This machine: CPU tensors never try to import a CUDA extension.
    q = torch.zeros(4, 2, 8, dtype=BF16)
    assert core_attention.dense_kernel(q) == "sdpa" and core_attention.packed_kernel(q, 0.0) == "sdpa_per_sample"


def _package(root, name: str, body: str) -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(textwrap.dedent(body))


def test_a_package_counts_as_present_only_if_it_imports(tmp_path, monkeypatch):
    # ring-flash-attn installs without flash-attn; a CUDA extension built for another CUDA raises OSError.
    _package(tmp_path, "fake_ring_attn", "import fake_flash_attn_absent\n")
    _package(tmp_path, "fake_cuda_ext", "raise OSError('libcudart.so.12: cannot open shared object file')\n")
    _package(tmp_path, "fake_fine", "VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ring = probe("fake_ring_attn")
    assert (ring.installed, ring.importable) == (True, False) and "fake_flash_attn_absent" in ring.reason
    assert "installed but does not import" in ring.status
    broken = probe("fake_cuda_ext")
    assert (broken.installed, broken.importable) == (True, False) and broken.reason.startswith("OSError: libcudart")
    assert probe("fake_fine").importable and probe("fake_fine").status == "imports"
    assert probe("no_such_package_here").status == "absent (its path stays off)"
    block("fake_fine")
    with pytest.raises(ImportError):
        import fake_fine  # noqa: F401
    assert not probe("fake_fine").installed
    del sys.modules["fake_fine"]


def test_a_transformer_engine_that_fails_to_load_leaves_the_local_spec(tmp_path):
    """megatron-core catches only ImportError around its TE imports (``import megatron.core.models.gpt``
    raises the OSError of such a TE); our guard, run when ``parallel`` is imported, before megatron,
    blocks it, and the layer-spec choice says why."""
    fake = tmp_path / "transformer_engine"
    (fake / "pytorch").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "pytorch" / "__init__.py").write_text("raise OSError('libtransformer_engine.so: undefined symbol')\n")
    guarded = textwrap.dedent("""
        import warnings
        warnings.simplefilter("ignore")
        import parallel
        from megatron.core.models.gpt import gpt_layer_specs
        from models.layer_spec import detect_layer_spec
        choice = detect_layer_spec("auto")
        print("HAVE_TE", gpt_layer_specs.HAVE_TE, choice.impl, choice.reason)
        """)
    env_path = f"{tmp_path}:{':'.join(sys.path)}"

    def run(code):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
        return done.stdout + done.stderr[-2000:]

    out = run(guarded)
    assert "HAVE_TE False local" in out, out
    assert "Transformer Engine is installed but fails to load: OSError: libtransformer_engine.so" in out, out


def _packed_inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 16, 23])  # three samples, then 3 tokens of trailing padding
    q = torch.randn(26, 4, 8, generator=gen, dtype=dtype)
    k, v = (torch.randn(26, 2, 8, generator=gen, dtype=dtype) for _ in range(2))  # GQA: 2 kv heads
    return q, k, v, cu, torch.randn(26, 4, 8, generator=gen, dtype=dtype)


def _run_packed(kernel, monkeypatch, dtype=FP32):
    monkeypatch.setattr(core_attention, "packed_kernel", lambda q, dropout_p: kernel)
    q, k, v, cu, weights = _packed_inputs(dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = packed_causal(q, k, v, cu, scale=0.35)
    (out.float() * weights.float()).sum().backward()
    return [t.detach().float() for t in (out, q.grad, k.grad, v.grad)]


def test_torch_varlen_path_equals_the_per_sample_path(monkeypatch):
    """The packed CUDA path without flash-attn (torch's varlen kernel, here its CPU stand-in): same
    output and gradients as one SDPA call per sample, zeros on the trailing padding."""
    expected = _run_packed("sdpa_per_sample", monkeypatch)
    with cuda_kernels_on_cpu():
        actual = _run_packed("torch_flash_varlen", monkeypatch)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert torch.allclose(a, e, atol=1e-5), f"{name}: {(a - e).abs().max()}"
    assert actual[0][23:].abs().max() == 0


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_ring_cuda_blocks_in_bf16_match_the_fp32_path(tmp_path, packed):
    """On CUDA the ring's blocks run in the inputs' bf16 (the memory-efficient kernel; here its CPU
    stand-in) and merge / accumulate in fp32: CP=1 output and gradients against the CPU path, which
    computes in fp32 throughout."""
    import torch.distributed as dist

    from parallel.attention.ring import ring_attention

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        gen = torch.Generator().manual_seed(1)
        lead = (40,) if packed else (32, 2)
        q, w = (torch.randn(*lead, 4, 16, generator=gen).to(BF16) for _ in range(2))
        k, v = (torch.randn(*lead, 2, 16, generator=gen).to(BF16) for _ in range(2))
        cu = torch.tensor([0, 10, 16, 36]) if packed else None  # 4 tokens of trailing padding

        def run():
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = ring_attention(*leaves, cp_group=group, scale=0.25, cu_seqlens=cu)
            (out.float() * w.float()).sum().backward()
            return [out.detach().float(), *(t.grad.float() for t in leaves)]

        expected = run()
        with cuda_kernels_on_cpu():
            actual = run()
    finally:
        dist.destroy_process_group()
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert a.dtype == e.dtype and torch.allclose(a, e, atol=3e-2, rtol=3e-2), f"{name}: {(a - e).abs().max()}"
