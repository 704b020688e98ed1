"""``python -m qa_common.export_onnx MODEL_DIR [--optimize] [--int8] [--validation-file FILE]``.

Writes, next to the model directory's Hugging Face files:

- ``model.onnx``: the QA model as an ONNX graph taking the tokenizer's ``input_ids``,
  ``attention_mask`` and ``token_type_ids`` (dynamic batch and sequence axes) and returning
  ``start_logits`` and ``end_logits``; with ``--optimize``, rewritten by ONNX Runtime's transformer
  optimizer (fused attention, embedding + LayerNorm, skip-LayerNorm and bias-GELU kernels);
- with ``--int8``, ``model.int8.onnx``: dynamic int8 quantisation of that graph (int8 weights,
  activations quantised per batch at run time). Each recipe of :data:`INT8_RECIPES` is tried and the
  one that agrees best with PyTorch is kept;
- ``onnx_export.json`` (what ``serve_app``'s ``backend: auto`` reads) and a section of the model
  card: every backend's start/end argmax agreement with PyTorch, its largest logit difference, its
  windows per second here and, given ``--validation-file``, its EM/F1 and F1 loss against PyTorch's.
  Without a validation file only agreement on random windows is recorded, and ``auto`` keeps PyTorch.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qa_common.backends import EXPORT_RECORD_FILE, ONNX_FILES, onnx_session
from qa_common.config import QAConfig, load_qa_config
from qa_common.decoding import decode_predictions
from qa_common.features import MODEL_INPUTS, prepare_eval_features
from qa_common.inference import OnnxRunner, TorchRunner, predict_logits
from qa_common.metric import evaluate_answers

OPSET = 17
OUTPUT_NAMES = ("start_logits", "end_logits")
# Dynamic int8 recipes tried by --int8 (quantize_dynamic keyword arguments). Per-channel weight scales
# keep more precision in matrices whose columns differ in range; the QA head is the last projection
# before the argmax, so one recipe leaves it in fp32.
INT8_RECIPES = {
    "per-tensor": {"per_channel": False},
    "per-channel": {"per_channel": True},
    "per-channel, fp32 QA head": {"per_channel": True, "nodes_to_exclude": ["/qa_outputs/MatMul"]},
}
RANDOM_PROBE_WINDOWS = 32
CARD_HEADING = "## ONNX Runtime backends"


def export_torchscript_onnx(model, tokenizer, path: Path) -> None:
    """``model`` as an ONNX graph at ``path`` (the TorchScript exporter; eager attention, which the optimizer fuses)."""
    import torch

    model.set_attn_implementation("eager")
    # Two windows of different lengths, so the traced graph applies the padding mask.
    example = tokenizer(["Which drug?", "Why?"], ["Warfarin was stopped on admission.", "Bleeding."],
                        padding=True, return_tensors="pt")
    names = [name for name in MODEL_INPUTS if name in example]
    with warnings.catch_warnings():  # the tracer's notes on shape checks it freezes: the mask stays an input
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, tuple(example[name] for name in names), str(path), input_names=names,
            output_names=list(OUTPUT_NAMES), dynamic_axes={name: {0: "batch", 1: "sequence"} for name in (*names, *OUTPUT_NAMES)},
            opset_version=OPSET, dynamo=False,
        )


def optimize_graph(source: Path, target: Path, model_config) -> dict:
    """ONNX Runtime's BERT fusions of ``source`` written to ``target``; returns the fused-operator counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(source), model_type="bert", num_heads=model_config.num_attention_heads,
                               hidden_size=model_config.hidden_size)
    optimized.save_model_to_file(str(target))
    return {name: count for name, count in optimized.get_fused_operator_statistics().items() if count}


def quantize_int8(source: Path, target: Path, recipe: dict) -> None:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # DefaultTensorType: the fused operators' outputs have no type that shape inference can see.
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT}, **recipe)


def timed_logits(runner, features: dict, batch_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``(start, end, windows_per_s)``, after one untimed batch."""
    predict_logits(runner, {name: values[:batch_size] for name, values in features.items()}, batch_size=batch_size)
    started = time.perf_counter()
    start, end = predict_logits(runner, features, batch_size=batch_size)
    return start, end, len(start) / (time.perf_counter() - started)


def compare(reference: tuple[np.ndarray, np.ndarray], logits: tuple[np.ndarray, np.ndarray], mask: np.ndarray) -> dict:
    """Start/end argmax agreement over windows and the largest logit difference (real tokens only)."""
    found = {}
    for name, ours, theirs in (("start", logits[0], reference[0]), ("end", logits[1], reference[1])):
        found[f"{name}_agreement"] = float((ours.argmax(axis=1) == theirs.argmax(axis=1)).mean())
        found.setdefault("max_abs_logit_diff", 0.0)
        found["max_abs_logit_diff"] = max(found["max_abs_logit_diff"], float(np.abs(ours[mask] - theirs[mask]).max()))
    return found


def scores(records: Sequence[dict], features: dict, logits, config: QAConfig) -> dict:
    """EM and F1 (percent) of the answers decoded from ``logits`` as training evaluates them, with the
    model's own no-answer threshold (so an abstaining model's decisions count), and the answers."""
    contexts = {str(i): record["context"] for i, record in enumerate(records)}
    decoded = decode_predictions(features["example_id"], *logits, features["offset_mapping"], contexts,
                                 config.replace(version_2_with_negative=False))
    predictions, metrics = evaluate_answers(
        {record["id"]: decoded[str(i)] for i, record in enumerate(records)},
        {record["id"]: record["answers"]["text"] for record in records},
        version_2_with_negative=config.version_2_with_negative, threshold=config.no_answer_threshold)
    return {"exact_match": metrics["exact_match"], "f1": metrics["f1"], "answers": predictions}


def probe_features(records: Sequence[dict] | None, tokenizer, config: QAConfig, vocab_size: int) -> dict:
    """The validation questions' windows, or (without records) random full-length windows."""
    if records:
        return prepare_eval_features([str(i) for i in range(len(records))], [r["question"] for r in records],
                                     [r["context"] for r in records], tokenizer, config)
    rng = np.random.default_rng(0)
    shape = (RANDOM_PROBE_WINDOWS, config.max_length)
    token_type_ids = np.zeros(shape, dtype=np.int64)
    token_type_ids[:, config.max_question_length :] = 1
    return {"input_ids": rng.integers(len(tokenizer.all_special_ids), vocab_size, shape),
            "attention_mask": np.ones(shape, dtype=np.int64), "token_type_ids": token_type_ids}


def export_onnx(model_dir: str | Path, *, optimize: bool = False, int8: bool = False,
                validation_records: Sequence[dict] | None = None, validation_name: str | None = None,
                batch_size: int = 32) -> dict:
    """Write the ONNX files, ``onnx_export.json`` and the model card section; return the record."""
    import onnxruntime

    from qa_common.modeling import load_model_and_tokenizer

    model_dir = Path(model_dir)
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    model.eval()
    config = load_qa_config(model_dir)
    features = probe_features(validation_records, tokenizer, config, model.config.vocab_size)
    mask = np.asarray(features["attention_mask"]).astype(bool)
    torch_logits = timed_logits(TorchRunner(model), features, batch_size)
    record = {
        "onnxruntime": onnxruntime.__version__, "opset": OPSET,
        "validation": ({"file": validation_name, "questions": len(validation_records), "windows": len(mask)}
                       if validation_records else {"random_windows": len(mask)}),
        "torch": {"windows_per_s": torch_logits[2]},
    }
    if validation_records:
        reference = scores(validation_records, features, torch_logits[:2], config)
        record["torch"].update(exact_match=reference["exact_match"], f1=reference["f1"])

    def measure(path: Path) -> dict:
        *logits, windows_per_s = timed_logits(OnnxRunner(onnx_session(path)), features, batch_size)
        found = {"file": path.name, "bytes": path.stat().st_size, "windows_per_s": windows_per_s,
                 **compare(torch_logits[:2], logits, mask)}
        if validation_records:
            found.update(scores(validation_records, features, logits, config))
            answers = found.pop("answers")
            found["answer_agreement"] = float(np.mean([answers[key] == text for key, text in reference["answers"].items()]))
            found["f1_loss"] = reference["f1"] - found["f1"]
        return found

    with tempfile.TemporaryDirectory(prefix="export-onnx-") as scratch:
        scratch = Path(scratch)
        fp32_path, int8_path = model_dir / ONNX_FILES["onnx"], model_dir / ONNX_FILES["onnx-int8"]
        int8_path.unlink(missing_ok=True)  # an int8 file of an earlier export would no longer match the record
        export_torchscript_onnx(model, tokenizer, scratch / "model.onnx")
        if optimize:
            fused = optimize_graph(scratch / "model.onnx", fp32_path, model.config)
        else:
            shutil.copyfile(scratch / "model.onnx", fp32_path)
        record["onnx"] = {**measure(fp32_path), "optimized": optimize, **({"fused_operators": fused} if optimize else {})}
        if int8:
            tried = {}
            for name, recipe in INT8_RECIPES.items():
                candidate = scratch / f"int8-{len(tried)}.onnx"
                quantize_int8(fp32_path, candidate, recipe)
                tried[name] = (candidate, measure(candidate))
            best = max(tried, key=lambda name: int8_quality(tried[name][1]))
            shutil.copyfile(tried[best][0], int8_path)
            record["onnx-int8"] = {**tried[best][1], "file": int8_path.name, "recipe": best,
                                   "recipes_tried": {name: int8_summary(found) for name, (_, found) in tried.items()}}
    (model_dir / EXPORT_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    write_card_section(model_dir / "README.md", record)
    return record


def int8_quality(found: dict) -> tuple:
    """How to rank int8 recipes: F1 first when measured, then argmax agreement with PyTorch, then speed."""
    return (found.get("f1", 0.0), found["start_agreement"] + found["end_agreement"], found["windows_per_s"])


def int8_summary(found: dict) -> dict:
    return {key: found[key] for key in ("start_agreement", "end_agreement", "f1", "windows_per_s") if key in found}


def card_section(record: dict) -> str:
    validation = record["validation"]
    if "file" in validation:
        measured_on = (f"{validation['questions']} questions ({validation['windows']} windows) of "
                       f"`{validation['file']}`")
    else:
        measured_on = f"{validation['random_windows']} random windows (no validation file: agreement only)"
    lines = [
        CARD_HEADING, "",
        f"Exported with `python -m qa_common.export_onnx` (ONNX Runtime {record['onnxruntime']}, opset {record['opset']}); "
        f"measured against PyTorch fp32 on {measured_on}. Serve with `python -m serve_app --backend onnx|onnx-int8|auto`.",
        "", "| backend | file | MB | start / end argmax agreement | EM | F1 | F1 loss | windows/s at export |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    torch_entry = record["torch"]
    lines.append(f"| torch (fp32) | model.safetensors | - | 1 / 1 | {cell(torch_entry.get('exact_match'))} | "
                 f"{cell(torch_entry.get('f1'))} | 0 | {torch_entry['windows_per_s']:.1f} |")
    for backend in ONNX_FILES:
        entry = record.get(backend)
        if entry:
            lines.append(
                f"| {backend} | {entry['file']} | {entry['bytes'] / 1e6:.1f} | {entry['start_agreement']:.3f} / "
                f"{entry['end_agreement']:.3f} | {cell(entry.get('exact_match'))} | {cell(entry.get('f1'))} | "
                f"{cell(entry.get('f1_loss'))} | {entry['windows_per_s']:.1f} |")
    if "onnx-int8" in record:
        lines += ["", f"int8 recipe kept: {record['onnx-int8']['recipe']} (of {', '.join(record['onnx-int8']['recipes_tried'])})."]
    return "\n".join(lines) + "\n"


def write_card_section(card: Path, record: dict) -> None:
    """Add (or replace) the ONNX section of the model card."""
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    text = re.sub(rf"\n?{re.escape(CARD_HEADING)}\n.*?(?=\n## |\Z)", "", text, flags=re.S).rstrip("\n")
    card.write_text((text + "\n\n" if text else "") + card_section(record), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qa_common.export_onnx", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a model directory written by train_job (or any HF QA model directory)")
    parser.add_argument("--optimize", action="store_true", help="apply ONNX Runtime's transformer fusions")
    parser.add_argument("--int8", action="store_true", help="also write model.int8.onnx (dynamic int8)")
    parser.add_argument("--validation-file", help="SQuAD-format file to measure each backend's EM/F1 on "
                        "(without it: argmax agreement on random windows only, and serving's auto keeps PyTorch)")
    parser.add_argument("--max-questions", type=int, help="measure on N validation questions, a seeded sample spread over the articles")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (default: %(default)s)")
    args = parser.parse_args(argv)
    from qa_common.data import read_squad
    from qa_common.splits import sample_questions

    try:
        records = (sample_questions(read_squad(args.validation_file), args.max_questions, seed=0)
                   if args.validation_file else None)
        record = export_onnx(args.model_dir, optimize=args.optimize, int8=args.int8, validation_records=records,
                             validation_name=Path(args.validation_file).name if records else None,
                             batch_size=args.batch_size)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(card_section(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
