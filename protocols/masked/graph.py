"""Who masks with whom: a random Harary graph (SecAgg+) or the complete graph (classic SecAgg).

SecAgg+ (Bell et al., CCS 2020) replaces SecAgg's all-pairs masking by a random k-regular
graph: each client masks with, and shares its secrets among, only its k neighbours. The graph
is a Harary graph H(k, n) (a ring where each node is joined to the k/2 nearest on each side)
with the ring order drawn by commit–reveal among the clients (``view.py``), so the server cannot bias it.

Defaults for k and the Shamir threshold t follow the paper's parameter search: the smallest
even k such that, with n clients of which a fraction ``adversarial_rate`` is corrupt and a
fraction ``dropout_rate`` drops out,

(counted as ⌈rate·n⌉ clients, at least one: a 10 % dropout among 16 clients is two clients, not one)

* the honest surviving clients stay connected except with probability 2^-(σ+1) (σ = 40),
  bounding "two gaps of k/2 consecutive bad clients on the ring" by a union bound;
* no client has more than t-1 corrupt neighbours except with probability 2^-(σ+1)/n
  (hypergeometric tail), t also exceeding half the neighbourhood plus the corrupt ones
  (the semi-malicious bound, so the server cannot collect both kinds of shares of one client);
* every client keeps at least t surviving neighbours except with probability 2^-η/n (η = 20).

The smallest admissible t is taken (cheapest reconstruction, most dropout tolerance). Up to
``COMPLETE_GRAPH_UP_TO`` clients, and whenever no sparse k < n-1 qualifies, the complete graph is used
with the smallest t satisfying the same semi-malicious bound (``complete_parameters``): there it costs
little more than the sparse graph (measured, see the constant) and tolerates far more dropouts. With the
ceiling counts the sparse defaults also tolerate any ⌈dropout_rate·n⌉ dropouts in the worst case
(k − t ≥ ⌈dropout_rate·n⌉) up to n = 120; above that the guarantee is the probabilistic one stated above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from ..errors import ConfigurationError

SECURITY_BITS = 40
CORRECTNESS_BITS = 20
# measured with simulate_round, P = 100k, 10 % dropout: the complete graph's round takes 1.18× the sparse one's at
# n = 16, 1.22× at 32, 1.17× at 48 and 1.76× at 64
COMPLETE_GRAPH_UP_TO = 48


@dataclass(frozen=True)
class GraphParameters:
    neighbours: int  # k: each client's neighbours (n-1 for the complete graph)
    threshold: int  # t: shares needed to reconstruct a client's secrets, t-of-k

    @property
    def tolerated_dropouts(self) -> int:
        """How many of one client's neighbours may vanish with its secrets still recoverable."""
        return self.neighbours - self.threshold


def _hypergeometric_pmf(population: int, successes: int, draws: int) -> list[float]:
    """P[X = x] for x = 0..draws, X the successes among ``draws`` taken without replacement."""
    total = math.comb(population, draws)
    return [math.comb(successes, x) * math.comb(population - successes, draws - x) / total for x in range(draws + 1)]


def _log_disconnection_bound(n: int, k: int, bad: int) -> float:
    """log of a union bound on removing ``bad`` random nodes disconnecting a random H(k, n)."""
    if k > bad:
        return -math.inf
    gap_pairs = math.log(n) + math.log(n - k - 1) - math.log(2)
    return gap_pairs + math.lgamma(bad + 1) + math.lgamma(n - k + 1) - math.lgamma(n + 1) - math.lgamma(bad - k + 1)


def _threshold_for(n: int, k: int, adversarial_rate: float, dropout_rate: float) -> int | None:
    small = 1e-14  # keeps float rounding from tipping a bound the insecure way
    # at least one corrupt and one dropped client, so that small federations get real margins too
    corrupt = max(1, math.ceil((adversarial_rate - small) * n))
    dropped = max(1, math.ceil((dropout_rate - small) * n))
    surviving = n - dropped
    if _log_disconnection_bound(n, k, corrupt + dropped) \
            >= -(SECURITY_BITS + 1) * math.log(2):
        return None
    security = 2.0 ** -(SECURITY_BITS + 1) / n
    correctness = 2.0 ** -CORRECTNESS_BITS / n
    corrupt_pmf = _hypergeometric_pmf(n, corrupt, k)
    # t1: the fewest corrupt neighbours exceeded only with probability <= security (tails summed directly:
    # 1 - cdf would lose these tiny probabilities to rounding)
    t1 = next(a for a in range(k + 1) if sum(corrupt_pmf[a + 1:]) <= security)
    t1 = math.ceil((t1 + k - 1.25) / 2)  # semi-malicious server: 2t - k must exceed the corrupt neighbours
    surviving_pmf = _hypergeometric_pmf(n, surviving, k)
    # t2: the largest t with P[fewer than t surviving neighbours] < correctness
    t2 = next(s for s in range(k + 1) if sum(surviving_pmf[:s + 1]) >= correctness)
    if t2 <= t1:
        return None
    return max(t1 + 1, 2)


@lru_cache(maxsize=256)
def default_parameters(n: int, graph: str = "sparse", adversarial_rate: float = 0.05,
                       dropout_rate: float = 0.1) -> GraphParameters:
    """Bell et al.'s (k, t) for ``n`` clients (see the module docstring); complete graph when needed."""
    if n < 2:
        raise ConfigurationError(f"masked aggregation needs at least 2 clients, not {n}")
    if graph == "sparse" and n > COMPLETE_GRAPH_UP_TO:
        for k in range(2, n - 1, 2):
            threshold = _threshold_for(n, k, adversarial_rate, dropout_rate)
            if threshold is not None:
                return GraphParameters(k, threshold)
    return complete_parameters(n, adversarial_rate)


def complete_parameters(n: int, adversarial_rate: float = 0.05) -> GraphParameters:
    """The complete graph's (k, t) = (n − 1, t): the smallest t with 2t − k > c, c = ⌈adversarial_rate·n⌉ (at
    least one) corrupt clients, and t > k/2.

    Why 2t − k > c (Bell et al.'s semi-malicious bound, as for the sparse graph): a server that tells some of a
    client's neighbours "it survived" and the others "it dropped" gets self-mask shares from the first group
    and mask-key shares from the second, and the c colluders give both kinds; it can rebuild both secrets only
    if t ≤ (k + c)/2. With t = ⌊k/2⌋ + 1 alone, an odd k (an even n) leaves 2t − k = 1, no margin for a
    single colluder."""
    k = n - 1
    corrupt = max(1, math.ceil(adversarial_rate * n - 1e-14))
    return GraphParameters(k, min(k, max(k // 2 + 1, (k + corrupt) // 2 + 1)))


def resolve_parameters(n: int, graph: str, neighbours: int, threshold: int, adversarial_rate: float,
                       dropout_rate: float) -> GraphParameters:
    """The (k, t) a round with ``n`` clients uses; 0 means "the default". Refuses unsafe choices."""
    if graph not in ("sparse", "complete"):
        raise ConfigurationError(f"graph must be 'sparse' or 'complete', not {graph!r}")
    if n < 2:
        raise ConfigurationError(f"masked aggregation needs at least 2 clients, not {n}")
    default = default_parameters(n, graph, adversarial_rate, dropout_rate)
    k = n - 1 if graph == "complete" else (neighbours or default.neighbours)
    k = min(k, n - 1)
    if k < n - 1 and k % 2:
        raise ConfigurationError(f"neighbours must be even for a sparse (Harary) graph, not {k}")
    if k < 1:
        raise ConfigurationError(f"neighbours must be positive, not {k}")
    t = threshold or (default.threshold if k == default.neighbours else k // 2 + 1)
    if not k // 2 < t <= k:
        raise ConfigurationError(f"threshold must satisfy k/2 < t <= k (k = {k} neighbours), not {t}: with "
                                 "t <= k/2 a server could collect both kinds of shares of a client")
    return GraphParameters(k, t)


def ring_neighbours(ring: tuple[str, ...], k: int) -> dict[str, tuple[str, ...]]:
    """Each client's neighbours in H(k, n) laid on ``ring``: the k/2 nearest on each side (all others if k = n-1)."""
    return {client: _around(ring, k, position) for position, client in enumerate(ring)}


def neighbours_of(ring: tuple[str, ...], k: int, client: str) -> tuple[str, ...]:
    """``client``'s entry of ``ring_neighbours(ring, k)``, without building everyone's (a client needs only its own)."""
    return _around(ring, k, ring.index(client))


def _around(ring: tuple[str, ...], k: int, position: int) -> tuple[str, ...]:
    n = len(ring)
    if k >= n - 1:
        return ring[:position] + ring[position + 1:]
    half = k // 2
    return tuple(ring[(position + offset) % n] for offset in range(-half, half + 1) if offset)
