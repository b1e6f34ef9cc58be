"""``feddat-secure privacy-report RUN_DIR``: what the main CLI runs for the subcommand (registered there, so
that ``--help`` stays light; this module loads the report and its accountants only when the command runs).

Exit codes: 0 written; 1 a ledger does not match the run's evidence (one line per mismatch, nothing written);
2 not a run folder this report can describe."""

from __future__ import annotations

import argparse
import sys

from .report import EvidenceMismatch, ReportError, write_privacy_report


def run_privacy_report_command(args: argparse.Namespace) -> int:
    try:
        paths = write_privacy_report(args.run_dir)
    except EvidenceMismatch as mismatch:
        print(f"feddat-secure: error: {mismatch}", file=sys.stderr)
        return 1
    except (ReportError, OSError, ValueError, KeyError) as error:
        print(f"feddat-secure: error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
