"""Command-line arguments shared by `generate`, `tune`, `bench` and `serve`: which models, which
sizes, how many threads. Its own module so that the subcommands do not import one another."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from .config import OuroborosConfig
from .errors import InvalidArgumentError

CONFIG_FIELDS = [name for name in OuroborosConfig.__dataclass_fields__]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that loads the model pair."""
    parser.add_argument("--target", help="target model directory (default: the built-in Qwen2.5-Coder 1.5B)")
    parser.add_argument("--draft", help="draft model directory (default: the built-in Qwen2.5-Coder 0.5B)")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    parser.add_argument("--device", default="cpu", help="torch device for both models (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


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
            parser.add_argument(flag, dest=name, type=int, default=None, help=f"(default {value})")


def config_from_args(args: argparse.Namespace) -> OuroborosConfig:
    """The --config file's sizes (or the defaults), overridden by the flags given."""
    from .sizing import load_config

    base = load_config(args.config) if getattr(args, "config", None) else OuroborosConfig()
    given = {name: getattr(args, name) for name in CONFIG_FIELDS if getattr(args, name, None) is not None}
    return dataclasses.replace(base, **given)


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidArgumentError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
