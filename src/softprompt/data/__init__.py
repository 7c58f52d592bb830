"""Text data for soft prompts: load rows, render them through a template, map labels, split.

    rows = load_rows("train.csv")
    template = Template("Tweet text : {Tweet text} Label : ")
    examples = build_examples(rows, template, "Label", Verbalizer({"1": "complaint", "2": "no complaint"}),
                              source="train.csv")

The modules: `rows` (files and hub data sets -> rows of strings; column checks), `templates`,
`verbalizers`, `examples` (rows -> rendered prompts with label texts), `splits` (seeded samples,
train/validation and k folds), `demo_tweets` (the VADER demo data set, imported on its own: it needs pip).
"""

from __future__ import annotations

from softprompt.data.examples import Example, build_examples, with_tasks
from softprompt.data.rows import (
    FORMATS,
    HUB_PREFIX,
    MAX_FILE_BYTES,
    MAX_VALUE_CHARS,
    Row,
    column_names,
    format_name,
    is_known_encoding,
    load_rows,
    require_columns,
)
from softprompt.data.splits import kfold, sample_rows, train_val_split
from softprompt.data.templates import Template, default_template, escape_template_text
from softprompt.data.verbalizers import Verbalizer, verbalizer_for

__all__ = [
    "FORMATS",
    "HUB_PREFIX",
    "MAX_FILE_BYTES",
    "MAX_VALUE_CHARS",
    "Example",
    "Row",
    "Template",
    "Verbalizer",
    "build_examples",
    "column_names",
    "default_template",
    "escape_template_text",
    "format_name",
    "is_known_encoding",
    "kfold",
    "load_rows",
    "require_columns",
    "sample_rows",
    "train_val_split",
    "verbalizer_for",
    "with_tasks",
]
