"""The checks a model directory passes before it takes traffic (``python -m serve_app update`` runs them).

Run in the updating process, before anything changes on the service: the model resolves, its
``qa_config.json`` and the service's ``qa`` overrides are valid, its tokenizer and the backend the
service asks for load, and it answers a probe question. Optionally it answers SQuAD-format
validation files as it would be served (its own threshold and calibration) and must reach an F1,
stay within a drop of the serving model's, or beat it.
"""

from __future__ import annotations

from dataclasses import dataclass

from qa_common import Question, answer_questions, load_qa_config, read_squad, resolve_model_path
from qa_common.backends import load_runner
from qa_common.metric import score_predictions
from serve_app.model import HEALTH_PROBE
from serve_app.settings import ServeArgs


class GateError(ValueError):
    """The model may not serve; the message says why and what to fix."""


@dataclass
class CheckedModel:
    model: str  # as given
    path: str  # resolved (a local directory)
    runner: object
    tokenizer: object
    qa_config: object


def check_model(model: str, args: ServeArgs) -> CheckedModel:
    """``model`` loaded as the service would serve it (``args``: backend, ``qa`` overrides) on CPU."""
    try:
        path = resolve_model_path(model)
    except FileNotFoundError as error:
        raise GateError(f"{error}; give a model directory written by train_job (OUTPUT_DIR/model)") from None
    try:
        qa_config = load_qa_config(path, **args.qa)
    except (ValueError, TypeError, OSError) as error:
        raise GateError(f"{model}: its QA settings are not valid ({error}); fix qa_config.json") from None
    try:
        runner, tokenizer, _ = load_runner(path, args.backend, device="cpu", max_f1_loss=args.max_f1_loss)
        answer_questions(runner, tokenizer, [HEALTH_PROBE], qa_config)
    except Exception as error:  # noqa: BLE001 - whatever stops the model from loading or running refuses it
        raise GateError(f"{model}: the model does not load or run with backend {args.backend!r} "
                        f"({type(error).__name__}: {error}); is it a complete model directory "
                        "(config.json, weights, tokenizer files)?") from None
    return CheckedModel(model, path, runner, tokenizer, qa_config)


def validation_f1(checked: CheckedModel, validation_file: str) -> float:
    """F1 (percent) of ``checked``'s answers as served on a SQuAD-format file with gold answers
    (the SQuAD 2.0 F1 when some question has none)."""
    try:
        records = read_squad(validation_file)
    except (ValueError, OSError) as error:
        raise GateError(f"--validate-on {validation_file}: {error}") from None
    answers = answer_questions(checked.runner, checked.tokenizer,
                               [Question(r["question"], r["context"]) for r in records], checked.qa_config)
    predictions = {record["id"]: best[0]["answer"] for record, best in zip(records, answers)}
    references = {record["id"]: record["answers"]["text"] for record in records}
    return score_predictions(predictions, references)["f1"]


def check_f1(new_f1: float, *, min_f1: float | None, serving_f1: float | None, max_f1_drop: float | None) -> None:
    """Refuse (GateError) a model whose validation F1 is below ``min_f1``, or more than ``max_f1_drop``
    below the serving model's on the same file."""
    if min_f1 is not None and new_f1 < min_f1:
        raise GateError(f"the new model's F1 on the validation file is {new_f1:.2f}, below --min-f1 {min_f1:g}: "
                        "not deployed; train it further or lower --min-f1")
    if max_f1_drop is not None and serving_f1 is not None and new_f1 < serving_f1 - max_f1_drop:
        raise GateError(f"the new model's F1 on the validation file is {new_f1:.2f}, more than --max-f1-drop "
                        f"{max_f1_drop:g} below the serving model's {serving_f1:.2f}: not deployed")


def check_gain(new_f1: float, serving_f1: float, *, min_gain: float) -> None:
    """Refuse (GateError) a model that does not beat the serving one by more than ``min_gain`` F1
    points (on the clinicians' own validation questions: an update must help where it was asked to)."""
    if not new_f1 > serving_f1 + min_gain:
        raise GateError(f"the new model's F1 on the --improve-on file is {new_f1:.2f}, not more than --min-gain "
                        f"{min_gain:g} above the serving model's {serving_f1:.2f}: not deployed")
