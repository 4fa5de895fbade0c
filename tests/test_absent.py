"""The absence check (does a photo show people? does the classifier rule a dog out?) and the words that
--forbid-absent keeps out of captions."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from capcli.cli import app
from capcli.config import GenerationSettings
from capcli.errors import ModelError
from capcli.absent import ABSENT_FILE, AbsenceCheck, compound_nouns, person_share, person_words
from capcli.labels import vocabulary
from capcli.pipeline import Captioner, WordBans, _ForbiddenWords
from conftest import make_images

runner = CliRunner()


def test_a_caption_names_people_by_any_person_word():
    assert person_share(["A man rides a bike .", "Two dogs play .", "A skier on a slope .", "A red car ."]) == 0.5
    assert {"man", "women", "girls", "skier", "people"} <= set(person_words())


def test_the_words_for_an_absent_dog_or_animal_include_breeds_and_other_animals():
    assert {"dog", "dogs", "puppy", "terrier", "hound"} <= set(AbsenceCheck.words("dog"))
    assert {"dog", "wolf", "cat", "horses", "animal", "pet"} <= set(AbsenceCheck.words("animal"))
    assert "hot dog" in compound_nouns() and "teddy bear" in compound_nouns()


def photos(count: int = 300):
    """Pooled features where feature 3 marks people and a dog score that is high exactly where a dog is."""
    generator = torch.Generator().manual_seed(0)
    pooled = torch.rand(count, 8, generator=generator) * 6
    people = pooled[:, 3] > 3
    dogs = pooled[:, 5] > 3
    scores = torch.zeros(count, len(vocabulary()))
    scores[:, vocabulary().index("dog")] = torch.where(dogs, 0.5 + pooled[:, 5] / 20, pooled[:, 5] / 1000)
    captions = [[("A man" if p else "A street") + (" with a dog ." if d else " .")] for p, d in zip(people, dogs)]
    return pooled, scores, captions, people, dogs


def test_the_check_learns_who_and_what_is_absent_and_survives_a_round_trip(tmp_path):
    pooled, scores, captions, people, dogs = photos()
    check = AbsenceCheck.fit(pooled, scores, captions)
    assert set(check.floors) == {"dog", "animal"}  # the one noun in 100 photos, and animals: only dogs here
    absent = check.absent(pooled, scores, people_threshold=0.5)
    assert sum(("person" in row) != (not shows) for row, shows in zip(absent, people.tolist())) < 0.05 * len(absent)
    assert all("dog" in row for row, d in zip(absent, dogs.tolist()) if not d)
    assert sum("dog" in row for row, d in zip(absent, dogs.tolist()) if d) <= 0.02 * dogs.sum()  # the floor: 1 %
    assert [("animal" in row) for row in absent] == [("dog" in row) for row in absent]
    check.save(tmp_path / ABSENT_FILE)
    again = AbsenceCheck.load(tmp_path / ABSENT_FILE, feature_dim=8)
    assert again.floors == check.floors and again.absent(pooled, scores, 0.5) == absent


def test_no_people_probe_when_every_caption_agrees_and_no_floors_without_a_classifier():
    check = AbsenceCheck.fit(torch.rand(4, 8), None, [["A dog ."]] * 4)
    assert check.people is None and check.floors == {}
    assert check.absent(torch.rand(2, 8), None, 0.5) == [[], []]


def test_a_check_for_another_encoder_or_a_broken_file_is_refused(tmp_path):
    pooled, scores, captions, _, _ = photos(120)
    AbsenceCheck.fit(pooled, scores, captions).save(tmp_path / ABSENT_FILE)
    with pytest.raises(ModelError, match="does not fit this model's 1280-d encoder features"):
        AbsenceCheck.load(tmp_path / ABSENT_FILE, feature_dim=1280)
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="not a readable absence check"):
        AbsenceCheck.load(tmp_path / "broken.safetensors", feature_dim=8)


def test_forbidden_words_are_blocked_per_image_and_only_after_their_first_tokens():
    # Two images with two rows (beams) each. Image 0 forbids the word [4] and the word [7, 8]; image 1 nothing.
    forbid = _ForbiddenWords([[[4], [7, 8]], []])
    scores = forbid(torch.tensor([[7], [1], [7], [7]]), torch.zeros(4, 10))
    assert scores[0, 4] == -float("inf") and scores[0, 8] == -float("inf")  # row 0 just wrote 7
    assert scores[1, 4] == -float("inf") and scores[1, 8] == 0  # row 1 did not
    assert scores[2:].isfinite().all()
    first_step = forbid(torch.zeros(4, 0, dtype=torch.long), torch.zeros(4, 10))
    assert first_step[0, 4] == -float("inf") and first_step[0, 8] == 0


def test_a_compound_stays_allowed_where_its_last_word_is_forbidden():
    # "dog" is token 5 and "hot dog" is 3, 5: after 3, a 5 is allowed; elsewhere it is not.
    forbid = _ForbiddenWords([[[5]]], allowed=[[[3, 5]]])
    scores = forbid(torch.tensor([[3], [2]]), torch.zeros(2, 10))
    assert scores[0, 5] == 0 and scores[1, 5] == -float("inf")


def test_a_forbidden_word_never_appears_in_the_caption(tiny_model):
    captioner = Captioner.load(tiny_model, device="cpu")
    features = torch.randn(1, captioner.model.config.feature_dim, generator=torch.Generator().manual_seed(0))
    settings = GenerationSettings(max_new_tokens=6, beams=2)
    [[caption]] = captioner.model.generate(features, settings)
    word = caption.split()[0]
    bans = WordBans(forbidden=[captioner.model.word_tokens([word])], allowed=[[]])
    [[again]] = captioner.model.generate(features, settings, bans=bans)
    assert again and word not in again.lower().split()


def test_training_writes_the_check_and_a_model_without_one_refuses_forbid_absent(tiny_model, tmp_path):
    check = AbsenceCheck.load(tiny_model / ABSENT_FILE, feature_dim=Captioner.load(tiny_model).model.config.feature_dim)
    assert check.people is None  # the tiny data's captions never name people: nothing to learn
    [image] = make_images(tmp_path, 1)
    result = runner.invoke(app, ["caption", str(image), "--model", str(tiny_model), "--forbid-absent", "-q",
                                 "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output  # nothing is ruled out, so nothing changes
    old = tmp_path / "old-model"
    shutil.copytree(tiny_model, old)
    (old / ABSENT_FILE).unlink()  # as a model trained before the check existed, which decoded greedily by default
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "generation": {}}))
    result = runner.invoke(app, ["caption", str(image), "--model", str(old), "--forbid-absent"])
    assert result.exit_code == 2
    assert "has no absence check" in result.output and "--forbid-absent" in result.output
    result = runner.invoke(app, ["caption", str(image), "--model", str(old), "-q", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
