"""A broken annotation file is a user's mistake: a DataError whose one line names the file, and for
invalid JSON the line and column, never a raw JSONDecodeError naming no file."""
from __future__ import annotations

import json

import pytest

from megavl.data.annotations import load_nlvr2, load_retrieval, load_vqa
from megavl.errors import DataError

VQA = [{"question_id": 1, "question": "what shape?", "answer": ["circle"], "image": "a.png"},
       {"question_id": 2, "question": "what colour?", "answer": ["red"], "image": "b.png"}]


def _missing_comma(path) -> None:
    text = json.dumps(VQA, indent=1)
    # the comma between the two entries: `},\n {` -> `}\n {`
    assert text.count("},\n {") == 1
    path.write_text(text.replace("},\n {", "}\n {"))


@pytest.mark.parametrize("reader", ["vqa", "retrieval", "nlvr2"])
def test_invalid_json_names_the_file_line_and_column(tmp_path, reader):
    path = tmp_path / "train.json"
    _missing_comma(path)
    read = {"vqa": lambda: load_vqa([str(path)], {"vqa": str(tmp_path)}, need_answers=True),
            "retrieval": lambda: load_retrieval(str(path), str(tmp_path)),
            "nlvr2": lambda: load_nlvr2(str(path), str(tmp_path))}[reader]
    with pytest.raises(DataError) as err:
        read()
    message = str(err.value)
    line = json.dumps(VQA, indent=1).split("\n").index(" {", 2) + 1  # the second entry's first line
    assert message.startswith(f"{path} line {line} column 2: not valid JSON: Expecting ',' delimiter"), message
    assert "\n" not in message and err.value.__cause__ is None and err.value.__suppress_context__


def test_not_utf8_not_a_list_and_absent_are_data_errors(tmp_path):
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"caption": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.json: not UTF-8 text"):
        load_retrieval(str(latin), str(tmp_path))
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"entries": VQA}))
    with pytest.raises(DataError, match=r"mapping\.json: expected a JSON list of entries, got dict"):
        load_vqa([str(mapping)], {"vqa": str(tmp_path)}, need_answers=True)
    with pytest.raises(DataError, match=r"absent\.json' does not exist"):
        load_retrieval(str(tmp_path / "absent.json"), str(tmp_path))
