"""Command-line flags generated from the typed configs: real types, presets, one validation."""

import argparse
import math
from dataclasses import dataclass

import pytest

from qa_common import QAConfig
from qa_common.config import add_dataclass_flags, flag_type, given_flags, setting
from train_job.config import add_config_flags, config_from_args
from train_job.presets import PRESETS


def test_flag_types_come_from_the_annotations_not_their_spelling():
    assert flag_type(int) is int and flag_type(float | None) is float and flag_type(bool) is bool
    with pytest.raises(TypeError, match="no command-line flag"):
        flag_type(list[int])

    @dataclass
    class Example:
        rate: float | None = setting("a rate", default=None)
        on: bool = setting("a switch", default=False)

    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, Example)
    args = parser.parse_args(["--rate", "2.5", "--on"])
    assert given_flags(args, Example) == {"rate": 2.5, "on": True}
    assert given_flags(parser.parse_args([]), Example) == {}


def parse_train(argv):
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return config_from_args(parser.parse_args(argv))


def test_every_qa_setting_is_a_training_flag_over_the_preset():
    config = parse_train(["--n-best", "7", "--stride", "64"])
    assert config.qa == QAConfig(**{**PRESETS["quickstart"]["qa"], "n_best": 7, "stride": 64})
    assert parse_train([]).qa == QAConfig(**PRESETS["quickstart"]["qa"])


def test_an_impossible_qa_setting_names_the_flag():
    with pytest.raises(ValueError, match="--stride"):
        parse_train(["--stride", "500"])


def test_the_train_config_round_trips_through_its_dict():
    from train_job.config import TrainConfig

    config = parse_train(["--max-answer-length", "12"])
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("preset, shown", [
    ("quickstart", ["peak AdamW learning rate (default: 0.0003)", "(default: auto:", "(default: 256)"]),
    ("squad-bert-base", ["peak AdamW learning rate (default: 2e-05)", "reserved for each worker (default: 1.0)",
                         "(default: 384)", "(default: True)"]),
])
def test_help_shows_the_defaults_of_the_chosen_preset(preset, shown, capsys):
    from train_job.__main__ import main

    with pytest.raises(SystemExit):
        main(["--preset", preset, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in shown:
        assert expected in text
def test_the_feedback_preset_needs_the_file_it_mixes_in(tmp_path, capsys):
    """Without --mix-file it stops with exit 2 and says what to add; with it, the preset's mix holds."""
    from train_job.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(["--preset", "feedback", "--output-dir", str(tmp_path / "out")])
    assert exited.value.code == 2 and "--mix-validation needs --mix-file FILE" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    add_config_flags(parser, "feedback")
    config = config_from_args(parser.parse_args(["--preset", "feedback", "--mix-file", "squad-train.json"]))
    assert (config.mix_file, config.mix_ratio, config.mix_validation) == ("squad-train.json", 1.0, 500)
    assert config.model == "runs/squad-minilm/model" and config.train_file == "runs/feedback-export/train.json"


def test_abstention_settings_are_validated_per_field_and_are_flags():
    assert QAConfig().version_2_with_negative is False and QAConfig().no_answer_threshold == 0.5
    for bad in ({"no_answer_threshold": 1.5}, {"no_answer_threshold": -0.1}, {"no_answer_threshold": True},
                {"version_2_with_negative": 1}, {"n_best": 2.0}, {"passage_rank_weight": -0.5},
                {"passage_rank_weight": math.inf}, {"passages_calibration": {"passage_rank_weight": -1.0}}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            QAConfig(**bad)
    config = parse_train(["--version-2-with-negative", "--negative-ratio", "1.5"])
    assert config.qa.version_2_with_negative is True and config.negative_ratio == 1.5
    with pytest.raises(ValueError, match="--negative-ratio"):
        parse_train(["--negative-ratio", "-1"])
    # Training chooses the threshold itself (the best validation F1): no flag to set it there.
    with pytest.raises(SystemExit):
        parse_train(["--no-answer-threshold", "0.3"])
