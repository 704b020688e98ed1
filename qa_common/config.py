"""One typed configuration for the QA logic that training, evaluation and serving share.

:class:`QAConfig` is the only place the QA settings are declared. Every command line that exposes
them (training, tuning, serving, the benchmarks) generates its flags from the dataclass with
:func:`add_dataclass_flags`, and a model directory carries the values it was trained with in
``qa_config.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path


def setting(help: str, *, flag: bool = True, **kwargs):
    """A dataclass field with the help text its command-line flag shows (``flag=False``: no flag)."""
    return field(metadata={"help": help, "flag": flag}, **kwargs)


def _knots(value) -> tuple[tuple[float, float], ...]:
    """``score_calibration`` as a tuple of ``(x, y)`` pairs in [0, 1], x increasing, y non-decreasing."""
    problem = "must be a list of [x, y] pairs in [0, 1] with x increasing and y non-decreasing"
    try:
        knots = tuple((float(x), float(y)) for x, y in value)
    except (TypeError, ValueError):
        raise ValueError(f"QAConfig.score_calibration {problem}, got {value!r}") from None
    inside = all(0 <= x <= 1 and 0 <= y <= 1 for x, y in knots)
    ordered = all(a[0] < b[0] and a[1] <= b[1] for a, b in zip(knots, knots[1:]))
    if not inside or not ordered or len(knots) == 1:
        raise ValueError(f"QAConfig.score_calibration {problem} (at least two), got {value!r}")
    return knots


def _confidence_weights(value) -> tuple[float, ...]:
    """``answer_confidence`` as a tuple of finite numbers: none, or the intercept and one weight per feature."""
    from qa_common.confidence import FEATURES  # imports the decoder, which imports this module

    try:
        weights = None if isinstance(value, (str, bytes, dict)) else \
            tuple(float(w) for w in value if not isinstance(w, bool))
    except (TypeError, ValueError):
        weights = None
    if weights is None or len(weights) != len(value) or len(weights) not in (0, len(FEATURES) + 1) \
            or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"QAConfig.answer_confidence must be empty or {len(FEATURES) + 1} finite numbers (the "
                         f"intercept, then a weight for each of {', '.join(FEATURES)}), got {value!r}")
    return weights


POSITIVE_INTEGERS = ("max_length", "stride", "max_question_length", "n_best", "max_answer_length")
# Fitted, so training has no flags for them: the no-answer threshold and the calibration (by training, on its
# validation split), and the weight of a passage's search rank and the answer confidence's weights (over a
# library's retrievals).
FITTED_SETTINGS = ("no_answer_threshold", "score_calibration", "no_answer_scale", "no_answer_bias",
                   "passage_rank_weight", "answer_confidence")


@dataclass(frozen=True)
class QAConfig:
    """Tokenisation and decoding settings; validated at construction.

    The defaults are those of Hugging Face's ``run_qa.py`` recipe: 384-token windows that overlap by
    128 tokens, the 20 best start and end logits per window, answers of at most 30 tokens, and
    SQuAD 1.1 decoding (always a span) unless ``version_2_with_negative``.
    """

    max_length: int = setting("tokens per window (question, context and special tokens)", default=384)
    stride: int = setting("tokens shared by consecutive windows of one context", default=128)
    max_question_length: int = setting("questions are cut to this many tokens", default=64)
    n_best: int = setting("best start and end logits per window considered when decoding", default=20)
    max_answer_length: int = setting("longest answer, in tokens, that decoding may return", default=30)
    version_2_with_negative: bool = setting(
        "SQuAD 2.0 decoding: the answer may be 'not in this document' (on automatically when the training "
        "data has unanswerable questions)", default=False)
    no_answer_threshold: float = setting(
        "answer 'not in this document' when the no-answer probability exceeds this (training stores the "
        "threshold with the best validation F1; 0.5 is Hugging Face's null_score_diff_threshold 0)", default=0.5)

    score_calibration: tuple[tuple[float, float], ...] = setting(
        "knots (softmax score, calibrated score) of the non-decreasing piecewise-linear map from an answer's "
        "softmax score to the probability that it is exactly right (isotonic regression on the validation "
        "split, fitted by training; empty: uncalibrated)", default=(), flag=False)
    no_answer_scale: float = setting(
        "Platt scaling of the no-answer probability: sigmoid(scale * (null score - best span score) + bias) "
        "(fitted on the validation split by training)", default=1.0)
    no_answer_bias: float = setting("see no_answer_scale", default=0.0)
    passage_rank_weight: float = setting(
        "over several retrieved passages, a span of the passage at search rank r has its logit lowered by this "
        "times ln r, so a passage the search ranks lower must convince the reader more (fitted over a library's "
        "retrievals; 0: the search's order is ignored)", default=0.0)
    answer_confidence: tuple[float, ...] = setting(
        "over several retrieved passages, the intercept and weights of the logistic model of an answer's features "
        "(qa_common.confidence.FEATURES) whose probability the score map calibrates in place of the softmax share "
        "(fitted over a library's retrievals; empty: the softmax share)", default=(), flag=False)
    passages_calibration: dict = setting(
        "the fitted settings above (any of " + ", ".join(FITTED_SETTINGS) + ") for a question read over several "
        "retrieved passages at once, as a library is asked: fitted over the library's own retrievals by "
        "`python -m qa_common.calibration --over-passages`; empty: the one-paragraph values", default_factory=dict,
        flag=False, hash=False)

    def __post_init__(self) -> None:
        for name in POSITIVE_INTEGERS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"QAConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.version_2_with_negative, bool):
            raise ValueError(
                f"QAConfig.version_2_with_negative must be true or false, got {self.version_2_with_negative!r}")
        threshold = self.no_answer_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"QAConfig.no_answer_threshold must be a probability in [0, 1], got {threshold!r}")
        object.__setattr__(self, "score_calibration", _knots(self.score_calibration))
        object.__setattr__(self, "passages_calibration", self._checked_passages_calibration())
        value = self.no_answer_scale
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"QAConfig.no_answer_scale must be a positive number, got {value!r}")
        if isinstance(self.no_answer_bias, bool) or not isinstance(self.no_answer_bias, (int, float)) \
                or not math.isfinite(self.no_answer_bias):
            raise ValueError(f"QAConfig.no_answer_bias must be a finite number, got {self.no_answer_bias!r}")
        object.__setattr__(self, "answer_confidence", _confidence_weights(self.answer_confidence))
        weight = self.passage_rank_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise ValueError(f"QAConfig.passage_rank_weight must be a finite number >= 0, got {weight!r}")
        if self.stride >= self.max_length:
            raise ValueError(
                f"QAConfig.stride ({self.stride}) must be smaller than max_length ({self.max_length}): "
                "the stride is the overlap between consecutive windows of one context"
            )
        # [CLS] question [SEP] context [SEP]: the context part must be longer than the overlap, or
        # the sliding window cannot advance. BERT's 3 special tokens here; check_tokenizer checks
        # the model's own tokenizer, which may add more.
        context_room = self.max_length - self.max_question_length - 3
        if context_room <= self.stride:
            raise ValueError(
                f"QAConfig leaves {context_room} context tokens per window (max_length {self.max_length} - "
                f"max_question_length {self.max_question_length} - 3 special tokens), which must exceed "
                f"stride {self.stride}; lower stride or max_question_length, or raise max_length"
            )

    def _checked_passages_calibration(self) -> dict:
        values = self.passages_calibration
        if not isinstance(values, dict) or set(values) - set(FITTED_SETTINGS):
            raise ValueError(f"QAConfig.passages_calibration must be an object of {', '.join(FITTED_SETTINGS)}, "
                             f"got {values!r}")
        if not values:
            return {}
        try:  # each value valid as the setting it stands in for
            checked = QAConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)},
                                  "passages_calibration": {}, **values})
        except ValueError as error:
            raise ValueError(f"QAConfig.passages_calibration: {error}") from None
        return {name: getattr(checked, name) for name in values}

    def over_passages(self) -> QAConfig:
        """The settings to decode a question read over several passages with: the fitted values of
        ``passages_calibration`` in place of the one-paragraph ones."""
        if not self.passages_calibration:
            return self
        return self.replace(**self.passages_calibration, passages_calibration={})

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **overrides) -> QAConfig:
        """A validated copy with ``overrides`` applied; overrides that are None keep the current value."""
        return QAConfig(**{**self.to_dict(), **checked_overrides(overrides)})


def checked_overrides(overrides: typing.Mapping) -> dict:
    """The non-None entries of ``overrides``; a key that is not a QAConfig field is an error."""
    known = {f.name for f in fields(QAConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown QA setting(s) {', '.join(unknown)}; the settings are {', '.join(sorted(known))}")
    return {name: value for name, value in overrides.items() if value is not None}


QA_CONFIG_FILE = "qa_config.json"  # in a model directory: the settings it was trained and evaluated with


def save_qa_config(config: QAConfig, model_dir: str | Path) -> None:
    (Path(model_dir) / QA_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")


def load_qa_config(model_dir: str | Path, **overrides) -> QAConfig:
    """The model directory's saved QAConfig (defaults when it has none), with ``overrides`` applied.

    Overrides that are None keep the saved value. An unknown key, saved or overridden, is a
    ValueError naming it (a typo in a deployed model's settings must be seen, not ignored). An
    override of a setting that ``passages_calibration`` also holds replaces it there too: an
    operator's threshold is meant for every answer, a library's included.
    """
    path = Path(model_dir) / QA_CONFIG_FILE
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a JSON object of QA settings")
    try:
        config = QAConfig().replace(**saved)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    given = checked_overrides(overrides)
    if "passages_calibration" not in given:
        fitted = config.passages_calibration
        given["passages_calibration"] = {**fitted, **{name: given[name] for name in fitted.keys() & given.keys()}}
    return config.replace(**given)


# --- command-line flags from dataclass fields ---------------------------------------------------


def dashed(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_type(annotation) -> type:
    """The scalar type of a field annotation: ``int``, ``float | None`` -> ``float``, ...

    Raises TypeError for anything else, so that a new kind of field cannot silently become a string flag.
    """
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return flag_type(options[0])
    if annotation in (bool, int, float, str):
        return annotation
    raise TypeError(f"no command-line flag for a field of type {annotation!r}")


def add_dataclass_flags(parser, cls, *, defaults: typing.Mapping | None = None, skip: typing.Collection[str] = ()):
    """One flag per field of dataclass ``cls`` (help from the field's metadata), all defaulting to None.

    None means "not given", so presets, config files and saved settings can fill the gaps; the help
    shows ``defaults[name]`` when given, else the field's own default. Returns the argument group.
    """
    group = parser.add_argument_group(cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip or "help" not in f.metadata or not f.metadata.get("flag", True):
            continue
        shown = (defaults or {}).get(f.name, f.default if f.default is not MISSING else None)
        help_text = f"{f.metadata['help']} (default: {shown})"
        kind = flag_type(hints[f.name])
        if kind is bool:
            group.add_argument(dashed(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(dashed(f.name), type=kind, default=None, metavar=f.name.upper(), help=help_text)
    return group


def given_flags(args: argparse.Namespace, cls, *, skip: typing.Collection[str] = ()) -> dict:
    """``{field: value}`` for the flags of ``cls`` that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls)
            if f.name not in skip and getattr(args, f.name, None) is not None}
