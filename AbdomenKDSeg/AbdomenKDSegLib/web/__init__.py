"""Browser edition: ``abdomen-kdseg serve``, a trame-slicer web app on the Slicer module's logic and worker.

This package's ``__init__`` only registers the command (standard library); :mod:`.app` imports
trame and trame-slicer (the ``web`` extra: ``pip install -e '.[web]'``) when the command runs.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

#: Packages the web app needs (import names), with the extra that installs them.
WEB_MODULES = ("trame", "trame_slicer", "trame_vuetify", "trame_rca")
INSTALL_HINT = "pip install -e '.[web]' (trame-slicer; it pins slicer-core < 5.12)"
#: Default upload limit, MB.
DEFAULT_MAX_UPLOAD_MB = 1024.0


def missing_web_modules() -> list[str]:
    """The web app's packages that are not installed (empty: ``serve`` can run)."""
    return [name for name in WEB_MODULES if importlib.util.find_spec(name) is None]


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the web app (blocking until interrupted)."""
    from ..errors import UsageError

    missing = missing_web_modules()
    if missing:
        raise UsageError(f"the web app needs {', '.join(missing)}: {INSTALL_HINT}")
    if args.data is not None and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data} is not a folder")
    if args.max_upload_mb <= 0:
        raise UsageError("--max-upload-mb must be > 0")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be 1 or more")
    from .app import ServeOptions, serve

    serve(ServeOptions(host=args.host, port=args.port, data_dir=Path(args.data) if args.data else None,
                       max_upload_mb=args.max_upload_mb, model=args.model, threads=args.threads or 0,
                       worker_debug_delay=args.worker_debug_delay))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``serve [--port] [--host] [--data DIR]`` to the main parser's subparsers; returns its parser."""
    parser = subparsers.add_parser(
        "serve", help="the browser edition: load a CT, segment it and view the organs in a web page",
        description="A trame-slicer web app: Slicer's slice and 3D views, the Slicer panel's options and the "
                    "same worker process. Needs the web extra: " + INSTALL_HINT + ". Browser tabs share one "
                    "scene; while a segmentation runs every tab shows it as busy.")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for a network)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="a folder of CT files (NIfTI, NRRD, MHA) or DICOM series folders to pick from")
    parser.add_argument("--model", default=None, help="model bundle (.safetensors); default: the bundled model")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, metavar="MB",
                        help=f"largest file accepted by the upload (default {DEFAULT_MAX_UPLOAD_MB:g} MB)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads of the worker")
    parser.add_argument("--worker-debug-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: Cancel
    parser.set_defaults(func=cmd_serve)
    return parser
