"""Merge a PEFT LoRA adapter into HF weights, one tensor at a time (``tools.convert.lora_combiner``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from models.lora.export import CONFIG_UPDATES, PEFT_PREFIX

_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"


class PeftAdapter:
    """A PEFT LoRA adapter directory: its scale, its pairs by HF module, its ``modules_to_save`` tensors."""

    def __init__(self, path: str | os.PathLike):
        from safetensors.torch import load_file

        self.path = Path(path)
        config_file = self.path / "adapter_config.json"
        if not config_file.is_file():
            raise ValueError(f"--lora_path {path}: no adapter_config.json (not a PEFT adapter directory)")
        self.config = json.loads(config_file.read_text())
        self._check_supported()
        rank, alpha = self.config["r"], self.config["lora_alpha"]
        self.scale = alpha / (rank**0.5 if self.config.get("use_rslora") else rank)
        tensors = load_file(str(self.path / "adapter_model.safetensors"))  # an adapter is MBs
        tensors = {name.removeprefix(PEFT_PREFIX): t for name, t in tensors.items()}
        self.pairs = {name.removesuffix(_LORA_A): (t, tensors[name.removesuffix(_LORA_A) + _LORA_B])
                      for name, t in tensors.items() if name.endswith(_LORA_A)}
        self.saved_modules = {name: t for name, t in tensors.items() if ".lora_" not in name}

    def _check_supported(self) -> None:
        config = self.config
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"--lora_path {self.path}: a {config.get('peft_type')} adapter, not LoRA")
        for key in ("use_dora", "rank_pattern", "alpha_pattern", "target_parameters"):
            if config.get(key):
                raise ValueError(f"--lora_path {self.path}: adapter_config.json sets {key}, which the combiner "
                                 "does not merge (merge with peft's merge_and_unload instead)")

    def config_updates(self) -> dict:
        path = self.path / CONFIG_UPDATES
        return json.loads(path.read_text()) if path.exists() else {}

    def merged(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (HF ``<module>.weight``) plus scale B A when the adapter has a pair for that module."""
        pair = self.pairs.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if pair is None:
            return tensor
        a, b = pair
        return (tensor.float() + self.scale * (b.float() @ a.float())).to(tensor.dtype)


def merged_checkpoint(base_dir: str | os.PathLike, adapter: PeftAdapter, *, drop: tuple[str, ...] = ()
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """The base checkpoint's tensors, file by file, with the adapter merged in; ``drop`` left out.
    Every adapter pair must find its tensor (a mismatch of base and adapter is an error, not a no-op)."""
    from safetensors import safe_open

    from models.hf_checkpoint import read_hf_config

    if read_hf_config(base_dir).get("quantization_config"):
        raise ValueError(f"--model_path {base_dir}: config.json has a quantization_config; merge into an "
                         "unquantised model (tools.convert.hf_to_mcore then mcore_to_hf dequantises FP8 block scales)")
    files = sorted(Path(base_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"--model_path {base_dir}: no safetensors files")
    used = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name in drop:
                    continue
                if name.removesuffix(".weight") in adapter.pairs:
                    used.add(name.removesuffix(".weight"))
                yield name, adapter.merged(name, handle.get_tensor(name))
    unused = sorted(set(adapter.pairs) - used)
    if unused:
        raise ValueError(f"--lora_path {adapter.path} adapts {unused[0]} (and {len(unused) - 1} more), which "
                         f"--model_path {base_dir} does not have: trained on another base model?")
