"""A round's replies taken in as they arrive: validate each, note what it signs for, fold it into the
aggregate, drop it.

The round engine (``rounds.py``) hands :class:`RoundIntake` the transport's replies, which may be a
generator that yields each reply as Flower delivers it, and passes :meth:`RoundIntake.updates` to the
job's aggregation strategy as its stream of updates. Each reply is validated
(:class:`fedtune.coordinator.validation.ReplyValidator`) the moment the strategy asks for the next
update; an accepted one is yielded with its signed record count as its weight, and once the strategy
has folded it into its running sums nothing holds its tensors any more. What the intake keeps per
reply is its outcome without tensors, the sending node and the attempts it signs for: a kilobyte or
so, which the round's one transaction writes as rows anyway.

Memory: for FedAvg, FFA, norm-clipped FedAvg, DP-FedAvg and the server optimizers, one update in
flight plus the strategy's running sums, whatever the number of clients (the transport's own buffers
aside: a transport that returns a list holds every reply it received). Median and trimmed mean hold
every update by nature (the bound is in ``aggregation.py``).

Capped weights. The engine caps each client's weight at ``max_weight_multiple`` equal shares
(:func:`fedtune.coordinator.aggregation.cap_weights`), and the cap depends on every accepted client's
record count: no weight is final before the last reply. The intake therefore folds each update with
its weight as claimed and also writes it to an :class:`UpdateSpool`. When no cap binds (the usual
case: at the default 1.5 it binds only on a client claiming more than 1.5 equal shares) the weights
were final after all and the streamed result is the result; when one binds, the engine aggregates
again from the spool with the capped weights, in the same order, so the adapter is bit for bit what
aggregating the capped updates in memory would give. Only strategies whose result depends on the
weights (:data:`fedtune.coordinator.aggregation.WEIGHTED_METHODS`) spool, and only when the job sets
a cap.

The spool is a temporary file in the blob directory, unlinked from the start (a crash leaves no file
behind), each update AES-256-GCM encrypted under a key that exists only in this process's memory for
the round: client updates never reach a disk in the clear. It costs one encryption and one write of
each accepted update (about 3 ms for a 1.84 MB update on a 2-core VM, most of it the write into the
page cache) and, when a cap binds, one read.

Errors. A strategy may stop the stream with an :class:`~fedtune.coordinator.aggregation.AggregationError`
(e.g. an FFA job whose updates carry A); :meth:`RoundIntake.drain` then validates the replies still to
come, so every reply is recorded whatever became of the aggregate.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedtune.compliance.wire import Attempt, Refusal, TrainReply
from fedtune.coordinator.aggregation import ClientUpdate
from fedtune.coordinator.validation import (
    Accepted,
    Outcome,
    RegisteredClient,
    Rejected,
    ReplyValidator,
    signed_spend,
)

Reply = TrainReply | Refusal | Rejected


@dataclass(frozen=True)
class SignedAttempt:
    """An attempt a reply's signature vouches for: the reply's own (with its validation outcome) or
    an earlier one it reports."""

    client_id: str
    attempt: Attempt
    epsilon: float | None  # the signed claim for the reply's own attempt; None for a reported one
    outcome: Outcome | None  # None for a reported attempt


class UpdateSpool:
    """Accepted updates in arrival order in an unlinked temporary file, each encrypted (AES-256-GCM)
    under a key generated here and never stored (see the module docstring). An update is stored as the
    raw bytes of its tensors in ``layout``'s order: validation made every accepted update match the
    round's adapter (names, shapes, dtypes) exactly. Encrypted straight from the tensors' memory into
    one buffer reused for every update (no allocation per update). A context manager: the file is gone
    when it exits."""

    TAG_BYTES = 16

    def __init__(self, directory: Path, layout: Mapping[str, torch.Tensor]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._layout = [(name, t.shape, t.dtype, t.numel() * t.element_size()) for name, t in layout.items()]
        self._size = sum(size for *_, size in self._layout)  # plaintext bytes of one update
        self._sealed = bytearray(self._size + 15)  # update_into wants a block's slack after each piece
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - closed by __exit__
        self._key = os.urandom(32)
        self._count = 0
        self._clients: list[str] = []

    def add(self, client_id: str, tensors: Mapping[str, torch.Tensor]) -> None:
        encryptor = Cipher(algorithms.AES(self._key), modes.GCM(self._nonce(self._count))).encryptor()
        out, at = memoryview(self._sealed), 0
        for name, *_ in self._layout:
            at += encryptor.update_into(memoryview(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy()),
                                        out[at:])
        encryptor.finalize()
        assert at == self._size, "validation lets only updates of the round's layout through"
        self._file.write(out[:at])
        self._file.write(encryptor.tag)
        self._clients.append(client_id)
        self._count += 1

    def replay(self, weights: Mapping[str, float]) -> Iterator[ClientUpdate]:
        """The updates again, in the order they were added, each with ``weights[client id]``."""
        self._file.flush()
        self._file.seek(0)
        for i, client_id in enumerate(self._clients):
            sealed = self._file.read(self._size + self.TAG_BYTES)
            decryptor = Cipher(algorithms.AES(self._key), modes.GCM(self._nonce(i), sealed[self._size:])).decryptor()
            plaintext = bytearray(self._size + 15)
            decryptor.update_into(memoryview(sealed)[:self._size], plaintext)
            decryptor.finalize()  # raises InvalidTag if the file was changed
            tensors, at = {}, 0
            for name, shape, dtype, size in self._layout:
                tensors[name] = torch.frombuffer(plaintext, dtype=dtype, count=size // dtype.itemsize,
                                                 offset=at).reshape(shape) if size else torch.empty(shape, dtype=dtype)
                at += size
            yield ClientUpdate(client_id, tensors, weights[client_id])

    def __enter__(self) -> UpdateSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    @staticmethod
    def _nonce(i: int) -> bytes:
        # the update's place in the file: unique under this key, and records cannot be swapped or replayed
        return struct.pack(">4xQ", i)


class RoundIntake:
    """One round's replies, validated in arrival order as the aggregation strategy asks for updates.

    Attributes (complete once :meth:`drain` returned):
        entries: ``(outcome, sending node)`` per reply, in arrival order; an :class:`Accepted`
            outcome without its tensors.
        spend: every attempt the replies sign for (:func:`fedtune.coordinator.validation.signed_spend`).
        transport_s, validate_s: seconds spent waiting for the transport and validating.
    """

    def __init__(self, replies: Iterable[tuple[Reply, int | None]], *, validator: ReplyValidator, job_id: str,
                 clients: Mapping[str, RegisteredClient], spool: UpdateSpool | None = None) -> None:
        self._replies = iter(replies)
        self._validator = validator
        self._job_id = job_id
        self._clients = clients
        self.spool = spool
        self.entries: list[tuple[Outcome, int | None]] = []
        self.spend: list[SignedAttempt] = []
        self.transport_s = 0.0
        self.validate_s = 0.0

    @property
    def outcomes(self) -> list[Outcome]:
        return [outcome for outcome, _ in self.entries]

    @property
    def accepted(self) -> list[Accepted]:
        return [outcome for outcome, _ in self.entries if isinstance(outcome, Accepted)]

    def updates(self) -> Iterator[ClientUpdate]:
        """The accepted updates as they arrive, each weighted by its signed record count (as claimed:
        see the module docstring on capped weights); spooled first when there is a spool."""
        while (taken := self._take()) is not None:
            if isinstance(taken, Accepted):
                if self.spool is not None:
                    self.spool.add(taken.client_id, taken.tensors)
                yield ClientUpdate(taken.client_id, taken.tensors, float(taken.records))

    def drain(self) -> None:
        """Validate and record the replies not taken yet (after a strategy stopped early, or none ran)."""
        while self._take() is not None:
            pass

    def _take(self) -> Outcome | None:
        """Receive, validate and record the next reply; its full outcome (tensors included) or None at the end."""
        t = time.perf_counter()
        item = next(self._replies, None)
        t1 = time.perf_counter()
        self.transport_s += t1 - t
        if item is None:
            return None
        reply, node = item
        outcome = self._validator.check(reply)
        kept = replace(outcome, tensors={}) if isinstance(outcome, Accepted) else outcome
        signed = signed_spend(reply, job_id=self._job_id, clients=self._clients)
        if signed is not None:
            client_id, own, earlier = signed
            self.spend.append(SignedAttempt(client_id, own, reply.receipt.epsilon, kept))
            self.spend.extend(SignedAttempt(client_id, a, None, None) for a in earlier)
        self.entries.append((kept, node))
        self.validate_s += time.perf_counter() - t1
        return outcome
