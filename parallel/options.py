"""User options as typed dataclass fields: the one declaration a CLI flag is generated from.

    @dataclass(kw_only=True)
    class OptimConfig:
        learning_rate: float = option(1e-5, help="peak learning rate")
        weight_decay: float = option(0.0, flag="l2", help="weight decay")

A field made with :func:`option` is a flag (named after the field unless ``flag`` says
otherwise: OpenRLHF's or Megatron's name); a plain field is set by code, never by a flag.
Nothing here parses arguments (only ``engine/cli`` does); this module sits in the bottom layer
so that every config, ``parallel.config.ParallelConfig`` included, can declare its options.
Validation messages name options as ``--<flag>``; the CLI rewrites them to what the user typed
(``--actor_tensor_model_parallel_size`` for a role's ``--tensor_model_parallel_size``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING
from typing import Any

OPTION = "option"  # the dataclasses.field metadata key


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    help: str
    flag: str | None = None  # default: the field name
    aliases: tuple[str, ...] = ()  # more flag names for the same field
    value_aliases: tuple[tuple[str, Any], ...] = ()  # flags that set the field to a fixed value
    metavar: str | None = None


def option(default: Any = MISSING, *, help: str, flag: str | None = None, aliases: tuple[str, ...] = (),
           value_aliases: dict[str, Any] | None = None, metavar: str | None = None) -> Any:
    """A dataclass field that is a user option. Without a default the flag is required."""
    info = OptionInfo(help=help, flag=flag, aliases=tuple(aliases),
                      value_aliases=tuple((value_aliases or {}).items()), metavar=metavar)
    return dataclasses.field(default=default, metadata={OPTION: info})


def option_info(field: dataclasses.Field) -> OptionInfo | None:
    return field.metadata.get(OPTION)


def flag_name(field: dataclasses.Field) -> str:
    """The flag a field is spelled as in validation messages (before any CLI prefix)."""
    info = option_info(field)
    return info.flag if info is not None and info.flag else field.name
