"""The norm of the local (non-Transformer-Engine) layer spec, usable under sequence parallelism.

megatron-core 0.16.1's local choices do not fit: ``WrappedTorchNorm`` (torch's RMSNorm) asserts
``not config.sequence_parallel`` and is created in fp32 whatever ``params_dtype`` is, and Apex's
``FusedLayerNorm`` (what Megatron picks with Apex but no TE) asserts ``normalization ==
"LayerNorm"``. :class:`LocalNorm` computes like HF's ``LlamaRMSNorm`` (normalise in fp32, cast
back, then scale) and marks its parameters ``sequence_parallel`` as TE's and Apex's norms do:
under sequence parallelism each TP rank sees only its slice of the sequence, so its norm
gradients are partial, and ``finalize_model_grads`` sums exactly the parameters so marked over
the TP group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class LocalNorm(torch.nn.Module):
    """RMSNorm or LayerNorm (``config.normalization``) over the last dimension.

    Takes the keyword arguments Megatron's ``build_module`` passes to a norm (``config``,
    ``hidden_size``, ``eps``; the others, TE / Apex options, are ignored).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"LocalNorm supports RMSNorm and LayerNorm, not {config.normalization!r}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("LocalNorm does not implement layernorm_zero_centered_gamma")
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        if self.rms:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * x.to(dtype)  # HF LlamaRMSNorm: cast, then scale in the weight's dtype
        bias = self.bias.float()
        return F.layer_norm(x, x.shape[-1:], self.weight.float(), bias, self.eps).to(dtype)

    def extra_repr(self) -> str:
        return f"{'RMSNorm' if self.rms else 'LayerNorm'}({self.weight.numel()}, eps={self.eps})"


class FixedEpsNorm(LocalNorm):
    """A :class:`LocalNorm` whose epsilon is its spec's ``fixed_eps``, not the one Megatron passes
    (``config.layernorm_epsilon``): HF DeepSeek's latent norms use 1e-6 whatever ``rms_norm_eps`` says
    (``ModuleSpec(module=FixedEpsNorm, params={"fixed_eps": ...})``)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, *, fixed_eps: float, **unused):
        super().__init__(config, hidden_size, eps=fixed_eps)
