"""`radio serve`: read the config, apply the command-line overrides, run the service.

`radio serve [--config FILE] [--model ID|DIR] [--host H] [--port P]`. Without `--config` the
built-in defaults are used (`config.toml` in the repository shows them all). A bad setting is one
line on stderr and exit code 2. Ctrl-C or SIGTERM closes the listeners and exits within seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from radio.errors import CliError

if TYPE_CHECKING:
    from radio.config import Config

log = logging.getLogger(__name__)


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the radio: MP3 mounts, HLS, web page, API")
    p.add_argument("--config", metavar="FILE", help="settings file (default: built-in defaults)")
    p.add_argument("--model", metavar="ID|DIR", help="hub id or local model folder (model.id)")
    p.add_argument("--host", metavar="H", help="address to listen on (server.host)")
    p.add_argument("--port", metavar="P", type=int, help="TCP port (server.port)")
    p.set_defaults(func=_cmd_serve)


def _config(args: argparse.Namespace) -> Config:
    from radio.config import ConfigError, load_config, with_overrides

    try:
        config = load_config(args.config)
        server = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        model = {"id": args.model} if args.model else {}
        return with_overrides(config, server=server, model=model)
    except ConfigError as e:
        raise CliError(str(e)) from None


def _cmd_serve(args: argparse.Namespace) -> int:  # never returns once serving
    config = _config(args)
    from engine.load_thread import Loading
    from engine.memory import freeze_long_lived, keep_freed_memory

    keep_freed_memory()  # before any thread has an arena of its own: see engine.memory

    loading = Loading(config.model)  # the weights load while the web stack is imported
    from aiohttp import web

    from engine import ModelLoadError
    from radio.app import init_app, load_model

    try:
        app = init_app(config, load_model(config, loading))
    except ModelLoadError as e:
        raise CliError(str(e)) from None
    except (OSError, ValueError) as e:
        raise CliError(f"cannot start: {e}") from None
    freeze_long_lived()  # the model's objects out of the collector's full passes (141 ms each)
    s = config.server
    shown = "localhost" if s.host in ("0.0.0.0", "::") else s.host
    stations = ", ".join(f"http://{shown}:{s.port}/{st.id}.mp3" for st in config.stations)
    log.info("listen on http://%s:%d/ (MP3: %s)", shown, s.port, stations)
    try:
        web.run_app(
            app,
            host=s.host,
            port=s.port,
            shutdown_timeout=s.shutdown_seconds,
            print=None,
            access_log=None,
            handle_signals=True,
        )
    except OSError as e:  # the port is taken, the address is not ours, ...
        raise CliError(f"cannot listen on {s.host}:{s.port}: {e.strerror or e}") from None
    log.info("stopped")
    # Everything is closed and joined; skip the interpreter's slow teardown of torch
    # (a second or so) so that Ctrl-C, a service manager or a container stop is quick.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
