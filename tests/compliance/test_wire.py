"""The wire protocol: canonical tensor digest, signed receipts, Flower RecordDict mapping."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch

from fedtune.compliance.signing import generate_signing_key
from fedtune.compliance.wire import (
    PROTOCOL_VERSION,
    Attempt,
    ProtocolVersionError,
    Refusal,
    RefusalReason,
    TrainInstruction,
    TrainReply,
    WireError,
    decode_tensors,
    encode_tensors,
    instruction_from_record_dict,
    instruction_to_record_dict,
    new_nonce,
    reply_from_record_dict,
    reply_to_record_dict,
    sign_refusal,
    sign_train_reply,
    tensors_digest,
)

MECHANISM = {"sample_rate": 0.1, "noise_multiplier": 1.1, "steps": 5, "accountant": "rdp"}


def _reference_digest(tensors: dict[str, np.ndarray], dtype_names: dict[str, str]) -> str:
    """The digest as the module docstring specifies it, written with numpy + struct only."""
    h = hashlib.sha256(b"fedtune.tensors\x00")
    h.update(struct.pack(">Q", len(tensors)))
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        for field in (name.encode(), dtype_names[name].encode()):
            h.update(struct.pack(">Q", len(field)) + field)
        h.update(struct.pack(">Q", a.ndim) + b"".join(struct.pack(">Q", d) for d in a.shape))
        raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        h.update(struct.pack(">Q", len(raw)) + raw)
    return "sha256:" + h.hexdigest()


def _adapter() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"layers.0.q.lora_A.weight": torch.randn(2, 3, generator=g),
            "layers.0.q.lora_B.weight": torch.randn(3, 2, generator=g)}


def _instruction(**kw) -> TrainInstruction:
    args = dict(job_id="job-1", round=3, nonce=b"\x07" * 32, base_digest="sha256:base",
                config={"ffa": True, "dp": {"epsilon": 2.0}}, adapter=_adapter())
    args.update(kw)
    return TrainInstruction(**args)


def test_digest_follows_the_spec():
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[1, -2]], dtype=np.int64)
    expected = _reference_digest({"b": b, "a": a}, {"a": "F32", "b": "I64"})
    assert tensors_digest({"a": torch.from_numpy(a), "b": torch.from_numpy(b)}) == expected


def test_digest_ignores_order_and_memory_layout_but_not_content():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    base = tensors_digest({"x": t, "y": t + 1})
    assert tensors_digest({"y": t + 1, "x": t}) == base
    assert tensors_digest({"x": t.t().contiguous().t(), "y": t + 1}) == base  # column-major copy
    assert tensors_digest({"x": t.reshape(3, 2), "y": t + 1}) != base  # shape
    assert tensors_digest({"x": t.double(), "y": t + 1}) != base  # dtype
    assert tensors_digest({"z": t, "y": t + 1}) != base  # name
    assert tensors_digest({"x": t, "y": t + 2}) != base  # value


def test_bf16_crosses_the_wire_exactly():
    t = {"w": torch.randn(4, 5).to(torch.bfloat16)}
    back = decode_tensors(encode_tensors(t))
    assert back["w"].dtype == torch.bfloat16 and torch.equal(back["w"], t["w"])
    assert tensors_digest(back) == tensors_digest(t)


def test_unsupported_dtype_and_garbage_bytes_are_wire_errors():
    with pytest.raises(WireError, match="cannot cross the wire"):
        tensors_digest({"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(WireError, match="not a valid safetensors"):
        decode_tensors(b"\x80\x04\x95 pickle bytes")


def test_receipt_signed_bytes_layout():
    key = generate_signing_key()
    earlier = Attempt(round=2, nonce=b"\x05" * 32, sample_rate=0.25, noise_multiplier=0.9, steps=7, accountant="prv",
                      delta=1e-5)
    reply = sign_train_reply(_instruction(), client_id="bank-a", tensors=_adapter(), records=120,
                             epsilon=1.25, delta=1e-6, sample_rate=0.125, noise_multiplier=1.5, steps=40,
                             accountant="rdp", attempts=(earlier,), private_key=key)

    def s(text: str) -> bytes:
        return struct.pack(">I", len(text.encode())) + text.encode()

    expected = (b"fedtune.receipt\x00" + struct.pack(">I", 3) + s("job-1") + struct.pack(">Q", 3)
                + struct.pack(">I", 32) + b"\x07" * 32 + s("bank-a") + s(tensors_digest(_adapter()))
                + struct.pack(">d", 1.25) + struct.pack(">d", 1e-6) + s("sha256:base") + struct.pack(">Q", 120)
                # version 2: the mechanism and the earlier attempts
                + struct.pack(">d", 0.125) + struct.pack(">d", 1.5) + struct.pack(">Q", 40) + s("rdp")
                + struct.pack(">I", 1)
                + struct.pack(">Q", 2) + struct.pack(">I", 32) + b"\x05" * 32 + struct.pack(">d", 0.25)
                + struct.pack(">d", 0.9) + struct.pack(">Q", 7) + s("prv") + struct.pack(">d", 1e-5))
    assert reply.receipt.signed_bytes() == expected
    key.public_key().verify(reply.receipt.signature, expected)  # raises if invalid


def test_receipt_verifies_only_with_the_signers_key_and_unchanged_fields():
    from dataclasses import replace

    key = generate_signing_key()
    receipt = sign_train_reply(_instruction(), client_id="bank-a", tensors=_adapter(), records=10,
                               epsilon=1.0, delta=1e-6, **MECHANISM, private_key=key).receipt
    assert receipt.verify(key.public_key())
    assert not receipt.verify(generate_signing_key().public_key())
    lost = Attempt(round=1, nonce=b"\x09" * 32, sample_rate=0.1, noise_multiplier=1.0, steps=5, accountant="rdp",
                   delta=1e-5)
    for change in ({"round": 2}, {"job_id": "job-2"}, {"epsilon": 0.5}, {"records": 1000},
                   {"nonce": b"\x08" * 32}, {"client_id": "bank-b"}, {"base_digest": "sha256:other"},
                   {"sample_rate": 0.2}, {"noise_multiplier": 2.0}, {"steps": 6}, {"accountant": "prv"},
                   {"attempts": (lost,)}):
        assert not replace(receipt, **change).verify(key.public_key()), change


def _through_flower(record_dict):
    """Serialize a RecordDict the way Flower's transport does (deflate every object, inflate)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record_dict).items()}
    return inflate_object_from_contents(record_dict.object_id, contents)


def test_instruction_round_trips_through_flower():
    instruction = _instruction(nonce=new_nonce())
    back = instruction_from_record_dict(_through_flower(instruction_to_record_dict(instruction)))
    assert (back.job_id, back.round, back.nonce, back.base_digest, back.config) == (
        instruction.job_id, instruction.round, instruction.nonce, instruction.base_digest, instruction.config)
    assert tensors_digest(back.adapter) == tensors_digest(instruction.adapter)


def test_reply_and_refusal_round_trip_through_flower():
    key = generate_signing_key()
    b_only = {k: v for k, v in _adapter().items() if "lora_B" in k}
    lost = Attempt(round=1, nonce=b"\x09" * 32, sample_rate=0.1, noise_multiplier=1.0, steps=5, accountant="rdp",
                   delta=1e-5)
    reply = sign_train_reply(_instruction(), client_id="bank-a", tensors=b_only, records=64,
                             epsilon=0.8, delta=1e-6, **MECHANISM, attempts=(lost,), private_key=key)
    back = reply_from_record_dict(_through_flower(reply_to_record_dict(reply)))
    assert isinstance(back, TrainReply)
    assert back.receipt == reply.receipt and back.metrics == {"records": 64}
    assert back.receipt.attempts == (lost,) and back.receipt.steps == MECHANISM["steps"]
    assert back.receipt.verify(key.public_key()) and tensors_digest(back.tensors) == reply.receipt.tensors_digest

    refusal = sign_refusal(_instruction(), client_id="bank-a", reason_code=RefusalReason.BUDGET_EXHAUSTED,
                           message="epsilon 9.5 of 10 spent", private_key=key)
    back = reply_from_record_dict(_through_flower(reply_to_record_dict(refusal)))
    assert isinstance(back, Refusal) and back == refusal and back.verify(key.public_key())


def test_other_protocol_version_and_missing_fields_are_refused():
    from flwr.app import ConfigRecord

    content = instruction_to_record_dict(_instruction())
    content.config_records["fedtune.instruction"]["protocol_version"] = PROTOCOL_VERSION + 1
    with pytest.raises(ProtocolVersionError, match=f"speaks wire protocol {PROTOCOL_VERSION + 1}"):
        instruction_from_record_dict(content)
    content.config_records["fedtune.instruction"] = ConfigRecord({"protocol_version": PROTOCOL_VERSION})
    with pytest.raises(WireError, match="no field"):
        instruction_from_record_dict(content)


def test_nonce_must_have_32_bytes():
    with pytest.raises(WireError, match="32"):
        _instruction(nonce=b"short")
    assert len(new_nonce()) == 32 and new_nonce() != new_nonce()


def test_a_version_1_reply_is_refused_naming_both_versions():
    """A v1 agent's reply (unsigned mechanism) cannot be booked: decoding refuses it, and the
    coordinator records it as a protocol_version rejection."""
    from fedtune.coordinator.validation import RejectReason, decode_reply

    key = generate_signing_key()
    content = reply_to_record_dict(sign_train_reply(_instruction(), client_id="bank-a", tensors=_adapter(),
                                                    records=10, epsilon=1.0, delta=1e-6, **MECHANISM, private_key=key))
    v1 = content.config_records["fedtune.reply"]
    v1["protocol_version"] = 1
    for field in ("sample_rate", "noise_multiplier", "steps", "accountant", "attempts_json"):
        del v1[field]
    with pytest.raises(ProtocolVersionError, match="peer speaks wire protocol 1, this side speaks 3"):
        reply_from_record_dict(content)
    rejected = decode_reply(content)
    assert rejected.reason_code == RejectReason.PROTOCOL_VERSION and rejected.client_id == "bank-a"
    assert "1" in rejected.message and "3" in rejected.message


def test_a_version_2_reply_with_its_loss_metric_is_refused_naming_both_versions():
    """Version 3 dropped version 2's constant ``loss`` metric: a v2 agent gets the version refusal, not an
    unknown-metric one."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from fedtune.coordinator.validation import RejectReason, decode_reply

    v3 = reply_to_record_dict(sign_train_reply(_instruction(), client_id="bank-a", tensors=_adapter(), records=10,
                                               epsilon=1.0, delta=1e-6, **MECHANISM,
                                               private_key=generate_signing_key())).config_records["fedtune.reply"]
    # version 2's layout: the adapter in an ArrayRecord, the metrics (with loss) in a MetricRecord
    data = v3.pop("adapter_safetensors")
    del v3["metrics_json"]
    v3["protocol_version"] = 2
    content = RecordDict({"fedtune.adapter": ArrayRecord({"safetensors": Array(dtype="uint8", shape=(len(data),),
                                                                                stype="safetensors", data=data)}),
                          "fedtune.metrics": MetricRecord({"loss": 0.0, "records": 10}), "fedtune.reply": v3})
    with pytest.raises(ProtocolVersionError, match="peer speaks wire protocol 2, this side speaks 3"):
        reply_from_record_dict(content)
    assert decode_reply(content).reason_code == RejectReason.PROTOCOL_VERSION


def test_malformed_attempts_are_wire_errors():
    key = generate_signing_key()
    content = reply_to_record_dict(sign_train_reply(_instruction(), client_id="bank-a", tensors=_adapter(),
                                                    records=10, epsilon=1.0, delta=1e-6, **MECHANISM, private_key=key))
    for bad, match in (("{", "not JSON"), ('{"round": 1}', "JSON list"), ('[{"round": "1"}]', "'round' is str"),
                       ('[{"round": 1, "nonce": "zz", "sample_rate": 0.1, "noise_multiplier": 1, "steps": 1, '
                        '"accountant": "rdp", "delta": 1e-5}]', "not hex"), ("[" * 100_000, "not JSON")):
        content.config_records["fedtune.reply"]["attempts_json"] = bad
        with pytest.raises(WireError, match=match):
            reply_from_record_dict(content)
