"""The server role as a Flower ServerApp runs it: the server's own folder, nodes bound to parties, the rounds.

The ServerApp (``deploy/flower``) calls :func:`run_server_role` with its ``Grid`` and run configuration. It
holds only what the server owns — its identity, the roster, the agreed configuration, the global state, the
protocol's server session, the client-level ledger, its audit log, its checkpoints — all in its folder
(``server-dir``); the sites and the key holder are reached through :class:`~.grid_channel.GridChannel`.
It writes the run's results into the same folder: ``metrics.jsonl`` (one line per round), the global state
and, in PEFT format, ``global_adapter/``, and ``result.json`` (how the run ended) last.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from audits import resolve_receipt_dir, write_receipt
from protocols.wire import new_session_id

from .party_dir import DeploymentError, check_unused, load_plan, party_of, private_folder

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class ServerRoleSettings:
    """The ServerApp's run configuration (``[tool.flwr.app.config]`` of ``deploy/flower``, ``--run-config``)."""

    server_dir: Path
    stage_deadline_s: float = 120.0  # every stage without its own deadline
    deadlines: Mapping[str, float] | None = None  # "<protocol>:<stage>" → seconds (e.g. feddat:train, masked:unmask)
    join_timeout_s: float = 300.0  # how long the server waits for every party's node to join and bind
    bind_deadline_s: float = 60.0
    node_auth: bool = False  # SuperLink runs with --enable-supernode-auth: a node's registered name must match

    @classmethod
    def from_run_config(cls, values: Mapping[str, object]) -> ServerRoleSettings:
        """From Flower's run configuration; DeploymentError naming a missing or malformed key."""
        server_dir = values.get("server-dir")
        if not isinstance(server_dir, str) or not server_dir:
            raise DeploymentError("run-config 'server-dir' must name the server's own folder")
        numbers = {}
        for key in ("stage-deadline-s", "join-timeout-s", "bind-deadline-s"):
            value = values.get(key, getattr(cls, key.replace("-", "_")))
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
                raise DeploymentError(f"run-config {key!r} must be a number of seconds in (0, 86400], not {value!r}")
            numbers[key.replace("-", "_")] = float(value)
        node_auth = values.get("node-auth", False)
        if not isinstance(node_auth, bool):
            raise DeploymentError(f"run-config 'node-auth' must be true or false, not {node_auth!r}")
        return cls(Path(server_dir), deadlines=parse_deadlines(values.get("deadlines", "")), node_auth=node_auth,
                   **numbers)


def parse_deadlines(text: object) -> dict[str, float]:
    """``"masked:masked_input=30,feddat:train=600"`` → {stage: seconds}; DeploymentError on a malformed item."""
    if not isinstance(text, str):
        raise DeploymentError(f"run-config 'deadlines' must be a string like 'feddat:train=600', not {text!r}")
    deadlines = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        stage, _, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        protocol, _, name = stage.strip().partition(":")
        if not protocol or not name or not 0 < value <= 86400:
            raise DeploymentError(f"run-config 'deadlines': {item!r} is not '<protocol>:<stage>=<seconds>'")
        deadlines[stage.strip()] = value
    return deadlines


def run_server_role(grid, settings: ServerRoleSettings, *, echo: Callable[[str], None] = print) -> dict:
    """Run the whole federation as its server over ``grid``; returns (and writes) the result."""
    from ..federation.parties import build_server
    from ..federation.party_folder import PartyFolder
    from ..federation.runner import format_round_table
    from ..federation.server_app import RoundLog
    from .grid_channel import GridChannel, bind_nodes

    folder = private_folder(settings.server_dir)
    party_id, role = party_of(folder)
    if role != "server":
        raise DeploymentError(f"{folder} holds the identity of {party_id!r}, a {role}, not the server's")
    check_unused(folder, party_id)
    planned = load_plan(folder)
    plan = planned.plan
    for stale in (METRICS_FILE, RESULT_FILE):
        (folder / stale).unlink(missing_ok=True)
    channel = GridChannel(grid)
    server = build_server(plan, PartyFolder(folder, party_id), channel, resume=False,
                          opening_digest=planned.agreement.digest())
    channel.max_answers = len(server.roster.entries) + 1  # one message per other party and one to the server
    channel.on_error = lambda party, code: server.audit.event("party_dropped", peer=party,
                                                              meta={"reason": f"relay error {code}"})
    server.link.default_deadline_s = settings.stage_deadline_s
    server.link.deadlines = dict(settings.deadlines or {})
    session = new_session_id()
    parties = [*plan.site_ids, *(["keyholder"] if plan.keyholder else [])]
    channel.nodes = bind_nodes(grid, identity=server.identity, roster=server.roster, session=session,
                               parties=parties, audit=server.audit, join_timeout_s=settings.join_timeout_s,
                               bind_deadline_s=settings.bind_deadline_s, node_auth=settings.node_auth, echo=echo)

    def write(record: dict) -> dict:
        with open(folder / METRICS_FILE, "a") as stream:
            stream.write(json.dumps(record, sort_keys=True) + "\n")
        echo(format_round_table(record))
        return record

    server.open(resume=False, session=session)
    server.run(RoundLog(write=write, echo=echo))
    heads = server.close()
    receipt = server.audit_receipt(plan.config.name)
    kept = None if receipt is None else write_receipt(receipt, resolve_receipt_dir(plan.config.audit.receipt_dir))
    if kept is not None:  # the server's copy, outside its folder; its operator hands it to the sites and reviewer
        echo(f"feddat-secure: audit receipt: {kept}")
    _save_global_adapter(planned, server.global_state, folder)
    result = {"session": session, "rounds": len(server.history), "stopped": server.stopped,
              "nodes": {party: str(node) for party, node in channel.nodes.items()},
              "bytes_sent": dict(server.link.bytes_sent), "bytes_received": dict(server.link.bytes_received),
              "audit": _audit_record(server, folder, heads[party_id]),
              "audit_receipt": None if kept is None else str(kept)}
    (folder / RESULT_FILE).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def _audit_record(server, folder: Path, final_head: str | None) -> dict | None:
    """The server's own closed log in ``audit verify``'s run record (the other parties' logs are in their
    folders; the heads they closed with are in the server's log): a cut or re-sealed server log then fails."""
    from audits import PartyRecord, RunRecord, SignedTreeHead

    if final_head is None:  # audit logs off
        return None
    record = PartyRecord(server.folder.audit_log.relative_to(folder).as_posix(), SignedTreeHead.from_json(final_head))
    return RunRecord(server.roster.digest, {server.party_id: record}).to_dict()


def _save_global_adapter(planned, global_state, folder: Path) -> None:
    from ..model.adapters import save_peft_adapter
    from ..model.classifier import save_head
    adapter, head = planned.plan.global_adapter(global_state)
    if adapter is not None:  # None: no global model (FedSA-LoRA's B stays with each site)
        save_peft_adapter(adapter, planned.lora, planned.foundation.path, folder / "global_adapter")
    if head:
        save_head(head, planned.agreement.answers, folder / "global_adapter")
