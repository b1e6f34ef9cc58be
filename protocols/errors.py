"""The one error family every protocol raises, so callers can catch ``ProtocolError`` alone.

Rejections and aborts carry structured fields (who sent the bad message, which stage failed)
because the runner reports them and the audit log records them; the text alone is for people.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Anything that went wrong in a secure-aggregation protocol."""


class MessageRejected(ProtocolError):
    """A message was refused (malformed, badly signed, unknown sender, replayed, unexpected).

    The receiving party's state is unchanged: rejection never half-applies a message.
    ``sender`` is the claimed sender when the header could be read that far, else None.
    """

    def __init__(self, reason: str, sender: str | None = None):
        super().__init__(reason if sender is None else f"message from {sender!r} rejected: {reason}")
        self.reason = reason
        self.sender = sender


class RoundAborted(ProtocolError):
    """The round cannot produce a correct aggregate; ``stage`` names where that became certain."""

    def __init__(self, stage: str, reason: str, round_id: int | None = None):
        where = f"round {round_id} " if round_id is not None else "round "
        super().__init__(f"{where}aborted at stage {stage!r}: {reason}")
        self.stage = stage
        self.reason = reason
        self.round_id = round_id


class ConfigurationError(ProtocolError):
    """Options or inputs that cannot work (an overflowing modulus, a bad weight); raised before a round starts.

    ``option`` names the protocol option at fault when one is (a configuration file reports it as its
    key, e.g. ``secure_aggregation.masked.quantization_bits``), else None.
    """

    def __init__(self, reason: str, option: str | None = None):
        super().__init__(reason)
        self.option = option
