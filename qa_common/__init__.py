"""Extractive question answering logic shared by training, evaluation and serving (no Ray here)."""

from qa_common.config import QA_CONFIG_FILE, QAConfig, load_qa_config, save_qa_config
from qa_common.data import SquadFormatError, load_hub_squad, read_squad, validate_records
from qa_common.decoding import NO_ANSWER, decode_predictions, decode_spans
from qa_common.features import count_windows, length_grouped_batches, prepare_eval_features, prepare_train_features, trim_padding
from qa_common.inference import PassagesQuestion, Question, answer_questions, predict_logits, read_questions
from qa_common.metric import evaluate_answers, normalize_answer, score_answer, squad_metrics, squad_v2_metrics
from qa_common.modeling import MINILM, load_model_and_tokenizer, load_tokenizer, resolve_model_path
from qa_common.negatives import synthesise_negatives
from qa_common.passage_decoding import decode_passages, passage_relevance

__all__ = [
    "MINILM", "NO_ANSWER", "PassagesQuestion", "QA_CONFIG_FILE", "QAConfig", "Question", "SquadFormatError", "answer_questions", "count_windows",
    "decode_passages", "decode_predictions", "decode_spans", "evaluate_answers", "length_grouped_batches", "load_qa_config", "load_hub_squad",
    "load_model_and_tokenizer", "load_tokenizer", "passage_relevance",
    "normalize_answer", "predict_logits", "prepare_eval_features", "prepare_train_features", "read_questions",
    "read_squad", "resolve_model_path", "save_qa_config", "score_answer", "squad_metrics", "squad_v2_metrics",
    "synthesise_negatives", "trim_padding", "validate_records",
]
