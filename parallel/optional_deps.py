"""Which optional GPU packages (Transformer Engine, flash-attn, ring-flash-attn) this process can use.

A package counts as present only if it imports: ``ring-flash-attn`` installs without ``flash-attn``
and then fails to import; a Transformer Engine built for another CUDA / torch installs and then
raises ``OSError`` (a missing ``libcudart`` / ``libtransformer_engine.so``) or ``RuntimeError`` at
import. Any exception counts as "absent", with its message kept as the reason, so that every
report names the real cause instead of calling the package installed.

Kept free of torch and megatron imports: :func:`parallel.megatron_patches.guard_transformer_engine`
runs this before megatron-core is first imported.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass

# The optional packages and the module whose import proves each one usable.
OPTIONAL_PACKAGES = {
    "transformer_engine": "transformer_engine.pytorch",
    "flash_attn": "flash_attn",
    "ring_flash_attn": "ring_flash_attn",
}


@dataclass(frozen=True)
class Probe:
    """``installed``: pip put it on the path; ``importable``: ``import`` succeeded here."""

    name: str
    installed: bool
    importable: bool
    reason: str = ""

    @property
    def status(self) -> str:
        """One word and the cause, for the check scripts' reports."""
        if self.importable:
            return "imports"
        if not self.installed:
            return "absent (its path stays off)"
        return f"installed but does not import ({self.reason}); its path stays off"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):  # a blocked module (sys.modules entry None) or a broken package
        return False


def probe(name: str, module: str | None = None) -> Probe:
    """Import ``module`` (default: the package's proof module) and say whether that worked."""
    module = module or OPTIONAL_PACKAGES.get(name, name)
    if not _installed(module):
        return Probe(name, installed=False, importable=False, reason="not installed")
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - OSError / RuntimeError from a broken CUDA extension too
        return Probe(name, installed=True, importable=False, reason=f"{type(error).__name__}: {error}"[:300])
    return Probe(name, installed=True, importable=True)


def block(package: str) -> None:
    """Make every later ``import package[...]`` raise ImportError (what libraries' optional-import
    guards catch), dropping the half-imported modules a failed import leaves behind."""
    for loaded in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[loaded]
    sys.modules[package] = None  # the import system's own "not importable" marker


def probe_all() -> dict[str, Probe]:
    return {name: probe(name) for name in OPTIONAL_PACKAGES}
