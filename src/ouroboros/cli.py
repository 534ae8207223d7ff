"""The `ouroboros` command: generate (streamed), tune, bench, serve."""

from __future__ import annotations

import argparse
import sys
import time

from . import __version__
from .arguments import (
    DEFAULT_METHOD,
    add_config_arguments,
    add_model_arguments,
    apply_threads,
    check_minimums,
    check_model_arguments,
    config_from_args,
    draft_vocab_from_args,
    fast_from_args,
    is_missing_extra,
    method_help,
    missing_extra,
)
from .errors import InvalidArgumentError, OuroborosError
from .methods import METHODS, get_method

GENERATE_DESCRIPTION = """Generate text from a prompt, streamed to stdout, then a one-line speed summary on stderr
(tokens/s, tokens per target forward). The output is the target's own greedy (or sampled) decoding,
whatever the method: exactly in float32; in bfloat16 (the default) it may differ where the target's
two best logits tie or nearly tie, as HF's own assisted generation does. The speed depends on the
machine: `ouroboros tune` and `ouroboros bench` measure yours. Ctrl-C stops the stream and prints
the summary so far."""


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import generate, make_verifier
    from .loading import load_pair

    config = config_from_args(args)
    if not args.prompt.strip():
        raise InvalidArgumentError("the prompt is empty")
    check_minimums(("--max-new-tokens", args.max_new_tokens, 1))
    make_verifier(args.temperature > 0, args.temperature, args.top_k, args.top_p, args.min_p, args.seed, None)
    check_model_arguments(args, needs_draft=get_method(args.method).needs_draft, what=f"--method {args.method}")
    apply_threads(args)
    target, draft, tokenizer = load_pair(args.target, args.draft, dtype=args.dtype, device=args.device)
    if args.chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = args.prompt
    input_ids = tokenizer(text, return_tensors="pt").input_ids.to(target.device)
    costs = None
    if get_method(args.method).needs_costs:  # read here, so that a first measurement is announced and timed apart
        from .engine import cost_table

        costs = cost_table(target, draft, fast=fast_from_args(args), progress=True,
                           draft_vocab=draft_vocab_from_args(args))
        if costs.meta["measure_seconds"]:
            print(f"ouroboros: forward costs measured in {costs.meta['measure_seconds']:.1f} s (once per machine "
                  "and setting; not counted below)", file=sys.stderr)
    streamer = counting_streamer(tokenizer)
    start = time.perf_counter()
    try:
        out = generate(target, input_ids, draft=draft, method=args.method, max_new_tokens=args.max_new_tokens,
                       config=config, streamer=streamer, do_sample=args.temperature > 0,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                       seed=args.seed, costs=costs, fast=fast_from_args(args),
                       draft_vocab=draft_vocab_from_args(args))
    except KeyboardInterrupt:
        streamer.end()
        seconds = time.perf_counter() - start
        print(f"\n[{args.method}] interrupted after {streamer.new_tokens} tokens in {seconds:.2f} s: "
              f"{streamer.new_tokens / seconds if seconds > 0 else 0.0:.2f} tokens/s", file=sys.stderr)
        return 130
    s = out.stats
    if s.plan:
        print(f"\n{s.plan}", file=sys.stderr)
    print(f"\n{summary_line(args.method, s)}", file=sys.stderr)
    return 0


def summary_line(method: str, stats) -> str:
    """The speed summary: tokens/s over the generating time only; compiling, paid once per process
    and shape, is said apart."""
    line = (f"[{method}] {stats.new_tokens} tokens in {stats.decode_time:.2f} s: {stats.tokens_per_second:.2f} "
            f"tokens/s, {stats.mean_accepted:.2f} tokens per target forward ({stats.target_forwards} target, "
            f"{stats.draft_forwards} draft forwards)")
    if stats.compile_seconds:
        line += f"; compiling or loading the fast path took {stats.compile_seconds:.1f} s more (not counted)"
    return line


def counting_streamer(tokenizer):
    """transformers' TextStreamer (prompt skipped) that also counts the new tokens it prints, so that
    an interrupted generation can still say how far it got."""
    from transformers import TextStreamer

    class CountingStreamer(TextStreamer):
        new_tokens = 0

        def put(self, value):
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.new_tokens += value.numel()
            super().put(value)

    return CountingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def add_missing_extra_parser(sub, command: str, extra: str, missing: str) -> None:
    """A stand-in sub-command that says which extra to install, instead of a traceback."""
    def explain(args: argparse.Namespace) -> int:
        raise missing_extra(extra, missing, f"'ouroboros {command}'")

    # No prefix characters: every option the real command would take (--port 8000, -h) lands in
    # `rest` instead of failing as "unrecognized arguments" before the install hint is shown.
    stub = sub.add_parser(command, help=f"(needs the [{extra}] extra)", add_help=False, prefix_chars="\0")
    stub.add_argument("rest", nargs=argparse.REMAINDER)
    stub.set_defaults(func=explain)


def cmd_tune(args: argparse.Namespace) -> int:
    """Measure the target's and draft's forward cost over 1-16 tokens on this device and dtype, and
    the draft's agreement with the target, then print and optionally save the OuroborosConfig sizes a
    cost model picks (gamma, phrase drafting, window, phrases per step, branches); level, pool size
    and the switches come from the config flags as given. Use the file with --config in generate,
    bench and serve."""
    import torch

    from .loading import load_pair
    from .roofline import memory_bound
    from .sizing import save_sizing, tune

    base = config_from_args(args)
    if args.acceptance is not None and not 0 <= args.acceptance < 1:
        raise InvalidArgumentError(f"--acceptance must be in [0, 1), got {args.acceptance}")
    check_minimums(("--slack", args.slack, 1))
    check_model_arguments(args, needs_draft=True, what="tune (it measures the draft too)")
    apply_threads(args)
    target, draft, tokenizer = load_pair(args.target, args.draft, dtype=args.dtype, device=args.device)
    print(f"measuring on {args.device}, {args.dtype}, {torch.get_num_threads()} threads ...", file=sys.stderr)
    from .engine import cost_table

    costs = cost_table(target, draft, fast=fast_from_args(args), progress=True, draft_vocab=draft_vocab_from_args(args))
    sizing = tune(target, draft, tokenizer, acceptance=args.acceptance, slack=args.slack, base=base, costs=costs)
    print(sizing.report())
    print(memory_bound(target, sizing.target.at(1)).line())
    if args.out:
        save_sizing(sizing, args.out)
        print(f"saved: {args.out} (use it with --config {args.out})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench import add_bench_parser

    parser = argparse.ArgumentParser(prog="ouroboros", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text, streamed, with a speed summary",
                         description=GENERATE_DESCRIPTION)
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS, help=method_help())
    gen.add_argument("--max-new-tokens", type=int, default=128,
                     help="stop after this many new tokens, or at EOS (default: 128)")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                     help="wrap the prompt in the target's chat template (default: on)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily; > 0 samples")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    gen.add_argument("--min-p", type=float, default=0.0, help="min-p sampling threshold (0 = off)")
    gen.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    add_model_arguments(gen)
    add_config_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    tune = sub.add_parser("tune", help="measure forward costs on this device and choose OuroborosConfig sizes",
                          description=cmd_tune.__doc__)
    tune.add_argument("--acceptance", type=float, default=None,
                      help="the draft's per-token acceptance (default: measured on a built-in sample text)")
    tune.add_argument("--slack", type=float, default=1.25,
                      help="a forward over k tokens counts as free up to this multiple of a one-token forward "
                           "(default: 1.25)")
    tune.add_argument("--out", metavar="FILE", help="write the sizing (config, costs, prediction) as JSON here")
    add_model_arguments(tune)
    add_config_arguments(tune)
    tune.set_defaults(func=cmd_tune)

    add_bench_parser(sub)
    add_optional_parser(sub, "serve", "serve", _serve_parser)
    return parser


def _serve_parser():
    from .server import add_serve_parser

    return add_serve_parser


def add_optional_parser(sub, command: str, extra: str, load) -> None:
    """Add the sub-command that `load()` returns; if `extra`'s own packages are missing, a stand-in
    that names the extra. Any other missing module is a bug and is raised."""
    try:
        add = load()
    except ModuleNotFoundError as exc:
        if not is_missing_extra(exc, extra):
            raise
        add_missing_extra_parser(sub, command, extra, exc.name)
    else:
        add(sub)


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user's mistake (the package's own errors, a bad path) is one line on
    stderr and exit status 2; anything else is a bug and keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (OuroborosError, OSError) as exc:
        print(f"ouroboros {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
