"""The CLI generated from typed configs: one declaration per option, in the config's dataclass.

A job is a dataclass whose fields are config dataclasses (groups)::

    @dataclass(kw_only=True)
    class PPOJob:
        actor: RoleOptions = group(prefix="actor_", title="actor role")
        data: DataConfig = group(rename={"dataset": "prompt_data"}, exclude=("eval_split",))
        derived: ClassVar[dict] = {"data.seed": "models.seed"}   # plain fields fed by one flag

    job = parse_job(PPOJob, argv, description=__doc__)   # a PPOJob, every field typed

Every field made with ``parallel.options.option`` becomes a flag (its help, type, ``Literal``
choices, aliases); nested dataclasses add their options flat, under the group's prefix; plain
fields are left to code (their defaults, or ``overrides`` of ``parse_job``). Two fields that
would share a flag are an error when the parser is built, so a flag always maps to one field.

OpenRLHF's flags that are not fields (``engine/cli/openrlhf_compat.py``: DeepSpeed-only ones,
LoRA, ...) are added for the job's CLI from that one table: ``parse_job`` refuses a refused one
with an OptionError naming it, prints one notice line per accepted one (rank 0 only) and builds
the job without them; a fan-out sets the fields of the flags it stands for.

OpenRLHF 0.10+'s dotted spellings (``engine/cli/openrlhf_dotted.py``: ``--ds.zero_stage``,
``--actor.adam.lr``, ...) of the flags a job has are more option strings of the same argparse
actions, so they have the same effect and the last of two spellings given wins, as for any alias;
``--help`` leaves them out and says so in one line at the end.

Validation errors of the configs name flags as ``--<field flag>``; they are rewritten to the
flag the user typed (``--actor_tensor_model_parallel_size``, ``--prompt_data``) and raised as
:class:`OptionError` (a ``ValueError``). ``naming_flags(job_cls, "actor")`` does the same for
checks made later (model shapes against a role's grid).

Why not a library: tyro nests prefixes as ``--actor.tensor_model_parallel_size`` and
simple-parsing adds a ``--noX`` twin to every boolean; neither rewrites validation errors to
the prefixed flag. This module is the ~200 lines of it that this project needs.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import re
import sys
import types
import typing
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field
from typing import Any, Iterator, Literal, get_args, get_origin

from engine.cli.openrlhf_compat import Foreign, entries_for
from engine.cli.openrlhf_dotted import BY_VALUE, CLIS, twins
from parallel.options import flag_name, option_info

GROUP = "option_group"


@dataclass(frozen=True)
class GroupInfo:
    prefix: str = ""
    title: str | None = None
    rename: dict[str, str] = field(default_factory=dict)  # dotted field path -> flag (before the prefix)
    exclude: tuple[str, ...] = ()  # dotted paths: not flags in this job (their defaults stand)
    defaults: dict[str, Any] = field(default_factory=dict)  # dotted path -> this job's default
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # dotted path -> extra flag names
    value_aliases: dict[str, dict[str, Any]] = field(default_factory=dict)  # dotted path -> {flag: fixed value}


def group(*, prefix: str = "", title: str | None = None, rename: dict | None = None, exclude: tuple = (),
          defaults: dict | None = None, aliases: dict | None = None, value_aliases: dict | None = None,
          factory=None) -> Any:
    """A job field holding one config group (``factory`` builds it when the job is made in code)."""
    info = GroupInfo(prefix, title, dict(rename or {}), tuple(exclude), dict(defaults or {}), dict(aliases or {}),
                     dict(value_aliases or {}))
    extra = {"default_factory": factory} if factory is not None else {}
    return dataclasses.field(metadata={GROUP: info}, **extra)


class OptionError(ValueError):
    """A bad option value; the message names the flag as the user typed it."""


@dataclass(frozen=True)
class Flag:
    """One option field of a job and the flag(s) it is set by."""

    path: tuple[str, ...]  # field names from the job down to the option
    flag: str  # without "--"
    canonical: str  # how the config's own messages spell it
    aliases: tuple[str, ...]
    value_aliases: tuple[tuple[str, Any], ...]
    field: dataclasses.Field
    type: Any
    default: Any  # MISSING: required
    owner: type  # the dataclass declaring it (its help section)

    @property
    def group(self) -> str:
        """The job field it belongs to."""
        return self.path[0]

    @property
    def dest(self) -> str:
        return ".".join(self.path)

    @property
    def option_strings(self) -> list[str]:
        return [f"--{name}" for name in (self.flag, *self.aliases, *(n for n, _ in self.value_aliases))]


# ----- walking the dataclasses ----------------------------------------------------------------
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


@functools.cache
def job_flags(job_cls) -> tuple[Flag, ...]:
    """Every flag of a job, in declaration order; raises if two fields would share a flag."""
    flags: list[Flag] = []
    hints = _hints(job_cls)
    for f in dataclasses.fields(job_cls):
        info: GroupInfo = f.metadata.get(GROUP) or GroupInfo()
        if not _is_dataclass_type(hints[f.name]):
            raise TypeError(f"{job_cls.__name__}.{f.name}: a job field must be a config dataclass")
        flags += _walk(hints[f.name], (), info, f.name)
    seen: dict[str, Flag] = {}
    for flag in flags:
        for name in flag.option_strings:
            if name in seen:
                raise TypeError(f"{name} would set both {seen[name].dest} and {flag.dest}")
            seen[name] = flag
    return tuple(flags)


def _walk(cls, rel: tuple[str, ...], info: GroupInfo, group_name: str) -> list[Flag]:
    """The flags of ``cls`` at ``rel`` inside job field ``group_name`` (nested dataclasses flat)."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, sub = hints[f.name], rel + (f.name,)
        dotted = ".".join(sub)
        if dotted in info.exclude:
            continue
        opt = option_info(f)
        if opt is None:
            if _is_dataclass_type(tp):
                out += _walk(tp, sub, info, group_name)
            continue
        default = info.defaults.get(dotted, _field_default(f))
        flag = info.prefix + info.rename.get(dotted, opt.flag or f.name)
        aliases = tuple(info.prefix + a for a in (*opt.aliases, *info.aliases.get(dotted, ())))
        value_aliases = tuple((info.prefix + name, value)
                              for name, value in (*opt.value_aliases, *info.value_aliases.get(dotted, {}).items()))
        out.append(Flag((group_name, *sub), flag, flag_name(f), aliases, value_aliases, f, tp, default, cls))
    return out


# ----- argparse -------------------------------------------------------------------------------
def unwrap_optional(tp):
    """``X`` for ``X | None``; any other type as it is."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _argparse_kwargs(flag: Flag) -> dict:
    tp = unwrap_optional(flag.type)
    info = option_info(flag.field)
    kwargs: dict[str, Any] = {"dest": flag.dest, "help": info.help}
    if flag.default is MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = flag.default
        if flag.default is not None and not isinstance(flag.default, bool) and flag.default != ():
            kwargs["help"] += f" (default: {_show(flag.default)})"
    kwargs["metavar"] = info.metavar or getattr(tp, "__name__", "VALUE").upper()
    if tp is bool:
        if flag.default is True and not flag.flag.split("_", 1)[0] == "no":
            raise TypeError(f"--{flag.flag}: a boolean option that defaults to True needs a no_* flag name")
        kwargs["action"] = "store_false" if flag.default is True else "store_true"
        kwargs.pop("metavar", None)
        return kwargs
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        kwargs.pop("metavar")
        return {**kwargs, "choices": list(args), "type": type(args[0])}
    if origin in (tuple, list):
        fixed = origin is tuple and Ellipsis not in args
        kwargs["metavar"] = info.metavar or args[0].__name__.upper()
        return {**kwargs, "nargs": len(args) if fixed else "+", "type": args[0]}
    return {**kwargs, "type": tp}


def _summary(cls) -> str:
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc and not doc.startswith(cls.__name__ + "(") else cls.__name__


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help without OpenRLHF 0.10+'s dotted twins (the epilog says they are accepted)."""

    # The one method that spells an action's option strings in the help (argparse since 3.2; the
    # usage line shows only the first, always the flat name).
    def _format_action_invocation(self, action):
        flat = [s for s in action.option_strings if "." not in s]
        if flat != action.option_strings:
            action = copy.copy(action)
            action.option_strings = flat
        return super()._format_action_invocation(action)


DOTTED_EPILOG = ("OpenRLHF 0.10+'s dotted names of these flags are accepted too, with the same effect\n"
                 "(--ds.zero_stage for --zero_stage, --data.max_len for --max_len, ...): the table is\n"
                 "engine/cli/openrlhf_dotted.py.")


def _spellings(names, dotted: dict[str, tuple[str, ...]]) -> list[str]:
    """Option strings of flags ``names``: each, then the dotted twins of them all."""
    return [f"--{n}" for n in names] + [f"--{d}" for n in names for d in dotted.get(n, ())]


def build_parser(job_cls, *, description: str | None = None) -> argparse.ArgumentParser:
    dotted = _dotted_twins(job_cls)
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter,
                                     epilog=DOTTED_EPILOG if dotted else None)
    sections: dict[tuple, argparse._ArgumentGroup] = {}
    titles = {f.name: (f.metadata.get(GROUP) or GroupInfo()).title or f.name.replace("_", " ")
              for f in dataclasses.fields(job_cls)}
    actions: dict[str, argparse.Action] = {}  # flag (no "--") -> its action
    for flag in job_flags(job_cls):
        key = (flag.group, flag.owner)
        if key not in sections:
            sections[key] = parser.add_argument_group(f"{titles[flag.group]}: {_summary(flag.owner)}")
        section = sections[key]
        kwargs = _argparse_kwargs(flag)
        action = section.add_argument(*_spellings((flag.flag, *flag.aliases), dotted), **kwargs)
        actions.update(dict.fromkeys((flag.flag, *flag.aliases), action))
        for name, value in flag.value_aliases:
            actions[name] = section.add_argument(*_spellings((name,), dotted), dest=flag.dest, action="store_const",
                                                 const=value, help=f"alias of --{flag.flag} {value}")
    actions.update(_add_foreign_flags(parser, job_cls, dotted))
    _add_by_value_flags(parser, actions)
    return parser


# ----- OpenRLHF's flags that are not options (engine/cli/openrlhf_compat.py) -------------------
_FOREIGN = "openrlhf:"  # argparse dest prefix of the entries (never a field path)


def cli_name(job_cls) -> str:
    """The CLI a job belongs to: its module's name (``engine.cli.train_sft`` -> ``train_sft``), also
    when the module runs as ``__main__`` (``python -m``: the name is in its spec)."""
    spec = getattr(sys.modules.get(job_cls.__module__), "__spec__", None)
    return (spec.name if spec is not None else job_cls.__module__).rsplit(".", 1)[-1]


@functools.cache
def foreign_flags(job_cls) -> tuple[Foreign, ...]:
    """The OpenRLHF table entries of a job's CLI; an entry that is also an option of the job (or
    fans out to a flag it does not have) is an error, so a flag is a field or an entry, never both."""
    entries = entries_for(cli_name(job_cls))
    options = {s for f in job_flags(job_cls) for s in f.option_strings}
    for entry in entries:
        if f"--{entry.flag}" in options:
            raise TypeError(f"--{entry.flag} is an option of {job_cls.__name__} and an entry of the OpenRLHF table")
        missing = [t for t in entry.fans_out_to if f"--{t}" not in options]
        if missing:
            raise TypeError(f"--{entry.flag} fans out to flags {job_cls.__name__} does not have: {missing}")
    return entries


_TYPED = "typed:"  # argparse dest prefix: how an entry was spelled (dotted or flat), for its notice


class _Entry(argparse.Action):
    """An OpenRLHF table entry: its value (True for a switch) and the spelling it was given with."""

    def __init__(self, option_strings, dest, *, switch: bool, **kwargs):
        self.switch = switch
        super().__init__(option_strings, dest, **({"nargs": 0} if switch else {}), **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True if self.switch else values)
        setattr(namespace, _TYPED + self.dest, option_string)


class _ByValue(argparse.Action):
    """An OpenRLHF 0.10+ valued flag standing for a 2025 switch (``--ds.param_dtype bf16``: ``--bf16``)."""

    def __init__(self, option_strings, dest, *, switch: argparse.Action, meaning: dict[str, bool], **kwargs):
        self.switch, self.meaning = switch, meaning
        super().__init__(option_strings, dest, choices=list(meaning), **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if self.meaning[values]:  # False: as if the switch were not given
            self.switch(parser, namespace, [], f"{option_string} {values}")


def _add_by_value_flags(parser: argparse.ArgumentParser, actions: dict[str, argparse.Action]) -> None:
    for dotted, (flat, meaning) in BY_VALUE.items():
        if flat in actions:
            parser.add_argument(f"--{dotted}", action=_ByValue, dest=actions[flat].dest, default=argparse.SUPPRESS,
                                switch=actions[flat], meaning=meaning, help=argparse.SUPPRESS)


def _flat_names(job_cls) -> set[str]:
    """Every flag of a job of OpenRLHF's CLIs (options, their aliases, OpenRLHF table entries), without "--"."""
    if cli_name(job_cls) not in CLIS:
        return set()
    return {s[2:] for f in job_flags(job_cls) for s in f.option_strings} | {e.flag for e in foreign_flags(job_cls)}


@functools.cache
def _dotted_twins(job_cls) -> dict[str, tuple[str, ...]]:
    """Flat flag of the job -> its OpenRLHF 0.10+ dotted spellings."""
    return twins(_flat_names(job_cls), cli_name(job_cls))


def dotted_flags(job_cls) -> dict[str, str]:
    """Every OpenRLHF 0.10+ dotted flag a job accepts -> the flat flag it stands for."""
    out = {d: flat for flat, ds in _dotted_twins(job_cls).items() for d in ds}
    out.update({d: flat for d, (flat, _) in BY_VALUE.items() if flat in _flat_names(job_cls)})
    return out


class _FanOut(argparse.Action):
    """One flag setting several options (their dests) to its value."""

    def __init__(self, option_strings, dest, *, targets: tuple[str, ...], **kwargs):
        self.targets = targets
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        for target in self.targets:
            setattr(namespace, target, values)


def _add_foreign_flags(parser: argparse.ArgumentParser, job_cls, dotted) -> dict[str, argparse.Action]:
    entries = foreign_flags(job_cls)
    if not entries:
        return {}
    actions = {}
    by_flag = {f.flag: f for f in job_flags(job_cls)}
    section = parser.add_argument_group("OpenRLHF flags: accepted with a one-line notice, aliases of several "
                                        "options here, or refused with the reason")
    for entry in entries:
        kwargs: dict[str, Any] = {"dest": _FOREIGN + entry.flag, "default": argparse.SUPPRESS}
        if entry.fans_out_to:
            targets = [by_flag[name] for name in entry.fans_out_to]
            kwargs.update(action=_FanOut, targets=tuple(t.dest for t in targets), type=unwrap_optional(targets[0].type),
                          help="alias of " + ", ".join(f"--{t.flag}" for t in targets))
        else:
            refused = "refused" + (f" unless {' / '.join(map(str, entry.accepted))}" if entry.accepted else "")
            kwargs["help"] = f"{refused}: {entry.says}" if entry.refused else entry.says
            kwargs.update(action=_Entry, switch=entry.type is None)
            if entry.type is not None:
                kwargs.update(type=entry.type, nargs=entry.nargs, metavar=entry.type.__name__.upper())
        actions[entry.flag] = section.add_argument(*_spellings((entry.flag,), dotted), **kwargs)
    return actions


def take_foreign_flags(job_cls, parsed: dict[str, Any]) -> list[str]:
    """Remove the OpenRLHF entries from ``parsed``: their notice lines; a refused value raises
    an OptionError naming the flag. (Fan-outs have already set their options.)"""
    notices = []
    for entry in foreign_flags(job_cls):
        if _FOREIGN + entry.flag not in parsed:
            continue
        value = parsed.pop(_FOREIGN + entry.flag)
        typed = parsed.pop(_TYPED + _FOREIGN + entry.flag, None)
        if entry.refuses(value):
            raise OptionError(entry.line(value, typed))
        notices.append(entry.line(value, typed))
    return notices


def print_notices(notices: list[str]) -> None:
    """One line each, on rank 0 only (under torchrun every rank parses the same command line)."""
    if os.environ.get("RANK", "0") != "0":
        return
    for line in notices:
        print(f"note: {line}", file=sys.stderr, flush=True)


# ----- building the configs back --------------------------------------------------------------
_FLAG_TOKEN = re.compile(r"--([A-Za-z][A-Za-z0-9_]*)")


@contextmanager
def renaming_flags(mapping: dict[str, str], *, context: str = "") -> Iterator[None]:
    """Inside the block, a ValueError's ``--name`` becomes ``--mapping[name]`` (an OptionError,
    prefixed with ``context``); OptionErrors pass through as they are."""
    try:
        yield
    except OptionError:
        raise
    except ValueError as err:
        message = _FLAG_TOKEN.sub(lambda m: f"--{mapping.get(m.group(1), m.group(1))}", str(err))
        raise OptionError(context + message) from err


def _flag_names(flags):
    return renaming_flags({f.canonical: f.flag for f in flags if f.canonical != f.flag})


def naming_flags(job_cls, group_name: str):
    """Inside the block, ValueErrors name ``group_name``'s flags as the user typed them."""
    return _flag_names([f for f in job_flags(job_cls) if f.group == group_name])


def _convert(value, tp):
    tp = unwrap_optional(tp)
    if isinstance(value, list) and get_origin(tp) is tuple:
        return tuple(value)
    return value


def _construct(cls, path: tuple[str, ...], values: dict[str, Any], flags: tuple[Flag, ...]):
    """``cls`` at ``path`` from the parsed values (options) and overrides (plain fields)."""
    hints, kwargs = _hints(cls), {}
    for f in dataclasses.fields(cls):
        sub = path + (f.name,)
        dotted = ".".join(sub)
        if dotted in values:
            kwargs[f.name] = values[dotted]
        elif _is_dataclass_type(hints[f.name]) and any(k.startswith(dotted + ".") for k in values):
            kwargs[f.name] = _construct(hints[f.name], sub, values, flags)
    below = [f for f in flags if f.path[: len(path)] == path]
    with _flag_names(below):
        return cls(**kwargs)


def build_job(job_cls, parsed: dict[str, Any], overrides: dict[str, Any] | None = None):
    """The job from parsed option values (dest -> value) and plain-field ``overrides`` (dotted paths).

    ``job_cls.derived`` (dotted target -> dotted option) gives fields that are not flags of their
    own the value of one that is (one ``--seed`` for every config that needs a seed), before any
    config is constructed, so its validation sees the value the job runs with."""
    flags = job_flags(job_cls)
    types_by_dest = {f.dest: f.type for f in flags}
    values = {dest: _convert(v, types_by_dest[dest]) for dest, v in parsed.items()}
    for target, source in getattr(job_cls, "derived", {}).items():
        values[target] = values[source]
    values.update(overrides or {})
    return _construct(job_cls, (), values, flags)


def parse_job(job_cls, argv=None, *, description: str | None = None, overrides: dict[str, Any] | None = None):
    """Parse ``argv`` into a ``job_cls`` instance; a bad value raises ``OptionError`` naming the flag.
    OpenRLHF flags of the table are acted on: refused ones raise, notices are printed (rank 0)."""
    parsed = vars(build_parser(job_cls, description=description).parse_args(argv))
    notices = take_foreign_flags(job_cls, parsed)
    job = build_job(job_cls, parsed, overrides)
    print_notices(notices)
    return job


def run_cli(main, argv=None):
    """A CLI's ``__main__``: flag errors end the process with one line naming the flag, not a traceback."""
    from engine.runtime.path_lock import PathLockError
    from parallel.errors import LaunchError
    from parallel.preemption import Preempted

    try:
        return main(argv)
    except (OptionError, LaunchError, PathLockError) as err:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {err}")
    except Preempted as err:  # a signal stopped the run after its checkpoint: not a crash, no traceback
        print(f"{os.path.basename(sys.argv[0])}: {err}", file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
