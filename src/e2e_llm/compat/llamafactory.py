# SPDX-License-Identifier: Apache-2.0
"""LLaMA-Factory (0.9.5): every name the training stage relies on, in one place.

All of them are public now (``llamafactory.train.tuner.run_exp`` and the argument dataclasses of
``llamafactory.hparams``); they are still :class:`~e2e_llm.compat.Entry` items so an upgrade
that moves or re-signs one fails with the entry's name (``tests/unit/test_compat_llamafactory.py``,
``-m train``), and the one behaviour we depend on is tested there: with ``USE_RAY`` off,
``run_exp`` trains in this process with our callbacks (inside a Ray Train worker). Importing this
module does not import LLaMA-Factory (the serve environment does not have it).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from e2e_llm.compat import Entry, problems, resolve

# LLaMA-Factory's own Ray launcher (plain ray.remote workers, see README "Training"): must stay off
# inside a Ray Train worker, or run_exp would start workers of its own.
USE_RAY_ENV = "USE_RAY"
_ENABLED = ("true", "y", "1")  # llamafactory.extras.misc.is_env_enabled

RUN_EXP = Entry(
    "llamafactory.train.tuner", "run_exp", params=("args", "callbacks"),
    why="each Ray Train worker runs LLaMA-Factory's training with our checkpoint-reporting callback; "
        "with USE_RAY off run_exp calls the in-process training function (formerly we called the "
        "private _training_function directly; there is no measured difference, run_exp only parses "
        "the Ray keys first)")
ARGUMENT_CLASSES = [
    Entry("llamafactory.hparams", name,
          why="the recipe keys LLaMA-Factory accepts and their types: an unknown key or a mistyped number "
              "fails before any worker starts "
              "(formerly read from the private llamafactory.hparams.parser._TRAIN_ARGS)")
    for name in ("ModelArguments", "DataArguments", "TrainingArguments", "FinetuningArguments", "GeneratingArguments")
]
_ROWS_WHY = ("the driver checks training rows as training will make them (e2e_llm.train_rows): their length "
             "against cutoff_len, and their prompt against the model's own chat template the engines use")
LOAD_TOKENIZER = Entry("llamafactory.model", "load_tokenizer", params=("model_args",), why=_ROWS_WHY)
CHAT_TEMPLATE = Entry("llamafactory.data", "get_template_and_fix_tokenizer", params=("tokenizer", "data_args"),
                      why=_ROWS_WHY)
ENCODE_ONE_TURN = Entry("llamafactory.data", "Template.encode_oneturn",
                        params=("self", "tokenizer", "messages", "system", "tools"), why=_ROWS_WHY)
ROLES = Entry("llamafactory.data", "Role", why=_ROWS_WHY)
ENTRIES = [RUN_EXP, *ARGUMENT_CLASSES, LOAD_TOKENIZER, CHAT_TEMPLATE, ENCODE_ONE_TURN, ROLES]


def check() -> list[str]:
    """Messages for every entry a LLaMA-Factory upgrade broke (empty: all fine)."""
    return problems(ENTRIES, __name__)


def recipe_field_types() -> dict[str, Any]:
    """Every key a LLaMA-Factory training recipe may set (fields of its argument dataclasses), with
    the type its dataclass declares for it."""
    import dataclasses
    import typing

    types: dict[str, Any] = {}
    for entry in ARGUMENT_CLASSES:
        cls = resolve(entry, __name__)
        hints = typing.get_type_hints(cls)
        types.update({f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)})
    return types


def _argument_class(name: str) -> Any:
    return resolve(next(e for e in ARGUMENT_CLASSES if e.name == name), __name__)


@dataclasses.dataclass(frozen=True)
class RowEncoder:
    """Training rows as LLaMA-Factory makes them under a resolved recipe (:func:`row_encoder`)."""

    tokenizer: Any  # as training loads it
    template: Any  # the recipe's chat template, as training resolves it
    cutoff_len: int  # the recipe's, or LLaMA-Factory's default
    limit: int  # the most tokens of a row training keeps: cutoff_len as LLaMA-Factory adjusts it (packing)
    roles: Any  # LLaMA-Factory's role names

    def encode(self, system: str, user: str, assistant: str) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) of one row, before any cut to the limit."""
        messages = [{"role": self.roles.USER.value, "content": user},
                    {"role": self.roles.ASSISTANT.value, "content": assistant}]
        return self.template.encode_oneturn(self.tokenizer, messages, system)

    def length(self, system: str, user: str, assistant: str) -> int:
        """The row's tokens, the length LLaMA-Factory compares with the limit (its efficient_eos
        token counted)."""
        prompt, answer = self.encode(system, user, assistant)
        return len(prompt) + len(answer) + (1 if self.template.efficient_eos else 0)

    def prompt_text(self, system: str, user: str) -> str:
        """The row's prompt as training shows it to the model, up to where the answer starts."""
        prompt, _ = self.encode(system, user, "")
        return self.tokenizer.decode(prompt, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def row_encoder(args: dict[str, Any]) -> RowEncoder:
    """The tokenizer and chat template training loads for the resolved recipe ``args``."""

    def own(cls: Any) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in args.items() if key in names})

    tokenizer = resolve(LOAD_TOKENIZER, __name__)(own(_argument_class("ModelArguments")))["tokenizer"]
    data_class = _argument_class("DataArguments")
    data_args = own(data_class)  # its __post_init__ adjusts cutoff_len (one token fewer with packing)
    recipe_cutoff = args.get("cutoff_len", next(f.default for f in dataclasses.fields(data_class)
                                                if f.name == "cutoff_len"))
    template = resolve(CHAT_TEMPLATE, __name__)(tokenizer, data_args)
    resolve(ENCODE_ONE_TURN, __name__)  # checked here; called on the template (a subclass may override it)
    return RowEncoder(tokenizer, template, int(recipe_cutoff), int(data_args.cutoff_len), resolve(ROLES, __name__))


def read_recipe_file(path) -> Any:
    """A recipe file as ``llamafactory-cli train <recipe>`` reads it (``llamafactory.hparams.read_args``:
    OmegaConf's YAML, in which ``1e-4`` is a float; PyYAML reads it as a string)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))


def read_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` items as ``llamafactory-cli train <recipe> key=value ...`` reads them."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.from_cli(items))


def use_ray_enabled(environ: dict[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get(USE_RAY_ENV, "0").lower() in _ENABLED


def run_training(args: dict[str, Any], callbacks: list[Any]) -> None:
    """Train in this process (a Ray Train worker) with ``args`` (a resolved recipe) and ``callbacks``."""
    if use_ray_enabled():
        raise RuntimeError(f"${USE_RAY_ENV} is set in a Ray Train worker: LLaMA-Factory would start its own Ray "
                           f"workers; unset it (Ray Train already runs the workers)")
    run_exp = resolve(RUN_EXP, __name__)
    run_exp(args, callbacks)
