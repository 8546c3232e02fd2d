"""The `radio` command: `serve`, `render` and `tiny-model`.

Each subcommand parses its flags, turns bad input into one plain message on stderr and exit
code 2 (never a traceback), and hands the work to the package that owns it.
"""

from __future__ import annotations

import argparse
import logging
import sys

from radio.errors import CliError


def _add_tiny_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tiny-model", help="write a random-weight MusicGen for tests and offline demos"
    )
    p.add_argument("dir", help="folder to write the model into")
    p.add_argument("--stereo", action="store_true", help="8 interleaved codebooks (stereo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument(
        "--size",
        choices=("tiny", "small"),
        default="tiny",
        help="tiny: fast tests; small: exact musicgen-small shapes, for benchmarks",
    )
    p.set_defaults(func=_cmd_tiny_model)


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from engine.tiny import build_tiny_model

    logging.getLogger(__name__).info(
        "writing a random-weight %s MusicGen to %s", args.size, args.dir
    )
    build_tiny_model(args.dir, size=args.size, stereo=args.stereo, seed=args.seed)
    print(f"wrote a random-weight {args.size} MusicGen to {args.dir} (it makes noise, not music)")
    return 0


def _add_render(sub: argparse._SubParsersAction) -> None:
    from radio.render_cli import add_render_parser

    add_render_parser(sub)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from radio.serve_cli import add_serve_parser

    add_serve_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radio", description="Endless Radio: music that never ends."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_render(sub)
    _add_tiny_model(sub)
    return parser


def _quiet_libraries() -> None:
    # transformers (`radio tiny-model`) warns that MusicGen's pad id (2048) lies outside the
    # codebook vocabulary: true of every published checkpoint, and harmless. Keep the logs
    # about the radio.
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except CliError as e:
        print(f"radio: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
