"""``feddat-secure privacy-report RUN_DIR``: the subcommand, for the main CLI to register."""

from __future__ import annotations

import argparse
import sys

from .report import ReportError, write_privacy_report


def add_privacy_report_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``privacy-report``; the parsed namespace's ``handler(args) -> int`` runs it (exit code)."""
    parser = subparsers.add_parser(
        "privacy-report", help="write the privacy budget report (HTML, Markdown, JSON) of a run folder",
        description="Recompute every privacy ledger of a run and write privacy_report.html, privacy_report.md and "
                    "privacy_report.json into the run folder.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (runs/<name>)")
    parser.set_defaults(handler=run_privacy_report_command)
    return parser


def run_privacy_report_command(args: argparse.Namespace) -> int:
    try:
        paths = write_privacy_report(args.run_dir)
    except (ReportError, OSError, ValueError, KeyError) as error:
        print(f"feddat-secure: error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
