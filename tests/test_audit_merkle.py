"""RFC 9162 Merkle trees: the Certificate Transparency reference vectors, and proofs over random sizes."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audits import merkle

# The RFC 6962 / 9162 reference data used by Certificate Transparency implementations.
CT_INPUTS = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                         "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = [  # (0-based leaf index, tree size, path)
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
CT_CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
CT_LEAVES = [merkle.leaf_hash(d) for d in CT_INPUTS]


def reference_root(leaves: list[bytes]) -> bytes:
    """MTH written straight from the RFC's definition, independently of the module."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + reference_root(leaves[:k]) + reference_root(leaves[k:])).digest()


def leaves_of(n: int) -> list[bytes]:
    return [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


def test_roots_match_the_reference_vectors():
    tree = merkle.CompactTree()
    assert merkle.root([]).hex() == CT_ROOTS[0] == tree.root().hex()
    for n in range(1, 9):
        tree.append(CT_LEAVES[n - 1])
        assert merkle.root(CT_LEAVES[:n]).hex() == CT_ROOTS[n]
        assert tree.root().hex() == CT_ROOTS[n]


@pytest.mark.parametrize(("index", "size", "path"), CT_INCLUSION)
def test_inclusion_paths_match_the_reference_vectors(index, size, path):
    assert [p.hex() for p in merkle.inclusion_path(CT_LEAVES, index, size)] == path
    proof = [bytes.fromhex(p) for p in path]
    root = bytes.fromhex(CT_ROOTS[size])
    assert merkle.verify_inclusion(CT_LEAVES[index], index, size, proof, root)
    assert not merkle.verify_inclusion(CT_LEAVES[index], index, size, proof, bytes.fromhex(CT_ROOTS[0]))


@pytest.mark.parametrize(("old", "new", "path"), CT_CONSISTENCY)
def test_consistency_paths_match_the_reference_vectors(old, new, path):
    assert [p.hex() for p in merkle.consistency_path(CT_LEAVES, old, new)] == path
    proof = [bytes.fromhex(p) for p in path]
    assert merkle.verify_consistency(old, bytes.fromhex(CT_ROOTS[old]), new, bytes.fromhex(CT_ROOTS[new]), proof)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.data())
def test_every_inclusion_proof_verifies_and_no_tampered_one_does(n, data):
    leaves = leaves_of(n)
    root = merkle.root(leaves)
    assert root == reference_root(leaves)
    tree = merkle.CompactTree()
    for leaf in leaves:
        tree.append(leaf)
    assert tree.root() == root
    index = data.draw(st.integers(0, n - 1))
    path = merkle.inclusion_path(leaves, index)
    assert merkle.verify_inclusion(leaves[index], index, n, path, root)
    other = data.draw(st.integers(0, n - 1))
    if other != index:
        assert not merkle.verify_inclusion(leaves[other], index, n, path, root)
        assert not merkle.verify_inclusion(leaves[index], other, n, path, root)
    assert not merkle.verify_inclusion(leaves[index], index, n, path + [root], root)
    if path:
        j = data.draw(st.integers(0, len(path) - 1))
        bad = list(path)
        bad[j] = bytes([bad[j][0] ^ 1]) + bad[j][1:]
        assert not merkle.verify_inclusion(leaves[index], index, n, bad, root)
        assert not merkle.verify_inclusion(leaves[index], index, n, path[:-1], root)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.data())
def test_every_consistency_proof_verifies_and_no_tampered_one_does(n, data):
    leaves = leaves_of(n)
    m = data.draw(st.integers(0, n))
    old_root, new_root = merkle.root(leaves[:m]), merkle.root(leaves)
    path = merkle.consistency_path(leaves, m)
    assert merkle.verify_consistency(m, old_root, n, new_root, path)
    if 0 < m < n:
        forked = leaves[:m - 1] + [merkle.leaf_hash(b"forged")] + leaves[m:]
        assert not merkle.verify_consistency(m, merkle.root(forked[:m]), n, new_root, path)
        assert not merkle.verify_consistency(m, old_root, n, merkle.root(forked), path)
        j = data.draw(st.integers(0, len(path) - 1))
        bad = list(path)
        bad[j] = bytes([bad[j][0] ^ 1]) + bad[j][1:]
        assert not merkle.verify_consistency(m, old_root, n, new_root, bad)
        assert not merkle.verify_consistency(m, old_root, n, new_root, path[:-1])
        assert not merkle.verify_consistency(n, new_root, m, old_root, path)


def test_out_of_range_requests_are_refused():
    leaves = leaves_of(5)
    with pytest.raises(ValueError):
        merkle.inclusion_path(leaves, 5)
    with pytest.raises(ValueError):
        merkle.consistency_path(leaves, 6)
    assert not merkle.verify_inclusion(leaves[0], 0, 0, [], merkle.EMPTY_ROOT)
