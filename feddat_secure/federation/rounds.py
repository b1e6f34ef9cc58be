"""The federated rounds: every party built once, then train → aggregate securely → evaluate.

Per round: the server sends the global state to the round's participants; each trains, turns
its update into its secure-aggregation input and reports only its example count and losses;
the protocol runs; the server applies the aggregate it revealed; every site evaluates; the
server and each participant exchange signed audit tree heads; the round is checkpointed.
A resumed run restores the checkpoint and continues with the next round, so it ends exactly
where an uninterrupted run would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from protocols.identity import SERVER_ID

from ..config import RunConfig
from .audit_trail import AuditTrail
from .checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from .client import FederatedClient
from .messages import Message, decode, encode, expect
from .privacy_hooks import PrivacyHooks
from .secure_aggregation import SecureAggregation
from .server import FederationServer
from .transport import InProcessTransport
from .updates import StateLayout


@dataclass
class RoundLog:
    """What the runner writes and prints; supplied by runner.py."""

    write: Callable[[dict], dict]  # records a finished round (metrics.jsonl, the printed table); returns it
    echo: Callable[[str], None]


@dataclass
class FederatedRun:
    config: RunConfig
    run_dir: Path
    clients: dict[str, FederatedClient]
    server: FederationServer
    layout: StateLayout
    aggregation: SecureAggregation | None
    audit: AuditTrail
    privacy: PrivacyHooks
    transport: InProcessTransport = field(default_factory=InProcessTransport)
    history: list[dict] = field(default_factory=list)
    next_round: int = 0
    stopped: str | None = None

    def __post_init__(self) -> None:
        self.ids = list(self.clients)
        self.sampler = np.random.default_rng([self.config.seed, 7])

    # ------------------------------------------------------------------------------------- rounds

    def run(self, log: RoundLog, progress: bool) -> None:
        rounds = self.config.federation.rounds
        per_round = self.config.participants_per_round(len(self.ids))
        bar = tqdm(total=(rounds - self.next_round) * per_round, disable=not progress, unit="client", leave=False)
        while self.next_round < rounds:
            round_index = self.next_round
            participants = self.privacy.participants(self.ids, per_round, self.sampler)
            refusal = self.privacy.refuse_round(round_index, participants)
            if refusal is not None:
                self.stop(round_index, refusal, log)
                break
            self.audit.events([SERVER_ID, *participants], "round_started", round=round_index)
            record = self._round(round_index, participants, bar)
            self.history.append(log.write(record))
            self.next_round = round_index + 1
            self._exchange_tree_heads(round_index, participants)
            self.checkpoint()
            self.privacy.write(self.run_dir)
        bar.close()

    def stop(self, round_index: int, reason: str, log: RoundLog) -> None:
        self.stopped = f"stopped before round {round_index + 1}: {reason}"
        self.audit.events(self.audit_parties(), "budget_exceeded", round=round_index, meta={"reason": reason[:256]})
        log.echo(f"feddat-secure: {self.stopped}")

    def audit_parties(self) -> list[str]:
        extra = list(self.aggregation.parties) if self.aggregation is not None else [SERVER_ID]
        return [*extra, *self.ids]

    def _round(self, round_index: int, participants: list[str], bar) -> dict:
        start = time.perf_counter()
        for cid, data in self.server.train_messages(round_index, participants):
            self._send(SERVER_ID, cid, data, round_index, "train")
        for cid in participants:
            bar.set_description(f"round {round_index + 1}/{self.config.federation.rounds} {cid}")
            for data in self.transport.receive(cid):
                self._send(cid, SERVER_ID, self.clients[cid].handle(data), round_index, "train")
            bar.update(1)
        losses = self.server.receive_updates(round_index, participants, self.transport.receive(SERVER_ID))
        aggregate = self._aggregate(round_index, participants)
        record_events = {cid: self.clients[cid].trainer.round_events for cid in participants
                         if self.clients[cid].trainer.privacy is not None}
        self.privacy.spend(round_index, participants, record_events, aggregate.get("counted_sites"), self.audit)
        for cid, data in self.server.evaluation_messages(round_index, self.ids):
            self._send(SERVER_ID, cid, data, round_index, "evaluate")
        for cid in self.ids:
            for data in self.transport.receive(cid):
                self._send(cid, SERVER_ID, self.clients[cid].handle(data), round_index, "evaluate")
        metrics = self.server.receive_metrics(round_index, self.ids, self.transport.receive(SERVER_ID))
        record = round_record(round_index, participants, metrics, losses, time.perf_counter() - start)
        record["aggregation"] = aggregate
        record["bytes_to_server_total"] = self.transport.bytes_received[SERVER_ID]
        record["bytes_to_clients_total"] = sum(v for k, v in self.transport.bytes_received.items()
                                               if k != SERVER_ID)
        record["privacy"] = self.privacy.round_summary(round_index)
        return record

    def _aggregate(self, round_index: int, participants: list[str]) -> dict:
        if self.aggregation is None:
            return {"protocol": "none (local training)"}
        if len(participants) < self.aggregation.min_participants:
            # Poisson sampling of sites (central client-level DP) drew too few for the protocol: nothing is
            # aggregated or applied, but the round is charged as if its mechanism had run (docs/privacy.md).
            reason = f"{len(participants)} sites sampled, the protocol needs {self.aggregation.min_participants}"
            self.audit.event(SERVER_ID, "round_finished", round=round_index, meta={"outcome": "skipped"})
            return {"protocol": self.aggregation.name, "rejections": [], "skipped": reason, "counted": [],
                    "counted_sites": 0}
        outcome = self.aggregation.aggregate(round_index, participants)
        summary = {"protocol": self.aggregation.name, "rejections": list(outcome.rejections)}
        if outcome.result is None:
            self.audit.event(SERVER_ID, "round_finished", round=round_index, meta={"outcome": "aborted"})
            return {**summary, "aborted": outcome.aborted, "counted": [], "counted_sites": None}
        result = outcome.result
        summed, denominator = self.privacy.aggregate_to_apply(result, self.sampler)
        self.server.apply_aggregate(self.layout, summed, denominator)
        self.audit.event(SERVER_ID, "aggregate_computed", round=round_index,
                         data=np.ascontiguousarray(summed, dtype="<f8").tobytes(),
                         meta={"protocol": self.aggregation.name, "counted": len(result.counted)})
        self.audit.event(SERVER_ID, "adapter_applied", round=round_index)
        return {**summary, "counted": list(result.counted), "counted_sites": len(result.counted),
                "total_weight": result.total_weight}

    def _send(self, sender: str, recipient: str, data: bytes, round_index: int, stage: str) -> None:
        self.audit.exchange(sender, recipient, data, round=round_index, stage=stage)
        self.transport.send(recipient, data)

    def _exchange_tree_heads(self, round_index: int, participants: list[str]) -> None:
        """Server and each participant swap signed tree heads, as ordinary (logged) messages."""
        if not self.audit.enabled:
            return
        for cid in participants:
            for sender, recipient in ((SERVER_ID, cid), (cid, SERVER_ID)):
                head = self.audit.tree_head(sender)
                data = encode(Message("tree_head", round_index, sender, recipient, {}, {"tree_head": head}))
                self._send(sender, recipient, data, round_index, "tree_head")
                message = decode(self.transport.receive(recipient)[0])
                expect(message, kind="tree_head", round_index=round_index, sender=sender, recipient=recipient)
                self.audit.peer_tree_head(recipient, sender, message.meta["tree_head"])

    def finish(self) -> None:
        """Seal the run: final privacy ledger, every audit log closed with its final signed tree head,
        and the checkpoint removed (a finished run is never resumed)."""
        self.privacy.write(self.run_dir)
        self.audit.close(self.stopped or "all rounds finished")
        (self.run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)

    # -------------------------------------------------------------------------------- checkpoints

    def checkpoint(self) -> None:
        save_checkpoint(self.run_dir, {
            "next_round": self.next_round,
            "global_state": self.server.global_state,
            "clients": {cid: client.state_dict() for cid, client in self.clients.items()},
            "sampler": self.sampler.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "bytes_received": dict(self.transport.bytes_received),
            "history": self.history,
            "privacy": self.privacy.state_dict(),
        })

    def restore(self) -> None:
        state = load_checkpoint(self.run_dir)
        self.next_round = int(state["next_round"])
        self.server.global_state = {k: np.asarray(v, dtype=np.float32) for k, v in state["global_state"].items()}
        for cid, client in self.clients.items():
            client.load_state_dict(state["clients"][cid])
        self.sampler.bit_generator.state = state["sampler"]
        torch.set_rng_state(state["torch_rng"])
        self.transport.bytes_received.update(state["bytes_received"])
        self.history = list(state["history"])
        self.privacy.load_state_dict(state["privacy"])


def round_record(round_index, participants, metrics, losses, seconds) -> dict:
    modes = [m for m in ("dat", "shared", "client") if all(m in v for v in metrics.values())]
    mean = {m: float(np.mean([v[m] for v in metrics.values()])) for m in modes}
    return {"round": round_index + 1, "participants": participants, "clients": metrics, "mean": mean,
            "train_loss": losses, "seconds": round(seconds, 3)}
