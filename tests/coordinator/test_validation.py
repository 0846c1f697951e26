"""Reply validation: every malicious reply is rejected with its reason code; a good one is accepted."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fedtune.compliance.signing import encode_public_key, generate_signing_key
from fedtune.compliance.wire import (
    RefusalReason,
    TrainInstruction,
    reply_to_record_dict,
    sign_refusal,
    sign_train_reply,
)
from fedtune.coordinator.validation import (
    Accepted,
    Refused,
    RegisteredClient,
    Rejected,
    RejectReason,
    RoundExpectation,
    decode_reply,
    validate_replies,
    validate_reply,
)

KEYS = {name: generate_signing_key() for name in ("bank-a", "bank-b", "hospital-c", "revoked-d", "stranger")}
CLIENTS = {
    "bank-a": RegisteredClient(encode_public_key(KEYS["bank-a"])),
    "bank-b": RegisteredClient(KEYS["bank-b"].public_key()),
    "hospital-c": RegisteredClient(encode_public_key(KEYS["hospital-c"])),
    "revoked-d": RegisteredClient(encode_public_key(KEYS["revoked-d"]), status="revoked"),
}
BOUND = 1.0
# The adapter the round started from: FFA mode, so replies carry the B tensors only.
CURRENT_B = {"layers.0.q.lora_B.weight": torch.zeros(4, 2), "layers.1.q.lora_B.weight": torch.full((4, 2), 0.5)}
ROUND_3 = TrainInstruction(job_id="job-1", round=3, nonce=b"\x03" * 32, base_digest="sha256:base", config={},
                           adapter=dict(CURRENT_B))
EXPECT = RoundExpectation(job_id="job-1", round=3, nonce=b"\x03" * 32, base_digest="sha256:base",
                          current=CURRENT_B, norm_bound=BOUND, max_epsilon=4.0)


def _trained(scale: float = 0.1) -> dict[str, torch.Tensor]:
    # every coordinate moves by `scale`: the update norm is scale * sqrt(16)
    return {name: t + scale for name, t in CURRENT_B.items()}


def _reply(client="bank-a", instruction=ROUND_3, tensors=None, key=None, **kw):
    args = dict(records=100, epsilon=1.5, delta=1e-6, sample_rate=0.16, noise_multiplier=1.2, steps=10,
                accountant="rdp")
    args.update(kw)
    return sign_train_reply(instruction, client_id=client, tensors=_trained() if tensors is None else tensors,
                            private_key=key or KEYS[client], **args)


def _check(reply, seen=frozenset()):
    return validate_reply(reply, expected=EXPECT, clients=CLIENTS, seen_clients=seen)


def test_good_reply_is_accepted_with_its_update_norm():
    outcome = _check(_reply())
    assert isinstance(outcome, Accepted)
    assert outcome.client_id == "bank-a" and outcome.records == 100 and outcome.epsilon == 1.5
    assert outcome.update_norm == pytest.approx(0.1 * math.sqrt(16), rel=1e-6)
    assert outcome.digest.startswith("sha256:")


def _wrong_shape():
    tensors = _trained()
    tensors["layers.0.q.lora_B.weight"] = torch.zeros(2, 4)
    return _reply(tensors=tensors)


def _nan():
    tensors = _trained()
    tensors["layers.1.q.lora_B.weight"][1, 1] = float("nan")
    return _reply(tensors=tensors)


def _swapped_tensors():
    reply = _reply()
    return replace(reply, tensors=_trained(0.2))  # tensors changed after signing


MALICIOUS = {
    "bad signature": (lambda: _reply(key=KEYS["stranger"]), RejectReason.BAD_SIGNATURE),
    "tampered signature": (lambda: replace(_reply(), receipt=replace(_reply().receipt, signature=b"\x00" * 64)),
                           RejectReason.BAD_SIGNATURE),
    "inflated weight": (lambda: replace(_reply(), receipt=replace(_reply().receipt, records=10**6)),
                        RejectReason.BAD_SIGNATURE),
    "replay of round 2": (lambda: _reply(instruction=replace(ROUND_3, round=2, nonce=b"\x02" * 32)),
                          RejectReason.WRONG_ROUND),
    "other job": (lambda: _reply(instruction=replace(ROUND_3, job_id="job-2")), RejectReason.WRONG_JOB),
    "stale nonce": (lambda: _reply(instruction=replace(ROUND_3, nonce=b"\x09" * 32)), RejectReason.WRONG_NONCE),
    "other base": (lambda: _reply(instruction=replace(ROUND_3, base_digest="sha256:other")),
                   RejectReason.WRONG_BASE),
    "wrong shape": (_wrong_shape, RejectReason.WRONG_SHAPE),
    "wrong dtype": (lambda: _reply(tensors={k: v.double() for k, v in _trained().items()}), RejectReason.WRONG_DTYPE),
    "missing tensor": (lambda: _reply(tensors={"layers.0.q.lora_B.weight": torch.zeros(4, 2)}),
                       RejectReason.WRONG_TENSORS),
    "A sent in FFA mode": (lambda: _reply(tensors={**_trained(), "layers.0.q.lora_A.weight": torch.zeros(2, 4)}),
                           RejectReason.WRONG_TENSORS),
    "NaN": (_nan, RejectReason.NON_FINITE),
    "norm 100x the bound": (lambda: _reply(tensors=_trained(100 * BOUND / math.sqrt(16))),
                            RejectReason.NORM_EXCEEDED),
    "tensors swapped in transit": (_swapped_tensors, RejectReason.DIGEST_MISMATCH),
    "negative epsilon": (lambda: _reply(epsilon=-1.0), RejectReason.BAD_PRIVACY_CLAIM),
    "epsilon over target": (lambda: _reply(epsilon=5.0), RejectReason.EPSILON_OVER_TARGET),
    "metrics disagree with receipt": (lambda: replace(_reply(), metrics={"records": 5}),
                                      RejectReason.BAD_METRICS),
    "a loss metric (protocol 2's constant 0.0)": (lambda: replace(_reply(), metrics={"loss": 0.0, "records": 100}),
                                                  RejectReason.BAD_METRICS),
    "sigma swapped in transit": (lambda: replace(_reply(), receipt=replace(_reply().receipt, noise_multiplier=9.0)),
                                 RejectReason.BAD_SIGNATURE),
    "zero noise signed": (lambda: _reply(noise_multiplier=0.0), RejectReason.BAD_PRIVACY_CLAIM),
    "sample rate over 1": (lambda: _reply(sample_rate=1.5), RejectReason.BAD_PRIVACY_CLAIM),
    "no steps": (lambda: _reply(steps=0), RejectReason.BAD_PRIVACY_CLAIM),
    "steps past a 32-bit count": (lambda: _reply(steps=2**31), RejectReason.BAD_PRIVACY_CLAIM),
    "unknown accountant": (lambda: _reply(accountant="gdp"), RejectReason.BAD_PRIVACY_CLAIM),
    "records past a 32-bit count": (lambda: _reply(records=2**31), RejectReason.BAD_METRICS),
    "unknown client": (lambda: _reply(client="stranger"), RejectReason.UNKNOWN_CLIENT),
    "revoked client": (lambda: _reply(client="revoked-d"), RejectReason.REVOKED_CLIENT),
}


@pytest.mark.parametrize("case", MALICIOUS)
def test_malicious_reply_is_rejected_with_its_reason(case):
    make, reason = MALICIOUS[case]
    outcome = _check(make())
    assert isinstance(outcome, Rejected), outcome
    assert outcome.reason_code == reason, outcome.message


def test_norm_just_under_the_bound_is_accepted():
    assert isinstance(_check(_reply(tensors=_trained(0.99 * BOUND / math.sqrt(16)))), Accepted)


def test_duplicate_reply_is_rejected():
    outcomes = validate_replies([_reply(), _reply(epsilon=1.4), _reply("bank-b")], expected=EXPECT, clients=CLIENTS)
    assert [type(o).__name__ for o in outcomes] == ["Accepted", "Rejected", "Accepted"]
    assert outcomes[1].reason_code == RejectReason.DUPLICATE


def test_forged_or_replayed_messages_do_not_use_up_a_clients_reply():
    forged = _reply(key=KEYS["stranger"])
    replayed = _reply(instruction=replace(ROUND_3, round=2, nonce=b"\x02" * 32))
    outcomes = validate_replies([forged, replayed, _reply()], expected=EXPECT, clients=CLIENTS)
    assert [getattr(o, "reason_code", None) for o in outcomes[:2]] == [RejectReason.BAD_SIGNATURE,
                                                                       RejectReason.WRONG_ROUND]
    assert isinstance(outcomes[2], Accepted)


def test_a_clients_rejected_update_counts_as_its_one_reply():
    outcomes = validate_replies([_nan(), _reply()], expected=EXPECT, clients=CLIENTS)
    assert outcomes[0].reason_code == RejectReason.NON_FINITE
    assert outcomes[1].reason_code == RejectReason.DUPLICATE


def test_signed_refusal_is_recorded_as_refused():
    refusal = sign_refusal(ROUND_3, client_id="hospital-c", reason_code=RefusalReason.BUDGET_EXHAUSTED,
                           message="budget spent", private_key=KEYS["hospital-c"])
    assert _check(refusal) == Refused("hospital-c", RefusalReason.BUDGET_EXHAUSTED, "budget spent")
    forged = sign_refusal(ROUND_3, client_id="hospital-c", reason_code=RefusalReason.BUDGET_EXHAUSTED,
                          message="budget spent", private_key=KEYS["stranger"])
    assert _check(forged).reason_code == RejectReason.BAD_SIGNATURE
    stale = sign_refusal(replace(ROUND_3, round=2), client_id="hospital-c", reason_code=RefusalReason.NO_DATA,
                         message="", private_key=KEYS["hospital-c"])
    assert _check(stale).reason_code == RejectReason.WRONG_ROUND


def test_undecodable_message_is_rejected_as_malformed():
    from flwr.app import ConfigRecord, RecordDict

    content = reply_to_record_dict(_reply())
    del content.config_records["fedtune.reply"]["adapter_safetensors"]
    outcome = decode_reply(content)
    assert outcome == Rejected("bank-a", RejectReason.MALFORMED, outcome.message)
    assert "adapter_safetensors" in outcome.message
    assert decode_reply(RecordDict({"x": ConfigRecord({"a": 1})})).reason_code == RejectReason.MALFORMED
    good = decode_reply(reply_to_record_dict(_reply()))
    assert isinstance(_check(good), Accepted)
