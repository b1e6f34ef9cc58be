"""The ``feddat-secure`` command line.

Errors a user can fix (config, data, model folder, run folder) print one line and exit 2; a run a privacy
budget stopped early (its outputs written) exits 1; nothing else is swallowed. Importing this module loads
no deep-learning library: the commands that train (``run``, ``demo``, ``pretrain-foundation``) and
``privacy-report`` (whose accountants need Opacus) import theirs when they run, so ``--help``, ``keys``,
``roster`` and ``audit`` start at once.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from audits.cli import add_audit_commands
from protocols import ConfigurationError
from protocols.enrolment import ENROLMENT_FILE, IDENTITY_FILE, build_roster, save_party_identity
from protocols.identity import ROLES, load_roster
from protocols.parallel import worker_count

from .config import RunConfig, config_from_dict, load_config, to_dict
from .errors import FeddatError

USER_ERRORS = (FeddatError, ConfigurationError)


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.output_dir:
        config = _with_keys(config, output_dir=args.output_dir)
    from .federation.runner import run  # torch and the rest: only once the configuration is known to be valid

    result = run(config, overwrite=args.overwrite, resume=args.resume, progress=not args.quiet)
    print(f"run folder: {result.run_dir}")
    if result.stopped:  # a budget stopped it: the outputs are written, but the run did not do what was asked
        print(f"feddat-secure: the run {result.stopped}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The embedded demo; a second demo goes to demo-2, demo-3, ... so no earlier run is lost."""
    config = load_config(resources.files("feddat_secure") / "configs" / "demo.toml")
    config = _with_keys(config, output_dir=args.output_dir or config.output_dir)
    if not args.overwrite:
        config = _with_keys(config, name=unused_run_name(Path(config.output_dir), config.name))
    from .federation.runner import run

    result = run(config, overwrite=args.overwrite, progress=not args.quiet)
    print(f"run folder: {result.run_dir}")
    _print_audit_check(result.run_dir)
    return 0


def _serve(args: argparse.Namespace) -> int:
    """A party's agent: the party (a site or the key holder) built from its own folder, serving its relay."""
    folder = Path(args.site_dir if args.command == "site" else args.keyholder_dir)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .deployment.agent import PartyAgent

    socket_path = Path(args.socket) if args.socket else None
    role = "client" if args.command == "site" else "keyholder"
    ledgers = getattr(args, "dataset_ledger_dir", None)
    PartyAgent(folder, role=role, socket_path=socket_path, socket_group=args.socket_group,
               dataset_ledger_dir=ledgers).serve()
    return 0


def _deploy_local(args: argparse.Namespace) -> int:
    if args.auth and not args.tls:
        raise FeddatError("--auth needs --tls: Flower authenticates nodes only over TLS")
    config = load_config(args.config)
    values = to_dict(config)
    if args.output_dir:
        values["output_dir"] = args.output_dir
    if args.sites is not None:
        values["data"] = {**values["data"], "num_clients": args.sites}
    config = config_from_dict(values)
    from .deployment.local import LocalSettings, deploy_local

    settings = LocalSettings(tls=args.tls, auth=args.auth, overwrite=args.overwrite,
                             stage_deadline_s=args.stage_deadline, deadlines=args.deadlines or "",
                             threads=args.threads, app_dir=Path(args.app) if args.app else None)
    try:
        result = deploy_local(config, settings)
    except KeyboardInterrupt:
        print("feddat-secure: deploy local interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    print(f"run folder: {result.run_dir}")
    _print_audit_check(result.run_dir)
    if result.stopped:
        print(f"feddat-secure: {result.stopped}")
        return 1
    return 0


def _with_keys(config: RunConfig, **values: Any) -> RunConfig:
    """``config`` with top-level keys replaced (from command-line options), validated like a config file's."""
    return config_from_dict({**to_dict(config), **values})


def _print_audit_check(run_dir: Path) -> None:
    """What a reviewer would run first: are the run's audit logs intact, and do both sides agree?"""
    from audits import reconcile, verify_path

    roster = _roster_keys(run_dir / "roster.json")
    found = _run_record(run_dir)
    print("audit:", verify_path(run_dir / "parties", roster, require_closed=True, record=found and found[1],
                                roster_sha256=load_roster(run_dir / "roster.json").digest).summary())
    print("audit:", reconcile(run_dir / "parties").summary())


def unused_run_name(output_dir: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, ... whichever has no run folder yet."""
    candidate, suffix = name, 1
    while (output_dir / candidate).exists():
        suffix += 1
        candidate = f"{name}-{suffix}"
    return candidate


def _pretrain(args: argparse.Namespace) -> int:
    from .model.backbone import EMBEDDED_FOUNDATIONS
    from .pretraining import FOUNDATIONS, pretrain

    recipe = FOUNDATIONS[args.foundation]
    settings = replace(recipe, steps=args.steps or recipe.steps, seed=args.seed)
    out = Path(args.out) if args.out else EMBEDDED_FOUNDATIONS[args.foundation]
    summary = pretrain(out, settings)
    print(f"foundation written to {out}: {summary}")
    return 0


def _privacy_report(args: argparse.Namespace) -> int:
    from .privacy.cli import run_privacy_report_command

    return run_privacy_report_command(args)


def _privacy_ledger(args: argparse.Namespace) -> int:
    from .privacy.cli import run_ledger_command

    return run_ledger_command(args)


def _create_keys(args: argparse.Namespace) -> int:
    """One party's identity, made where it will be used: no one else ever holds its private key."""
    out = Path(args.out)
    save_party_identity(out, args.party, args.role)
    print(f"private key of {args.party!r} ({args.role}): {out / IDENTITY_FILE} (keep it there; it never leaves)")
    print(f"public enrolment file: {out / ENROLMENT_FILE} (hand it to whoever builds the roster)")
    return 0


def _build_roster(args: argparse.Namespace) -> int:
    """The roster from public enrolment files only; its SHA-256 is what every party pins."""
    roster = build_roster(args.enrolments)
    roster.save(args.out)
    counts = ", ".join(f"{role}: {len(roster.ids(role))}" for role in ROLES)
    print(f"roster {args.out}: {len(roster)} parties ({counts})")
    print(f"sha256 {roster.digest} (every party pins this value)")
    return 0


def _roster_keys(path: Path) -> dict:
    roster = load_roster(path)
    return {entry.party_id: entry.public_key for entry in roster.entries}


def _roster_digest(path: Path) -> str:
    """The roster's own digest (``Roster.digest``): what ``roster build`` prints and every party pins."""
    return load_roster(path).digest


RUN_RECORD_FILES = ("manifest.json", "result.json")  # a run folder's; a deployed server's own folder's


def _run_record(folder: Path):
    """The record a finished run wrote of its audit logs, for ``folder`` (a run folder, its ``parties``, a party's
    folder, or a deployed server's folder): ``(file, audits.RunRecord)``, or None when the run did not finish.
    A manifest without the record is refused (ValueError): closure could not be checked."""
    import json

    from audits import RunRecord

    for candidate in (folder, folder.parent, folder.parent.parent):
        for name in RUN_RECORD_FILES:
            path = candidate / name
            if path.is_file():
                record = json.loads(path.read_text()).get("audit")
                if record is None:
                    raise ValueError(f"{path} records no audit logs (a run without audit logs, or written before "
                                     "manifests recorded every party's final tree head)")
                return path, RunRecord.from_dict(record)
    return None


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
    pretrain = commands.add_parser("pretrain-foundation", help="re-create an embedded foundation checkpoint")
    pretrain.add_argument("--foundation", choices=("embedded", "embedded-v2", "embedded-v3", "embedded-v4"),
                          default="embedded",
                          help="the committed recipe to run (feddat_secure.pretraining.FOUNDATIONS)")
    pretrain.add_argument("--out", help="the folder to write (default: that embedded foundation's, in the package)")
    pretrain.add_argument("--steps", type=int, help="training steps (default: the committed recipe's)")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.set_defaults(handler=_pretrain)
    keys = commands.add_parser("keys", help="enrol one party: its Ed25519 identity key, made locally")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create this party's identity key and public enrolment file")
    create.add_argument("--party", required=True, help="the party's id (1-64 of A-Z a-z 0-9 . _ -)")
    create.add_argument("--role", default="client", help=f"{' | '.join(ROLES)} (default: client)")
    create.add_argument("--out", required=True,
                        help="the party's own folder (created 0700): identity.pem (0600) and enrolment.json")
    create.set_defaults(handler=_create_keys)
    roster = commands.add_parser("roster", help="the roster of enrolled parties, from public enrolment files")
    roster_commands = roster.add_subparsers(dest="roster_command", required=True)
    build = roster_commands.add_parser("build", help="build roster.json from the parties' enrolment files")
    build.add_argument("enrolments", nargs="+", metavar="ENROLMENT_FILE", help="a party's enrolment.json")
    build.add_argument("--out", required=True, help="the roster file to write (never overwritten)")
    build.set_defaults(handler=_build_roster)
    for role, option in (("site", "--site-dir"), ("keyholder", "--keyholder-dir")):
        party = commands.add_parser(role, help=f"run this {role}'s agent in a deployment (docs/deployment.md)")
        serve = party.add_subparsers(dest=f"{role}_command", required=True).add_parser(
            "serve", help=f"serve the {role} from its own folder to its Flower node's relay until the run closes")
        serve.add_argument(option, required=True, help="the party's own folder (identity, roster, config.toml, "
                                                       "federation.json; 0700)")
        serve.add_argument("--socket", help="the Unix socket to serve on (default: agent.sock in the folder; "
                                            "the SuperNode's node-config agent-socket)")
        serve.add_argument("--socket-group", help="let this group's members (the SuperNode's user) connect: socket "
                                                  "0660 instead of 0600 (run the agent as a user of its own)")
        serve.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
        if role == "site":
            serve.add_argument("--dataset-ledger-dir", help="where the data owner keeps the privacy ledger of this "
                                                            "site's dataset across runs (default: "
                                                            "$FEDDAT_SECURE_LEDGER_DIR, else "
                                                            "~/.local/share/feddat-secure/privacy-ledgers)")
        serve.set_defaults(handler=_serve)
    deploy = commands.add_parser("deploy", help="deploy a run on Flower")
    local = deploy.add_subparsers(dest="deploy_command", required=True).add_parser(
        "local", help="a real Flower deployment of CONFIG on this machine: SuperLink, one SuperNode and agent per "
                      "party, the ServerApp; torn down at the end")
    local.add_argument("config", help="path to CONFIG.toml")
    local.add_argument("--sites", type=int, help="number of sites (default: the config's data.num_clients)")
    local.add_argument("--tls", action="store_true", help="TLS with a certificate made for this run")
    local.add_argument("--auth", action="store_true", help="node authentication (needs --tls): each SuperNode's key "
                                                           "registered under its party's name")
    local.add_argument("--stage-deadline", type=float, default=120.0,
                       help="seconds each stage waits for replies (default 120)")
    local.add_argument("--deadlines", help="per-stage deadlines, e.g. 'feddat:train=900,masked:masked_input=60'")
    local.add_argument("--threads", type=int, default=1, help="torch threads per party process (default 1)")
    local.add_argument("--app", help="the Flower app folder (default: deploy/flower of the source tree)")
    local.add_argument("--output-dir", help="parent folder of the run folder (default: the config's)")
    local.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    local.set_defaults(handler=_deploy_local)
    add_audit_commands(commands, _roster_keys, roster_digest=_roster_digest, find_run_record=_run_record)
    report = commands.add_parser(
        "privacy-report", help="write the privacy budget report (HTML, Markdown, JSON) of a run folder",
        description="Recompute every privacy ledger of a run and write privacy_report.html, privacy_report.md and "
                    "privacy_report.json into the run folder.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (runs/<name>)")
    report.add_argument("--allow-unsigned", action="store_true",
                        help="report on a run that kept no audit log (its ledgers cannot be checked against signed "
                             "entries; the report's headline says so)")
    report.set_defaults(handler=_privacy_report)
    privacy = commands.add_parser("privacy", help="a dataset's privacy ledger across runs (docs/privacy.md)")
    ledger = privacy.add_subparsers(dest="privacy_command", required=True).add_parser(
        "ledger", help="verify and read a dataset ledger")
    ledger_commands = ledger.add_subparsers(dest="ledger_command", required=True)
    for name, text in (("show", "verify the ledger, then print per level ε (rdp, prv), δ, budget, remaining and "
                                "each run's share"),
                       ("export", "verify the ledger, then print its entries as JSON for an auditor")):
        command = ledger_commands.add_parser(name, help=text, description=text + "; exit 1 if it does not verify, "
                                                                                 "naming the first bad entry")
        command.add_argument("ledger", metavar="LEDGER", help="the ledger file (<dataset sha256>"
                                                              ".privacy-ledger.jsonl)")
        command.add_argument("--public-key", help="the data owner's ledger public key (PEM; default: the key in "
                                                  "the ledger's folder)")
        command.set_defaults(handler=_privacy_ledger)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        worker_count()  # a bad FEDDAT_SECURE_THREADS is refused here, not deep inside the first message
        return args.handler(args)
    except USER_ERRORS as error:
        print(f"feddat-secure: error: {' '.join(str(error).splitlines())}", file=sys.stderr)  # always one line
        return 2


if __name__ == "__main__":
    sys.exit(main())
