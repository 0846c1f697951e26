"""Local data: JSONL records, errors with line numbers, completion-only labels, one padded row per record."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.client_agent.data import (
    IGNORE_INDEX,
    DataError,
    Record,
    encode_record,
    encode_records,
    load_records,
    pad_records,
    padding_collate,
)
from fedtune.model.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _write(tmp_path, lines: list[str], name: str = "data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_loads_records_skipping_blank_lines_and_extra_keys(tmp_path):
    path = _write(tmp_path, [json.dumps({"prompt": "Q: 2+2?", "completion": " 4", "id": 7}), "",
                             json.dumps({"prompt": "héllo", "completion": "wörld"})])
    assert load_records(path) == [Record("Q: 2+2?", " 4"), Record("héllo", "wörld")]


@pytest.mark.parametrize(("bad", "message"), [
    ("{not json", "not valid JSON"),
    ('["prompt", "completion"]', "expected a JSON object"),
    ('{"prompt": "p"}', "missing field 'completion'"),
    ('{"completion": "c"}', "missing field 'prompt'"),
    ('{"prompt": 3, "completion": "c"}', "field 'prompt' must be a string, got int"),
    ('{"prompt": "p", "completion": null}', "field 'completion' must be a string, got NoneType"),
    ('{"prompt": "", "completion": "c"}', "field 'prompt' is empty"),
    ('{"prompt": "p", "completion": ""}', "field 'completion' is empty"),
])
def test_bad_line_names_file_and_line(tmp_path, bad, message):
    good = json.dumps({"prompt": "p", "completion": "c"})
    path = _write(tmp_path, [good, good, bad, good])
    with pytest.raises(DataError, match=message) as info:
        load_records(path)
    assert info.value.line == 3
    assert f"{path}, line 3" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_empty_or_blank_file_is_a_clear_error(tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataError, match="contains no records"):
            load_records(path)


def test_missing_file_and_non_utf8_line(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        load_records(tmp_path / "absent.jsonl")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "p", "completion": "c"}\n{"prompt": "\xe9", "completion": "c"}\n')
    with pytest.raises(DataError, match="line 2: not UTF-8"):
        load_records(path)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "completion": "c"}\n')
    assert load_records(path) == [Record("p", "c")]


def test_labels_cover_completion_and_eos_only():
    enc = encode_record(Record("ab", "xyz"), TOK, max_len=64)
    expected_ids = [TOK.bos_token_id, *b"ab", *b"xyz", TOK.eos_token_id]
    assert enc.input_ids.tolist() == expected_ids
    assert enc.labels.tolist() == [IGNORE_INDEX] * 3 + [*b"xyz", TOK.eos_token_id]


def test_long_prompt_is_cut_from_the_left_then_completion_from_the_right():
    enc = encode_record(Record("0123456789", "abc"), TOK, max_len=8)  # bos + 10 + 3 + eos = 15
    assert enc.input_ids.tolist() == [TOK.bos_token_id, *b"789", *b"abc", TOK.eos_token_id]
    enc = encode_record(Record("0123", "abcdefghij"), TOK, max_len=6)  # prompt keeps 1 token, no eos
    assert enc.input_ids.tolist() == [TOK.bos_token_id, *b"3", *b"abcd"]
    assert enc.labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, *b"abcd"]
    with pytest.raises(ValueError, match="max_len"):
        encode_record(Record("p", "c"), TOK, max_len=2)


def test_padding_keeps_one_row_per_record_and_masks_padding():
    encoded = encode_records([Record("a", "b"), Record("long prompt", "long completion")], TOK, max_len=64)
    batch = padding_collate(TOK.pad_token_id)(encoded)
    assert len(batch) == 2 and batch.input_ids.shape == (2, len(encoded[1].input_ids))
    short = len(encoded[0].input_ids)
    assert batch.input_ids[0, short:].eq(TOK.pad_token_id).all()
    assert batch.labels[0, short:].eq(IGNORE_INDEX).all()
    assert batch.attention_mask[0].tolist() == [1] * short + [0] * (batch.input_ids.shape[1] - short)
    assert torch.equal(batch.labels[1], encoded[1].labels)


def test_empty_batch_has_zero_rows():
    batch = pad_records([], TOK.pad_token_id)
    assert len(batch) == 0 and batch.input_ids.shape == (0, 0)
