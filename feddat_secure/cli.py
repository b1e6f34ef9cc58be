"""The ``feddat-secure`` command line.

Errors a user can fix (config, data, model folder, run folder) print one line and exit 2;
nothing else is swallowed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from importlib import resources
from pathlib import Path

from audits.cli import add_audit_commands
from protocols import ConfigurationError
from protocols.identity import KEYHOLDER_ID, SERVER_ID, create_identities, load_roster

from .config import ConfigError, load_config
from .data import DataError
from .federation.checkpoint import CheckpointError
from .model.backbone import EMBEDDED_FOUNDATION, ModelLoadError
from .privacy.cli import add_privacy_report_command

USER_ERRORS = (ConfigError, DataError, ModelLoadError, ConfigurationError, CheckpointError)


def _run(args: argparse.Namespace) -> int:
    from .federation.runner import run

    config = load_config(args.config)
    if args.output_dir:
        config = replace(config, output_dir=args.output_dir)
    result = run(config, overwrite=args.overwrite, resume=args.resume, progress=not args.quiet)
    print(f"run folder: {result.run_dir}")
    if result.stopped:
        print(f"the run {result.stopped}", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The embedded demo; a second demo goes to demo-2, demo-3, ... so no earlier run is lost."""
    from .federation.runner import run

    config = load_config(resources.files("feddat_secure") / "configs" / "demo.toml")
    config = replace(config, output_dir=args.output_dir or config.output_dir)
    if not args.overwrite:
        config = replace(config, name=unused_run_name(Path(config.output_dir), config.name))
    result = run(config, overwrite=args.overwrite, progress=not args.quiet)
    print(f"run folder: {result.run_dir}")
    _print_audit_check(result.run_dir)
    return 0


def _print_audit_check(run_dir: Path) -> None:
    """What a reviewer would run first: are the run's audit logs intact, and do both sides agree?"""
    from audits import reconcile, verify_path

    roster = _roster_keys(run_dir / "roster.json")
    print("audit:", verify_path(run_dir / "audit", roster, require_closed=True).summary())
    print("audit:", reconcile(run_dir / "audit").summary())


def unused_run_name(output_dir: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, ... whichever has no run folder yet."""
    candidate, suffix = name, 1
    while (output_dir / candidate).exists():
        suffix += 1
        candidate = f"{name}-{suffix}"
    return candidate


def _pretrain(args: argparse.Namespace) -> int:
    from .pretraining import PretrainSettings, pretrain

    settings = replace(PretrainSettings(), steps=args.steps or PretrainSettings.steps, seed=args.seed)
    summary = pretrain(Path(args.out), settings)
    print(f"foundation written to {args.out}: {summary}")
    return 0


def _create_keys(args: argparse.Namespace) -> int:
    clients = [c.strip() for c in args.clients.split(",") if c.strip()] if args.clients else \
        [f"client{i}" for i in range(args.num_clients)]
    roster = create_identities(args.out, SERVER_ID, clients, KEYHOLDER_ID)
    print(f"{len(roster)} identities in {args.out}: private keys <id>.pem (give each party only its own), "
          f"public roster roster.json (give every party a copy)")
    return 0


def _roster_keys(path: Path) -> dict:
    roster = load_roster(path)
    return {entry.party_id: entry.public_key for entry in roster.entries}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feddat-secure", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler, text in (("run", _run, "run a federation from a TOML config"),
                                ("demo", _demo, "run the embedded demo (FedDAT, 5 sites)")):
        command = commands.add_parser(name, help=text)
        if name == "run":
            command.add_argument("config", help="path to CONFIG.toml")
        command.add_argument("--output-dir", help="parent folder of the run folder (default: the config's)")
        command.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
        if name == "run":
            command.add_argument("--resume", action="store_true",
                                 help="continue an interrupted run of the same config from its last checkpoint")
        else:
            command.set_defaults(resume=False)
        command.add_argument("--quiet", action="store_true", help="no progress bar")
        command.set_defaults(handler=handler)
    pretrain = commands.add_parser("pretrain-foundation", help="re-create the embedded foundation checkpoint")
    pretrain.add_argument("--out", default=str(EMBEDDED_FOUNDATION))
    pretrain.add_argument("--steps", type=int, help="training steps (default: the committed recipe's)")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.set_defaults(handler=_pretrain)
    keys = commands.add_parser("keys", help="enrol parties: Ed25519 identity keys and the roster")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create identity keys for a server, a key holder and clients")
    create.add_argument("--out", required=True, help="folder to write <id>.pem files and roster.json into")
    create.add_argument("--clients", help="comma-separated client ids (the run's site ids, e.g. client0,client1)")
    create.add_argument("--num-clients", type=int, default=5, help="or this many clients client0, client1, ...")
    create.set_defaults(handler=_create_keys)
    add_audit_commands(commands, _roster_keys)
    add_privacy_report_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        print(f"feddat-secure: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
