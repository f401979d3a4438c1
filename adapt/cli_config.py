"""How `adapt` commands are bound: options from the config dataclasses, `--config FILE`, lazily built commands and
the one error path.

A run's options are its config dataclass: each field is the option `--field-name`, with the field's default and its
`metadata["help"]`, through the command's `__signature__` (typer reads signatures). Hand-written rather than tyro or
jsonargparse because those parse with argparse and own the whole program, while `adapt` is one typer app that many
commands extend.

    values: command line > --config FILE (YAML, or the `config` entry of an adapter) > the dataclass default

Commands whose options need a heavy module (torch, peft) are built only when run or asked for help, so `adapt --help`
and `adapt tasks ...` start without importing torch.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

# Fields that are not options (machine-local, runtime-only or set by the run itself), by config class: the one place
# that says so. They are neither command-line options nor keys of a config file.
NOT_OPTIONS: dict[str, tuple[str, ...]] = {
    "TuneConfig": ("data_root", "progress"),
    "PretrainConfig": ("model", "data_root"),
    # The engine settings a run derives from its own config (length, lr, seed, device, run folder, checkpoints).
    "TrainConfig": ("out_dir", "lr", "weight_decay", "lr_multipliers", "warmup_steps", "max_steps", "epochs",
                    "batch_size", "eval_every", "checkpoint_every", "best_metric", "best_mode", "seed", "device",
                    "dtype", "amp", "distributed", "progress", "max_bad_steps"),
    "EngineConfig": ("keep_text",),
    "SweepConfig": ("data_root",),
}

CONFIG_HELP = ("YAML file of option values (as written to a run's config.yaml), or an adapter file whose training "
               "config to reuse; options given on the command line win")


class CommandError(Exception):
    """A refusal the CLI reports as one `error: ...` line with exit status `code`."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of config class `cls` that are user options."""
    skip = NOT_OPTIONS.get(cls.__name__, ())
    return [f for f in dataclasses.fields(cls) if f.init and f.name not in skip]


def field_default(f: dataclasses.Field) -> Any:
    """The field's default; `dataclasses.MISSING` for a required field."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_dict(config) -> dict[str, Any]:
    """The options of a config instance as plain YAML/JSON values: what `--config` reads back."""
    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return {f.name: plain(getattr(config, f.name)) for f in option_fields(type(config))}


def write_config(config, path: str | Path) -> Path:
    """Write `config_dict(config)` as YAML (atomically)."""
    import yaml

    from glip_io import atomic_write

    text = yaml.safe_dump(config_dict(config), sort_keys=False)
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def read_config_file(path: Path) -> dict[str, Any]:
    """Option values from a YAML file, or from the `config` header entry of an adapter (.safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix == ".safetensors":
        from adapt.adapter import read_adapter_header

        text = read_adapter_header(path).get("config")
        if not text:
            raise ValueError(f"adapter {path} holds no training config (written by an older glip-adapt); pass the "
                             "run's config.yaml instead")
        values = json.loads(text)
    else:
        import yaml

        try:
            values = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not valid YAML ({' '.join(str(error).split())}); fix the "
                             "file") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value, not a {type(values).__name__}")
    return values


def _unwrap(hint) -> tuple[Any, bool]:
    """(the type inside Optional, whether None is allowed)."""
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return (inner[0] if len(inner) == 1 else hint), len(inner) < len(typing.get_args(hint))
    return hint, False


def _scalar(kind, text: str):
    if kind is bool:
        lowered = str(text).lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{text!r} is not true or false")
        return lowered in ("true", "1", "yes")
    return kind(text)


def coerce(hint, value, label: str):
    """`value` (from a file or a parser) as the type `hint` says: Path, tuple, float from int, None where allowed."""
    kind, optional = _unwrap(hint)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{label} cannot be empty; give a value")
    origin = typing.get_origin(kind)
    try:
        if origin is tuple:
            args = typing.get_args(kind)
            items = [p for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(coerce(args[0], item, label) for item in items)
            return tuple(coerce(a, item, label) for a, item in zip(args, items, strict=True))
        if origin in (dict, Mapping) or kind in (dict, Any):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("a whole number is needed")
        if kind in (int, str, Path, bool) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
        if kind in (int, float, str, Path, bool) and not isinstance(value, (list, dict)):
            return _scalar(kind, value)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{label}={value!r}: expected {getattr(kind, '__name__', kind)} ({error})") from None
    raise ValueError(f"{label}={value!r}: expected {getattr(kind, '__name__', kind)}")


def _option_parameter(f: dataclasses.Field, hint) -> inspect.Parameter:
    """The typer parameter of one config field: same name, default and help."""
    default = field_default(f)
    kind, optional = _unwrap(hint)
    help_text = f.metadata.get("help", "")
    extra: dict[str, Any] = {}
    annotation = Optional[kind] if optional or default is dataclasses.MISSING else kind
    if typing.get_origin(kind) is tuple:  # comma-separated on the command line, a list in a file
        annotation = str
        extra = {"parser": functools.partial(coerce, hint, label=option_name(f.name)),
                 "show_default": ",".join(str(v) for v in default) if default and default is not dataclasses.MISSING
                 else False}
    elif optional:  # "none" sets None (e.g. turns clipping off, or drops a run folder a config file names)
        extra = {"parser": functools.partial(coerce, hint, label=option_name(f.name))}
    decls = [option_name(f.name)]
    if kind is bool:  # a switch: --name / --no-name
        decls = [f"{decls[0]}/--no-{decls[0][2:]}"]
    info = typer.Option(*decls, help=help_text, **extra)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[annotation, info],
                             default=None if default is dataclasses.MISSING else default)


def bind_options(func: Callable, config: type, *, fixed: Mapping[str, Any] | None = None,
                 nested: Mapping[str, type] | None = None, hide: tuple[str, ...] = ()) -> Callable:
    """A typer command function: `func`'s own parameters, one option per field of `config` (and of each `nested`
    config class, whose values go into the config field named by its key) and `--config FILE`.

    `func(values, **own)` gets `values`, the keyword arguments for `config` given on the command line or in the file
    (plus `fixed`, which the command sets), and its own parameters, each resolved command line > file > default.
    `hide` names fields this command does not offer (a file may still set them)."""
    fixed, nested = dict(fixed or {}), dict(nested or {})
    own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "values"]
    own_names = {p.name for p in own}
    hints = {cls: typing.get_type_hints(cls) for cls in (config, *nested.values())}
    section_of: dict[str, str | None] = {}  # option name -> None (the config) or the nested field it goes into
    params = []
    for section, cls in ((None, config), *nested.items()):
        for f in option_fields(cls):
            if f.name in fixed or f.name in nested or f.name in section_of or f.name in own_names or f.name in hide:
                continue
            section_of[f.name] = section
            params.append(_option_parameter(f, hints[cls][f.name]))
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                                    annotation=Annotated[Optional[Path], typer.Option("--config", help=CONFIG_HELP)]))
    params.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
    file_keys = {f.name: hints[config][f.name] for f in option_fields(config)}
    required = [f.name for f in option_fields(config)
                if field_default(f) is dataclasses.MISSING and f.name not in fixed]

    @functools.wraps(func)
    def command(**kwargs):
        ctx, path = kwargs.pop("ctx"), kwargs.pop("config")
        values: dict[str, Any] = dict(fixed)
        own_values: dict[str, Any] = {}
        for key, value in (read_config_file(path) if path else {}).items():
            label = f"{path}: {key}"
            if key in fixed:
                if value != fixed[key]:
                    raise ValueError(f"{path} sets {key}: {value}, but this command runs {key} {fixed[key]}; run the "
                                     f"command for {value}, or drop the line")
            elif key in nested:
                if not isinstance(value, dict):
                    raise ValueError(f"{label} must be a mapping of {nested[key].__name__} fields")
                nested_hints = hints[nested[key]]
                for k in value:
                    if k not in nested_hints:
                        close = difflib.get_close_matches(k, nested_hints, n=1)
                        raise ValueError(f"{label}: unknown option {k!r}" + (f" (did you mean {close[0]!r}?)" if close
                                         else "") + f"; options under {key} are {', '.join(nested_hints)}")
                values[key] = {k: coerce(nested_hints[k], v, f"{label}.{k}") for k, v in value.items()}
            elif key in file_keys:
                values[key] = coerce(file_keys[key], value, label)
            elif key in own_names:
                own_values[key] = coerce(own_hints[key], value, label)
            else:
                known = [*file_keys, *nested, *own_names]
                close = difflib.get_close_matches(key, known, n=1)
                raise ValueError(f"{path}: unknown option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                                 + f"; options are {', '.join(known)}")
        for name, value in kwargs.items():
            explicit = ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")
            if name not in section_of:
                if explicit or name not in own_values:
                    own_values[name] = value
            elif explicit:
                section = section_of[name]
                if section is None:
                    values[name] = value
                else:
                    values[section] = {**values.get(section, {}), name: value}
        missing = [name for name in required if values.get(name) is None]
        if missing:
            raise ValueError(f"missing {', '.join(option_name(n) for n in missing)}: pass it on the command line or "
                             f"as `{missing[0]}:` in --config FILE")
        return func(values, **own_values)

    own_hints = {p.name: p.annotation for p in own}
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {}
    del command.__wrapped__  # typer must read the signature above, not func's
    return command


class LazyCommand(TyperCommand):
    """A command listed by name and summary, built (with its heavy imports) only when run or asked for help."""

    def __init__(self, name: str, summary: str, build: Callable[[], TyperCommand]):
        super().__init__(name, help=summary, short_help=summary)
        self._build = build

    @functools.cached_property
    def command(self) -> TyperCommand:
        return self._build()

    def make_context(self, info_name, args, parent=None, **extra):
        return self.command.make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        return self.command.invoke(ctx)

    def get_params(self, ctx):
        return self.command.get_params(ctx)

    def get_help(self, ctx) -> str:
        return self.command.get_help(ctx)


def build_command(name: str, func: Callable) -> TyperCommand:
    """The typer command of one function (for LazyCommand builders)."""
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name)(func)
    return typer.main.get_command(single)


class CommandGroup(TyperGroup):
    """The `adapt` command group: every failure of a command is one `error: ...` line and its exit status.

    Subclasses made by `with_lazy` also list lazily built commands."""

    lazy: Callable[[], dict[str, tuple[str, Callable[[], TyperCommand]]]] = staticmethod(dict)

    @classmethod
    def with_lazy(cls, commands: Callable[[], dict[str, tuple[str, Callable[[], TyperCommand]]]]) -> type:
        """A group class that also lists `commands()` ({name: (summary, build)}), read each time the app is built."""
        return type("AdaptCommandGroup", (cls,), {"lazy": staticmethod(commands)})

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name, (summary, build) in self.lazy().items():
            self.add_command(LazyCommand(name, summary, build), name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as error:
            if os.environ.get("ADAPT_DEBUG"):
                raise
            typer.echo(f"error: {user_message(error)}", err=True)
            raise typer.Exit(getattr(error, "code", 2) if isinstance(error, CommandError) else 2) from None


# Known failures and the one line a user sees for them; anything else is reported as a bug, still in one line.
_PICKLE_HINT = ("holds pickled objects other than tensors, which this toolkit will not unpickle (that could run code); "
                "pass a .safetensors checkpoint, a checkpoint name (e.g. glip-nano) or an official GLIP .pth")


def _argument(option: str) -> str | None:
    """The value given to `option` on this command line, for naming it in an error."""
    import sys

    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def user_message(error: BaseException) -> str:
    """One line for `error`: what went wrong and what to do next (never a traceback, never torch's advice)."""
    import pickle

    from PIL import UnidentifiedImageError

    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, CommandError):
        return text
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text:
        source = _argument("--base")
        return f"{repr(source) if source else 'the checkpoint'} {_PICKLE_HINT}"
    if isinstance(error, UnidentifiedImageError):
        return f"{text.replace('cannot identify image file', 'cannot read image')}; pass a PNG, JPEG or WebP file"
    if isinstance(error, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return text if "check the path" in text or "choose another" in text else f"{text}; check the path"
    if isinstance(error, OSError) and "image" in text.lower():
        return f"{text}; the image is truncated or corrupt, re-export it"
    if isinstance(error, (ValueError, KeyError, TypeError, OSError)):
        return text.strip('"')
    return f"{type(error).__name__}: {text} (an internal error; rerun with ADAPT_DEBUG=1 for the traceback and report it)"
