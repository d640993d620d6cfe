"""``genesis-ckpt``: look after a checkpoint directory from the shell (any fsspec URL).

Exit codes: 0 success, 1 a checkpoint is corrupt or missing (``verify``), 2 a user error (bad URL, missing
directory, unreadable file). User errors print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..core.errors import GenesisCheckpointError, is_storage_client_error
from ..core.names import EXPORT_FORMATS
from .common import PROG, UserError, storage_options

__all__ = ["build_parser", "main"]


# -------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``genesis-ckpt``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--storage-option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option (repeatable); VALUE is parsed as JSON when it can be",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect and maintain lightning-genesis-ckpt stores."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ls", parents=[common], help="list committed checkpoints")
    p.add_argument("dir")
    p.add_argument("--verify", action="store_true", help="verify checksums too (reads every file)")
    p.set_defaults(func="cmd_ls")

    p = sub.add_parser("verify", parents=[common], help="verify checksums; exit 1 if anything is corrupt")
    p.add_argument("path", help="a store directory or one checkpoint file")
    p.set_defaults(func="cmd_verify")

    p = sub.add_parser("inspect", parents=[common], help="describe one checkpoint file")
    p.add_argument("file")
    p.add_argument("--trusted", action="store_true", help="allow full pickle (only for files you trust)")
    p.set_defaults(func="cmd_inspect")

    p = sub.add_parser(
        "resume-path", parents=[common], help="which checkpoint auto-resume would pick, and why"
    )
    p.add_argument("dir")
    p.set_defaults(func="cmd_resume_path")

    p = sub.add_parser(
        "prune",
        parents=[common],
        help="delete scheduled checkpoints beyond a retention policy (and a superseded interrupt snapshot)",
    )
    p.add_argument("dir")
    p.add_argument("--keep-last", type=int, required=True, help="keep the N with the most training")
    p.add_argument("--keep-best", type=int, default=0, help="also keep the N best by --monitor")
    p.add_argument("--monitor", help="metric for --keep-best (default: the one the records name)")
    p.add_argument("--mode", choices=["min", "max"], default="min")
    p.add_argument(
        "--keep-every-steps", type=int, default=0, help="also keep every checkpoint at a multiple of N steps"
    )
    p.add_argument("--keep-for", help="also keep everything saved within this long (90, 30m, 12h, 7d)")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func="cmd_prune")

    p = sub.add_parser("export", parents=[common], help="export a checkpoint's model for deployment")
    p.add_argument("file", help="a checkpoint file (Lightning, save/save_checkpoint, or a state dict)")
    p.add_argument("out", help="the artifact to write (path or URL)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="safetensors")
    p.add_argument("--model", help="package.module:Class to trace (torch.export and torchscript only)")
    p.add_argument("--input-shape", help="example input shape to trace with, e.g. 1,32 (program formats)")
    p.add_argument("--trusted", action="store_true", help="allow full pickle (only for files you trust)")
    p.set_defaults(func="cmd_export")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (
        getattr(args, "keep_last", 1) < 1
        or getattr(args, "keep_best", 0) < 0
        or getattr(args, "keep_every_steps", 0) < 0
    ):
        parser.error("--keep-last must be at least 1, --keep-best and --keep-every-steps at least 0")
    # The commands print their own result; the library's info lines would say it twice. Warnings stay. The
    # level is put back afterwards: ``main`` called in-process (a notebook, a test) must not mute the library.
    logger = logging.getLogger("lightning_genesis_ckpt")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        return _run(args)
    finally:
        logger.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    try:
        args.options = storage_options(args.storage_option)
        # Imported only now: the commands need torch and fsspec, whose imports take seconds; ``--help`` and
        # argument errors answer without them.
        from . import commands

        return int(getattr(commands, args.func)(args))
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, GenesisCheckpointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not is_storage_client_error(e):
            raise  # a bug of ours: the traceback is what a report needs
        # Credentials, endpoint, permissions on an object store: the user's to fix, and the client says how.
        print(
            f"{PROG}: error: the storage backend refused the request ({type(e).__name__}: {e}); "
            "check the URL and the credentials (--storage-option key=VALUE or the backend's environment)",
            file=sys.stderr,
        )
        return 2
