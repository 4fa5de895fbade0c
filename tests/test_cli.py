"""The command line: data on stdout, messages on stderr, documented exit statuses."""

import csv
import io
import subprocess
import sys

from cli_runner import runner
from conftest import make_images

from capcli.cli import app


def caption(*args: str, input: str | None = None):
    return runner.invoke(app, ["caption", "--quiet", *args], input=input)


def test_help_and_version_do_not_import_torch():
    code = "import sys; from capcli.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert runner.invoke(app, ["--version"]).stdout.startswith("capcli ")


def test_caption_text_output_is_path_tab_caption(tiny_model, tmp_path):
    images = make_images(tmp_path / "imgs")
    result = caption(str(tmp_path / "imgs"), "--model", str(tiny_model), "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images]
    assert all(len(line.split("\t")) == 2 for line in lines)


def test_caption_jsonl_csv_and_several_captions(tiny_model, tmp_path, read_jsonl):
    [image] = make_images(tmp_path, 1)
    result = caption(str(image), "--model", str(tiny_model), "--format", "jsonl", "--beams", "3",
                     "--num-captions", "2")
    assert result.exit_code == 0, result.output
    [record] = read_jsonl(result.stdout)
    assert record["image"] == str(image) and len(record["captions"]) == 2
    assert record["caption"] == record["captions"][0]
    result = caption(str(image), "--model", str(tiny_model), "--format", "csv")
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["image", "caption"] and rows[1][0] == str(image)


def test_sampling_is_reproducible_with_a_seed_and_varies_with_it(tiny_model, tmp_path):
    [image] = make_images(tmp_path, 1)
    args = [str(image), "--model", str(tiny_model), "--sample", "--beams", "1", "--temperature", "2",
            "--num-captions", "3", "--format", "jsonl"]
    first, again, other = caption(*args, "--seed", "7"), caption(*args, "--seed", "7"), caption(*args, "--seed", "8")
    assert first.exit_code == again.exit_code == other.exit_code == 0, first.output
    assert first.stdout == again.stdout
    assert first.stdout != other.stdout


def test_the_length_penalty_goes_to_beam_search_only(tiny_model, tmp_path, monkeypatch):
    """--length-penalty reaches transformers' beam search; greedy decoding has no use for it (and would warn)."""
    from capcli.model.pipeline import Captioner

    captioner = Captioner.load(tiny_model, device="cpu")
    lm = captioner.model.lm.model
    real, seen = lm.generate, []

    def generate(*args, generation_config, **kwargs):
        seen.append((generation_config.num_beams, generation_config.length_penalty))
        return real(*args, generation_config=generation_config, **kwargs)
    monkeypatch.setattr(lm, "generate", generate)
    images = make_images(tmp_path, 1)
    captioner.caption(images, beams=2, length_penalty=2.0, max_new_tokens=4)
    captioner.caption(images, beams=1, length_penalty=2.0, max_new_tokens=4)
    # Each caption() call may decode twice (an empty caption is decoded again), so compare the kinds of call.
    assert set(seen) == {(2, 2.0), (1, None)}


def test_paths_from_stdin(tiny_model, tmp_path):
    images = make_images(tmp_path, 2)
    result = caption("-", "--model", str(tiny_model), input="\n".join(map(str, images)) + "\n")
    assert result.exit_code == 0
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [str(p) for p in images]


def test_bad_inputs_are_reported_and_the_rest_still_captioned(tiny_model, tmp_path):
    images = make_images(tmp_path, 2)
    (tmp_path / "broken.jpg").write_text("<html>not an image</html>")
    result = caption(str(tmp_path), "--model", str(tiny_model))
    assert result.exit_code == 1
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [str(p) for p in images]
    assert f"{tmp_path / 'broken.jpg'}: not an image" in result.stderr
    assert "Traceback" not in result.output


def test_every_capcli_error_survives_pickling():
    """Errors raised in a DataLoader worker are pickled back to the main process."""
    import pickle

    from capcli.errors import CapcliError, DataError, InputError, ModelError

    for error in (CapcliError("fix it"), ModelError("no model"), DataError("no data"), InputError("a.jpg", "broken")):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)
    assert pickle.loads(pickle.dumps(InputError("a.jpg", "broken"))).reason == "broken"


def test_a_folder_larger_than_a_batch_with_bad_files_is_decoded_in_workers(tiny_model, tmp_path):
    images = make_images(tmp_path, 7)
    bad = [tmp_path / "broken.jpg", tmp_path / "empty.png", tmp_path / "truncated.png"]
    bad[0].write_text("<html>not an image</html>")
    bad[1].write_bytes(b"")
    bad[2].write_bytes(images[0].read_bytes()[:60])
    result = caption(str(tmp_path), "--model", str(tiny_model), "--batch-size", "2", "--workers", "2")
    assert result.exit_code == 1, result.output
    assert sorted(line.split("\t")[0] for line in result.stdout.splitlines()) == sorted(map(str, images))
    assert all(str(path) in result.stderr for path in bad)
    assert "Traceback" not in result.output


def test_output_file_and_resume_caption_each_image_once(tiny_model, tmp_path, read_jsonl):
    images = make_images(tmp_path / "imgs", 3)
    out = tmp_path / "out.jsonl"
    out.write_text('{"image": "%s", "caption": "done before"}\n{"image": "torn' % images[0])
    result = caption(str(tmp_path / "imgs"), "--model", str(tiny_model), "-f", "jsonl", "-o", str(out), "--resume")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    records = read_jsonl(out.read_text())
    assert [r["image"] for r in records] == [str(p) for p in images]
    assert records[0]["caption"] == "done before"


def test_sidecars_written_beside_images_and_skipped_when_present(tiny_model, tmp_path):
    images = make_images(tmp_path, 2)
    images[0].with_suffix(".txt").write_text("keep me\n")
    result = caption(str(tmp_path), "--model", str(tiny_model), "--sidecar", ".txt", "--min-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert images[0].with_suffix(".txt").read_text() == "keep me\n"
    assert images[1].with_suffix(".txt").read_text().strip() != ""
    caption(str(tmp_path), "--model", str(tiny_model), "--sidecar", ".txt", "--existing", "overwrite")
    assert images[0].with_suffix(".txt").read_text() != "keep me\n"


def test_usage_errors_exit_2_with_one_line(tmp_path):
    result = caption(str(tmp_path / "nothing-here"), "--model", str(tmp_path / "no-model"))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "model dir not found" in result.stderr
    result = caption(str(tmp_path), "--resume")
    assert result.exit_code == 2 and "--resume needs -o FILE" in result.stderr
    assert runner.invoke(app, ["caption", "x.jpg", "--format", "xml"]).exit_code == 2


def test_extract_then_train_reuses_the_feature_cache(shapes_data, tiny_lm, tmp_path):
    features = tmp_path / "features"
    args = ["extract", "--data", str(shapes_data), "--out", str(features), "--encoder", "tiny-random-cnn"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    distinct = len({p.read_bytes() for p in (shapes_data / "images").iterdir()})
    assert f"encoded {distinct} images" in first.stderr
    again = runner.invoke(app, args)
    assert "encoded 0 images" in again.stderr and "48 were cached already" in again.stderr
    (shapes_data / "images" / "img000.png").write_bytes((shapes_data / "images" / "img001.png").read_bytes())
    assert "encoded 0 images" in runner.invoke(app, args).stderr  # same content as img001: found by its hash
    (shapes_data / "images" / "img001.png").write_bytes(b"")
    broken = runner.invoke(app, args)
    assert broken.exit_code == 1 and "img001.png: not an image" in broken.stderr
    model = tmp_path / "model"
    result = runner.invoke(app, ["train", "--data", str(shapes_data), "--out", str(model), "--features", str(features),
                                 "--encoder", "tiny-random-cnn", "--lm", str(tiny_lm), "--epochs", "1",
                                 "--prefix-length", "2", "--hidden-size", "8"])
    assert result.exit_code == 0, result.output
    assert "epoch 1" in result.stderr
    assert sorted(p.name for p in model.iterdir()) == ["checkpoint.pt", "config.json",
                                                        "loss_curve.png", "mapper.safetensors", "train_log.jsonl"]


def test_an_output_that_cannot_be_written_stops_with_a_clear_error(tiny_model, tmp_path):
    images = make_images(tmp_path, 2)
    images[1].with_suffix(".txt").mkdir()  # the sidecar's place is taken by a folder
    result = caption(str(tmp_path), "--model", str(tiny_model), "--sidecar", ".txt", "--existing", "overwrite")
    assert result.exit_code == 2
    assert f"cannot write {images[1].with_suffix('.txt')}" in result.stderr and "Traceback" not in result.output
    assert images[0].with_suffix(".txt").is_file()  # written before the failure, kept
    (tmp_path / "file").write_text("")
    result = caption(str(images[0]), "--model", str(tiny_model), "-o", str(tmp_path / "file" / "out.txt"))
    assert result.exit_code == 2 and "cannot write" in result.stderr


def test_precision_sets_the_lm_autocast_and_fp32_is_the_cpu_default(tiny_model, tmp_path):
    import torch

    from capcli.model.pipeline import Captioner

    images = make_images(tmp_path, 2)
    default = caption(*map(str, images), "--model", str(tiny_model))
    fp32 = caption(*map(str, images), "--model", str(tiny_model), "--precision", "fp32")
    bf16 = caption(*map(str, images), "--model", str(tiny_model), "--precision", "bf16")
    assert default.exit_code == fp32.exit_code == bf16.exit_code == 0, bf16.output
    assert fp32.stdout == default.stdout  # auto is fp32 on a CPU
    assert len(bf16.stdout.splitlines()) == 2

    for precision, dtype in [("auto", torch.float32), ("bf16", torch.bfloat16)]:
        captioner = Captioner.load(tiny_model, device="cpu", precision=precision)
        seen = []
        layer = captioner.model.lm.model.model.layers[0].mlp.down_proj
        layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        captioner.caption(images[:1], max_new_tokens=2)
        assert seen and set(seen) == {dtype}, precision


def test_a_folder_named_like_a_photo_is_reported_not_skipped(tiny_model, tmp_path):
    [image] = make_images(tmp_path / "imgs", 1)
    (tmp_path / "holiday.jpg").mkdir()
    result = runner.invoke(app, ["caption", str(image), str(tmp_path / "holiday.jpg"), "--model", str(tiny_model)])
    assert result.exit_code == 1
    assert f"{tmp_path / 'holiday.jpg'}: is a folder, not an image" in result.stderr
    assert "captioned 1 image;" in result.stderr


def test_failures_are_recorded_in_a_jsonl_output_and_tried_again_on_resume(tiny_model, tmp_path, read_jsonl):
    [image] = make_images(tmp_path, 1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    out = tmp_path / "out.jsonl"
    result = caption(str(tmp_path), "--model", str(tiny_model), "-f", "jsonl", "-o", str(out))
    assert result.exit_code == 1
    records = {r["image"]: r for r in read_jsonl(out.read_text())}
    assert "not an image" in records[str(broken)]["error"] and "caption" in records[str(image)]
    make_images(tmp_path / "fixed", 1)[0].replace(broken)  # the file is mended: --resume captions it
    again = caption(str(tmp_path), "--model", str(tiny_model), "-f", "jsonl", "-o", str(out), "--resume")
    assert again.exit_code == 0, again.output
    assert "caption" in read_jsonl(out.read_text())[-1] and read_jsonl(out.read_text())[-1]["image"] == str(broken)


def test_library_progress_bars_stay_out_of_log_files():
    code = ("from capcli.cli import quiet_library_bars; quiet_library_bars(); "
            "from tqdm import tqdm; [None for _ in tqdm(range(3), desc='converting')]")
    done = subprocess.run([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, check=True)
    assert "\r" not in done.stderr and "converting" not in done.stderr


def test_help_groups_caption_options_and_every_train_option_says_what_it_does():
    import typer as typer_module

    shown = runner.invoke(app, ["caption", "--help"]).stdout
    assert all(f"\n{panel}:\n" in shown for panel in ("Output", "Decoding", "Retrieval memory", "Jobs and devices"))
    assert len(shown.splitlines()) <= 100
    train = typer_module.main.get_command(app).commands["train"]
    for param in train.params:
        if param.param_type_name == "option":
            assert param.help and not param.help.startswith("["), f"{param.opts[0]} has no help"
