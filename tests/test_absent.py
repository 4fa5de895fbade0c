"""Absent objects: what the object detector does not see, and the words that --forbid-absent keeps out of
captions."""

import torch
from cli_runner import runner
from conftest import make_images

from capcli.cli import app
from capcli.config import GenerationSettings
from capcli.model.pipeline import Captioner
from capcli.steering.absent import absent_objects, absent_words, compound_nouns
from capcli.steering.detector import Detection
from capcli.steering.stages import ForbiddenWords


def found(label: str, score: float) -> Detection:
    return Detection(label, score, (0.1, 0.1, 0.5, 0.5))


def test_the_words_for_an_absent_person_or_dog_include_every_way_to_say_it():
    assert {"man", "women", "girls", "skier", "people"} <= set(absent_words("person"))
    assert {"dog", "dogs", "puppy", "terrier", "hound"} <= set(absent_words("dog"))
    assert "hot dog" in compound_nouns() and "teddy bear" in compound_nouns()


def test_what_the_detector_does_not_see_and_no_label_names_is_absent():
    absent = absent_objects([found("person", 0.8), found("dog", 0.2)], ["person", "cup"], below=0.3)
    assert {"dog", "car"} <= set(absent)
    assert "person" not in absent and "cup" not in absent  # seen; told
    assert "dog" not in absent_objects([found("dog", 0.2)], [], below=0.1)
    assert "dining table" not in absent_objects([], ["2 tables"], below=0.3)  # told as the prompt says it


def test_forbidden_words_are_blocked_per_image_and_only_after_their_first_tokens():
    # Two images with two rows (beams) each. Image 0 forbids the word [4] and the word [7, 8]; image 1 nothing.
    forbid = ForbiddenWords([[[4], [7, 8]], []])
    scores = forbid(torch.tensor([[7], [1], [7], [7]]), torch.zeros(4, 10))
    assert scores[0, 4] == -float("inf") and scores[0, 8] == -float("inf")  # row 0 just wrote 7
    assert scores[1, 4] == -float("inf") and scores[1, 8] == 0  # row 1 did not
    assert scores[2:].isfinite().all()
    first_step = forbid(torch.zeros(4, 0, dtype=torch.long), torch.zeros(4, 10))
    assert first_step[0, 4] == -float("inf") and first_step[0, 8] == 0


def test_a_compound_stays_allowed_where_its_last_word_is_forbidden():
    # "dog" is token 5 and "hot dog" is 3, 5: after 3, a 5 is allowed; elsewhere it is not.
    forbid = ForbiddenWords([[[5]]], allowed=[[[3, 5]]])
    scores = forbid(torch.tensor([[3], [2]]), torch.zeros(2, 10))
    assert scores[0, 5] == 0 and scores[1, 5] == -float("inf")


def test_a_forbidden_word_never_appears_in_the_caption(tiny_model):
    captioner = Captioner.load(tiny_model, device="cpu")
    features = torch.randn(1, captioner.model.config.feature_dim, generator=torch.Generator().manual_seed(0))
    settings = GenerationSettings(max_new_tokens=6, min_new_tokens=2, beams=2)
    [[caption]] = captioner.model.generate(features, settings)
    word = caption.split()[0]
    forbid = ForbiddenWords(forbidden=[captioner.model.word_tokens([word])])
    [[again]] = captioner.model.generate(features, settings, processors=[forbid])
    assert again and word not in again.lower().split()


def test_forbid_absent_captions_with_the_detector_s_evidence(tiny_model, tmp_path):
    [image] = make_images(tmp_path, 1)
    result = runner.invoke(app, ["caption", str(image), "--model", str(tiny_model), "--forbid-absent", "-q",
                                 "--max-new-tokens", "3", "--absent-below", "0.5"])
    assert result.exit_code == 0, result.output
    assert Captioner.load(tiny_model, device="cpu").detector is not None  # trained models forbid absent things
