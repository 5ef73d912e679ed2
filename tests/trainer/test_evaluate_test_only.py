"""`gramrec evaluate --data` on a test-only data set: no times (split.json names the split), no training part."""

from __future__ import annotations

import json

import pytest

from gramrec.trainer.errors import DataFormatError
from gramrec.trainer.evaluate import evaluate_checkpoint
from gramrec.trainer.explicit_settings import explicit_train_settings
from gramrec.trainer.nr_task import NewsTask
from tests.helpers.checkpoints import tiny_checkpoint
from tests.helpers.retrain_data import write_kt_data, write_mind_data


def write_test_only_mind(folder, impressions: int = 30):
    write_mind_data(folder, impressions=impressions)
    lines = (folder / "behaviors.tsv").read_text().splitlines()
    rows = [line.split("\t") for line in lines]
    (folder / "behaviors.tsv").write_text("".join("\t".join(r[:2] + [""] + r[3:]) + "\n" for r in rows))
    (folder / "split.json").write_text(json.dumps({"val": [], "test": [r[0] for r in rows]}))
    return folder


def test_evaluate_a_test_only_mind_folder(tmp_path, tiny_encoder_dir):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", tiny_encoder_dir, "nr")
    data = write_test_only_mind(tmp_path / "mind-test")
    result = evaluate_checkpoint(checkpoint, data, "test", "cpu")
    assert result["split"] == "test" and 0 <= result["metrics"]["auc"] <= 1 and result["metrics"]["auc"] != 0.5


def test_evaluate_a_test_only_kt_folder(tmp_path, tiny_encoder_dir):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", tiny_encoder_dir, "kt")
    data = write_kt_data(tmp_path / "kt-test")
    users = sorted({line.split(",")[0] for line in (data / "interactions.csv").read_text().splitlines()[1:]})
    (data / "split.json").write_text(json.dumps({"val": [], "test": users}))
    result = evaluate_checkpoint(checkpoint, data, "test", "cpu")
    assert result["metrics"]["n"] > 0


def test_training_on_it_says_which_file_leaves_no_training_part(tmp_path):
    data = write_test_only_mind(tmp_path / "mind-test")
    (data / "behaviors.tsv").write_text((data / "behaviors.tsv").read_text())
    settings = explicit_train_settings(task="nr", data=str(data), device="cpu", progress=False)
    with pytest.raises(DataFormatError) as error:
        NewsTask(settings)
    assert str(data / "split.json") in str(error.value) and "no training impressions" in str(error.value)


def test_missing_times_without_a_split_file_name_the_file_and_line(tmp_path):
    data = write_test_only_mind(tmp_path / "mind-test")
    (data / "split.json").unlink()
    settings = explicit_train_settings(task="nr", data=str(data), device="cpu", progress=False)
    with pytest.raises(DataFormatError, match=r"behaviors.tsv:1: bad time ''.*only when split.json names the split"):
        NewsTask(settings)
