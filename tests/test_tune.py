"""Self-critical fine-tuning (`capcli train --objective cider`): the reward, the baseline, the direction of
the update, and a run that starts from a trained model dir and keeps its model."""

import json

import pytest
import torch
from cli_runner import runner
from conftest import tune

from capcli.cli import app
from capcli.training.scst import SelfCritical


def test_a_caption_like_the_references_earns_more_than_one_unlike_them():
    critic = SelfCritical([["a red circle .", "a red round shape"], ["a blue square .", "a blue box"]], samples=2)
    rewards = critic.rewards([0, 1], ["a red circle", "a blue box", "a blue square", "a red circle"])
    assert rewards.shape == (2, 2)
    assert rewards[0, 0] > rewards[0, 1] and rewards[1, 0] > rewards[1, 1]


def test_each_object_that_no_reference_names_costs_the_object_penalty():
    references = [["a dog runs on the grass .", "a brown dog runs outside"]]
    captions = ["a dog runs on the grass", "a man and his dog run on the grass with a frisbee"]
    plain = SelfCritical(references, samples=2).rewards([0], captions)
    penalised = SelfCritical(references, samples=2, object_penalty=0.25)
    assert penalised.wrong_objects(0, captions[1]) == ["person", "frisbee"]
    assert torch.allclose(penalised.rewards([0], captions), plain - torch.tensor([[0.0, 0.5]]))


def test_each_sample_is_measured_against_the_mean_of_the_others():
    critic = SelfCritical([["x"]], samples=3)
    advantages = critic.advantages(torch.tensor([[1.0, 2.0, 3.0]]))
    assert advantages.tolist() == [[-1.5, 0.0, 1.5]]


def test_the_update_favours_the_sample_that_beat_the_baseline(tiny_model, tiny_lm):
    from capcli.model.lm import load_lm
    from capcli.model.modeldir import load_mapper_weights, read_model_dir
    from capcli.model.pipeline import CaptionModel

    config, weights = read_model_dir(tiny_model)
    model = CaptionModel(config, load_lm(str(tiny_lm)))
    load_mapper_weights(model.mapper, weights, tiny_model, config.mapper)
    torch.manual_seed(0)
    features = torch.randn(1, config.feature_dim).repeat(2, 1)
    better, worse = model.tokenize(["a red circle .", "a blue square ."])

    def log_likelihoods():
        with torch.no_grad():
            return [-model.loss(features[:1], [ids], 1.0).item() for ids in (better, worse)]

    before = log_likelihoods()
    optimizer = torch.optim.SGD(model.mapper.parameters(), lr=1e-3)
    model.loss(features, [better, worse], 2.0, None, torch.tensor([1.0, -1.0])).backward()
    optimizer.step()
    after = log_likelihoods()
    # Both captions share the prefix, so both may move; the one with the positive advantage gains on the other.
    assert after[0] - after[1] > before[0] - before[1]


def test_weighted_loss_is_the_weighted_sum_of_each_caption_s_loss(tiny_model, tiny_lm):
    from capcli.model.lm import load_lm
    from capcli.model.modeldir import read_model_dir
    from capcli.model.pipeline import CaptionModel

    config, _ = read_model_dir(tiny_model)
    model = CaptionModel(config, load_lm(str(tiny_lm)))
    torch.manual_seed(0)
    features = torch.randn(2, config.feature_dim)
    ids = model.tokenize(["a red circle .", "a blue square that is big ."])
    with torch.no_grad():
        each = [model.loss(features[i:i + 1], [ids[i]], 1.0).item() for i in range(2)]
        weighted = model.loss(features, ids, 4.0, None, torch.tensor([0.5, -2.0])).item()
    assert weighted == pytest.approx((0.5 * each[0] - 2.0 * each[1]) / 4.0, rel=1e-4)


def test_the_cross_entropy_weight_adds_each_reference_s_loss_per_image(tiny_model, tiny_lm):
    from capcli.model.lm import load_lm
    from capcli.model.modeldir import read_model_dir
    from capcli.model.pipeline import CaptionModel

    config, _ = read_model_dir(tiny_model)
    model = CaptionModel(config, load_lm(str(tiny_lm)))
    critic = SelfCritical([["a red circle ."], ["a blue square ."]], samples=2)
    features = torch.randn(2, config.feature_dim, generator=torch.Generator().manual_seed(0))
    references = model.tokenize(["a red circle .", "a blue square that is big ."])

    def loss(*mixed):
        torch.manual_seed(1)  # the same samples each time
        with torch.no_grad():
            return critic.loss(model, model, features, [0, 1], None, 8.0, *mixed)[0].item()

    with torch.no_grad():
        summed = [model.loss(features[i:i + 1], [references[i]], 1.0).item() for i in range(2)]
    # divisor 8 = 4 images of 2 samples in the global batch: 0.5 x (the references' summed losses) / 4 images
    assert loss(references, 0.5) - loss() == pytest.approx(0.5 * sum(summed) / 4, rel=1e-4)


def test_a_self_critical_run_keeps_the_model_of_init_and_logs_the_reward(tiny_data, tiny_model, tmp_path):
    from capcli.jobs import TrainJob, train_job

    out = tmp_path / "tuned"
    train_job(TrainJob(data=tiny_data, out=out, features=tiny_data / "features", settings=dict(
        init=str(tiny_model), objective="cider", samples=3, xent_weight=0.1, object_penalty=0.01, batch_size=4, epochs=2,
        lr=1e-4, warmup_steps=1, log_every=1)))
    before, after = (json.loads((d / "config.json").read_text()) for d in (tiny_model, out))
    assert {k: v for k, v in after.items() if k != "training"} == {k: v for k, v in before.items() if k != "training"}
    assert after["training"]["objective"] == "cider" and after["training"]["samples"] == 3
    assert after["training"]["xent_weight"] == 0.1 and after["training"]["object_penalty"] == 0.01
    steps = [r for r in (json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # 8 images, 4 a step, 2 epochs
    assert all(-1 <= r["reward"] <= 10 for r in steps)  # CIDEr-D, less at most 24 tokens' object penalties
    captioned = runner.invoke(app, ["caption", str(tiny_data / "0.png"), "--model", str(out), "--quiet"])
    assert captioned.exit_code == 0 and captioned.stdout.strip()


def test_self_critical_needs_a_model_to_start_from_and_keeps_its_shape(tiny_data, tiny_model, tmp_path):
    alone = runner.invoke(app, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "a"), "--objective", "cider",
                                "--features", str(tiny_data / "features"), "--quiet"])
    assert alone.exit_code == 2 and "--init MODEL_DIR" in alone.output
    reshaped = tune(tiny_data, tiny_model, tmp_path / "b", "--prefix-length", "4")
    assert reshaped.exit_code == 2 and "--prefix-length" in reshaped.output and "keeps the model of --init" in reshaped.output
    mixed_alone = runner.invoke(app, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "c"),
                                      "--xent-weight", "0.1", "--features", str(tiny_data / "features"), "--quiet"])
    assert mixed_alone.exit_code == 2 and "--xent-weight" in mixed_alone.output
    penalty_alone = runner.invoke(app, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "d"),
                                        "--object-penalty", "0.2", "--features", str(tiny_data / "features"), "--quiet"])
    assert penalty_alone.exit_code == 2 and "--object-penalty" in penalty_alone.output
    labels_alone = runner.invoke(app, ["train", "--data", str(tiny_data), "--out", str(tmp_path / "e"),
                                       "--tune-labels", "captions", "--features", str(tiny_data / "features"), "--quiet"])
    assert labels_alone.exit_code == 2 and "--tune-labels" in labels_alone.output
    ungrounded = tune(tiny_data, tiny_model, tmp_path / "f", "--tune-labels", "captions")
    assert ungrounded.exit_code == 2 and "not grounded" in ungrounded.output
