"""One typed configuration for the QA logic that training, evaluation and serving share."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class QAConfig:
    """Tokenisation and decoding settings; validated at construction.

    The defaults are those of Hugging Face's ``run_qa.py`` recipe: 384-token windows that overlap by
    128 tokens, the 20 best start and end logits per window, answers of at most 30 tokens.
    """

    max_length: int = 384
    stride: int = 128
    max_question_length: int = 64
    n_best: int = 20
    max_answer_length: int = 30

    def __post_init__(self) -> None:
        for name in ("max_length", "stride", "max_question_length", "n_best", "max_answer_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"QAConfig.{name} must be a positive integer, got {value!r}")
        if self.stride >= self.max_length:
            raise ValueError(
                f"QAConfig.stride ({self.stride}) must be smaller than max_length ({self.max_length}): "
                "the stride is the overlap between consecutive windows of one context"
            )
        # [CLS] question [SEP] context [SEP]: the context part must be longer than the overlap, or
        # the sliding window cannot advance.
        context_room = self.max_length - self.max_question_length - 3
        if context_room <= self.stride:
            raise ValueError(
                f"QAConfig leaves {context_room} context tokens per window (max_length {self.max_length} - "
                f"max_question_length {self.max_question_length} - 3 special tokens), which must exceed "
                f"stride {self.stride}; lower stride or max_question_length, or raise max_length"
            )

    def to_dict(self) -> dict:
        return asdict(self)


QA_CONFIG_FILE = "qa_config.json"  # in a model directory: the settings it was trained and evaluated with


def save_qa_config(config: QAConfig, model_dir: str | Path) -> None:
    (Path(model_dir) / QA_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")


def load_qa_config(model_dir: str | Path, **overrides) -> QAConfig:
    """The model directory's saved QAConfig (defaults when it has none), with ``overrides`` applied.

    Overrides that are None keep the saved value.
    """
    path = Path(model_dir) / QA_CONFIG_FILE
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    chosen = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in fields(QAConfig)}
    return QAConfig(**{k: v for k, v in {**saved, **chosen}.items() if k in known})
