"""Seeded samples spread over a file's articles, and whole articles held out for validation."""

from collections import Counter

import pytest

from qa_common.splits import hold_out_articles, sample_questions


def _records(sizes: dict[str, int]) -> list[dict]:
    return [{"id": f"{title}-{i}", "title": title} for title, size in sizes.items() for i in range(size)]


RECORDS = _records({"a": 40, "b": 30, "c": 20, "d": 8, "e": 2})


def test_a_spread_sample_gives_every_article_its_share():
    sample = sample_questions(RECORDS, 50, seed=1)
    assert len(sample) == 50 and len({r["id"] for r in sample}) == 50
    assert Counter(r["title"] for r in sample) == {"a": 20, "b": 15, "c": 10, "d": 4, "e": 1}
    assert [RECORDS.index(r) for r in sample] == sorted(RECORDS.index(r) for r in sample)  # file order kept


def test_a_spread_sample_is_seeded_and_first_n_only_when_asked():
    assert sample_questions(RECORDS, 33, seed=3) == sample_questions(RECORDS, 33, seed=3)
    assert sample_questions(RECORDS, 33, seed=3) != sample_questions(RECORDS, 33, seed=4)
    assert sample_questions(RECORDS, 33, seed=3, how="first") == RECORDS[:33]
    assert {r["title"] for r in sample_questions(RECORDS, 33, seed=3, how="first")} == {"a"}
    assert sample_questions(RECORDS, None, seed=0) == RECORDS == sample_questions(RECORDS, 1000, seed=0)
    with pytest.raises(ValueError, match="spread, first"):
        sample_questions(RECORDS, 3, seed=0, how="last")


def test_held_out_articles_are_whole_and_disjoint():
    for seed in range(5):
        kept, held = hold_out_articles(RECORDS, 25, seed=seed)
        assert len(held) >= 25 and len(kept) + len(held) == len(RECORDS)
        assert not {r["title"] for r in kept} & {r["title"] for r in held}
        sizes = Counter(r["title"] for r in RECORDS)
        assert all(Counter(r["title"] for r in held)[t] == sizes[t] for t in {r["title"] for r in held})
    assert hold_out_articles(RECORDS, 25, seed=1) == hold_out_articles(RECORDS, 25, seed=1)
    with pytest.raises(ValueError, match="leaves no training data"):
        hold_out_articles(RECORDS, len(RECORDS), seed=0)


def test_training_validates_on_held_out_articles_with_negatives_on_both_sides(capsys):
    from conftest import FIXTURES
    from train_job.config import TrainConfig
    from train_job.data import load_splits
    from train_job.fingerprint import run_fingerprint

    config = TrainConfig(train_file=str(FIXTURES / "tiny-squad.jsonl"), holdout_questions=5, max_train_samples=5,
                         negative_ratio=1, negative_source="mix", seed=3).validate()
    train, validation = load_splits(config)
    answerable = [r for r in train if r["answers"]["text"]]
    assert len(answerable) == 5 and not {r["title"] for r in train} & {r["title"] for r in validation}
    assert len({r["title"] for r in answerable}) > 1  # spread over the articles, not the file's first five
    assert any(not r["answers"]["text"] for r in validation) and any(r["answers"]["text"] for r in validation)
    assert config.qa.version_2_with_negative  # switched on by the negatives
    assert "held-out article" in capsys.readouterr().out
    settings = run_fingerprint(config, train, validation)["settings"]
    assert (settings["sample"], settings["holdout_questions"], settings["negative_source"]) == ("spread", 5, "mix")
    with pytest.raises(ValueError, match="--validation-file or --holdout-questions, not both"):
        TrainConfig(train_file="t.json", validation_file="v.json", holdout_questions=3).validate()


def test_a_mix_file_adds_its_share_of_questions_spread_over_its_articles(tmp_path, capsys):
    import json

    from conftest import FIXTURES
    from train_job.config import TrainConfig
    from train_job.data import load_splits

    feedback = {"version": "v2.0", "data": [{"title": "ward/leaflet.pdf", "paragraphs": [{
        "context": "Hold warfarin when the INR is above 4.",
        "qas": [{"id": f"feedback-{i}", "question": f"When is warfarin held ({i})?", "is_impossible": False,
                 "answers": [{"text": "when the INR is above 4", "answer_start": 14}]} for i in range(4)]}]}]}
    (tmp_path / "train.json").write_text(json.dumps(feedback))
    config = TrainConfig(train_file=str(tmp_path / "train.json"), validation_file=str(tmp_path / "train.json"),
                         mix_file=str(FIXTURES / "tiny-squad.jsonl"), mix_ratio=2, seed=1).validate()
    train, _ = load_splits(config)
    mixed = [r for r in train if not r["id"].startswith("feedback-")]
    assert len(train) == 4 + 8 and len({r["title"] for r in mixed}) > 1  # two per question, spread over articles
    assert train != sorted(train, key=lambda r: r["id"].startswith("feedback-"))  # shuffled together
    assert "mixed 8 questions of --mix-file into 4" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--mix-ratio must be positive"):
        TrainConfig(train_file="t.json", validation_file="v.json", mix_ratio=0).validate()

    # --mix-validation: others of the file join the validation split, where the threshold is chosen.
    config = TrainConfig(train_file=str(tmp_path / "train.json"), validation_file=str(tmp_path / "train.json"),
                         mix_file=str(FIXTURES / "tiny-squad.jsonl"), mix_ratio=2, mix_validation=3, seed=1).validate()
    train, validation = load_splits(config)
    added = [r for r in validation if not r["id"].startswith("feedback-")]
    assert len(train) == 4 + 8 and len(validation) == 4 + 3 and len(added) == 3
    assert not {r["question"] for r in added} & {r["question"] for r in train}  # none of them trained on
    assert "and 3 into 4 validation questions (--mix-validation)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--mix-validation needs --mix-file FILE"):
        TrainConfig(train_file="t.json", validation_file="v.json", mix_validation=5).validate()


def test_a_question_read_over_several_passages_is_sampled_whole():
    records = [{"id": f"q{q}/{p}", "group": f"q{q}", "title": f"t{q % 3}", "context": f"c{p}", "question": "?"}
               for q in range(30) for p in range(4)]
    chosen = sample_questions(records, 10, seed=0)
    groups = {record["group"] for record in chosen}
    assert len(groups) == 10 and len(chosen) == 40
    assert sorted(record["id"] for record in chosen) == sorted(f"{g}/{p}" for g in groups for p in range(4))
    assert {int(g[1:]) % 3 for g in groups} == {0, 1, 2}  # spread over the articles
