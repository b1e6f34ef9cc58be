"""Merkle trees in the style of RFC 9162 (Certificate Transparency 2.0), section 2.1.

Leaves are hashed as ``SHA-256(0x00 || entry)``, interior nodes as ``SHA-256(0x01 || left || right)``,
and the tree over ``n`` leaves splits at ``k``, the largest power of two smaller than ``n``.
:func:`inclusion_path` / :func:`verify_inclusion` and :func:`consistency_path` /
:func:`verify_consistency` follow the RFC's algorithms (sections 2.1.3 and 2.1.4) step by step.
Everything here works on leaf *hashes* (32-byte ``bytes``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over leaf hashes; the empty tree's root is SHA-256 of the empty string."""
    if not leaves:
        return EMPTY_ROOT
    return _subtree_root(leaves, 0, len(leaves))


def _subtree_root(leaves: Sequence[bytes], start: int, end: int) -> bytes:
    n = end - start
    if n == 1:
        return leaves[start]
    k = _split(n)
    return node_hash(_subtree_root(leaves, start, start + k), _subtree_root(leaves, start + k, end))


def inclusion_path(leaves: Sequence[bytes], index: int, tree_size: int | None = None) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 section 2.1.3.1 for leaf ``index`` in the first ``tree_size`` leaves."""
    n = len(leaves) if tree_size is None else tree_size
    if not 0 <= index < n <= len(leaves):
        raise ValueError(f"no leaf {index} in a tree of {n} leaves")
    path: list[bytes] = []
    start, end, m = 0, n, index
    while end - start > 1:
        k = _split(end - start)
        if m < k:
            path.append(_subtree_root(leaves, start + k, end))
            end = start + k
        else:
            path.append(_subtree_root(leaves, start, start + k))
            start, m = start + k, m - k
    path.reverse()  # the RFC lists the sibling nearest the leaf first
    return path


def verify_inclusion(leaf: bytes, index: int, tree_size: int, path: Sequence[bytes], root_hash: bytes) -> bool:
    """RFC 9162 section 2.1.3.2: does ``path`` prove ``leaf`` at ``index`` in the tree ``root_hash``?"""
    if not 0 <= index < tree_size:
        return False
    fn, sn, r = index, tree_size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root_hash


def consistency_path(leaves: Sequence[bytes], old_size: int, new_size: int | None = None) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 9162 section 2.1.4.1: the first ``old_size`` leaves are a prefix of the first
    ``new_size``. Empty when ``old_size`` is 0 or equals ``new_size``."""
    n = len(leaves) if new_size is None else new_size
    if not 0 <= old_size <= n <= len(leaves):
        raise ValueError(f"no consistency proof from {old_size} to {n} leaves (log holds {len(leaves)})")
    if old_size in (0, n):
        return []
    return _subproof(leaves, old_size, 0, n, True)


def _subproof(leaves: Sequence[bytes], m: int, start: int, end: int, complete: bool) -> list[bytes]:
    n = end - start
    if m == n:
        return [] if complete else [_subtree_root(leaves, start, end)]
    k = _split(n)
    if m <= k:
        return _subproof(leaves, m, start, start + k, complete) + [_subtree_root(leaves, start + k, end)]
    return _subproof(leaves, m - k, start + k, end, False) + [_subtree_root(leaves, start, start + k)]


def verify_consistency(old_size: int, old_root: bytes, new_size: int, new_root: bytes,
                       path: Sequence[bytes]) -> bool:
    """RFC 9162 section 2.1.4.2: does ``path`` prove the tree ``old_root`` a prefix of ``new_root``?

    The tree of size 0 has exactly one root, MTH({}) = SHA-256 of the empty string (section 2.1.1): a claimed
    size-0 tree with any other root is refused, so an empty proof cannot vouch for an arbitrary old root."""
    if not 0 <= old_size <= new_size:
        return False
    if old_size == 0 and old_root != EMPTY_ROOT or new_size == 0 and new_root != EMPTY_ROOT:
        return False
    if old_size == new_size:
        return not path and old_root == new_root
    if old_size == 0:
        return not path  # the empty tree (checked above) is a prefix of every tree
    if not path:
        return False
    path = list(path)
    if old_size & (old_size - 1) == 0:  # an exact power of two
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0


class CompactTree:
    """A growing tree kept as the roots of its perfect subtrees (O(log n) memory for the root)."""

    __slots__ = ("_stack", "size")

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []
        self.size = 0

    def append(self, leaf: bytes) -> None:
        stack = self._stack
        stack.append((1, leaf))
        while len(stack) > 1 and stack[-1][0] == stack[-2][0]:
            (width, right), (_, left) = stack.pop(), stack.pop()
            stack.append((2 * width, node_hash(left, right)))
        self.size += 1

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        r = self._stack[-1][1]
        for _, h in reversed(self._stack[:-1]):
            r = node_hash(h, r)
        return r
