import io

import pytest

from gpt2lab.errors import GPT2LabError
from gpt2lab.jsonl import read_jsonl


def lines(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


def test_records_blank_lines_and_sizes():
    got = list(read_jsonl(lines(b'{"a": 1}\n\n  \n[2, 3]\nnull'), "f.jsonl", "one JSON object"))
    assert got == [
        ("f.jsonl:1", 9, {"a": 1}, False),
        ("f.jsonl:2", 1, None, True),
        ("f.jsonl:3", 3, None, True),
        ("f.jsonl:4", 7, [2, 3], False),
        ("f.jsonl:5", 4, None, False),  # JSON null is a record, not a blank line
    ]


def test_bad_json_names_file_line_and_column():
    with pytest.raises(GPT2LabError) as e:
        list(read_jsonl(lines(b'{"a": 1}\n{"a": }\n'), "f.jsonl", "one HellaSwag item"))
    assert str(e.value) == (
        "f.jsonl:2: not valid JSON (Expecting value at column 7); each line must be one HellaSwag item"
    )


def test_not_utf8_is_an_error_unless_a_decoder_is_given():
    data = b'{"a": "ok"}\n{"a": "caf\xe9"}\n'
    with pytest.raises(GPT2LabError) as e:
        list(read_jsonl(lines(data), "f.jsonl", "one JSON object"))
    assert str(e.value) == "f.jsonl:2: not UTF-8 text (byte 10); each line must be one JSON object"
    lenient = list(read_jsonl(lines(data), "f.jsonl", "one JSON object", decode=lambda b: b.decode("latin-1")))
    assert [line.record for line in lenient] == [{"a": "ok"}, {"a": "café"}]


def test_lines_are_read_lazily():
    # Nothing past the line the caller stops at is parsed (a limit on HellaSwag items relies on it).
    reader = read_jsonl(lines(b'{"a": 1}\n{broken\n'), "f.jsonl", "one JSON object")
    assert next(reader).record == {"a": 1}
