"""capcli eval: metrics from pycocoevalcap, predictions file, and an HTML report worst-first."""

import json
import shutil

import pytest
from cli_runner import runner

import capcli.outputs.evaluate
from capcli.cli import app
from capcli.outputs.evaluate import diversity, score
from capcli.text import python_tokenize


def test_identical_captions_score_perfectly_and_wrong_ones_do_not(monkeypatch):
    monkeypatch.setattr(capcli.outputs.evaluate, "java_available", lambda: False)  # fast, and the fallback is tested
    refs = {"a": ["a dog runs on the grass", "a brown dog runs"], "b": ["a man rides a red bike", "a cyclist"],
            "c": ["two cats sleep on a sofa", "cats asleep"]}
    perfect, per_image, tokenizer = score({k: v[0] for k, v in refs.items()}, refs)
    assert tokenizer == "python" and "METEOR" not in perfect
    assert perfect["BLEU-1"] == pytest.approx(1.0) and perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    wrong, per_image, _ = score({"a": "a plate of food", "b": "a man rides a red bike", "c": "a plate"}, refs)
    assert wrong["CIDEr"] < perfect["CIDEr"] and per_image["b"] > per_image["a"]


def test_python_tokenizer_lowercases_and_drops_punctuation():
    assert python_tokenize('A dog, "running"  fast.') == "a dog running fast"
    assert python_tokenize("The dog's ball") == "the dog's ball"


def test_diversity_counts_distinct_captions_words_and_length():
    spread = diversity(["A dog runs.", "a dog runs", "A cat sleeps on a mat."])
    assert spread == {"distinct_captions": pytest.approx(2 / 3), "vocabulary": 7, "mean_length": pytest.approx(4.0)}


@pytest.mark.skipif(shutil.which("java") is None, reason="Java is not installed")
def test_ptb_tokenizer_and_meteor_with_java():
    metrics, _, tokenizer = score({"a": "A dog runs."}, {"a": ["A dog runs.", "The dog is running."]})
    assert tokenizer == "ptb" and 0 < metrics["METEOR"] <= 1


def test_eval_command_prints_summary_and_writes_predictions_and_report(tiny_model, shapes_data, tmp_path, monkeypatch):
    monkeypatch.setattr(capcli.outputs.evaluate, "java_available", lambda: False)
    predictions, report = tmp_path / "pred.jsonl", tmp_path / "report.html"
    result = runner.invoke(app, ["eval", "--data", str(shapes_data), "--split", str(shapes_data / "dev.txt"),
                                 "--model", str(tiny_model), "-o", str(predictions), "--report", str(report),
                                 "--max-new-tokens", "5", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 6 and set(summary["metrics"]) >= {"BLEU-4", "ROUGE-L", "CIDEr"}
    assert summary["decoding"]["max_new_tokens"] == 5
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["references"]) == 1 for r in rows)
    assert summary["diversity"] == diversity([r["caption"] for r in rows])
    page = report.read_text()
    assert page.count("<tr><td><img src='data:image/jpeg;base64,") == 6
    ciders = [float(cell.split("<")[0]) for cell in page.split("<td class='num'>")[1:]]
    assert ciders == sorted(ciders)
