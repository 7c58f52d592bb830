"""Data loading, templates, verbalizers and splits (softprompt.data)."""

from __future__ import annotations

import csv
import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt.data import (
    Example,
    Template,
    Verbalizer,
    build_examples,
    column_names,
    default_template,
    escape_template_text,
    kfold,
    load_rows,
    require_columns,
    sample_rows,
    train_val_split,
    verbalizer_for,
)
from softprompt.errors import ConfigError, DataError, SoftPromptError

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def write(path: Path, content: str | bytes, encoding: str = "utf-8") -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode(encoding))
    return path


# ------------------------------------------------------------------------------------------ formats


def test_csv_quoting_spaces_in_header_and_bom(tmp_path):
    path = write(
        tmp_path / "tweets.csv",
        '\ufeffTweet text,ID,Label\r\n"hello, world",0,1\r\n"two\nlines ""quoted""",1,2\r\n\r\n',
    )
    rows = load_rows(path)
    assert rows == [
        {"Tweet text": "hello, world", "ID": "0", "Label": "1"},
        {"Tweet text": 'two\nlines "quoted"', "ID": "1", "Label": "2"},
    ]
    assert column_names(rows) == ["Tweet text", "ID", "Label"]


def test_tsv_reads_quotes_literally_and_keeps_trailing_spaces(tmp_path):
    path = write(tmp_path / "dev.tsv", 'sentence\tlabel\nit \'s "great" \t1\n"unbalanced\t0\n')
    assert load_rows(path) == [{"sentence": 'it \'s "great" ', "label": "1"}, {"sentence": '"unbalanced', "label": "0"}]


def test_jsonl_values_become_strings_and_blank_lines_are_skipped(tmp_path):
    lines = [
        {"text": "a", "label": 1, "ok": True, "tags": ["x", "ü"], "score": 0.5, "note": None},
        {"text": "b", "label": 2, "ok": False, "tags": [], "score": 2.0, "note": "n"},
    ]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n  \n")
    rows = load_rows(path)
    assert rows == [
        {"text": "a", "label": "1", "ok": "true", "tags": '["x", "ü"]', "score": "0.5", "note": ""},
        {"text": "b", "label": "2", "ok": "false", "tags": "[]", "score": "2.0", "note": "n"},
    ]


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["a", "b", None], "label": [1, 0, 1]}).to_parquet(path)
    assert load_rows(path) == [{"text": "a", "label": "1"}, {"text": "b", "label": "0"}, {"text": "", "label": "1"}]


def test_phrasebank_latin1_crlf_and_last_at(tmp_path):
    body = "Sepp\u00e4l\u00e4 's sales rose .@positive\r\nuser@example.com wrote@neutral\r\n"
    path = write(tmp_path / "Sentences.txt", body, encoding="latin-1")
    rows = load_rows(path)
    assert rows == [
        {"sentence": "Sepp\u00e4l\u00e4 's sales rose .", "label": "positive"},
        {"sentence": "user@example.com wrote", "label": "neutral"},
    ]


def test_phrasebank_in_utf8_is_not_mojibake(tmp_path):
    path = write(tmp_path / "s.txt", "Sepp\u00e4l\u00e4 grew .@positive\n", encoding="utf-8")
    assert load_rows(path)[0]["sentence"] == "Sepp\u00e4l\u00e4 grew ."


def test_format_flag_overrides_extension(tmp_path):
    path = write(tmp_path / "data.dat", "a,b\n1,2\n")
    assert load_rows(path, format="CSV") == [{"a": "1", "b": "2"}]
    assert load_rows(path, format="tsv") == [{"a,b": "1,2"}]
    bank = write(tmp_path / "bank.dat", "good .@positive\n")
    assert load_rows(bank, format="phrasebank") == [{"sentence": "good .", "label": "positive"}]


def test_explicit_encoding(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\ncaf\u00e9,1\n", encoding="cp1252")
    assert load_rows(path, encoding="cp1252") == [{"text": "caf\u00e9", "label": "1"}]


def test_hub_name_calls_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"Tweet text": "hi", "ID": 0, "Label": 2}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    expected = [{"Tweet text": "hi", "ID": "0", "Label": "2"}]  # class ids become strings like CSV labels
    assert load_rows("hf:ought/raft:twitter_complaints", split="test") == expected
    assert load_rows("hf:imdb") == expected
    assert calls == [("ought/raft", "twitter_complaints", "test"), ("imdb", None, "train")]


def test_hub_failure_is_one_clear_error(monkeypatch):
    def failing(name, config=None, split=None):
        raise ValueError(f"Unknown split {split!r}.\nShould be one of ['train'].")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=failing))
    with pytest.raises(DataError, match=r"hf:owner/name: cannot load split 'nope'.*Unknown split") as e:
        load_rows("hf:owner/name", split="nope")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file") as e:
        load_rows(tmp_path / "nope.csv")
    assert str(tmp_path / "nope.csv") in str(e.value)


def test_missing_file_that_looks_like_a_hub_name_suggests_hf_prefix():
    with pytest.raises(
        DataError,
        match=r"ought/raft: no such file \(for a Hugging Face data set write "
        r"hf:ought/raft\)",
    ):
        load_rows("ought/raft")


def test_directory(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        load_rows(tmp_path)


def test_unknown_extension_and_format(tmp_path):
    path = write(tmp_path / "d.xlsx", "x")
    with pytest.raises(ConfigError, match=r"d\.xlsx: cannot tell the format.*'\.xlsx'.*--format"):
        load_rows(path)
    with pytest.raises(ConfigError, match=r"--format 'xml' is not supported"):
        load_rows(path, format="xml")


@pytest.mark.parametrize("name", ["e.csv", "e.tsv", "e.jsonl", "e.txt"])
@pytest.mark.parametrize("content", [b"", b"\n \r\n"])
def test_empty_file(tmp_path, name, content):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match="is empty") as e:
        load_rows(path)
    assert str(path) in str(e.value)


def test_header_only_csv(tmp_path):
    with pytest.raises(DataError, match=r"h\.csv has a header but no data rows"):
        load_rows(write(tmp_path / "h.csv", "text,label\n"))


def test_empty_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "e.parquet"
    pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(path)
    with pytest.raises(DataError, match=r"e\.parquet has no rows"):
        load_rows(path)


def test_undecodable_bytes_name_file_offset_line_and_encoding_flag(tmp_path):
    path = write(tmp_path / "bad.csv", b"text,label\nok,1\ncaf\xe9,2\n")
    with pytest.raises(DataError) as e:
        load_rows(path)
    message = str(e.value)
    assert str(path) in message and "0xe9 at offset 19 (line 3)" in message and "--encoding" in message
    assert load_rows(path, encoding="latin-1")[1] == {"text": "caf\u00e9", "label": "2"}


def test_unknown_encoding(tmp_path):
    path = write(tmp_path / "d.csv", "a\n1\n")
    with pytest.raises(ConfigError, match="--encoding 'utf-99' is not a known text encoding"):
        load_rows(path, encoding="utf-99")


def test_malformed_json_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n\n{"text": "b",}\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 3: is not valid JSON") as e:
        load_rows(path)
    assert str(path) in str(e.value)


def test_json_line_that_is_not_an_object(tmp_path):
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: holds a JSON list"):
        load_rows(write(tmp_path / "d.jsonl", '{"text": "a"}\n["b"]\n'))


def test_jsonl_lines_with_different_keys(tmp_path):
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: lacks \['label'\] compared with line 1"):
        load_rows(write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n'))


def test_ragged_csv_row(tmp_path):
    path = write(tmp_path / "r.csv", "text,label\na,1\nb,2,extra\n")
    with pytest.raises(DataError, match=r"r\.csv, row 2 \(line 3\): has 3 fields but the header has 2") as e:
        load_rows(path)
    assert str(path) in str(e.value)


def test_ragged_tsv_row(tmp_path):
    with pytest.raises(DataError, match=r"r\.tsv, row 1 \(line 2\): has 1 fields but the header has 2"):
        load_rows(write(tmp_path / "r.tsv", "sentence\tlabel\nno tab here\n"))


def test_unclosed_quote(tmp_path):
    with pytest.raises(DataError, match=r"q\.csv, line 3: malformed CSV"):
        load_rows(write(tmp_path / "q.csv", 'text,label\n"open,1\nb,2\n'))


def test_bad_headers(tmp_path):
    with pytest.raises(DataError, match=r"names column 'a' twice"):
        load_rows(write(tmp_path / "d.csv", "a,a\n1,2\n"))
    with pytest.raises(DataError, match=r"column 2 of the header has no name"):
        load_rows(write(tmp_path / "e.csv", "a,\n1,2\n"))


def test_phrasebank_line_without_at(tmp_path):
    path = write(tmp_path / "s.txt", "fine .@neutral\r\nno label here\r\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"s\.txt, line 2: expected 'sentence@label'.*--format"):
        load_rows(path)


def test_not_a_parquet_file(tmp_path):
    pytest.importorskip("pyarrow")
    with pytest.raises(DataError, match=r"x\.parquet: is not a readable parquet file"):
        load_rows(write(tmp_path / "x.parquet", b"not parquet at all"))


def test_every_error_is_a_softprompt_error(tmp_path):
    assert issubclass(DataError, SoftPromptError) and issubclass(ConfigError, SoftPromptError)


# ------------------------------------------------------------------------------------------ columns


ROWS = [{"Tweet text": "a", "ID": "0", "Label": "1"}, {"Tweet text": "b", "ID": "1", "Label": "2"}]


def test_require_columns_names_missing_column_and_available_ones():
    require_columns(ROWS, ["Tweet text", "Label"], source="train.csv")
    with pytest.raises(DataError) as e:
        require_columns(ROWS, ["label"], source="train.csv")
    assert str(e.value) == (
        "train.csv has no column 'label' (did you mean 'Label'?); available columns: 'Tweet text', 'ID', 'Label'."
    )


def test_require_columns_checks_every_row_and_empty_data():
    with pytest.raises(DataError, match=r"x\.csv, row 2: lacks column 'Label'"):
        require_columns([{"Label": "1"}, {"other": "2"}], ["Label"], source="x.csv")
    with pytest.raises(DataError, match=r"x\.csv has no rows"):
        require_columns([], ["Label"], source="x.csv")


# ----------------------------------------------------------------------------------------- template


def test_template_with_spaces_in_column_names():
    template = Template("Tweet text : {Tweet text} Label : ")
    assert template.fields == ("Tweet text",)
    assert template.render(ROWS[0]) == "Tweet text : a Label : "


def test_default_template_is_the_text_column_alone():
    assert default_template("Tweet text") == "{Tweet text}"
    assert Template(default_template("Tweet text")).render(ROWS[0]) == "a"


def test_template_escaped_braces_and_repeated_fields():
    template = Template("{{json}} {a} and {a}{ b } }}")
    assert template.fields == ("a", " b ")
    assert template.render({"a": "1", " b ": "2"}) == "{json} 1 and 12 }"
    assert Template("{{}}").render({}) == "{}"
    assert Template("x {n}").render({"n": 3}) == "x 3"


@pytest.mark.parametrize(
    "text, message",
    [
        ("Label: {label", r"the '\{' at character 8 is never closed"),
        ("{a {b}", r"the '\{' at character 1 is never closed"),
        ("a } b", r"the '\}' at character 3 closes nothing"),
        ("x {}", r"the '\{\}' at character 3 names no column"),
    ],
)
def test_template_syntax_errors(text, message):
    with pytest.raises(ConfigError, match=message) as e:
        Template(text)
    assert repr(text) in str(e.value)


def test_template_validate_names_template_column_and_source():
    template = Template("Tweet: {text} / {Label}")
    template.validate(["text", "Label"], source="d.csv")
    with pytest.raises(ConfigError) as e:
        template.validate(["Tweet text", "ID", "Label"], source="train.csv")
    assert str(e.value) == (
        "template 'Tweet: {text} / {Label}' uses column 'text' that train.csv lacks; "
        "available columns: 'Tweet text', 'ID', 'Label'."
    )


def test_template_render_missing_column():
    with pytest.raises(DataError, match=r"uses column 'text', which the row lacks"):
        Template("{text}").render({"other": "x"})


FIELD_NAMES = st.text(st.characters(blacklist_characters="{}"), min_size=1, max_size=10)


@given(st.lists(st.tuples(st.text(max_size=10), FIELD_NAMES), max_size=5), st.text(max_size=10), st.data())
def test_template_render_round_trips(segments, tail, data):
    text = "".join(escape_template_text(literal) + "{" + name + "}" for literal, name in segments)
    text += escape_template_text(tail)
    names = list(dict.fromkeys(name for _, name in segments))
    row = {name: data.draw(st.text(max_size=10)) for name in names}
    template = Template(text)
    assert template.fields == tuple(names)
    assert template.render(row) == "".join(literal + row[name] for literal, name in segments) + tail


@given(st.text())
def test_escaped_literal_text_renders_unchanged(text):
    template = Template(escape_template_text(text))
    assert template.fields == ()
    assert template.render({}) == text


# --------------------------------------------------------------------------------------- verbalizer


def test_verbalizer_from_dict():
    verbalizer = Verbalizer({1: "complaint", "2": "no complaint"})  # YAML gives int keys
    assert verbalizer.texts == ["complaint", "no complaint"]
    assert verbalizer.raws == ["1", "2"]
    assert verbalizer.to_text("1") == "complaint" and verbalizer.to_text(2) == "no complaint"
    assert verbalizer.to_raw("no complaint") == "2"
    assert len(verbalizer) == 2


def test_verbalizer_identity_from_labels_sorts_numbers_numerically():
    assert Verbalizer.from_labels(["10", "2", "1", "2"]).texts == ["1", "2", "10"]
    assert Verbalizer.from_labels(["positive", "negative", "neutral"]).texts == ["negative", "neutral", "positive"]
    verbalizer = Verbalizer.from_rows(ROWS, "Label", source="train.csv")
    assert verbalizer.mapping == {"1": "1", "2": "2"}


def test_verbalizer_unknown_label_names_file_row_column_value_and_allowed():
    verbalizer = Verbalizer({"1": "complaint", "2": "no complaint"})
    with pytest.raises(DataError) as e:
        verbalizer.to_text("3", row_index=4, source="train.csv", column="Label")
    assert str(e.value) == (
        "train.csv, row 5, column 'Label': label '3' is not one of the expected labels: "
        "'1' (complaint), '2' (no complaint)."
    )
    with pytest.raises(DataError, match=r"^label 'x' is not one of the expected labels: 'a', 'b'\.$"):
        Verbalizer.from_labels(["a", "b"]).to_text("x")


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({}, "needs at least one label"),
        ({"1": "yes", "2": "yes"}, r"labels '1' and '2' both map to 'yes'"),
        ({"1": ""}, r"label '1' maps to ''"),
        ({1: "a", "1": "b"}, r"label '1' is given twice"),
    ],
)
def test_verbalizer_config_errors(mapping, message):
    with pytest.raises(ConfigError, match=message):
        Verbalizer(mapping)


def test_verbalizer_to_raw_unknown_and_empty_label_in_rows():
    with pytest.raises(ConfigError, match=r"'maybe' is not a label text; expected one of 'yes', 'no'"):
        Verbalizer({"1": "yes", "0": "no"}).to_raw("maybe")
    with pytest.raises(DataError, match=r"d\.csv, row 2, column 'Label': the label is empty"):
        Verbalizer.from_rows([{"Label": "1"}, {"Label": " "}], "Label", source="d.csv")


def test_verbalizer_for_uses_the_mapping_else_the_labels_in_the_rows():
    rows = [{"Label": "2"}, {"Label": "10"}, {"Label": "1"}]
    assert verbalizer_for({"1": "yes", "2": "no"}, rows, "Label", source="d.csv") == Verbalizer({"1": "yes", "2": "no"})
    for empty in (None, {}):
        assert verbalizer_for(empty, rows, "Label", source="d.csv").raws == ["1", "2", "10"]
    with pytest.raises(DataError, match=r"d\.csv has no column 'label' \(did you mean 'Label'\?\)"):
        verbalizer_for(None, rows, "label", source="d.csv")


# ------------------------------------------------------------------------------------------- splits


def labelled_rows(counts: dict[str, int]) -> list[dict[str, str]]:
    rows = [{"id": "", "label": label} for label, n in counts.items() for _ in range(n)]
    for i, row in enumerate(rows):
        row["id"] = str(i)
    return rows


def ids(rows) -> list[str]:
    return [row["id"] for row in rows]


def test_train_val_split_is_deterministic_disjoint_and_complete():
    rows = labelled_rows({"a": 60, "b": 40})
    train, val = train_val_split(rows, 0.25, seed=3)
    assert len(val) == 25 and len(train) == 75
    assert set(ids(train)).isdisjoint(ids(val)) and set(ids(train)) | set(ids(val)) == set(ids(rows))
    assert ids(val) == sorted(ids(val), key=int)  # original order kept
    again = train_val_split(rows, 0.25, seed=3)
    assert (ids(again[0]), ids(again[1])) == (ids(train), ids(val))
    assert ids(train_val_split(rows, 0.25, seed=4)[1]) != ids(val)


def test_train_val_split_stratified_keeps_label_shares():
    rows = labelled_rows({"neutral": 139, "positive": 57, "negative": 30})
    train, val = train_val_split(rows, 0.2, seed=0, stratify_column="label")
    assert len(val) == 45  # round(226 * 0.2)
    counts = Counter(row["label"] for row in val)
    for label, total in Counter(row["label"] for row in rows).items():
        assert abs(counts[label] - total * 45 / 226) <= 1
    assert set(ids(train)).isdisjoint(ids(val))


def test_train_val_split_errors():
    rows = labelled_rows({"a": 5})
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ConfigError, match="val_fraction must be a number between 0 and 1"):
            train_val_split(rows, bad, seed=0)
    with pytest.raises(DataError, match="has 1 row; a train/validation split needs at least 2"):
        train_val_split(rows[:1], 0.5, seed=0)
    with pytest.raises(DataError, match="has no column 'Label'"):
        train_val_split(rows, 0.5, seed=0, stratify_column="Label")
    with pytest.raises(ConfigError, match="seed must be an integer"):
        train_val_split(rows, 0.5, seed="0")


def test_train_val_split_keeps_one_row_on_each_side():
    train, val = train_val_split(labelled_rows({"a": 3}), 0.01, seed=0)
    assert (len(train), len(val)) == (2, 1)


def test_sample_rows_stratified_keeps_label_shares_of_a_file_sorted_by_label():
    rows = labelled_rows({"neutral": 139, "positive": 57, "negative": 30})
    sample = sample_rows(rows, 50, seed=0, stratify_column="label")
    assert len(sample) == 50 and len(set(ids(sample))) == 50
    counts = Counter(row["label"] for row in sample)
    for label, total in Counter(row["label"] for row in rows).items():
        assert abs(counts[label] - total * 50 / 226) <= 1
    assert ids(sample) == sorted(ids(sample), key=int)  # original order kept
    assert all(row in rows for row in sample)


def test_sample_rows_is_seeded():
    rows = labelled_rows({"a": 40, "b": 60})
    for stratify in (None, "label"):
        sample = ids(sample_rows(rows, 30, seed=3, stratify_column=stratify))
        assert ids(sample_rows(rows, 30, seed=3, stratify_column=stratify)) == sample
        assert ids(sample_rows(rows, 30, seed=4, stratify_column=stratify)) != sample
    assert len(sample_rows(rows, 30, seed=3)) == 30


@pytest.mark.parametrize("n", [5, 6, 1000])
def test_sample_rows_of_at_least_all_rows_returns_all(n):
    rows = labelled_rows({"a": 2, "b": 3})
    assert sample_rows(rows, n, seed=0, stratify_column="label") == rows


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "10"])
def test_sample_rows_bad_count_names_max_rows(n):
    with pytest.raises(ConfigError, match=rf"--max-rows must be a whole number of at least 1, got {n!r}"):
        sample_rows(labelled_rows({"a": 5}), n, seed=0)


def test_sample_rows_names_a_missing_label_column():
    with pytest.raises(DataError, match="train.csv has no column 'Label'"):
        sample_rows(labelled_rows({"a": 5}), 2, seed=0, stratify_column="Label", source="train.csv")


@pytest.mark.parametrize("stratify", [None, "label"])
def test_kfold_covers_every_row_once(stratify):
    rows = labelled_rows({"a": 17, "b": 33})
    folds = kfold(rows, 5, seed=1, stratify_column=stratify)
    assert len(folds) == 5
    val_ids = [i for _, val in folds for i in ids(val)]
    assert sorted(val_ids, key=int) == ids(rows)  # every row in exactly one val fold
    for train, val in folds:
        assert len(val) == 10 and set(ids(train)).isdisjoint(ids(val)) and len(train) + len(val) == 50
    if stratify:
        for _, val in folds:
            counts = Counter(row["label"] for row in val)
            assert abs(counts["a"] - 17 / 5) < 1 and abs(counts["b"] - 33 / 5) < 1
    assert [ids(v) for _, v in kfold(rows, 5, seed=1, stratify_column=stratify)] == [ids(v) for _, v in folds]


def test_kfold_uneven_sizes_differ_by_at_most_one():
    sizes = [len(val) for _, val in kfold(labelled_rows({"a": 11}), 3, seed=0)]
    assert sorted(sizes) == [3, 4, 4]


@pytest.mark.parametrize("k", [1, 0, 6, 2.5])
def test_kfold_bad_k(k):
    with pytest.raises(
        ConfigError,
        match=rf"k must be an integer between 2 and the number of rows of the data "
        rf"\(5\), got {k}",
    ):
        kfold(labelled_rows({"a": 5}), k, seed=0)


# ----------------------------------------------------------------------------------------- examples


def test_build_examples_labelled_and_unlabelled():
    template = Template("Tweet text : {Tweet text} Label : ")
    verbalizer = Verbalizer({"1": "complaint", "2": "no complaint"})
    examples = build_examples(ROWS, template, "Label", verbalizer, source="train.csv")
    assert examples == [
        Example("Tweet text : a Label : ", "complaint", ROWS[0]),
        Example("Tweet text : b Label : ", "no complaint", ROWS[1]),
    ]
    unlabelled = build_examples(ROWS, "{Tweet text}!", source="test.csv")
    assert [(e.text, e.target) for e in unlabelled] == [("a!", None), ("b!", None)]
    identity = build_examples(ROWS, template, "Label", source="train.csv")
    assert [e.target for e in identity] == ["1", "2"]


def test_build_examples_errors():
    with pytest.raises(DataError, match=r"train\.csv, row 2, column 'Label': label '2' is not one of"):
        build_examples(ROWS, "{Tweet text}", "Label", Verbalizer({"1": "complaint"}), source="train.csv")
    with pytest.raises(ConfigError, match=r"template '\{text\}' uses column 'text' that train\.csv lacks"):
        build_examples(ROWS, "{text}", "Label", source="train.csv")
    with pytest.raises(DataError, match=r"train\.csv has no column 'label' \(did you mean 'Label'\?\)"):
        build_examples(ROWS, "{Tweet text}", "label", source="train.csv")
    with pytest.raises(ConfigError, match="uses no column"):
        build_examples(ROWS, "constant", source="train.csv")
    with pytest.raises(ConfigError, match="verbalizer was given without a label column"):
        build_examples(ROWS, "{ID}", None, Verbalizer({"1": "x"}), source="train.csv")
    with pytest.raises(DataError, match=r"empty\.csv has no rows"):
        build_examples([], "{ID}", source="empty.csv")


# ------------------------------------------------------------------------------- loader properties

# No surrogates: they cannot be written as UTF-8. Header names need a visible character and must not
# start with a BOM (which the loader strips on purpose).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
NAMES = st.lists(TEXT.filter(lambda s: s.strip() and not s.startswith("\ufeff")), min_size=1, max_size=4, unique=True)


TSV_TEXT = TEXT.filter(lambda s: not set(s) & set("\t\r\n"))


def table(values=TEXT, names=NAMES):
    """(header, rows as value lists); rows are built as dicts by the test, in header order."""
    return names.flatmap(
        lambda header: st.tuples(
            st.just(header),
            st.lists(st.lists(values, min_size=len(header), max_size=len(header)), min_size=1, max_size=6),
        )
    )


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=80)
@given(table())
def test_csv_round_trip(tmp_path, header_and_values):
    header, values = header_and_values
    path = tmp_path / "p.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(values)
    rows = load_rows(path)
    assert rows == [dict(zip(header, v)) for v in values]
    assert column_names(rows) == header


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=80)
@given(table(TSV_TEXT, NAMES.filter(lambda names: all(not set(n) & set("\t\r\n") for n in names))))
def test_tsv_round_trip(tmp_path, header_and_values):
    header, values = header_and_values
    path = tmp_path / "p.tsv"
    path.write_text("\n".join("\t".join(line) for line in [header, *values]) + "\n", encoding="utf-8")
    # a row of one empty value is a blank line, which the loader skips; such rows cannot round-trip
    expected = [dict(zip(header, v)) for v in values if "\t".join(v)]
    if expected:
        assert load_rows(path) == expected
    else:
        with pytest.raises(DataError, match="has a header but no data rows"):
            load_rows(path)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=80)
@given(
    st.lists(TEXT, max_size=4, unique=True).flatmap(
        lambda keys: st.lists(st.fixed_dictionaries({k: TEXT for k in keys}), min_size=1, max_size=6)
    ),
    st.booleans(),
    st.sampled_from(["\n", "\r\n"]),
)
def test_jsonl_round_trip(tmp_path, rows, ascii_only, newline):
    path = tmp_path / "p.jsonl"
    path.write_bytes(newline.join(json.dumps(row, ensure_ascii=ascii_only) for row in rows).encode("utf-8"))
    assert load_rows(path) == rows


# --------------------------------------------------------------------------------- the shared files


def test_shared_data_files():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    bank = load_rows(SHARED_DATA / "financial_phrasebank" / "Sentences_AllAgree.txt")
    assert len(bank) == 2264
    assert Counter(row["label"] for row in bank) == {"neutral": 1391, "positive": 570, "negative": 303}
    assert not any(row["sentence"].endswith(("\r", " ")) for row in bank)
    raw = (SHARED_DATA / "financial_phrasebank" / "Sentences_AllAgree.txt").read_bytes().decode("latin-1")
    assert bank[0]["sentence"] + "@" + bank[0]["label"] == raw.split("\r\n")[0]

    tweets = load_rows(SHARED_DATA / "raft_twitter_complaints" / "train.csv")
    assert len(tweets) == 50
    assert column_names(tweets) == ["Tweet text", "ID", "Label"]
    assert Counter(row["Label"] for row in tweets) == {"2": 33, "1": 17}
    examples = build_examples(
        tweets,
        "Tweet text : {Tweet text} Label : ",
        "Label",
        Verbalizer({"1": "complaint", "2": "no complaint"}),
        source="train.csv",
    )
    assert Counter(e.target for e in examples) == {"no complaint": 33, "complaint": 17}
