"""Stage names (usable in ``simulate_round(dropouts=...)``), message vocabulary and size limits (masked)."""

NAME = "masked"
COMMIT = "commit"
ADVERTISE = "advertise_keys"
SHARE = "share_keys"
MASKED = "masked_input"
CONSISTENCY = "consistency_check"
UNMASK = "unmask"
STAGES = (COMMIT, ADVERTISE, SHARE, MASKED, CONSISTENCY, UNMASK)

CIPHER_KEY = "cipher_key"  # blob: X25519 public key for share encryption
MASK_KEY = "mask_key"  # blob: X25519 public key for pairwise masks
NONCE = "nonce"  # blob: the revealed ring nonce
SELF_MASK_SHARE = "self_mask/"  # blob-name prefix in unmask answers
MASK_KEY_SHARE = "mask_key/"

# per-stage size limits (issue 10 item 9): every message but a masked input is bounded by the cohort size
_CONTROL_BASE_BYTES = 64 * 1024
_CONTROL_BYTES_PER_CLIENT = 2 * 1024  # a relayed signed message (ids ≤ 128 chars) or a share pair, with header


def control_bytes(num_clients: int) -> int:
    """The largest non-vector message of a round of ``num_clients``: relays carry one signed message per client."""
    return _CONTROL_BASE_BYTES + _CONTROL_BYTES_PER_CLIENT * num_clients


def masked_input_bytes(num_clients: int, vector_length: int, width: int) -> int:
    """The largest masked-input message: a header allowance plus the vector's packed values (``width`` bytes each)."""
    return control_bytes(num_clients) + vector_length * width


def share_index(sorted_clients: tuple[str, ...], client: str) -> int:
    """The Shamir x-coordinate of ``client``'s shares: its 1-based position among the round's clients."""
    return sorted_clients.index(client) + 1
