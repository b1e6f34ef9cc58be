"""The aggregation server: runs the rounds by sending signed requests and reading signed replies.

It owns the roster (pinned by digest), its identity, the global state, the protocol's server session, the
federation's client-level privacy ledger (central and distributed noise), its audit log and its checkpoints.
It never holds a site's or the key holder's private key, data, ledger or model: it learns what the sites
report in their signed replies and, of their updates, only what the secure-aggregation protocol reveals
(the weighted sum).

A round: sample the participants (from OS entropy under client-level DP unless ``reproducible``), and under
Poisson sampling draw fillers when the sample is smaller than the protocol's minimum → ``train`` requests
carrying the global state, its SHA-256 and the client-level terms (a filler's says ``zero_input``: it inputs
the zero vector and does not train) → charge the federation's client-level ledger and write it to disk
(write-ahead: before anything of the round can be released) → the protocol round among the sites that
trained and the fillers → apply the aggregate (central noise and DP-FedAvg's denominator under client-level
DP) → ``evaluate`` at every site → signed tree heads with the round's parties → checkpoint. On resume the
ledger comes from that file, which is ahead of the checkpoint by the charge of an interrupted round.

A failed round never crashes the run: a malicious server or site can always deny service, but it must not
corrupt the global state or stop the run uncleanly. Whatever makes the protocol round fail (an abort, any
other protocol error, a numeric error of a protocol step on malformed input, a result that is no finite
vector of the round's length or has no positive total weight) is recorded (the audit's ``round_finished``
with outcome ``aborted`` and the reason, ``aborted`` in the round's entry of ``metrics.jsonl``, one line in
the round log), nothing is applied, and the run goes on; after
``MAX_CONSECUTIVE_FAILED_ROUNDS`` failed rounds in a row it stops cleanly, as a budget stop does (outputs,
ledgers and logs closed; the CLI exits 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from audits import Receipt, SignedTreeHead
from protocols import AggregateResult, MessageRejected, Outgoing, Protocol, ProtocolError, Roster, RoundAborted
from protocols.identity import Identity
from protocols.wire import Envelope, new_session_id

from ..errors import FederationError
from ..privacy.run_privacy import ServerPrivacy, write_ledger
from . import envelopes as E
from .channel import Reply, ServerLink
from .checkpoint import checkpoint_sha256, load_checkpoint, save_checkpoint
from .party_folder import PartyFolder
from .protocol_round import run_protocol_round
from .updates import StateLayout, apply_mean_update

GLOBAL_STATE_FILE = "global_state.safetensors"
MAX_CONSECUTIVE_FAILED_ROUNDS = 3  # the run stops cleanly after this many failed protocol rounds in a row
LABELS = {
    "plain": "plain (INSECURE reference: the server sees every site's update)",
    "masked": "masked (SecAgg+: the server sees only the sum)",
    "he": "he (CKKS: the server adds ciphertexts; a separate key holder decrypts only the sum)",
}


@dataclass
class RoundLog:
    """What the runner writes and prints; supplied by runner.py."""

    write: Callable[[dict], dict]  # records a finished round (metrics.jsonl, the printed table); returns it
    echo: Callable[[str], None]


@dataclass
class ServerPlan:
    """The run as the server's configuration describes it."""

    config_digest: str
    rounds: int
    per_round: int
    sends_updates: bool
    vector_length: int  # the protocol input's length (the update, plus the adaptive-clipping indicator)
    seed: int
    # whether sites report losses, clipped counts and accuracies (False: DP without privacy.share_site_metrics,
    # the sites withhold them and every reply must carry them as null)
    site_metrics: bool


@dataclass
class Server:
    identity: Identity
    roster: Roster
    folder: PartyFolder
    plan: ServerPlan
    link: ServerLink
    global_state: dict[str, np.ndarray]
    layout: StateLayout
    protocol: Protocol | None
    privacy: ServerPrivacy
    history: list[dict] = field(default_factory=list)
    next_round: int = 0
    stopped: str | None = None
    failures: list[str] = field(default_factory=list)  # why each of the latest failed rounds in a row failed
    closing_heads: dict[str, str | None] = field(default_factory=dict)  # every party's last tree head, by close()

    def __post_init__(self) -> None:
        self.party_id = self.identity.party_id
        self.stamp = E.Stamp(self.identity, self.roster)
        self.site_ids = list(self.roster.client_ids)
        self.keyholder_id = self.roster.keyholder_id if self.protocol is not None and self.protocol.needs_keyholder \
            else None
        self.sampler = np.random.default_rng([self.plan.seed, 7])
        self.session = None  # the protocol's server session

    @property
    def audit(self):
        return self.link.audit

    @property
    def min_participants(self) -> int:
        """Fewer sites than this in a round and it is not aggregated: the protocol's own minimum, and at least
        2 for a secure protocol (the sum over one site is that site's update)."""
        if self.protocol is None:
            return 1
        return self.protocol.min_clients if self.protocol.insecure else max(2, self.protocol.min_clients)

    # ------------------------------------------------------------------------------------- the run

    def open(self, *, resume: bool, session: str | None = None) -> None:
        """Start (or, on ``resume``, continue from this server's own checkpoint) the run's session with every
        site and the key holder. ``session``: the new session's id when the caller drew it already (a
        deployment binds its network nodes to roster parties under it first); by default a fresh one."""
        state, checkpoint = self._restore() if resume else (None, None)
        # Every start, a resumed one too, is a new session: nothing signed before a crash is accepted after it.
        self.stamp.session = session or new_session_id()
        if self.protocol is not None and self.plan.sends_updates:
            self.session = self.protocol.server(self.identity, self.roster, session=self.stamp.session)
        self.audit.event("run_started", meta={"session": self.stamp.session,
                                              "protocol": self.protocol.name if self.protocol else "none"})
        if state is not None:
            self.audit.run_resumed(self.next_round, state["session"], checkpoint)
        parties = [*self.site_ids, *([self.keyholder_id] if self.keyholder_id else [])]
        fields = {"config_sha256": self.plan.config_digest, "next_round": self.next_round, "resume": resume,
                  "resumes_session": state["session"] if state else None, "clients": self.site_ids}
        opened = self._replies(E.OPENED, self.next_round,
                               self._request(E.OPEN, self.next_round, parties, lambda _: fields, {}))
        self._check_answered(E.OPEN, parties, opened)
        nonces = {party: envelope.fields.get("nonce") for party, envelope in opened.items()}
        raw = self._request(E.CONFIRM, self.next_round, parties, lambda party: {"nonce": nonces[party]}, {})
        to_us = {p: [m for m in messages if m.recipient == self.party_id] for p, messages in raw.items()}
        self._check_answered(E.CONFIRM, parties, self._replies(E.CONFIRMED, self.next_round, to_us))
        relayed = []
        for party, messages in raw.items():
            for m in messages:
                if m.recipient in self.site_ids and m.recipient != party:  # accepted for relay: logged as such
                    self.audit.received(party, m.data)
                    relayed.append(m)
                elif m.recipient != self.party_id:
                    self.audit.rejected(party, m.data, f"asked the server to relay a message to {m.recipient!r}")
        if relayed:  # the key holder's one-off setup messages for the sites
            for reply in self.link.exchange(relayed, f"{E.PROTOCOL}:setup"):
                for m in reply.messages or ():
                    self.audit.rejected(reply.party, m.data, "an answer to a relayed setup message (none is expected)")

    def run(self, log: RoundLog) -> None:
        while self.next_round < self.plan.rounds:
            round_index = self.next_round
            participants = self.privacy.participants(self.site_ids, self.plan.per_round, self.sampler)
            fillers = self.privacy.fillers(self.site_ids, participants, self.min_participants, self.sampler) \
                if self.session is not None else []
            refusal = self.privacy.refusal(round_index)
            if refusal is not None:
                self._budget_stop(round_index, refusal, log)
                return
            self.audit.event("round_started", round=round_index)
            record = self._round(round_index, participants, fillers)
            if record is None:
                self._budget_stop(round_index, self.stopped, log)
                return
            self.history.append(log.write(record))
            self._warn(record, log)
            self.next_round = round_index + 1
            aborted = record["aggregation"].get("aborted")
            self.failures = [*self.failures, f"round {round_index + 1}: {aborted}"] if aborted else []
            self._checkpoint()
            if len(self.failures) >= MAX_CONSECUTIVE_FAILED_ROUNDS:
                self._stop(f"stopped after round {round_index + 1}: {len(self.failures)} rounds in a row failed ("
                           + "; ".join(self.failures) + ")", log)
                return

    def close(self) -> dict[str, str | None]:
        """Seal the run: every party writes its outputs and closes its log; the server records their final tree
        heads, writes its ledger and closes its own log. Returns every party's final tree head (JSON)."""
        reason = self.stopped or "all rounds finished"
        parties = [*self.site_ids, *([self.keyholder_id] if self.keyholder_id else [])]
        replies = self._request(E.CLOSE, self.next_round, parties, lambda _: {"reason": reason[:256]}, {})
        heads = {party: envelope.fields["tree_head"] for party, envelope in
                 self._replies(E.CLOSED, self.next_round, replies, check=self._record_tree_head).items()}
        self._write_ledger()
        if self.plan.sends_updates:  # the server's own copy of what it computed, in its own folder
            save_file(self.global_state, str(self.folder.path / GLOBAL_STATE_FILE))
        heads[self.party_id] = self.audit.close(reason)
        self.folder.drop_checkpoints()
        self.closing_heads = heads
        return heads

    def audit_receipt(self, run: str) -> Receipt | None:
        """The run's audit receipt (audits/receipt.py), signed by this server once :meth:`close` ran: the last
        tree head each party handed it (in its close reply) and its own final one, and the SHA-256 of the roster
        file it pinned. None when auditing is off. Whoever keeps it outside the run folder can later tell a
        rewritten log, even one re-signed with every party's key."""
        if not self.closing_heads or None in self.closing_heads.values():
            return None
        heads = {party: SignedTreeHead.from_bytes(head) for party, head in self.closing_heads.items()}
        return Receipt.sign(self.identity.private_key, signer=self.party_id, run=run, session=self.stamp.session,
                            roster_sha256=self.roster.digest,
                            tree_heads=heads)

    def _budget_stop(self, round_index: int, reason: str, log: RoundLog) -> None:
        self.audit.event("budget_exceeded", round=round_index, meta={"reason": reason[:256]})
        self._stop(f"stopped before round {round_index + 1}: {reason}", log)

    def _stop(self, message: str, log: RoundLog) -> None:
        self.stopped = message
        log.echo(f"feddat-secure: {self.stopped}")

    @staticmethod
    def _warn(record: dict, log: RoundLog) -> None:
        """One line in the round log for a failed round, and one when the protocol clipped any site's input
        (when the sites report it)."""
        if "aborted" in record["aggregation"]:
            log.echo(f"feddat-secure: round {record['round']} failed, nothing applied: "
                     f"{record['aggregation']['aborted']}")
        clipped = {site: count for site, count in (record["clipped"] or {}).items() if count}
        if clipped:
            log.echo(f"feddat-secure: warning: round {record['round']}: the protocol clipped update entries to its "
                     f"input range ({', '.join(f'{site}: {count}' for site, count in clipped.items())}); the "
                     "aggregate is biased towards zero there")

    # ------------------------------------------------------------------------------------- one round

    def _round(self, round_index: int, participants: list[str], fillers: list[str]) -> dict | None:
        """One round among the sampled ``participants`` and the ``fillers`` (zero input, no training)."""
        start = time.perf_counter()
        terms = self.privacy.train_terms(len(participants))
        arrays = E.state_arrays(self.global_state) if self.plan.sends_updates else {}
        digest = E.model_digest(arrays) if arrays else None
        fields = {"model_sha256": digest, "send_update": self.plan.sends_updates, **terms}
        requests = self._request(E.TRAIN, round_index, [*participants, *fillers],
                                 lambda party: {**fields, "zero_input": True} if party in fillers else fields, arrays)
        # A malformed report is refused (and logged as rejected) inside _replies: the site does not take part.
        replies = self._replies(E.UPDATE, round_index, requests, check=self._checked_update)
        trained, filled, refused, losses, epsilon, clipped = [], [], {}, {}, {}, {}
        shared = self.plan.site_metrics
        for party in [*participants, *fillers]:
            report = replies.get(party)
            if report is None:
                continue
            reason = self._checked_update(report)
            if reason is not None:
                refused[party] = reason
                continue
            if party in fillers:
                filled.append(party)
                continue
            trained.append(party)
            if shared:
                clipped[party] = report.fields["clipped"]
                losses[party] = dict(report.fields["losses"])
            epsilon.update({f"{level}:{party}": value for level, value in report.fields["epsilon"].items()})
        if refused and not trained:
            self.stopped = "; ".join(f"{party}: {reason}" for party, reason in refused.items())
            return None
        cohort = [party for party in self.site_ids if party in trained or party in filled]
        aggregate, spent = self._aggregate(round_index, cohort, digest or "")
        if spent is not None:
            epsilon["client:federation"] = spent
        # Tree heads with every party every round, not only the round's cohort: a party that did not take part still
        # logged the round (its evaluation), and a log no peer holds a recent head of can be cut unnoticed.
        metrics = self._evaluate(round_index, [*self.site_ids, *([self.keyholder_id] if self.keyholder_id else [])])
        # Withheld (DP without privacy.share_site_metrics): null, never 0 or an empty mean; "clients" still says
        # which sites evaluated.
        withheld = {} if shared else {"site_metrics": "withheld"}
        return {"round": round_index + 1, "participants": participants, "fillers": fillers, "trained": trained,
                "refused": refused, "clients": metrics, "mean": mean_accuracies(metrics) if shared else None,
                "train_loss": losses if shared else None, "clipped": clipped if shared else None, **withheld,
                "seconds": round(time.perf_counter() - start, 3), "aggregation": aggregate,
                "bytes_to_server_total": sum(self.link.bytes_received.values()),
                "bytes_to_clients_total": sum(self.link.bytes_sent.values()), "privacy": epsilon}

    def _checked_update(self, envelope: Envelope) -> str | None:
        """The reason a site refused to train, or None; a malformed report raises MessageRejected."""
        fields, sender = envelope.fields, envelope.sender
        if set(fields) != {"refused", "num_examples", "losses", "epsilon", "clipped"}:
            raise MessageRejected(f"an update report has fields {sorted(fields)}", sender)
        clipped = fields["clipped"]
        if not self.plan.site_metrics:
            if clipped is not None or fields["losses"] is not None:
                raise MessageRejected("under DP without privacy.share_site_metrics an update report carries "
                                      "'losses' and 'clipped' as null", sender)
        elif not isinstance(clipped, int) or isinstance(clipped, bool) or not 0 <= clipped <= self.plan.vector_length:
            raise MessageRejected(f"'clipped' must be an integer in 0..{self.plan.vector_length}", sender)
        if fields["refused"] is not None:
            return str(fields["refused"])
        count = fields["num_examples"]
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
            raise MessageRejected("num_examples must be a positive integer", sender)
        losses = fields["losses"]
        if not isinstance(fields["epsilon"], dict) or (self.plan.site_metrics and not isinstance(losses, dict)):
            raise MessageRejected("'losses' and 'epsilon' must be objects", sender)
        if envelope.arrays or envelope.blobs:
            raise MessageRejected("an update report carries data; updates travel only through the secure-aggregation "
                                  "protocol", sender)
        return None

    def _aggregate(self, round_index: int, cohort: list[str], context: str) -> tuple[dict[str, Any], float | None]:
        """Run the protocol round among ``cohort`` (the sites that trained and the fillers) under ``context`` (the
        SHA-256 of the model the server sent) and apply its aggregate. Returns the round's aggregation record and
        ε of the federation's client-level ledger after the round's charge (None: nothing charged).

        The client-level charge (central, distributed) is the round's planned event, written to disk before the
        protocol round starts: whatever the round then releases (a sum a malicious server computed before an
        abort, the noisy aggregate, a crash after either) is already accounted, and an aborted round is charged
        like any other. Record-level DP needs nothing here: each site charges its own ledger."""
        if self.session is None:
            return {"protocol": "none (local training)"}, None
        name = self.protocol.name
        if len(cohort) < self.min_participants:
            # Too few inputs (sites refused or dropped; never the sample's size: fillers make up a small Poisson
            # sample): nothing is aggregated or applied. Central noise: charged as if the round had released
            # (which sites refuse or drop may depend on who was sampled); distributed: no share reached any sum.
            reason = f"{len(cohort)} sites sent input, the protocol needs {self.min_participants}"
            self.audit.event("round_finished", round=round_index, meta={"outcome": "skipped"})
            central = self.privacy.client is not None and self.privacy.client.placement == "central"
            return {"protocol": name, "rejections": [], "skipped": reason, "counted": [], "counted_sites": 0}, \
                self._charge(round_index) if central else None
        spent = self._charge(round_index)
        rejections: list[str] = []
        answered: set[str] = set()
        relay_to = {*cohort, *([self.keyholder_id] if self.keyholder_id else [])}
        try:
            result = run_protocol_round(self.session, self.link, cohort, round_index, self.plan.vector_length,
                                        protocol=name, server_id=self.party_id, relay_to=relay_to,
                                        rejections=rejections, answered=answered, round_context=context)
            vector = self._checked_result(result, round_index)
        except (ProtocolError, ValueError, ArithmeticError) as failure:  # a protocol step failing on bad input
            reason = f"aborted at stage {failure.stage!r}: {failure.reason}" if isinstance(failure, RoundAborted) \
                else f"{type(failure).__name__}: {failure}"
            self.audit.event("round_finished", round=round_index, meta={"outcome": "aborted", "reason": reason[:256]})
            return {"protocol": name, "rejections": rejections, "aborted": reason, "counted": [],
                    "counted_sites": None, "sent_protocol_messages": sorted(answered)}, spent
        summed, denominator = self.privacy.aggregate_to_apply(vector, result.total_weight, self.sampler)
        self.global_state = apply_mean_update(self.layout, self.global_state, summed, denominator)
        self.audit.event("aggregate_computed", round=round_index,
                         data=np.ascontiguousarray(summed, dtype="<f8").tobytes(),
                         meta={"protocol": name, "counted": len(result.counted)})
        self.audit.event("adapter_applied", round=round_index)
        return {"protocol": name, "rejections": rejections, "counted": list(result.counted),
                "counted_sites": len(result.counted), "total_weight": result.total_weight}, spent

    def _charge(self, round_index: int) -> float | None:
        """Charge the round's planned client-level event to the federation's ledger and write the ledger file
        durably, before anything of the round can be released (write-ahead: a crash after this point resumes
        with the charge, and the retried round is charged again). ε so far, or None without that ledger."""
        spent = self.privacy.charge(round_index)
        if spent is not None:
            self._write_ledger()
            self.audit.event("privacy_spent", round=round_index,
                             meta={"level": "client", "epsilon": spent, "delta": self.privacy.client.delta})
        return spent

    def _checked_result(self, result: AggregateResult, round_index: int) -> np.ndarray:
        """The aggregate's vector, when it is one the server can apply: a finite vector of the round's length with
        a finite, positive total weight; otherwise the round aborts (RoundAborted) and nothing is applied."""
        vector = np.asarray(result.vector)
        weight = result.total_weight
        if vector.shape != (self.plan.vector_length,) or vector.dtype.kind not in "iuf" \
                or not np.all(np.isfinite(vector)):
            raise RoundAborted("result", f"the aggregate is not a finite vector of {self.plan.vector_length}",
                               round_index)
        if isinstance(weight, bool) or not isinstance(weight, int | float | np.integer | np.floating) \
                or not np.isfinite(weight) or weight <= 0:
            raise RoundAborted("result", f"the aggregate's total weight {weight!r} is not a positive number",
                               round_index)
        return vector

    def _evaluate(self, round_index: int, head_parties: Sequence[str]) -> dict[str, dict | None]:
        """Every site evaluates the new global model; in the same exchange (one message per party on a network:
        a round trip fewer) the server and each of the round's parties (``head_parties``) swap signed tree heads,
        as ordinary (logged) messages. Returns each answering site's metrics (None: withheld)."""
        arrays = E.state_arrays(self.global_state) if self.plan.sends_updates else {}
        fields = {"model_sha256": E.model_digest(arrays)} if arrays else {}
        head = self.audit.tree_head()  # None when auditing is off: the exchange then only closes the round
        requests = [Outgoing(p, self.stamp.envelope(E.EVALUATE, round_index, p, fields, arrays)) for p in self.site_ids]
        requests += [Outgoing(p, self.stamp.envelope(E.TREE_HEAD, round_index, p, {"tree_head": head}))
                     for p in head_parties]
        replies = self.link.exchange(requests, f"{E.PROTOCOL}:{E.EVALUATE}")
        answered = [{reply.party: list(reply.messages) for reply in part if reply.messages is not None}
                    for part in (replies[:len(self.site_ids)], replies[len(self.site_ids):])]
        check = _check_metrics if self.plan.site_metrics else _check_withheld_metrics
        metrics = self._replies(E.METRICS, round_index, answered[0], check=check)
        self._replies(E.TREE_HEAD, round_index, answered[1], check=self._record_tree_head)
        return {party: dict(metrics[party].fields["metrics"]) if self.plan.site_metrics else None
                for party in self.site_ids if party in metrics}

    def _record_tree_head(self, envelope: Envelope) -> None:
        """A tree-head (or closing) reply holds exactly ``tree_head``: None (auditing off) or a signed tree head
        that verifies under the sender's roster key, which is then recorded; anything else raises MessageRejected."""
        head = envelope.fields.get("tree_head")
        if set(envelope.fields) != {"tree_head"} or not (head is None or isinstance(head, str)) \
                or envelope.arrays or envelope.blobs:
            raise MessageRejected("a tree-head reply holds exactly the field 'tree_head' (a string or null)",
                                  envelope.sender)
        if head is not None:
            self.audit.record_peer_tree_head(envelope.sender, head)

    # ------------------------------------------------------------------------------------ messaging

    def _request(self, stage: str, round_index: int, parties: Sequence[str], fields: Callable[[str], dict],
                 arrays: Mapping[str, np.ndarray]) -> dict[str, list[Outgoing]]:
        requests = [Outgoing(p, self.stamp.envelope(stage, round_index, p, fields(p), arrays)) for p in parties]
        replies: list[Reply] = self.link.exchange(requests, f"{E.PROTOCOL}:{stage}")
        return {reply.party: list(reply.messages) for reply in replies if reply.messages is not None}

    def _replies(self, stage: str, round_index: int, replies: Mapping[str, list[Outgoing]],
                 check: Callable[[Envelope], object] | None = None) -> dict[str, Envelope]:
        """Each party's one signed reply of ``stage`` to us in this session and round; anything else in a reply
        is refused (logged as rejected), an accepted one logged as received once it passed every check, and
        a party without an acceptable reply counts as not having answered. ``check``
        validates (and may record) a reply's content, raising MessageRejected: a signature proves who sent a
        reply, not that its fields are sane, and a malicious site must not crash the run with them."""
        accepted = {}
        for party, messages in replies.items():
            for message in messages:
                try:
                    if message.recipient != self.party_id:
                        raise MessageRejected(f"a {stage!r} reply addressed to {message.recipient!r}", party)
                    envelope = self.stamp.open(message.data, session=self.stamp.session)
                    if envelope.sender != party or envelope.stage != stage or envelope.round != round_index \
                            or party in accepted:
                        raise MessageRejected(f"expected one {stage!r} reply of round {round_index + 1} from "
                                              f"{party!r}, got {envelope.stage!r} of round {envelope.round + 1} from "
                                              f"{envelope.sender!r}", party)
                    if check is not None:
                        check(envelope)
                    accepted[party] = envelope
                    self.audit.received(party, message.data)
                except MessageRejected as rejection:
                    self.audit.rejected(party, message.data, rejection.reason)
        return accepted

    def _check_answered(self, stage: str, parties: Sequence[str], replies: Mapping[str, Any]) -> None:
        missing = [party for party in parties if party not in replies]
        if missing:
            raise FederationError(f"no acceptable answer to {stage!r} from {', '.join(missing)}; see the server's "
                                  "audit log")

    # ------------------------------------------------------------------------------------ checkpoints

    def _write_ledger(self) -> None:
        if self.privacy.client is not None:
            write_ledger(self.folder.ledger, self.privacy.ledger())

    def _checkpoint(self) -> None:
        save_checkpoint(self.folder.checkpoint(self.next_round), {
            "session": self.stamp.session,
            "next_round": self.next_round,
            "global_state": self.global_state,
            "sampler": self.sampler.bit_generator.state,
            "bytes_sent": dict(self.link.bytes_sent),
            "bytes_received": dict(self.link.bytes_received),
            "history": self.history,
            "failures": self.failures,
            "privacy": self.privacy.state_dict(),
        })
        self._write_ledger()
        self.folder.keep_checkpoints_from(self.next_round)

    def _restore(self) -> tuple[dict[str, Any], str]:
        """Restore the latest checkpoint; returns its state and the SHA-256 of its file."""
        found = self.folder.checkpoints()
        if not found:
            raise FederationError(f"cannot resume: the server has no checkpoint in {str(self.folder.path)!r}")
        state = load_checkpoint(found[max(found)])
        digest = checkpoint_sha256(found[max(found)])
        self.next_round = int(state["next_round"])
        self.global_state = {k: np.asarray(v, dtype=np.float32) for k, v in state["global_state"].items()}
        self.sampler.bit_generator.state = state["sampler"]
        self.link.bytes_sent.update(state["bytes_sent"])
        self.link.bytes_received.update(state["bytes_received"])
        self.history = list(state["history"])
        self.failures = list(state["failures"])
        self.privacy.load_state_dict(state["privacy"])
        try:  # the charge of a round interrupted after it was charged is in the ledger file, not the checkpoint
            self.privacy.restore_written_ahead(self.folder.ledger)
        except ValueError as error:
            raise FederationError(f"cannot resume: {error}") from None
        return state, digest


def _check_metrics(envelope: Envelope) -> None:
    """An evaluate reply holds exactly ``metrics``: accuracies by name (str → a finite number in [0, 1])."""
    metrics = envelope.fields.get("metrics")
    if set(envelope.fields) != {"metrics"} or not isinstance(metrics, dict) or envelope.arrays or envelope.blobs \
            or not all(isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
                       for value in metrics.values()):
        raise MessageRejected("an evaluate reply holds exactly 'metrics', accuracies in [0, 1] by name",
                              envelope.sender)


def _check_withheld_metrics(envelope: Envelope) -> None:
    """Under DP without privacy.share_site_metrics an evaluate reply holds exactly ``metrics``: null."""
    if set(envelope.fields) != {"metrics"} or envelope.fields["metrics"] is not None or envelope.arrays \
            or envelope.blobs:
        raise MessageRejected("under DP without privacy.share_site_metrics an evaluate reply holds exactly "
                              "'metrics': null", envelope.sender)


def mean_accuracies(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    modes = [m for m in ("dat", "shared", "client") if metrics and all(m in v for v in metrics.values())]
    return {m: float(np.mean([v[m] for v in metrics.values()])) for m in modes}
