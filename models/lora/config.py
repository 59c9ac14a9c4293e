"""The LoRA options of a trained model (OpenRLHF's flag names)."""
from __future__ import annotations

from dataclasses import dataclass

from parallel.options import option

ALL_LINEAR = "all-linear"


@dataclass(kw_only=True)
class LoraConfig:
    """Low-rank adapters on the decoder's linear layers; the base weights stay frozen."""

    lora_rank: int = option(0, help="LoRA rank r (0: full-parameter training)")
    lora_alpha: int = option(16, help="LoRA scale numerator: the adapter output is multiplied by lora_alpha / lora_rank")
    target_modules: tuple[str, ...] = option(
        (ALL_LINEAR,), help="HF module names that get adapters (q_proj k_proj v_proj o_proj gate_proj up_proj "
                            "down_proj; Mixtral experts w1 w2 w3), or all-linear: every decoder linear (never an MoE "
                            "router; the job prints what the names adapt on this model)")
    lora_dropout: float = option(0.0, help="dropout on the adapters' input (tensor parallel size 1 only)")
    load_in_4bit: bool = option(False, help="QLoRA: hold the frozen base linears of the decoder in NF4 (bitsandbytes), "
                                            "dequantised per layer in forward; needs --lora_rank > 0")
    init_b_std: float = 0.0  # B starts at zero (PEFT); tests draw it at random to see the adapters' output

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"--lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise ValueError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        # OpenRLHF passes them space-separated; a comma-separated list is taken too.
        self.target_modules = tuple(name for item in self.target_modules for name in item.split(",") if name)
        if self.load_in_4bit and not self.enabled:
            raise ValueError("--load_in_4bit trains adapters on a frozen 4-bit base: it needs --lora_rank > 0")
        if not self.target_modules:
            raise ValueError("--target_modules needs at least one module name (or all-linear)")

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.lora_rank
