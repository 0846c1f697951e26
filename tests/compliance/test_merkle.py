"""RFC 6962 Merkle trees against the Certificate Transparency reference vectors.

Vectors: transparency-dev/merkle (the Go successor of certificate-transparency-go's merkletree
package), ``testonly/constants.go`` (leaf inputs, roots for sizes 0..8, node hashes) and
``proof/verify_test.go`` (inclusion and consistency proofs; its leaf numbers are 1-based, ours
0-based), https://github.com/transparency-dev/merkle. The same leaves and roots are in the
C++ certificate-transparency repo's ``merkle_tree_test.cc``.
"""

from __future__ import annotations

import hashlib

import pytest

from fedtune.compliance.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    leaf_hash,
    merkle_root,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f")]

ROOTS = {  # tree size -> MTH of the first `size` leaves
    0: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}

# The reference's proofs below are lists of these hashes of its tree's subtrees, named here by the
# leaves each covers: (a, b) is MTH(D[a:b]) (RFC 6962 §2.1).
NODES = {
    (0, 1): ROOTS[1], (0, 2): ROOTS[2], (0, 4): ROOTS[4],
    (1, 2): "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    (2, 4): "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
    (4, 5): "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    (4, 6): "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
    (6, 7): "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
    (6, 8): "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    (4, 8): "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
}


def _nodes(*spans):
    return [NODES[span] for span in spans]


# (0-based leaf index, tree size, audit path)
INCLUSION = [
    (0, 1, []),
    (0, 8, _nodes((1, 2), (2, 4), (4, 8))),
    (5, 8, _nodes((4, 5), (6, 8), (0, 4))),
    (2, 3, _nodes((0, 2))),
    (1, 5, _nodes((0, 1), (2, 4), (4, 5))),
]

# (old size, new size, consistency proof)
CONSISTENCY = [
    (1, 1, []),
    (1, 8, _nodes((1, 2), (2, 4), (4, 8))),
    (6, 8, _nodes((4, 6), (6, 8), (0, 4))),
    (2, 5, _nodes((2, 4), (4, 5))),
    (6, 7, _nodes((4, 6), (6, 7), (0, 4))),
]

TREE = MerkleTree.from_leaves(LEAVES)
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def _hex(hashes):
    return [h.hex() for h in hashes]


def test_hash_prefixes_are_rfc6962s():
    assert EMPTY_ROOT.hex() == ROOTS[0] == hashlib.sha256(b"").hexdigest()
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    left, right = leaf_hash(LEAVES[0]), leaf_hash(LEAVES[1])
    assert node_hash(left, right) == hashlib.sha256(b"\x01" + left + right).digest()


@pytest.mark.parametrize("size", range(9))
def test_roots_match_the_reference(size):
    assert merkle_root(LEAVES[:size]).hex() == ROOTS[size]
    assert TREE.root(size).hex() == ROOTS[size]


@pytest.mark.parametrize(("index", "size", "path"), INCLUSION)
def test_inclusion_proofs_match_the_reference(index, size, path):
    assert _hex(TREE.inclusion_proof(index, size)) == path
    proof = [bytes.fromhex(h) for h in path]
    root = bytes.fromhex(ROOTS[size])
    leaf = leaf_hash(LEAVES[index])
    assert verify_inclusion(leaf, index, size, proof, root)
    # The reference tests' corruptions: every one must fail.
    bad = [(index - 1, size, root, leaf, proof), (index + 1, size, root, leaf, proof),
           (index ^ 2, size, root, leaf, proof), (index, size * 2, root, leaf, proof),
           (index, size // 2, root, leaf, proof), (index, size, root, b"WrongLeaf", proof),
           (index, size, EMPTY_ROOT, leaf, proof), (index, size, SOME_HASH, leaf, proof),
           (index, size, root, leaf, [*proof, b""]), (index, size, root, leaf, [*proof, root]),
           (index, size, root, leaf, [b"", *proof]), (index, size, root, leaf, [root, *proof])]
    for i in range(len(proof)):
        flipped = [*proof]
        flipped[i] = bytes([flipped[i][0] ^ 8]) + flipped[i][1:]
        bad.append((index, size, root, leaf, flipped))
    if proof:
        bad.append((index, size, root, leaf, proof[:-1]))
    if len(proof) > 1:
        bad.append((index, size, root, leaf, [proof[0], SOME_HASH, *proof[1:]]))
    for i, s, r, lf, p in bad:
        assert not verify_inclusion(lf, i, s, p, r), (i, s)


@pytest.mark.parametrize(("old", "new", "path"), CONSISTENCY)
def test_consistency_proofs_match_the_reference(old, new, path):
    assert _hex(TREE.consistency_proof(old, new)) == path
    proof = [bytes.fromhex(h) for h in path]
    r1, r2 = bytes.fromhex(ROOTS[old]), bytes.fromhex(ROOTS[new])
    assert verify_consistency(old, new, r1, r2, proof)
    if not proof:
        return
    bad = [(old - 1, new, r1, r2, proof), (old + 1, new, r1, r2, proof), (old ^ 2, new, r1, r2, proof),
           (old, new * 2, r1, r2, proof), (old, new // 2, r1, r2, proof), (old, new, b"WrongRoot", r2, proof),
           (old, new, r1, b"WrongRoot", proof), (old, new, r2, r1, proof), (old, new, r1, r2, []),
           (old, new, r1, r2, [*proof, b""]), (old, new, r1, r2, [*proof, r1]), (old, new, r1, r2, [*proof, r2]),
           (old, new, r1, r2, [b"", *proof]), (old, new, r1, r2, [r1, *proof]), (old, new, r1, r2, [r2, *proof]),
           (old, new, r1, r2, [proof[0], *proof]), (old, new, r1, r2, proof[:-1])]
    for i in range(len(proof)):
        flipped = [*proof]
        flipped[i] = bytes([flipped[i][0] ^ 16]) + flipped[i][1:]
        bad.append((old, new, r1, r2, flipped))
    for m, n, a, b, p in bad:
        assert not verify_consistency(m, n, a, b, p), (m, n)


def test_consistency_edge_cases_of_the_reference():
    r1, r2, empty = b"don't care 1", b"don't care 2", EMPTY_ROOT
    assert verify_consistency(0, 0, r1, r1, [])
    assert verify_consistency(0, 1, r1, r2, [])
    assert verify_consistency(1, 1, r2, r2, [])
    assert not verify_consistency(1, 1, r1, r2, [])
    assert not verify_consistency(1, 0, r1, r2, [])
    assert not verify_consistency(2, 1, r1, r2, [])
    assert not verify_consistency(1, 2, r1, r2, [])
    for old, new in ((0, 0), (0, 1), (1, 1)):
        assert not verify_consistency(old, new, empty, empty, [empty])


def test_every_proof_of_larger_trees_verifies_and_tampering_fails():
    # Beyond the vectors: every size up to 33 (all shapes of the split), checked against each other.
    leaves = [bytes([i, i * 7 % 256]) for i in range(33)]
    tree = MerkleTree.from_leaves(leaves)
    for n in range(1, len(leaves) + 1):
        root = tree.root(n)
        assert root == merkle_root(leaves[:n])
        for i in range(n):
            proof = tree.inclusion_proof(i, n)
            assert verify_inclusion(tree.leaf_hash(i), i, n, proof, root)
            if n > 1:
                assert not verify_inclusion(tree.leaf_hash((i + 1) % n), i, n, proof, root)
        for m in range(1, n + 1):
            proof = tree.consistency_proof(m, n)
            assert verify_consistency(m, n, tree.root(m), root, proof)
            if m < n:
                assert not verify_consistency(m, n, tree.root(m - 1) if m > 1 else SOME_HASH, root, proof)


def test_out_of_range_requests_are_refused():
    with pytest.raises(ValueError, match="outside"):
        TREE.inclusion_proof(8, 8)
    with pytest.raises(ValueError, match="outside"):
        TREE.root(9)
    with pytest.raises(ValueError, match="outside"):
        TREE.consistency_proof(9, 8)
