"""A site: one data owner. It holds everything that is its own and answers the server's signed requests.

What a site owns and nobody else holds: its identity key, its data, its model (adapters, head, trainer,
optimizers), its privacy ledgers and budget gates (record level; client level under local and distributed
noise), its audit log, its checkpoints and its random generators (numpy for batches and noise, its own torch
generator state for the model's random choices). It trains in no round beyond the configuration's planned
rounds, whatever the server asks.
It learns about the run only from signed messages: the server's session id, the round, the global model
(checked against the SHA-256 the server signed with it), the clip norm and the number of noise shares.

After local training the site's update (the change of its travelling state) never goes to the server
directly: after its own client-level step (clipping, local noise, or a distributed noise share) it becomes
the input of the site's secure-aggregation session; the ``update`` reply carries only the example count,
the losses when no record-level DP is on, the ε the site has spent, and how many of the update's entries the
protocol clipped to its input range. Under DP (either level) the losses, the clipped count and the
``evaluate`` reply's accuracies are computed from the site's records outside any accounted mechanism: unless
the configuration opts in (``privacy.share_site_metrics``) they travel as null and the site keeps them in its
own ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protocols import MessageRejected, Outgoing, Protocol, ProtocolError, Roster
from protocols.identity import Identity
from protocols.wire import Envelope, peek

from ..data.batching import EncodedSplit
from ..model.adapters import save_peft_adapter
from ..model.classifier import save_head
from ..privacy.budget import BudgetExceeded
from ..privacy.run_privacy import SitePrivacy, write_ledger
from ..training.trainers import LocalTrainer
from . import envelopes as E
from .channel import PartyAudit
from .checkpoint import checkpoint_sha256, load_checkpoint, save_checkpoint
from .party_folder import PartyFolder, keep_rounds_until
from .updates import StateLayout, update_vector


class Site:
    """One site's party. ``handle(bytes) -> [Outgoing]`` is all the rest of the world can call."""

    def __init__(self, identity: Identity, roster: Roster, folder: PartyFolder, *, config_digest: str,
                 trainer: LocalTrainer, train: EncodedSplit, test: EncodedSplit, answers: tuple[str, ...],
                 layout: StateLayout, sends_updates: bool, protocol: Protocol | None, privacy: SitePrivacy,
                 weight: int, seed: int, audit: PartyAudit, base_model_path: Path, rounds: int) -> None:
        self.party_id = identity.party_id
        self.stamp = E.Stamp(identity, roster, model_values=layout.size)
        self.roster = roster
        self.folder = folder
        self.config_digest = config_digest
        self.trainer = trainer
        self.train = train
        self.test = test
        self.answers = answers
        self.layout = layout
        self.sends_updates = sends_updates
        self.protocol = protocol
        self.privacy = privacy
        self.weight = weight
        self.rng = np.random.default_rng(seed)
        self.torch_rng = torch.get_rng_state()  # taken right after this site's model was built from its seed
        self.audit = audit
        self.base_model_path = base_model_path
        self.rounds = rounds  # the configuration's planned rounds: every DP level is planned (and calibrated) for them
        self.aggregation = None  # the protocol's client session, once the run's session is confirmed
        self.opening = E.Opening()
        self.last_trained_round = -1
        self.last_evaluated_round = -1
        self.kept: dict[str, Any] = {}  # DP, metrics withheld: this round's training values for its metrics file

    # ------------------------------------------------------------------------------------------ messages

    def handle(self, data: bytes) -> list[Outgoing]:
        header = peek(data)
        if header is None:
            raise MessageRejected("not a readable message")
        if header.protocol == E.PROTOCOL:
            return [self._runner_message(data, header)]
        if self.aggregation is not None and self.protocol is not None and header.protocol == self.protocol.name:
            return self.aggregation.handle(data)
        raise MessageRejected(f"{self.party_id} takes no {header.protocol!r} messages now", header.sender)

    def _runner_message(self, data: bytes, header: Envelope) -> Outgoing:
        envelope = self.stamp.request(data, header, self.opening)
        handler = {E.OPEN: self._open, E.CONFIRM: self._confirm, E.TRAIN: self._train, E.EVALUATE: self._evaluate,
                   E.TREE_HEAD: self._tree_head, E.CLOSE: self._close}.get(envelope.stage)
        if handler is None:
            raise MessageRejected(f"a site takes no {envelope.stage!r} request", envelope.sender)
        fields = handler(envelope)
        return Outgoing(envelope.sender, self.stamp.envelope(E.REPLY_TO[envelope.stage], envelope.round,
                                                             envelope.sender, fields, session=envelope.session))

    # -------------------------------------------------------------------------------------------- stages

    def _open(self, envelope: Envelope) -> dict[str, Any]:
        fields = envelope.fields
        if fields.get("config_sha256") != self.config_digest:
            raise MessageRejected(f"the server runs configuration {fields.get('config_sha256')!r}; this site agreed "
                                  f"to {self.config_digest!r}", envelope.sender)
        next_round = fields.get("next_round")
        if not isinstance(next_round, int) or isinstance(next_round, bool) or next_round < 0:
            raise MessageRejected("'next_round' must be an integer >= 0", envelope.sender)
        resumed = None  # (checkpoint state, its file's SHA-256)
        if fields.get("resume"):  # a resumed run is a new session; the checkpoint names the one it continues
            resumed = self._own_checkpoint(next_round, fields.get("resumes_session"), envelope.sender)
        nonce = self.opening.offer(envelope.session, (next_round, resumed))  # refused once a session is confirmed
        return {"next_round": next_round, "nonce": nonce}

    def _confirm(self, envelope: Envelope) -> dict[str, Any]:
        """The server proved it is live in this session (it echoed our nonce): only now does the site act,
        restoring its own checkpoint when the server resumes the run."""
        next_round, resumed = self.opening.confirm(envelope)
        self.stamp.session = envelope.session
        if resumed is not None:
            self._restore(resumed[0], next_round)
        else:
            self.privacy.run = envelope.session  # the run's id in the dataset ledger: its first session
        self.privacy.observe_dataset()
        if self.sends_updates and self.protocol is not None:  # a fresh protocol session: rounds are whole
            self.aggregation = self.protocol.client(self.stamp.identity, self.roster, self.roster.server_id,
                                                    session=envelope.session)
        self.audit.event("run_started", meta={"session": envelope.session, **self.privacy.dataset_anchor()})
        if resumed is not None:
            self.audit.run_resumed(next_round, resumed[0]["session"], resumed[1])
        return {}

    def _train(self, envelope: Envelope) -> dict[str, Any]:
        round_index = envelope.round
        if round_index <= self.last_trained_round:
            raise MessageRejected(f"round {round_index + 1} is not after round {self.last_trained_round + 1}, the last "
                                  "one this site trained (replay?)", envelope.sender)
        if round_index >= self.rounds:  # whatever the budgets say: ε and the server's ledger count on the plan
            reason = (f"round {round_index + 1} is beyond the {self.rounds} rounds of the configuration this site "
                      "agreed to")
            self.audit.event("budget_exceeded", round=round_index, meta={"reason": reason})
            return {"refused": reason, "num_examples": len(self.train), "epsilon": {},
                    **self._reported(round_index, {"losses": {}, "clipped": 0}, trained=False)}
        send_update = envelope.fields.get("send_update")
        if send_update is not self.sends_updates:
            raise MessageRejected(f"'send_update' must be {self.sends_updates} for this run's algorithm",
                                  envelope.sender)
        model = E.checked_model(envelope) if send_update else None
        clip_norm, noise_shares = self._client_terms(envelope)
        if "zero_input" in envelope.fields:  # a filler: no training, no charge (docs/privacy.md, "Who takes part")
            return self._zero_input(envelope)
        refusal = self.privacy.refusal(round_index)
        if refusal is None:
            if model is not None:  # checked before anything is charged: a model that does not fit costs nothing
                self._load_global(model, envelope.sender)
                self.audit.event("adapter_applied", round=round_index)
            try:  # write-ahead: charged (dataset ledger fsynced, then the run's) before anything is computed
                spent = self.privacy.charge_ahead(round_index)
            except BudgetExceeded as exceeded:  # the dataset's budget, across every run on these records
                refusal = "; ".join(exceeded.reasons)
        if refusal is not None:
            self.audit.event("budget_exceeded", round=round_index, meta={"reason": refusal[:256]})
            self.last_trained_round = round_index
            return {"refused": refusal, "num_examples": len(self.train), "epsilon": {},
                    **self._reported(round_index, {"losses": {}, "clipped": 0}, trained=False)}
        self.last_trained_round = round_index  # charged: this round is never charged again in this session
        for level, epsilon_so_far in spent.items():
            delta = (self.privacy.record if level == "record" else self.privacy.client).delta
            self.audit.event("privacy_spent", round=round_index,
                             meta={"level": level, "epsilon": epsilon_so_far, "delta": delta,
                                   **self.privacy.dataset_anchor()})
        received = self.trainer.shared_state()
        with self._own_torch_rng():
            losses = self.trainer.train_round_on(self.train, self.rng, round_index)
        self.privacy.check_trained(self.trainer.round_events)
        epsilon, clipped = dict(spent), 0
        if send_update:
            update = update_vector(self.layout, self.trainer.shared_state(), received)
            update, noise = self.privacy.update_step(update, clip_norm=clip_norm, noise_shares=noise_shares,
                                                     rng=self.rng)
            # The protocol binds the digest of the model this site verified and trained from (checked_model
            # above) into what the site signs, so a server that sent the sites different models gets no sum.
            # Distributed noise: this site's share is sized for planned_shares(noise_shares) shares, so it refuses
            # to be unmasked among fewer survivors (a server claiming dropouts would otherwise release a sum with
            # less noise), and rounds conditionally to the norm bound its sensitivity counts on.
            extra = {} if noise is None else {"noise": noise,
                                              "min_survivors": self.privacy.client.planned_shares(noise_shares),
                                              "rounding_norm_bound": self.privacy.client.rounding_norm_bound}
            try:
                clipped = self.aggregation.set_input(round_index, update, self.weight,
                                                     round_context=envelope.fields["model_sha256"], **extra)
            except ProtocolError as error:  # this site's own input or terms do not fit the protocol: it takes no part
                raise MessageRejected(f"this site cannot take part in round {round_index + 1}'s aggregation: "
                                      f"{error}", envelope.sender) from None
        return {"refused": None, "num_examples": len(self.train), "epsilon": epsilon,
                **self._reported(round_index, {"losses": losses, "clipped": clipped}, trained=True)}

    def _reported(self, round_index: int, values: dict[str, Any], *, trained: bool) -> dict[str, Any]:
        """The update reply's ``losses`` and ``clipped``: as computed, or, when this site withholds its metrics
        (DP without ``privacy.share_site_metrics``), null in the reply and kept for its own metrics file."""
        if not self.privacy.withholds_metrics:
            return values
        self.kept = {"round": round_index, "train_loss": values["losses"], "clipped": values["clipped"]} \
            if trained else {}
        return dict.fromkeys(values)

    def _zero_input(self, envelope: Envelope) -> dict[str, Any]:
        """Take part in the round's aggregation with the zero vector, without training: a filler that makes up a
        Poisson sample of sites smaller than the protocol's minimum, so that the round releases exactly the
        sampled sites' clipped updates plus the central noise. Zero adds nothing to the sum nor to the adaptive
        clipping count (its indicator slot is 0, not ±½), and nothing of this site's records is used, so nothing
        is charged. Taken only under central client-level DP with Poisson sampling, whose server is trusted
        anyway: elsewhere a malicious server could silence a site's contribution without anyone noticing."""
        client, round_index = self.privacy.client, envelope.round
        if envelope.fields["zero_input"] is not True or client is None or not client.poisson_sampling \
                or self.aggregation is None:
            raise MessageRejected("'zero_input' is taken only under central client-level DP with Poisson sampling "
                                  "of sites", envelope.sender)
        self.last_trained_round = round_index
        length = self.layout.size + (1 if client.adaptive else 0)
        try:
            self.aggregation.set_input(round_index, np.zeros(length), self.weight,
                                       round_context=envelope.fields["model_sha256"])
        except ProtocolError as error:
            raise MessageRejected(f"this site cannot take part in round {round_index + 1}'s aggregation: {error}",
                                  envelope.sender) from None
        return {"refused": None, "num_examples": len(self.train), "epsilon": {},
                **self._reported(round_index, {"losses": {}, "clipped": 0}, trained=False)}

    def _load_global(self, model: dict[str, np.ndarray], sender: str) -> None:
        """Replace the received adapters with the server's model, refusing (nothing applied) one that does not fit."""
        try:
            self.trainer.load_global(model)
        except ValueError as error:  # AdapterStateError included: names, shapes or a head that should stay local
            raise MessageRejected(f"the model does not fit this site's: {error}", sender) from None

    def _client_terms(self, envelope: Envelope) -> tuple[float | None, int | None]:
        """The round's clip norm and noise-share count from the server, checked against this site's own
        settings: a fixed clip norm must be exactly the configured one, an adaptive one positive and finite."""
        client = self.privacy.client
        clip_norm, shares = envelope.fields.get("clip_norm"), envelope.fields.get("noise_shares")
        if client is None:
            if clip_norm is not None or shares is not None:
                raise MessageRejected("client-level terms in a run without client-level DP", envelope.sender)
            return None, None
        if isinstance(clip_norm, bool) or not isinstance(clip_norm, int | float) or not math.isfinite(clip_norm) \
                or clip_norm <= 0 or (not client.adaptive and clip_norm != client.clip_norm):
            raise MessageRejected(f"clip norm {clip_norm!r} is not this site's ({client.clip_norm}, "
                                  f"{'adaptive' if client.adaptive else 'fixed'})", envelope.sender)
        if client.placement == "distributed":
            if isinstance(shares, bool) or not isinstance(shares, int) \
                    or not client.tolerated_dropouts < shares <= len(self.roster.client_ids):
                raise MessageRejected(f"noise shares {shares!r} outside ({client.tolerated_dropouts}, "
                                      f"{len(self.roster.client_ids)}]", envelope.sender)
        elif shares is not None:
            raise MessageRejected("noise shares belong to the distributed placement", envelope.sender)
        return float(clip_norm), shares

    def _evaluate(self, envelope: Envelope) -> dict[str, Any]:
        round_index = envelope.round
        if round_index <= self.last_evaluated_round:
            raise MessageRejected(f"round {round_index + 1} was already evaluated (replay?)", envelope.sender)
        if self.sends_updates or envelope.arrays or envelope.fields.get("model_sha256") is not None:
            self._load_global(E.checked_model(envelope), envelope.sender)  # a claimed model must be there
        with self._own_torch_rng():
            metrics = self.trainer.evaluate(self.test)
        self.last_evaluated_round = round_index
        if self.privacy.withholds_metrics:
            self._keep_metrics(round_index, metrics)
            metrics = None
        self._checkpoint(round_index + 1)
        return {"metrics": metrics}

    def _keep_metrics(self, round_index: int, accuracy: dict[str, float]) -> None:
        """Append the round's line to this site's own ``metrics.jsonl``: its accuracies and, when it trained
        in the round, its losses and clipped count; the data owner sees them, the server does not."""
        line = {"round": round_index + 1, "accuracy": accuracy}
        if self.kept.get("round") == round_index:
            line.update(train_loss=self.kept["train_loss"], clipped=self.kept["clipped"])
        with open(self.folder.metrics, "a") as stream:
            stream.write(json.dumps(line, sort_keys=True) + "\n")
        self.kept = {}

    def _tree_head(self, envelope: Envelope) -> dict[str, Any]:
        head = envelope.fields.get("tree_head")
        if head is not None:
            self.audit.record_peer_tree_head(envelope.sender, head)
        return {"tree_head": self.audit.tree_head()}

    def _close(self, envelope: Envelope) -> dict[str, Any]:
        reason = envelope.fields.get("reason")
        if not isinstance(reason, str):
            raise MessageRejected("'reason' must be a string", envelope.sender)
        self.save_outputs()
        if self.privacy.keeps_ledger:
            write_ledger(self.folder.ledger, self.privacy.ledger())
        head = self.audit.close_after_reply(reason)
        self.folder.drop_checkpoints()
        return {"tree_head": head}

    # --------------------------------------------------------------------------------- what the site keeps

    def save_outputs(self) -> None:
        """Write what this site keeps: its adapters in PEFT format and, when local, its head and answers."""
        adapters = self.trainer.model.adapters
        with self.trainer.averaged():  # the model the site evaluated
            for name in self.trainer.kept:
                save_peft_adapter(adapters.get_state(name), adapters.settings, self.base_model_path,
                                  self.folder.path / f"{name}_adapter")
            if not self.trainer.head_travels:
                save_head(self.trainer.model.head_state(), self.answers, self.folder.path)

    @contextlib.contextmanager
    def _own_torch_rng(self):
        """Run with this site's own torch generator state (the model draws from torch's default generator:
        ViLT samples image patches on every forward pass), so no site's draws depend on another's."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.torch_rng)
            yield
            self.torch_rng = torch.get_rng_state()

    def _checkpoint(self, next_round: int) -> None:
        save_checkpoint(self.folder.checkpoint(next_round), {
            "session": self.stamp.session,
            "run": self.privacy.run,
            "trainer": self.trainer.state_dict(),
            "rng": self.rng.bit_generator.state,
            "torch_rng": self.torch_rng,
            "last_trained_round": self.last_trained_round,
            "last_evaluated_round": self.last_evaluated_round,
            "privacy": self.privacy.state_dict(),
        })
        if self.privacy.keeps_ledger:
            write_ledger(self.folder.ledger, self.privacy.ledger())
        self.folder.keep_checkpoints_from(next_round - 1)

    def _own_checkpoint(self, next_round: int, session: str, sender: str) -> tuple[dict[str, Any], str]:
        """This site's own state when ``next_round`` is next, read (nothing applied) from its checkpoint of that
        round, which must belong to ``session``; with the SHA-256 of the checkpoint's file."""
        path = self.folder.checkpoint(next_round)
        if not path.is_file():
            raise MessageRejected(f"this site has no checkpoint to resume round {next_round + 1} from", sender)
        state = load_checkpoint(path)
        if state["session"] != session:
            raise MessageRejected(f"the checkpoint for round {next_round + 1} belongs to session {state['session']!r}, "
                                  f"not {session!r}", sender)
        return state, checkpoint_sha256(path)

    def _restore(self, state: dict[str, Any], next_round: int) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self.rng.bit_generator.state = state["rng"]
        self.torch_rng = state["torch_rng"]
        self.last_trained_round = int(state["last_trained_round"])
        self.last_evaluated_round = int(state["last_evaluated_round"])
        self.privacy.load_state_dict(state["privacy"])
        self.privacy.resume(state["run"])
        keep_rounds_until(self.folder.metrics, next_round)
        self.folder.keep_checkpoints_from(next_round)
