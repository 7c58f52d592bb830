"""Multitask prompt tuning (Wang et al., 2023): one shared prompt, scaled per task by a low-rank factor.

Same semantics and file layout as PEFT's ``MULTITASK_PROMPT_TUNING``: task ``t``'s prompt is the shared
``[n, hidden]`` table times (elementwise) ``prefix_task_cols[t] @ prefix_task_rows[t]`` (``[n, rank] @ [rank,
hidden]``). Every row picks its task (PEFT's ``task_ids``; here also the row key ``NAME:TASK``), so one batch
holds several tasks of one adapter beside other adapters. ``adapter_model.safetensors`` holds PEFT's three
tensors: ``prompt_embeddings`` (the shared table, ``[n * submodules, hidden]``), ``prefix_task_cols`` and
``prefix_task_rows``.

Initialisation as PEFT's ``prompt_tuning_init``: ``random`` (N(0, 1) table), ``text``, or from a source
(``init_source``: an adapter directory, softprompt's or PEFT's, of multitask or plain prompt tuning, or a
``.safetensors`` state dict as PEFT's ``prompt_tuning_init_state_dict_path``; pickled ``.bin`` files are
refused): ``exact_source_task`` (its table and task ``init_task``'s factors), ``average_source_tasks`` (its table
and the mean factors), ``only_source_shared`` (its table, new factors). PEFT then needs ``num_tasks`` 1; here the
source factors start every task. The task factors start at N(0, 0.02) as in PEFT. Saved files name the
source inits ``RANDOM`` for PEFT, which re-reads a named source file whenever it builds the adapter, even to load
trained weights over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from softprompt.engine.families import ModelShape
from softprompt.errors import ConfigError, SoftPromptError
from softprompt.methods.base import MethodConfig, SoftPromptMethod
from softprompt.methods.prompt_tuning import init_from_text, init_random
from softprompt.options import OptionError, check_choice, check_int, option

SOURCE_INITS = ("exact_source_task", "average_source_tasks", "only_source_shared")
INITS = ("random", "text", *SOURCE_INITS)
SOURCE_WEIGHTS = "adapter_model.safetensors"  # the weights file of an adapter directory given as init_source


@dataclass
class MultitaskPromptTuningConfig(MethodConfig):
    method = "multitask_prompt_tuning"
    peft_type = "MULTITASK_PROMPT_TUNING"

    num_tasks: int = option(
        1, "Tasks sharing the prompt; each row names its task (0 to num_tasks - 1), training rows by --task-column."
    )
    num_ranks: int = option(
        1,
        "Rank of each task's factor of the shared prompt (prefix_task_cols [n, rank] @ prefix_task_rows [rank, hidden]).",
    )
    init: str = option(
        "auto",
        "random (N(0, 1) prompt), text (embeddings of init_text), exact_source_task / average_source_tasks "
        "(init_source's prompt and the init_task's / the mean task factors), only_source_shared (its prompt only), "
        "or auto (text when init_text is given, else random).",
        choices=(*INITS, "auto"),
    )
    init_text: str | None = option(None, "Text whose token embeddings start the prompt (repeated or cut to fit).")
    init_source: str | None = option(
        None,
        "Adapter directory (multitask or plain prompt tuning, softprompt's or PEFT's) or .safetensors state dict "
        "that the *_source_* inits start from (PEFT's prompt_tuning_init_state_dict_path).",
    )
    init_task: int = option(0, "The source task that init exact_source_task copies (PEFT's prompt_tuning_init_task).")

    def validate(self) -> None:
        super().validate()
        check_int(self.num_tasks, "num_tasks", minimum=1, maximum=65536)
        check_int(self.num_ranks, "num_ranks", minimum=1, maximum=4096)
        check_int(self.init_task, "init_task", minimum=0)
        if self.init == "auto":
            self.init = "text" if self.init_text else "random"
        check_choice(self.init, "init", INITS)
        if self.init == "text" and not self.init_text:
            raise OptionError("init_text", "required when init is 'text' (the text whose embeddings start the prompt)")
        if self.init in SOURCE_INITS and not self.init_source:
            raise OptionError("init_source", f"required when init is {self.init!r} (the adapter to start from)")
        if self.init_source and self.init not in SOURCE_INITS:
            raise OptionError("init_source", f"only used with init {', '.join(SOURCE_INITS)}; init is {self.init!r}")


def read_source(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an ``init_source``: an adapter directory's weights or a ``.safetensors`` file (never a pickle)."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / SOURCE_WEIGHTS
    where = f"init_source {path}"
    if file.suffix != ".safetensors":
        raise ConfigError(
            f"{where}: expected an adapter directory or a .safetensors file; pickled weights (.bin, .pt) are "
            "never loaded, convert them with safetensors"
        )
    if not file.is_file():
        raise ConfigError(f"{where}: no such file {file}")
    try:
        with safe_open(str(file), framework="pt") as f:
            names = f.keys()
            return {key: f.get_tensor(key).float() for key in names}
    except Exception as exc:
        raise ConfigError(f"{where}: not a readable safetensors file ({exc})") from None


class MultitaskPromptTuning(SoftPromptMethod):
    adds = "input"
    has_tasks = True
    config_class = MultitaskPromptTuningConfig
    config: MultitaskPromptTuningConfig

    def __init__(self, config: MultitaskPromptTuningConfig, shape: ModelShape):
        super().__init__(config, shape)
        rows = config.num_virtual_tokens * self.submodules
        # Registered in the order of PEFT's file (table, cols, rows): the training state is the saved weights.
        self.embedding = nn.Parameter(torch.zeros(rows, shape.hidden_size))
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, 0.02, (config.num_tasks, rows, config.num_ranks)))
        self.prefix_task_rows = nn.Parameter(
            torch.normal(0.0, 0.02, (config.num_tasks, config.num_ranks, shape.hidden_size))
        )

    @classmethod
    def create(
        cls,
        config: MultitaskPromptTuningConfig,
        shape: ModelShape,
        *,
        word_embeddings: nn.Embedding,
        tokenize,
        generator: torch.Generator,
        text_kv=None,
    ) -> MultitaskPromptTuning:
        adapter = cls.seeded(config, shape, generator)
        rows = adapter.embedding.shape[0]
        if config.init == "text":
            assert config.init_text is not None  # validate() requires it
            table = init_from_text(word_embeddings, tokenize(config.init_text), rows)
        elif config.init == "random":
            table = init_random(rows, shape.hidden_size, generator)
        else:
            assert config.init_source is not None  # validate() requires it
            table = adapter.start_from_source(read_source(config.init_source), f"init_source {config.init_source}")
        with torch.no_grad():
            adapter.embedding.copy_(table)
        return adapter

    def start_from_source(self, source: dict[str, torch.Tensor], where: str) -> torch.Tensor:
        """Take the task factors a source init asks for from ``source``; returns its shared table."""
        config = self.config
        table = _tensor(source, "prompt_embeddings", tuple(self.embedding.shape), where)
        if config.init == "only_source_shared":
            return table
        cols = source.get("prefix_task_cols")
        rows = source.get("prefix_task_rows")
        if cols is None or rows is None or cols.dim() != 3 or rows.dim() != 3:
            raise ConfigError(f"{where}: init {config.init} needs a multitask adapter (prefix_task_cols/rows)")
        if config.init == "exact_source_task":
            if config.init_task >= cols.shape[0]:
                raise ConfigError(
                    f"init_task: {config.init_task} is not a task of {where} (it has {cols.shape[0]} tasks)"
                )
            cols, rows = cols[config.init_task], rows[config.init_task]
        else:
            cols, rows = cols.mean(0), rows.mean(0)
        _tensor({"prefix_task_cols": cols}, "prefix_task_cols", tuple(self.prefix_task_cols.shape[1:]), where)
        _tensor({"prefix_task_rows": rows}, "prefix_task_rows", tuple(self.prefix_task_rows.shape[1:]), where)
        with torch.no_grad():
            self.prefix_task_cols.copy_(cols.expand_as(self.prefix_task_cols))
            self.prefix_task_rows.copy_(rows.expand_as(self.prefix_task_rows))
        return table

    @property
    def num_tasks(self) -> int:
        return self.config.num_tasks

    def input_embeddings(self, task: int | None = None) -> torch.Tensor:
        if task is None or not 0 <= task < self.num_tasks:
            raise SoftPromptError(f"multitask prompt tuning: expected a task in 0..{self.num_tasks - 1}, got {task!r}")
        n = self.num_virtual_tokens
        # PEFT's order of operations (the full product, then the first n rows), so results match it bit for bit.
        scale = torch.matmul(self.prefix_task_cols[task], self.prefix_task_rows[task])
        return (self.embedding * scale)[:n]

    def materialized(self) -> torch.Tensor:
        return self.embedding.detach()

    def load_materialized(self, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            self.embedding.copy_(tensor.float())

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {
            **super().peft_tensors(),
            "prefix_task_cols": self.prefix_task_cols.detach(),
            "prefix_task_rows": self.prefix_task_rows.detach(),
        }

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        with torch.no_grad():
            for name, param in (
                ("prefix_task_cols", self.prefix_task_cols),
                ("prefix_task_rows", self.prefix_task_rows),
            ):
                param.copy_(_tensor(tensors, name, tuple(param.shape), source))

    def peft_config_fields(self) -> dict:
        config = self.config
        return {
            # Source inits are written as RANDOM: PEFT would re-read the source file on every load.
            "prompt_tuning_init": "TEXT" if config.init == "text" else "RANDOM",
            "prompt_tuning_init_text": config.init_text if config.init == "text" else None,
            "prompt_tuning_init_state_dict_path": None,
            "prompt_tuning_init_task": config.init_task,
            "num_tasks": config.num_tasks,
            "num_ranks": config.num_ranks,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
        }

    @classmethod
    def config_from_peft(cls, peft: dict) -> dict:
        text = peft.get("prompt_tuning_init_text") if peft.get("prompt_tuning_init") == "TEXT" else None
        return {
            **super().config_from_peft(peft),
            "num_tasks": int(peft.get("num_tasks") or 1),  # PEFT's defaults when absent
            "num_ranks": int(peft.get("num_ranks") or 1),
            "init": "text" if text else "random",
            "init_text": text,
            "init_task": int(peft.get("prompt_tuning_init_task") or 0),
        }


def _tensor(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
    """``tensors[name]``, which must have ``shape``; else one error naming ``where``."""
    tensor = tensors.get(name)
    if tensor is None:
        raise SoftPromptError(f"{where}: no {name!r} tensor (found: {', '.join(tensors) or 'none'})")
    if tuple(tensor.shape) != shape:
        raise SoftPromptError(f"{where}: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor.float()
