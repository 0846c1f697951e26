"""RFC 6962 Merkle hash trees: tree heads, inclusion proofs and consistency proofs.

Hashing (RFC 6962 §2.1, SHA-256): a leaf is ``SHA-256(0x00 || data)``, an interior node
``SHA-256(0x01 || left || right)``, the empty tree ``SHA-256("")``; a tree of n > 1 leaves splits
at k, the largest power of two smaller than n. Proofs are generated with RFC 6962's recursive
definitions (§2.1.1 audit paths, §2.1.2 consistency proofs) and checked with the iterative
algorithms of RFC 9162 (§2.1.3.2 inclusion, §2.1.4.2 consistency), which use nothing but the
proof, the sizes and the roots. Hashes are 32-byte ``bytes``; indices are 0-based.

Plain Python only: the offline verifier imports this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``."""
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """A Merkle tree over fixed leaves that answers roots and proofs for any size up to its own.

    Every complete, aligned subtree's hash is kept (about twice the leaves), so a root or a proof
    for any size costs O(log n) hashes after the O(n) build.
    """

    def __init__(self, leaf_hashes: Iterable[bytes]):
        level = list(leaf_hashes)
        self._levels: list[list[bytes]] = [level]  # [j][i]: the subtree of leaves [i * 2^j, (i + 1) * 2^j)
        while len(level) > 1:
            level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            self._levels.append(level)

    @classmethod
    def from_leaves(cls, leaves: Iterable[bytes]) -> MerkleTree:
        """A tree over the leaf data (each hashed with :func:`leaf_hash`)."""
        return cls(leaf_hash(data) for data in leaves)

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def leaf_hash(self, index: int) -> bytes:
        return self._levels[0][index]

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first ``size`` leaves (default: all)."""
        size = self._check_size(size)
        return EMPTY_ROOT if size == 0 else self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 6962 §2.1.1 ``PATH(index, D[0:size])``, deepest sibling first."""
        size = self._check_size(size)
        if not 0 <= index < size:
            raise ValueError(f"leaf index {index} is outside a tree of size {size}")
        return self._path(index, 0, size)

    def consistency_proof(self, old_size: int, size: int | None = None) -> list[bytes]:
        """RFC 6962 §2.1.2 ``PROOF(old_size, D[0:size])``; empty when ``old_size`` is 0 or ``size``."""
        size = self._check_size(size)
        if not 0 <= old_size <= size:
            raise ValueError(f"old size {old_size} is outside 0..{size}")
        if old_size in (0, size):
            return []
        return self._subproof(old_size, 0, size, True)

    def _check_size(self, size: int | None) -> int:
        if size is None:
            return self.size
        if not 0 <= size <= self.size:
            raise ValueError(f"tree size {size} is outside 0..{self.size} (the leaves this tree holds)")
        return size

    def _subtree(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]), 0 <= start < end <= size."""
        n = end - start
        if n & (n - 1) == 0 and start % n == 0:  # a complete, aligned subtree: kept at build time
            level = n.bit_length() - 1
            return self._levels[level][start >> level]
        k = _split(n)
        return node_hash(self._subtree(start, start + k), self._subtree(start + k, end))

    def _path(self, index: int, start: int, end: int) -> list[bytes]:
        n = end - start
        if n == 1:
            return []
        k = _split(n)
        if index < k:
            return [*self._path(index, start, start + k), self._subtree(start + k, end)]
        return [*self._path(index - k, start + k, end), self._subtree(start, start + k)]

    def _subproof(self, m: int, start: int, end: int, complete: bool) -> list[bytes]:
        n = end - start
        if m == n:
            return [] if complete else [self._subtree(start, end)]
        k = _split(n)
        if m <= k:
            return [*self._subproof(m, start, start + k, complete), self._subtree(start + k, end)]
        return [*self._subproof(m - k, start + k, end, False), self._subtree(start, start + k)]


def merkle_root(leaves: Iterable[bytes]) -> bytes:
    """MTH over the leaf data (RFC 6962 §2.1)."""
    return MerkleTree.from_leaves(leaves).root()


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def _proof_sides(fn: int, sn: int, count: int) -> list[bool] | None:
    """The walk both proof checks of RFC 9162 (§2.1.3.2, §2.1.4.2) make from node ``fn`` up to the
    root, ``sn`` the last node at each level: for each of ``count`` proof nodes, whether it joins
    from the left (True) or the right; None when the proof is longer or shorter than that path."""
    sides = []
    for _ in range(count):
        if sn == 0:
            return None
        on_left = bool(fn & 1 or fn == sn)
        sides.append(on_left)
        if on_left and not fn & 1:
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        fn, sn = fn >> 1, sn >> 1
    return sides if sn == 0 else None


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """True exactly when ``proof`` shows the leaf hash ``leaf`` at ``index`` in the tree of ``size``
    leaves with head ``root`` (RFC 9162 §2.1.3.2)."""
    if not (_is_hash(leaf) and _is_hash(root) and all(_is_hash(p) for p in proof)):
        return False
    if not 0 <= index < size:
        return False
    sides = _proof_sides(index, size - 1, len(proof))
    if sides is None:
        return False
    r = leaf
    for p, on_left in zip(proof, sides, strict=True):
        r = node_hash(p, r) if on_left else node_hash(r, p)
    return r == root


def verify_consistency(old_size: int, size: int, old_root: bytes, root: bytes, proof: Sequence[bytes]) -> bool:
    """True exactly when ``proof`` shows that the tree of ``old_size`` leaves with head ``old_root``
    is a prefix of the tree of ``size`` leaves with head ``root`` (RFC 9162 §2.1.4.2).

    The empty tree is a prefix of every tree (empty proof); equal sizes need equal roots and an
    empty proof.
    """
    if not all(_is_hash(p) for p in proof) or not 0 <= old_size <= size:
        return False
    if old_size == 0:
        return not proof
    if old_size == size:
        return not proof and old_root == root
    if not proof or not (_is_hash(old_root) and _is_hash(root)):
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a complete subtree: the old root is the proof's first node
        path.insert(0, old_root)
    fn, sn = old_size - 1, size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    sides = _proof_sides(fn, sn, len(path) - 1)
    if sides is None:
        return False
    fr = sr = path[0]
    for c, on_left in zip(path[1:], sides, strict=True):
        if on_left:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
        else:
            sr = node_hash(sr, c)
    return fr == old_root and sr == root
