"""The one interface every soft-prompt method implements.

A method adds trainable state to a frozen model in exactly one of three ways:

* ``adds = "input"``: `input_embeddings()` returns ``[n, hidden]`` vectors placed before the input
  (prompt tuning, P-tuning; multitask prompt tuning returns one prompt per task, ``input_embeddings(task)``);
* ``adds = "kv"``: `kv_prefix()` returns, for every layer, a key and a value of ``n`` virtual tokens
  (prefix tuning);
* ``adds = "gated"``: `gated_prompts()` returns, for some layers, a prompt of ``n`` hidden-space vectors and a
  gate; the layer attends to the prompt, projected through its own key/value projections, and adds the result
  times the gate to its attention output (adaption prompts). Nothing enters the key/value cache.

The engine (`softprompt.engine.model`) turns the first two into per-layer key/value prefixes for causal models
and adds the third in its attention function (`softprompt.engine.gated`), so a batch can mix methods freely. Saving writes what PEFT writes (``prompt_embeddings``: the materialised
vectors); `training_state()` additionally keeps reparameterisation weights so training can resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import torch
from torch import nn

from softprompt.engine.families import ModelShape
from softprompt.errors import ConfigError
from softprompt.options import check_int, option

if TYPE_CHECKING:  # only named in an annotation: methods need nothing of the data package
    from softprompt.adapters.training_format import TrainingFormat
    from softprompt.data import Example, Template


@dataclass
class MethodConfig:
    """Fields every method shares. Subclasses add their own and extend `validate`.

    Each field is declared once, here or in a method's subclass, with its help text: the training
    config, its YAML keys and the ``softprompt train`` flags (``init_text`` -> ``--init-text``) all come
    from these fields, and `validate` is the one check of their values. Errors are `OptionError`s
    naming the field, so a caller can re-spell it as its user wrote it (a flag, an adapter's key)."""

    method: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""

    num_virtual_tokens: int = option(
        8, "Number of virtual tokens the adapter adds (adaption_prompt: per adapted layer, PEFT's adapter_len)."
    )

    def validate(self) -> None:
        check_int(self.num_virtual_tokens, "num_virtual_tokens", minimum=1, maximum=4096)

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> MethodConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known - {"method"})
        if unknown:
            raise ConfigError(
                f"{source}: unknown field(s) {', '.join(unknown)} for method {cls.method!r}; "
                f"expected some of: {', '.join(sorted(known))}"
            )
        config = cls(**{k: v for k, v in values.items() if k in known})
        config.validate()
        return config


def repeat_to(token_ids: list[int], n: int) -> list[int]:
    """``token_ids`` repeated or cut to ``n`` (PEFT's TEXT init of prompt tuning)."""
    if not token_ids:
        raise ValueError("init text tokenised to no tokens")
    return (token_ids * math.ceil(n / len(token_ids)))[:n]


class SoftPromptMethod(nn.Module):
    """Base class of every method. See the module docstring for the contract."""

    adds: ClassVar[Literal["input", "kv", "gated"]]
    config_class: ClassVar[type[MethodConfig]]
    # Whether the adapter holds several prompts, one per task, of which each row picks one (`num_tasks`).
    has_tasks: ClassVar[bool] = False
    # How its training data was rendered, read from its directory by `softprompt.adapters.peft_format`;
    # None for an adapter made in code or trained elsewhere.
    training_format: TrainingFormat | None = None

    def __init__(self, config: MethodConfig, shape: ModelShape):
        super().__init__()
        self.config = config
        self.shape = shape

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    @property
    def submodules(self) -> int:
        """PEFT keeps 2 copies of the virtual tokens for encoder-decoder models (only the first is used)."""
        return 2 if self.shape.is_encoder_decoder else 1

    @property
    def num_tasks(self) -> int:
        """How many tasks a row may pick from (0: none; the engine passes a task exactly when this is not 0)."""
        return 0

    def input_embeddings(self, task: int | None = None) -> torch.Tensor:
        """``[n, hidden]`` vectors placed before the input (methods with ``adds == "input"``); ``task``: the
        row's task, ``0 <= task < num_tasks`` for methods with tasks, else None."""
        raise NotImplementedError

    def kv_prefix(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(key, value)``, each ``[kv_heads, n, head_dim]`` (methods with ``adds == "kv"``)."""
        raise NotImplementedError

    def gated_prompts(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Layer index -> ``(prompt [n, hidden], gate [1])`` (methods with ``adds == "gated"``)."""
        raise NotImplementedError

    def materialized(self) -> torch.Tensor:
        """The tensor PEFT saves as ``prompt_embeddings`` (reparameterisation applied)."""
        raise NotImplementedError

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of PEFT's ``adapter_model.safetensors``: ``prompt_embeddings`` for prompt learning."""
        return {"prompt_embeddings": self.materialized()}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Load `peft_tensors` read from ``source``; errors name it. Prompt learning's ``prompt_embeddings`` table is
        checked and loaded by `softprompt.adapters.peft_format` through `load_materialized` first, so a method
        loads here only what it saves beside it (multitask factors) or, for gated methods, everything."""

    def load_materialized(self, tensor: torch.Tensor) -> None:
        """Load a PEFT ``prompt_embeddings`` tensor: the adapter becomes a plain, inference-ready table."""
        raise NotImplementedError

    def peft_config_fields(self) -> dict:
        """Method-specific fields of PEFT's ``adapter_config.json``."""
        return {}

    @classmethod
    def seeded(cls, config: Any, shape: ModelShape, generator: torch.Generator) -> Self:
        """The module built with its random initialisation drawn from ``generator`` (a seed taken from it), leaving
        torch's global random state as it was: one seed gives one adapter whatever ran before."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            return cls(config, shape)

    @classmethod
    def create(
        cls,
        config: Any,  # the method's own `config_class`
        shape: ModelShape,
        *,
        word_embeddings: Any,  # the base model's input embedding table
        tokenize: Callable[[str], list[int]],
        generator: torch.Generator,
        text_kv: Callable[[list[int]], list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
    ) -> SoftPromptMethod:
        """A new trainable adapter initialised as ``config`` says; ``tokenize`` and ``text_kv`` (the frozen
        model's keys/values of some tokens) serve initialisation from text."""
        raise NotImplementedError

    @classmethod
    def config_from_peft(cls, peft: dict) -> dict:
        """Our config fields from PEFT's ``adapter_config.json``."""
        return {"num_virtual_tokens": int(peft["num_virtual_tokens"])}

    @classmethod
    def options_from_examples(
        cls,
        options: dict[str, Any],
        examples: Sequence[Example],
        template: Template,
        tokenize: Callable[[str], list[int]],
    ) -> dict[str, Any]:
        """The method's options completed from its training examples before the adapter is created (CPT
        builds its context from some of them); unchanged by default."""
        return options

    def prompt_targets(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Input methods whose virtual tokens are also text to learn (CPT's context): per virtual token, the
        token id the model should predict there (-100: none) and its loss weight. Every row of the adapter
        then adds these terms to the loss beside its own label tokens. None (the default): no such terms."""
        return None

    def after_step(self) -> None:
        """Called by training after every optimizer step (CPT projects its update back onto its epsilon ball)."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume training (reparameterisation weights included)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)
