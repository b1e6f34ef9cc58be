"""``feddat-secure privacy-report RUN_DIR`` and ``privacy ledger show|export LEDGER``: what the main CLI runs for
these subcommands (registered there, so that ``--help`` stays light; this module loads the report and its
accountants only when a command runs).

``privacy-report`` exit codes: 0 written; 1 a ledger does not match the run's evidence (one line per mismatch,
nothing written); 2 not a run folder this report can describe."""

from __future__ import annotations

import argparse
import json
import sys

from .report import EvidenceMismatch, ReportError, write_privacy_report


def run_privacy_report_command(args: argparse.Namespace) -> int:
    try:
        paths = write_privacy_report(args.run_dir, allow_unsigned=args.allow_unsigned)
    except EvidenceMismatch as mismatch:
        print(f"feddat-secure: error: {mismatch}", file=sys.stderr)
        return 1
    except (ReportError, OSError, ValueError, KeyError) as error:
        print(f"feddat-secure: error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def run_ledger_command(args: argparse.Namespace) -> int:
    """``privacy ledger show|export LEDGER``: verify a dataset ledger; exit 1 naming its first bad entry."""
    from pathlib import Path

    from .dataset_ledger import (
        DatasetLedgerError,
        load_public_key,
        read_ledger,
        read_records,
        records_path,
        sharing_records,
    )

    try:
        key = load_public_key(Path(args.public_key)) if args.public_key else None
        contents = read_ledger(args.ledger, key)
        records = read_records(contents.path)
        shared = sharing_records(contents.path, records) if args.ledger_command == "show" else {}
    except DatasetLedgerError as error:
        print(f"feddat-secure: error: {error}", file=sys.stderr)
        return 1
    if args.ledger_command == "export":
        print(json.dumps({**contents.to_json(), "records": len(records.digests)}, indent=1, sort_keys=True))
        return 0
    summary = contents.summary()
    print(f"dataset ledger {summary['path']}: intact, {summary['entries']} entries, head {summary['head_sha256']}")
    print(f"dataset sha256 {summary['dataset_sha256']}, signed by ledger key {summary['key_id']}")
    print(f"records: {len(records.digests)} (record set {records_path(contents.path).name} matches the dataset)")
    for path, count in shared.items():
        print(f"  shares {count} records with the ledger {path.name} (each run on either is charged to both)")
    for level, values in summary["levels"].items():
        budget = values["budget_epsilon"]
        epsilons = ", ".join(f"{name} {_number(value)}" for name, value in values["epsilon"].items())
        remaining = "no budget" if budget is None else f"budget {budget:g}, remaining {values['remaining_epsilon']:.3f}"
        print(f"{level} level: ε {epsilons} at δ = {values['delta']:g} ({values['accountant']} governs); "
              f"{remaining}; {_charges(values['charges'])}")
        for run, share in values["runs"].items():
            others = [dataset[:12] for dataset in share["trained_on"] if dataset != summary["dataset_sha256"]]
            trained = f", trained on dataset {', '.join(others)} (shares records)" if others else ""
            print(f"  run {run}: {_charges(share['charges'])}, ε {share['epsilon']:.3f} alone (rdp){trained}")
    return 0


def _number(value: float | None) -> str:
    return "n/a (outside PRV's range)" if value is None else f"{value:.3f}"


def _charges(count: int) -> str:
    return f"{count} charge" + ("" if count == 1 else "s")
