"""Retrieval memories: build one from a data set, caption with it (the neighbours' captions vote among
candidates), see the neighbours, and refuse memories that do not fit."""

import json
import shutil

import pytest
from cli_runner import runner

from capcli.cli import app
from capcli.steering.memory import Memory


def build(data, model, out, *extra):
    result = runner.invoke(app, ["memory", "build", "--data", str(data), "--model", str(model), "--out", str(out),
                                 "--features", str(out.parent / "features"), "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return out


def test_cider_d_votes_match_pycocoevalcap():
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    refs = [["a red circle", "a red round shape", "red circle on white"],
            ["a blue square", "a blue box", "square in blue"],
            ["a green circle", "green round shape", "a circle that is green"]]
    candidates = ["a red circle", "a blue circle", "green square shape"]
    memory = Memory("enc", ["0", "1", "2"], refs, __import__("torch").eye(3).half())
    scorer = CiderScorer(n=4, sigma=6.0)
    for candidate, item_refs in zip(candidates, refs):
        scorer += (candidate, item_refs)
    _, expected = scorer.compute_score()
    from capcli.steering.memory import Neighbour

    ours = [memory.consensus([c], [Neighbour(str(i), 1.0, r)])[0] for i, (c, r) in enumerate(zip(candidates, refs))]
    assert ours == pytest.approx(list(expected), rel=1e-9)


def test_the_candidate_the_neighbours_agree_with_wins():
    from capcli.steering.memory import Neighbour

    memory = Memory("enc", ["a", "b"], [["a red circle ."], ["a blue square ."]], __import__("torch").eye(2).half())
    votes = memory.consensus(["a blue square .", "a red circle ."], [Neighbour("a", 0.9, ["a red circle .", "red circle"])])
    assert votes[1] > votes[0]


def test_build_a_memory_and_caption_with_it_showing_the_neighbours(tiny_data, tiny_model, tmp_path, read_jsonl):
    memory = build(tiny_data, tiny_model, tmp_path / "memory")
    index = json.loads((memory / "memory.json").read_text())
    assert sorted(index["images"]) == [f"{n}.png" for n in range(8)] and len(index["captions"]) == 8
    result = runner.invoke(app, ["caption", "--quiet", str(tiny_data / "3.png"), "--model", str(tiny_model),
                                 "--memory", str(memory), "--explain", "-f", "jsonl", "--neighbours", "2",
                                 "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    record, = read_jsonl(result.stdout)
    nearest = record["neighbours"][0]
    assert len(record["neighbours"]) == 2 and record["caption"]
    assert nearest["image"] == "3.png" and nearest["similarity"] == pytest.approx(1.0, abs=1e-3)  # itself
    assert nearest["captions"] == [(tiny_data / "captions.txt").read_text().splitlines()[4].split(",", 1)[1]]


def test_a_model_dirs_own_memory_is_used_and_more_can_be_added(tiny_data, tiny_model, tmp_path, read_jsonl):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    build(tiny_data, model, model / "memory", "--split", str(write_split(tmp_path / "a.txt", range(4))))
    other = build(tiny_data, model, tmp_path / "other", "--split", str(write_split(tmp_path / "b.txt", range(4, 8))))

    def neighbours(*extra):
        result = runner.invoke(app, ["caption", "--quiet", str(tiny_data / "0.png"), "--model", str(model), "-f",
                                     "jsonl", "--explain", "--neighbours", "8", "--max-new-tokens", "3", *extra])
        assert result.exit_code == 0, result.output
        return sorted(n["image"] for n in read_jsonl(result.stdout)[0]["neighbours"])

    assert neighbours() == ["0.png", "1.png", "2.png", "3.png"]
    assert neighbours("--memory", str(other)) == ["4.png", "5.png", "6.png", "7.png"]
    assert neighbours("--memory", str(other), "--memory-mode", "add") == [f"{n}.png" for n in range(8)]


def write_split(path, numbers):
    path.write_text("".join(f"{n}.png\n" for n in numbers))
    return path


def test_memories_that_do_not_fit_are_refused_with_one_line(tiny_data, tiny_model, tmp_path):
    memory = build(tiny_data, tiny_model, tmp_path / "memory")

    def caption_with(folder, *extra):
        return runner.invoke(app, ["caption", str(tiny_data / "0.png"), "--model", str(tiny_model), "--memory",
                                   str(folder), *extra])

    index = json.loads((memory / "memory.json").read_text())
    broken = {"other-encoder": {**index, "encoder_id": "resnet50@123"},
              "empty": {**index, "images": [], "captions": []},
              "disagreeing": {**index, "images": index["images"][:3], "captions": index["captions"][:3]}}
    for name, changed in broken.items():
        folder = tmp_path / name
        shutil.copytree(memory, folder)
        (folder / "memory.json").write_text(json.dumps(changed))
    for folder, message in [(tmp_path / "nowhere", "memory dir not found"),
                            (tmp_path / "other-encoder", "was built with encoder resnet50@123"),
                            (tmp_path / "empty", "the memory is empty"),
                            (tmp_path / "disagreeing", "memory files disagree")]:
        result = caption_with(folder)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    no_memory = runner.invoke(app, ["caption", str(tiny_data / "0.png"), "--model", str(tiny_model), "--explain",
                                    "-f", "jsonl"])
    assert no_memory.exit_code == 2 and "has no memory" in no_memory.stderr


def test_build_skips_and_counts_bad_rows_and_images(tiny_data, tiny_model, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("features"))
    (data / "7.png").write_bytes(b"not a png")
    with open(data / "captions.txt", "a") as f:
        f.write("missing.png,a photo that is not there .\n3.png,\n")
    result = runner.invoke(app, ["memory", "build", "--data", str(data), "--model", str(tiny_model),
                                 "--out", str(tmp_path / "memory"), "--features", str(tmp_path / "features")])
    assert result.exit_code == 1, result.output  # one image could not be used
    assert "skipped" in result.stderr and "missing.png" in result.stderr and "7.png" in result.stderr
    index = json.loads((tmp_path / "memory" / "memory.json").read_text())
    assert sorted(index["images"]) == [f"{n}.png" for n in range(7)]
