"""Running a round in one process: the generic driver and ``simulate_round``.

``drive_round`` is the transport: it carries each party's messages to their recipients, lets
clients vanish before a named stage, and closes a stage once every message is delivered.
The feddat_secure runner uses it too, with ``deliver`` hooked to byte counts and audit logs.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .base import AggregateResult, ClientSession, KeyHolderSession, Outgoing, ServerSession
from .errors import ConfigurationError, MessageRejected, ProtocolError
from .identity import KEYHOLDER_ID, SERVER_ID, Identity, Roster
from .registry import make_protocol
from .wire import new_session_id

Deliver = Callable[[str, str, bytes], None]
OnRejection = Callable[[str | None, str], None]


def setup_keyholder(keyholder: KeyHolderSession, clients: Mapping[str, ClientSession], *,
                    keyholder_id: str = KEYHOLDER_ID, deliver: Deliver | None = None,
                    on_rejection: OnRejection | None = None) -> None:
    """Once per run, before any round: deliver the key holder's setup messages to the clients.

    Answers (if a protocol has any) are routed back by recipient like in ``drive_round``.
    """
    _route(keyholder.setup(list(clients)), keyholder_id, None, clients, keyholder, keyholder_id,
           {}, deliver, on_rejection, server_id=SERVER_ID)


def drive_round(server: ServerSession, clients: Mapping[str, ClientSession], keyholder: KeyHolderSession | None,
                round_id: int, vector_length: int, *, dropouts: Mapping[str, str] | None = None,
                deliver: Deliver | None = None, on_rejection: OnRejection | None = None,
                server_id: str = SERVER_ID, keyholder_id: str = KEYHOLDER_ID,
                round_context: str = "") -> AggregateResult:
    """Run one round to its end and return the server's result.

    Clients must already hold their input (``set_input``). A client named in ``dropouts`` vanishes
    just before the stage named there: from then on it receives nothing and answers nothing.
    A rejected message is reported to ``on_rejection(sender, reason)`` and otherwise ignored (its
    sender counts as dropped for that stage); a RoundAborted from the server propagates.
    """
    dropouts = dict(dropouts or {})
    unknown = {stage for stage in dropouts.values() if stage not in server.stages}
    if unknown:
        raise ConfigurationError(f"unknown stage names in dropouts: {sorted(unknown)}; "
                                 f"the stages are {', '.join(server.stages)}")
    vanish_at = {client: server.stages.index(stage) for client, stage in dropouts.items()}

    def deliver_stage(outgoing: Sequence[Outgoing]) -> None:
        gone = {client for client, index in vanish_at.items() if server.stages.index(server.stage) >= index}
        _route(outgoing, server_id, server, clients, keyholder, keyholder_id, gone, deliver, on_rejection,
               server_id=server_id)

    return run_stages(server, round_id, list(clients), vector_length, deliver_stage, round_context=round_context)


def run_stages(server: ServerSession, round_id: int, clients: Sequence[str], vector_length: int,
               deliver_stage: Callable[[Sequence[Outgoing]], None], *, round_context: str = "") -> AggregateResult:
    """The server's side of one round, whoever carries the messages: begin the round (announcing
    ``round_context``), then hand each stage's messages to ``deliver_stage`` (which feeds the answers to
    ``server.receive``) and close the stage, until the result. RoundAborted from the server propagates."""
    outgoing = server.begin_round(round_id, list(clients), vector_length, round_context=round_context)
    for _ in range(4 * len(server.stages) + 4):  # each stage closes once; the bound only guards against bugs
        deliver_stage(outgoing)
        if server.round_done:
            return server.result()
        outgoing = server.advance()
        if server.round_done and not outgoing:
            return server.result()
    raise ProtocolError(f"the server did not finish round {round_id} (stuck at stage {server.stage!r})")


def _route(outgoing: Sequence[Outgoing], sender: str, server: ServerSession | None,
           clients: Mapping[str, ClientSession], keyholder: KeyHolderSession | None, keyholder_id: str,
           gone: set[str], deliver: Deliver | None, on_rejection: OnRejection | None, *, server_id: str) -> None:
    queue = deque((sender, message) for message in outgoing)
    while queue:
        source, message = queue.popleft()
        recipient = message.recipient
        if recipient in gone:
            continue
        if deliver is not None:
            deliver(source, recipient, message.data)
        try:
            if recipient == server_id and server is not None:
                server.receive(message.data)
                answers = []
            elif recipient == keyholder_id and keyholder is not None:
                answers = keyholder.handle(message.data)
            elif recipient in clients:
                answers = clients[recipient].handle(message.data)
            else:
                raise MessageRejected(f"no party {recipient!r} to deliver to", source)
        except MessageRejected as rejection:
            if on_rejection is not None:
                on_rejection(source, rejection.reason)
            continue
        # answers go first, so each reply reaches its recipient before the next request goes out: at most a
        # few messages are in flight at a time, whatever the number of clients
        queue.extendleft((recipient, answer) for answer in reversed(answers))


def simulate_round(protocol: str, updates: Sequence[np.ndarray], weights: Sequence[float] | None = None, *,
                   dropouts: Mapping[int, str] | None = None, seed: int = 0, **options) -> np.ndarray:
    """Σ w_i·x_i over the clients the protocol counted, computed by running the protocol in-process, in a
    fresh session with fresh identities.

    ``dropouts`` maps a client's index to the stage before which it vanishes (``make_protocol(protocol)
    .stages`` lists the names). ``seed`` fixes every non-cryptographic random choice; key material
    always comes from the OS. Raises the protocol's error (RoundAborted, ConfigurationError, ...)
    when the round cannot produce a correct result. Warns (UserWarning, naming the count and the range) when
    inputs were clipped to the protocol's input range: the sum is then of the clipped inputs.
    """
    instance = make_protocol(protocol, seed=seed, **options)
    if len(updates) == 0:
        raise ConfigurationError("simulate_round needs at least one update")
    vector_length = len(np.asarray(updates[0]).reshape(-1))
    weights = [1.0] * len(updates) if weights is None else list(weights)
    if len(weights) != len(updates):
        raise ConfigurationError(f"{len(updates)} updates but {len(weights)} weights")
    dropouts = dict(dropouts or {})
    outside = [index for index in dropouts if not (isinstance(index, int) and 0 <= index < len(updates))]
    if outside:
        raise ConfigurationError(f"dropouts name clients that do not exist: {outside}")
    instance.check(len(updates), vector_length)
    names = [f"client-{index}" for index in range(len(updates))]
    server_identity = Identity.generate(SERVER_ID)
    client_identities = [Identity.generate(name) for name in names]
    keyholder_identity = Identity.generate(KEYHOLDER_ID) if instance.needs_keyholder else None
    roster = Roster.from_identities(server_identity, client_identities, keyholder_identity)
    session = new_session_id()
    clients = {identity.party_id: instance.client(identity, roster, SERVER_ID, session=session)
               for identity in client_identities}
    keyholder = (instance.keyholder(keyholder_identity, roster, session=session)
                 if keyholder_identity is not None else None)
    if keyholder is not None:
        setup_keyholder(keyholder, clients)
    clipped = sum(clients[name].set_input(0, update, weight) for name, update, weight in zip(names, updates, weights))
    if clipped:
        clip_range = getattr(instance.options, "clip_range", None)
        warnings.warn(f"{clipped} input entries lay outside the {protocol} protocol's input range"
                      + (f" ±{clip_range}" if clip_range is not None else "")
                      + " and were clipped: the result is the sum of the clipped inputs", UserWarning, stacklevel=2)
    server = instance.server(server_identity, roster, session=session)
    result = drive_round(server, clients, keyholder, 0, vector_length,
                         dropouts={names[index]: stage for index, stage in dropouts.items()})
    return result.vector
