"""Property-based tests (hypothesis) of every parser of user input: templates, data files, verbalizers,
command-line override words, and the train/validation and k-fold splits. See docs/reliability.md."""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
import typing

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from softprompt.data import Template, Verbalizer, escape_template_text, kfold, load_rows, train_val_split
from softprompt.data.templates import _parse_template
from softprompt.errors import ConfigError, DataError
from softprompt.training.config import TrainConfig, parse_override_words

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ------------------------------------------------------------------------------------------ templates

BRACEY = st.text(st.one_of(st.sampled_from("{}{}ab "), st.characters(blacklist_categories=("Cs",))), max_size=30)


def rebuild(parts) -> str:
    return "".join("{" + value + "}" if is_field else escape_template_text(value) for value, is_field in parts)


@SETTINGS
@given(BRACEY)
def test_any_template_text_parses_and_rebuilds_exactly_or_raises_one_error_type(text):
    try:
        parts = _parse_template(text)
    except ConfigError as exc:  # the only error type, and it quotes the template and a position
        assert repr(text) in str(exc) and "at character" in str(exc)
        with pytest.raises(ConfigError):
            Template(text)
        return
    assert rebuild(parts) == text  # nothing is lost or invented: {{ and }} are literal braces, {x} a field
    assert all(value for value, _ in parts)
    assert not any(not a[1] and not b[1] for a, b in zip(parts, parts[1:]))  # adjacent literals are merged
    for value, is_field in parts:
        if is_field:
            assert "{" not in value and "}" not in value


@SETTINGS
@given(BRACEY, st.data())
def test_the_fields_found_are_exactly_the_columns_required(text, data):
    try:
        template = Template(text)
    except ConfigError:
        return
    fields = template.fields
    assert len(set(fields)) == len(fields)
    row = {name: data.draw(st.text(max_size=5)) for name in fields}
    rendered = template.render(row)  # every field present: renders
    template.validate(list(row) + ["extra"], source="data.csv")
    literal = "".join(value for value, is_field in _parse_template(text) if not is_field)
    assert len(rendered) == len(literal) + sum(len(row[v]) for v, f in _parse_template(text) if f)
    for missing in fields:  # any one field absent: both validate and render name it
        partial = {k: v for k, v in row.items() if k != missing}
        with pytest.raises(ConfigError, match="data.csv lacks"):
            template.validate(list(partial), source="data.csv")
        with pytest.raises(DataError, match="uses column"):
            template.render(partial)


@SETTINGS
@given(
    st.text(max_size=30),
    st.text(st.characters(blacklist_characters="{}", blacklist_categories=("Cs",)), min_size=1, max_size=8),
)
def test_escaped_text_around_a_field_renders_the_text_literally(text, column):
    template = Template(escape_template_text(text) + "{" + column + "}" + escape_template_text(text))
    assert template.fields == (column,)
    assert template.render({column: "<v>"}) == text + "<v>" + text


# --------------------------------------------------------------------------------------- data files

CELL = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
HEADER = st.lists(
    st.text(st.characters(whitelist_categories=("L", "N")), min_size=1, max_size=6), min_size=1, max_size=4, unique=True
)


def rows_for(header):
    return st.lists(st.fixed_dictionaries({name: CELL for name in header}), min_size=1, max_size=6)


TABLES = HEADER.flatmap(lambda header: st.tuples(st.just(header), rows_for(header)))


@SETTINGS
@given(TABLES, st.booleans())
def test_csv_and_jsonl_give_the_same_rows_for_any_unicode_values(tmp_path, table, bom):
    header, rows = table
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, header)
    writer.writeheader()
    writer.writerows(rows)
    (tmp_path / "t.csv").write_bytes(("\ufeff" if bom else "").encode() + buffer.getvalue().encode("utf-8"))
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=bom) for r in rows) + "\n", encoding="utf-8")
    assert load_rows(tmp_path / "t.csv") == rows  # the csv writer quotes a lone empty cell: no blank line
    assert load_rows(tmp_path / "t.jsonl") == rows
    tsv_safe = all(not set(v) & set("\t\r\n") for r in rows for v in r.values())
    if tsv_safe and all("".join(r.values()) or len(header) > 1 for r in rows):  # TSV has no quoting at all
        (tmp_path / "t.tsv").write_text(
            "\n".join("\t".join(r[h] for h in header) for r in [dict(zip(header, header))] + rows) + "\n",
            encoding="utf-8",
        )
        assert load_rows(tmp_path / "t.tsv") == rows


PHRASE_SENTENCE = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\ufeff\x00"), min_size=1, max_size=20
).filter(lambda s: s.strip())
PHRASE_LABEL = st.text("abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=8)


@SETTINGS
@given(st.lists(st.tuples(PHRASE_SENTENCE, PHRASE_LABEL), min_size=1, max_size=6), st.sampled_from(["\n", "\r\n"]))
def test_phrasebank_sentence_at_label_round_trips_even_with_at_signs_in_the_sentence(tmp_path, lines, newline):
    path = tmp_path / "Sentences_AllAgree.txt"
    path.write_bytes(newline.join(f"{s}@{label}" for s, label in lines).encode("utf-8") + newline.encode())
    assert load_rows(path) == [{"sentence": s, "label": label} for s, label in lines]


@SETTINGS
@given(st.binary(max_size=64), st.sampled_from(["csv", "tsv", "jsonl", "txt"]))
def test_arbitrary_bytes_load_or_raise_a_data_error_naming_the_file(tmp_path, content, extension):
    path = tmp_path / f"junk.{extension}"
    path.write_bytes(content)
    try:
        rows = load_rows(path)
    except (DataError, ConfigError) as exc:
        assert str(path) in str(exc)
        return
    assert rows and all(isinstance(v, str) for row in rows for v in row.values())
    assert all(list(row) == list(rows[0]) for row in rows)


# ---------------------------------------------------------------------------------------- verbalizer

LABELS = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1", "2", "10", "1e3", "-0", "0", " 3", "b", "A"]),
    st.text(max_size=4),
).filter(str.strip)


@SETTINGS
@given(st.lists(LABELS, min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_label_order_is_the_same_whatever_order_the_rows_come_in(labels, rng):
    shuffled = list(labels)
    rng.shuffle(shuffled)
    first, second = Verbalizer.from_labels(labels), Verbalizer.from_labels(shuffled)
    assert first.raws == second.raws
    assert sorted(first.raws) == sorted(set(labels))
    numbers = []
    for raw in first.raws:
        try:
            value = float(raw)
        except ValueError:
            continue
        if math.isfinite(value):
            numbers.append(value)
    assert numbers == sorted(numbers)  # numeric labels in numeric order ("2" before "10")


@SETTINGS
@given(
    st.dictionaries(st.text(max_size=5), st.text(max_size=6).filter(str.strip), min_size=1, max_size=6),
    st.text(max_size=5),
)
def test_verbalizer_maps_both_ways_or_refuses_clashing_texts(mapping, stranger):
    if len(set(mapping.values())) < len(mapping):
        with pytest.raises(ConfigError, match="both map to"):
            Verbalizer(mapping)
        return
    verbalizer = Verbalizer(mapping)
    for raw, text in mapping.items():
        assert verbalizer.to_text(raw) == text and verbalizer.to_raw(text) == raw
    if stranger not in mapping:
        with pytest.raises(DataError, match=re.escape(f"d.csv, row 5, column 'label': label {stranger!r} is not one")):
            verbalizer.to_text(stranger, row_index=4, source="d.csv", column="label")


# --------------------------------------------------------------------------------- override words

HINTS = typing.get_type_hints(TrainConfig)
VALUE_KEYS = sorted(k for k in HINTS if typing.get_args(HINTS[k]) != (bool, type(None)) and HINTS[k] is not bool)
BOOL_KEYS = sorted(k for k in HINTS if k not in VALUE_KEYS)
VALUE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)


@st.composite
def override_words(draw):
    expected, words = {}, []
    for key in draw(st.lists(st.sampled_from(VALUE_KEYS + BOOL_KEYS), max_size=6)):
        spelled = draw(st.sampled_from([key, key.replace("_", "-")]))
        if key in BOOL_KEYS:
            value = draw(st.booleans())
            words.append(f"--{spelled}" if value else f"--no-{spelled}")
        else:
            value = draw(VALUE)
            inline = value.startswith("--") or draw(st.booleans())  # a value that looks like a flag goes inline
            words += [f"--{spelled}={value}"] if inline else [f"--{spelled}", value]
        expected[key] = value
    return words, expected


@SETTINGS
@given(override_words())
def test_override_words_parse_back_to_what_was_written(case):
    words, expected = case
    assert parse_override_words(words) == expected


@SETTINGS
@given(
    st.lists(
        st.one_of(
            st.sampled_from(["--lr", "--bf16", "--no-bf16", "--epochs=3", "--lrr", "--no-lr", "3", "--"]),
            st.text(max_size=6),
        ),
        max_size=6,
    )
)
def test_any_words_parse_or_raise_a_config_error_naming_the_word(words):
    try:
        out = parse_override_words(words)
    except ConfigError as exc:
        assert str(exc).startswith(("--", "'", '"')) and ": " in str(exc)  # names the word, then what is wrong
        return
    assert set(out) <= set(HINTS)


# ------------------------------------------------------------------------------------------- splits

SPLIT_ROWS = st.lists(st.sampled_from(["a", "b", "c"]), min_size=2, max_size=40).map(
    lambda labels: [{"id": str(i), "label": label} for i, label in enumerate(labels)]
)


def ids(rows) -> list[int]:
    return [int(r["id"]) for r in rows]


@SETTINGS
@given(SPLIT_ROWS, st.floats(0.01, 0.99), st.integers(0, 2**31), st.booleans())
def test_train_val_split_is_a_seeded_order_keeping_partition(rows, fraction, seed, stratify):
    column = "label" if stratify else None
    train, val = train_val_split(rows, fraction, seed, column)
    assert sorted(ids(train) + ids(val)) == list(range(len(rows)))  # disjoint and covering
    assert ids(train) == sorted(ids(train)) and ids(val) == sorted(ids(val))  # file order kept
    assert len(val) == min(max(math.floor(len(rows) * fraction + 0.5), 1), len(rows) - 1)
    assert (train, val) == train_val_split(list(rows), fraction, seed, column)  # same seed, same split
    if stratify:  # every label gets its proportional share, to within one row
        for label in "abc":
            n = sum(r["label"] == label for r in rows)
            share = n * len(val) / len(rows)
            assert math.floor(share) <= sum(r["label"] == label for r in val) <= math.ceil(share)


@SETTINGS
@given(SPLIT_ROWS, st.integers(2, 6), st.integers(0, 2**31), st.booleans())
def test_kfold_puts_every_row_in_exactly_one_validation_fold(rows, k, seed, stratify):
    assume(k <= len(rows))
    column = "label" if stratify else None
    folds = kfold(rows, k, seed, column)
    assert len(folds) == k
    seen = sorted(i for _, val in folds for i in ids(val))
    assert seen == list(range(len(rows)))
    sizes = [len(val) for _, val in folds]
    assert max(sizes) - min(sizes) <= 1
    for train, val in folds:
        assert sorted(ids(train) + ids(val)) == list(range(len(rows))) and not set(ids(train)) & set(ids(val))
    assert folds == kfold(list(rows), k, seed, column)
    if stratify:
        for label in "abc":
            counts = [sum(r["label"] == label for r in val) for _, val in folds]
            assert max(counts) - min(counts) <= 1


@SETTINGS
@given(SPLIT_ROWS, st.integers(0, 1000), st.integers(0, 1000))
def test_splits_depend_on_their_seed_only_not_on_the_global_random_state(rows, seed, other):
    random.seed(other)
    a, folds = train_val_split(rows, 0.3, seed, "label"), kfold(rows, 2, seed)
    random.seed(other + 1)
    random.random()
    assert train_val_split(rows, 0.3, seed, "label") == a and kfold(rows, 2, seed) == folds
