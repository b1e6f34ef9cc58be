"""Stage names (usable in ``simulate_round(dropouts=...)``) and message vocabulary of the masked protocol."""

NAME = "masked"
ADVERTISE = "advertise_keys"
SHARE = "share_keys"
MASKED = "masked_input"
CONSISTENCY = "consistency_check"
UNMASK = "unmask"
STAGES = (ADVERTISE, SHARE, MASKED, CONSISTENCY, UNMASK)

CIPHER_KEY = "cipher_key"  # blob: X25519 public key for share encryption
MASK_KEY = "mask_key"  # blob: X25519 public key for pairwise masks
SELF_MASK_SHARE = "self_mask/"  # blob-name prefix in unmask answers
MASK_KEY_SHARE = "mask_key/"


def share_index(sorted_clients: tuple[str, ...], client: str) -> int:
    """The Shamir x-coordinate of ``client``'s shares: its 1-based position among the round's clients."""
    return sorted_clients.index(client) + 1
