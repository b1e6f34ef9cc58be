"""One secure-aggregation round driven by the server over a :class:`~.channel.ServerLink`.

The protocol's server session says what to send; the link delivers each stage's messages at once (a
deployment sends them in parallel) and returns the replies. Replies for the server go into its session;
replies for another party (the HE key holder's context for each site) are relayed in the next wave.
Whoever has not answered by the stage's deadline has dropped out; the session decides, when the stage
closes, whether the round can still succeed (or raises RoundAborted).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from protocols import AggregateResult, Outgoing, ProtocolError, ServerSession
from protocols.simulation import run_stages

from .channel import ServerLink

MAX_RELAY_WAVES = 8  # a stage's messages are answered within a few waves; more means a party loops


def run_protocol_round(session: ServerSession, link: ServerLink, clients: Sequence[str], round_index: int,
                       vector_length: int, *, protocol: str, server_id: str, relay_to: Collection[str],
                       rejections: list[str], answered: set[str], round_context: str = "") -> AggregateResult:
    """Run the round to its end and return the aggregate; RoundAborted (any ProtocolError) propagates.
    ``round_context`` is what the server announces as the round's shared context (the SHA-256 of the model it
    sent the sites; every client compares it with its own). ``relay_to``: the parties the server forwards other
    parties' messages to (this round's clients and the key holder); a message for anyone else is refused.
    Every refused message is appended to ``rejections`` and logged by the link; every client that sent the
    server anything in this round is added to ``answered`` (also when the round then aborts: the server's
    privacy accounting must know whose data may have reached it)."""
    members = set(clients)

    def deliver_stage(outgoing: Sequence[Outgoing]) -> None:
        _deliver(session, link, outgoing, f"{protocol}:{session.stage}", server_id, relay_to, rejections, members,
                 answered)

    return run_stages(session, round_index, clients, vector_length, deliver_stage, round_context=round_context)


def _deliver(session: ServerSession, link: ServerLink, outgoing: Sequence[Outgoing], stage: str, server_id: str,
             relay_to: Collection[str], rejections: list[str], clients: Collection[str], answered: set[str]) -> None:
    wave = list(outgoing)
    for _ in range(MAX_RELAY_WAVES):
        if not wave:
            return
        relayed: list[Outgoing] = []
        replies = link.exchange(wave, stage)
        # the stage's replies are handed to the server together, which may check their signatures side by side
        # (ServerSession.receive_each); each is still taken in, and audited, in order
        outcomes = session.receive_each([message.data for reply in replies for message in reply.messages or ()
                                         if message.recipient == server_id])
        for reply in replies:
            if reply.messages and reply.party in clients:
                answered.add(reply.party)
            for message in reply.messages or ():
                if message.recipient == server_id:
                    try:
                        rejection = next(outcomes)
                    except ProtocolError as error:  # the round ends on it (RoundAborted): not taken in
                        link.audit.rejected(reply.party, message.data, f"{type(error).__name__}: {error}")
                        raise
                    if rejection is not None:
                        _refuse(link, reply.party, message.data, rejection.reason, rejections)
                    else:
                        link.audit.received(reply.party, message.data)
                elif message.recipient in relay_to and message.recipient != reply.party:
                    link.audit.received(reply.party, message.data)  # accepted for relay
                    relayed.append(message)
                else:
                    _refuse(link, reply.party, message.data,
                            f"asked the server to relay a message to {message.recipient!r}, who is not in this round",
                            rejections)
        wave = relayed
    raise ProtocolError(f"stage {stage!r}: parties kept answering after {MAX_RELAY_WAVES} relays")


def _refuse(link: ServerLink, sender: str, data: bytes, reason: str, rejections: list[str]) -> None:
    rejections.append(f"server rejected a message from {sender}: {reason}")
    link.audit.rejected(sender, data, reason)
