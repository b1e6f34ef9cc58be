"""CKKS parameters for additive aggregation, checked against the HE security standard.

Aggregation only adds ciphertexts, so there is nothing to rescale: one data prime is enough and
every extra prime would only make ciphertexts bigger. The defaults (N = 8192, moduli [60, 40],
scale 2^40) were chosen by measurement (docs/protocols.md, "Homomorphic protocol (CKKS)"):
32 bytes per parameter (8x float32), aggregate error about 1e-7 before the released rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigurationError

# Largest total coefficient-modulus bits (special prime included) for 128-bit classical security with
# a ternary secret: HomomorphicEncryption.org security standard (Albrecht et al., 2018), Table 1.
# SEAL enforces the same table; we check it first to explain the refusal.
MAX_MODULUS_BITS_128 = {2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

# Fresh-ciphertext noise measured at about 2^14.5 and a 100-client sum at about 2^16 (both in units of
# 2^-scale): everything the key holder releases is rounded to a multiple of 2^(NOISE_MARGIN_BITS - scale),
# 2^6 or more above that noise, so a decryption reveals (almost) nothing of its noise and thus of the
# secret key (Li-Micciancio, "On the security of homomorphic encryption on approximate numbers", 2021).
NOISE_MARGIN_BITS = 24
# Canary slots per ciphertext (see chunks.py): a forged aggregate passes one with probability about
# 2^(NOISE_MARGIN_BITS - scale); four per ciphertext give 2^-64 at the default scale.
CANARIES = 4


@dataclass(frozen=True)
class HEOptions:
    """CKKS parameters, the quorum and the ranges: the HE protocol's options, validated once, by
    ``make_protocol`` and by the run configuration (its ``[secure_aggregation.he]`` table). This module
    never imports TenSEAL, so a configuration can be checked without it.

    ``coeff_mod_bit_sizes`` lists the primes: all but the last hold ciphertext data, the last is SEAL's
    special (key-switching) prime, which only keys carry. The ``minimum`` metadata is what a configuration
    file is checked against first; ``__post_init__`` then applies the security table.

    ``min_clients`` / ``min_fraction``: an aggregate counts at least ``required(cohort)`` inputs (issue 10,
    item 5: the default is well above a collusion budget of one or two sites). ``committee_size``: how many of
    the round's counted sites recompute and co-sign the sum the key holder decrypts (keyholder.py). ``min_weight``,
    ``max_weight``, ``input_bound``: the ranges a client checks its own input against and the key holder
    checks the decrypted total against (0 = the per-client capacity bound), so that a zero or tiny total
    weight, or an out-of-range sum from a malicious site, is refused before anything divides by it.
    """

    poly_modulus_degree: int = field(default=8192, metadata={"minimum": 1024, "strict": False})
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40)
    global_scale_bits: int = field(default=40, metadata={"minimum": 1, "strict": False})
    min_clients: int = field(default=3, metadata={"minimum": 1, "strict": False})
    min_fraction: float = field(default=0.5, metadata={"minimum": 0.0, "strict": True, "maximum": 1.0,
                                                       "strict_maximum": False})
    committee_size: int = field(default=3, metadata={"minimum": 1, "strict": False})
    # the run's own bounds (the runner passes them; 0 = the per-client capacity bound of the announced cohort)
    min_weight: float = field(default=1.0, metadata={"runtime": True})
    max_weight: float = field(default=0.0, metadata={"runtime": True})
    input_bound: float = field(default=0.0, metadata={"runtime": True})
    # accepted because the runner passes one to every protocol; keys, canary seeds and committees come from the OS
    seed: int | None = field(default=0, metadata={"runtime": True})

    def __post_init__(self):
        if not isinstance(self.coeff_mod_bit_sizes, list | tuple):
            raise ConfigurationError(f"coeff_mod_bit_sizes must be a list of prime sizes in bits, not "
                                     f"{self.coeff_mod_bit_sizes!r}", "coeff_mod_bit_sizes")
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        degree, bits, scale = self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.global_scale_bits
        if _not_int(degree) or degree not in MAX_MODULUS_BITS_128:
            raise ConfigurationError(f"poly_modulus_degree must be one of {sorted(MAX_MODULUS_BITS_128)}, not "
                                     f"{degree!r}", "poly_modulus_degree")
        if len(bits) < 2 or any(_not_int(b) or not 20 <= b <= 60 for b in bits):
            raise ConfigurationError(f"coeff_mod_bit_sizes must list at least two primes (data primes, then the "
                                     f"special prime) of 20-60 bits each, not {list(bits)!r}", "coeff_mod_bit_sizes")
        if sum(bits) > MAX_MODULUS_BITS_128[degree]:
            raise ConfigurationError(f"coeff_mod_bit_sizes {list(bits)} total {sum(bits)} bits; 128-bit security "
                                     f"allows at most {MAX_MODULUS_BITS_128[degree]} for N = {degree}",
                                     "coeff_mod_bit_sizes")
        if _not_int(scale) or scale < NOISE_MARGIN_BITS + 6:
            raise ConfigurationError(f"global_scale_bits must be an integer >= {NOISE_MARGIN_BITS + 6} (the "
                                     f"released precision is 2^({NOISE_MARGIN_BITS} - scale)), not {scale!r}",
                                     "global_scale_bits")
        if self.data_bits - scale < 8:
            raise ConfigurationError(f"the data primes {list(bits[:-1])} leave {self.data_bits - scale} bits above "
                                     f"the scale 2^{scale}; at least 8 are needed to hold a sum", "global_scale_bits")
        if _not_int(self.min_clients) or self.min_clients < 1:
            raise ConfigurationError(f"min_clients must be a positive integer, not {self.min_clients!r}", "min_clients")
        fraction = self.min_fraction
        if not _is_number(fraction) or not 0.0 < fraction <= 1.0:
            raise ConfigurationError(f"min_fraction must be a number in (0, 1], not {fraction!r}", "min_fraction")
        if _not_int(self.committee_size) or self.committee_size < 1:
            raise ConfigurationError(f"committee_size must be a positive integer, not {self.committee_size!r}",
                                     "committee_size")
        for name in ("min_weight", "max_weight", "input_bound"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ConfigurationError(f"{name} must be a finite number >= 0, not {value!r}", name)
            object.__setattr__(self, name, float(value))
        if self.max_weight and self.max_weight < self.min_weight:
            raise ConfigurationError(f"max_weight = {self.max_weight} is below min_weight = {self.min_weight}",
                                     "max_weight")
        if self.seed is not None and _not_int(self.seed):
            raise ConfigurationError(f"seed must be an integer or None, not {self.seed!r}", "seed")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def data_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def scale(self) -> float:
        return float(2**self.global_scale_bits)

    @property
    def capacity(self) -> float:
        """Largest |slot value| of a sum that decrypts correctly, with a factor 2 to spare.

        A slot bound B bounds every plaintext coefficient by B·scale; decryption is correct while that
        (plus noise) stays below half the data modulus q, and q >= 2^(data_bits - number of data primes).
        """
        data_primes = len(self.coeff_mod_bit_sizes) - 1
        return math.ldexp(1.0, self.data_bits - data_primes - 2 - self.global_scale_bits)

    @property
    def output_step(self) -> float:
        """The grid the key holder rounds released values to; also the canary tolerance."""
        return math.ldexp(1.0, NOISE_MARGIN_BITS - self.global_scale_bits)

    def per_client_bound(self, num_clients: int) -> float:
        """The largest |weight·value| (and weight) one of ``num_clients`` clients may encrypt."""
        return self.capacity / num_clients

    def required(self, cohort: int) -> int:
        """The fewest receipted inputs an aggregate of a ``cohort``-client round must count:
        max(min_clients, ⌈min_fraction · cohort⌉). With c colluding sites among them, a released sum still
        holds at least ``required(cohort) - c`` honest inputs. The server announces the cohort, so it could
        announce a small one: the absolute ``min_clients`` is what bounds that."""
        return max(self.min_clients, math.ceil(self.min_fraction * cohort - 1e-9))

    def weight_range(self, cohort: int) -> tuple[float, float]:
        """The weights one client of a ``cohort``-client round may carry: [min_weight, max_weight], with
        max_weight = 0 standing for the per-client capacity bound."""
        return self.min_weight, self.max_weight or self.per_client_bound(cohort)

    def value_bound(self, cohort: int) -> float:
        """The largest |x_j| one client may submit (``input_bound``; 0 = the per-client capacity bound)."""
        return self.input_bound or self.per_client_bound(cohort)


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)
