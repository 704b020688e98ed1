"""The model a benchmark measures, as a local directory.

Nothing here downloads anything: a model is either a local directory, the packaged all-MiniLM-L6-v2,
or a randomly initialised BERT of a named shape (throughput depends on the shape, not the weights)
saved with MiniLM's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

# Shapes of randomly initialised BERTs (BertConfig keyword arguments).
SHAPES = {
    # One layer of width 32: the model costs next to nothing, so tokenising, decoding and the pipeline show.
    "bert-micro": dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64),
    # google/bert_uncased_L-2_H-128_A-2 ("BERT-tiny"): model time next to nothing, so the serving path shows.
    "bert-tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    # google/bert_uncased_L-4_H-256_A-4 ("BERT-mini"): the CPU default, minutes on 2 cores.
    "bert-mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    # all-MiniLM-L6-v2's shape (the quickstart model), random weights.
    "minilm-shape": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
    # bert-base-cased: BertConfig()'s defaults with the cased vocabulary size.
    "bert-base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                      vocab_size=28996),
}
MODEL_HELP = (
    "a shape to initialise randomly ({}), 'minilm' (the packaged pretrained all-MiniLM-L6-v2), "
    "or a local model directory".format(", ".join(SHAPES))
)


def prepare_model_dir(model: str, directory: Path, *, seed: int = 0, tokenizer_source: str | None = None) -> str:
    """A local model directory for ``model``: a directory as given, else one written to ``directory``.

    ``minilm`` gives the packaged pretrained all-MiniLM-L6-v2 with a fresh QA head; a name from
    ``SHAPES`` gives a randomly initialised BERT of that shape with MiniLM's (uncased) tokenizer, read
    from ``tokenizer_source`` when given (a machine without the MiniLM package).
    """
    import torch
    from transformers import AutoModelForQuestionAnswering, BertConfig, BertForQuestionAnswering

    from qa_common import MINILM, load_tokenizer, resolve_model_path

    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if model not in SHAPES and model != "minilm":
        raise SystemExit(f"--model {model!r}: not a directory; {MODEL_HELP}")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_source or MINILM)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    if model == "minilm":
        qa_model = AutoModelForQuestionAnswering.from_pretrained(resolve_model_path(MINILM))
    else:
        shape = {"vocab_size": len(tokenizer), **SHAPES[model]}
        shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))  # every token id must have an embedding
        qa_model = BertForQuestionAnswering(BertConfig(**shape, max_position_embeddings=512))
    qa_model.save_pretrained(directory)
    return str(directory)


def model_summary(model_dir: str) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "heads": config.num_attention_heads,
            "intermediate": config.intermediate_size, "vocab": config.vocab_size}
