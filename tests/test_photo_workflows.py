"""Photo-library and data-set workflows: text around captions, appending to sidecars, mirrored sidecar folders,
XMP sidecars, captions embedded in the image files, an HTML contact sheet, and one writer per output."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import runner
from conftest import make_images

from capcli.cli import app
from capcli.outputs.locks import exclusive, lock_path
from capcli.outputs.metadata import read_xmp, xmp_packet

EXIFTOOL = shutil.which("exiftool")
BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
               None)
needs_exiftool = pytest.mark.skipif(EXIFTOOL is None, reason="exiftool is not installed "
                                    "(apt install libimage-exiftool-perl); .ci/run installs it")


def caption(model: Path, *args: str):
    return runner.invoke(app, ["caption", "--quiet", "--model", str(model), "--min-new-tokens", "2",
                               "--max-new-tokens", "4", *args])


def records(text: str) -> dict[str, str]:
    return {r["image"]: r["caption"] for r in map(json.loads, text.splitlines())}


def test_caption_prefix_and_suffix_appear_in_every_output(tiny_model, tmp_path):
    images = make_images(tmp_path, 2)
    result = caption(tiny_model, str(tmp_path), "--caption-prefix", "photo of sks, ", "--caption-suffix", " [auto]",
                     "--sidecar", ".txt", "-o", str(tmp_path / "out.jsonl"), "-f", "jsonl")
    assert result.exit_code == 0, result.output
    for image, text in records((tmp_path / "out.jsonl").read_text()).items():
        assert text.startswith("photo of sks, ") and text.endswith(" [auto]") and len(text) > 21
        assert Path(image).with_suffix(".txt").read_text() == text + "\n"
    assert len(images) == 2


def test_existing_append_and_prepend_join_the_new_caption_to_a_text_sidecar(tiny_model, tmp_path):
    first, second = make_images(tmp_path, 2)
    first.with_suffix(".txt").write_text("by hand\n")
    result = caption(tiny_model, str(tmp_path), "--sidecar", ".txt", "--existing", "append", "--join", " | ",
                     "-f", "jsonl")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # with sidecars and no -o, nothing goes to stdout
    appended = first.with_suffix(".txt").read_text()
    assert appended.startswith("by hand | ") and appended.endswith("\n") and appended.count("\n") == 1
    assert " | " not in second.with_suffix(".txt").read_text()  # nothing to join to: just the caption
    first.with_suffix(".txt").write_text("by hand\n")
    assert caption(tiny_model, str(first), "--sidecar", ".txt", "--existing", "prepend").exit_code == 0
    prepended = first.with_suffix(".txt").read_text()
    assert prepended.endswith(", by hand\n") and prepended == appended.split(" | ")[1].rstrip("\n") + ", by hand\n"


def test_sidecar_dir_mirrors_the_input_folders_and_leaves_the_photos_alone(tiny_model, tmp_path):
    make_images(tmp_path / "photos" / "2023" / "june", 2)
    make_images(tmp_path / "photos" / "2024", 1)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "photos").rglob("*"))
    out = tmp_path / "captions"
    result = caption(tiny_model, str(tmp_path / "photos"), "-r", "--sidecar", ".txt", "--sidecar-dir", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.txt")) == [
        "2023/june/shape0.txt", "2023/june/shape1.txt", "2024/shape0.txt"]
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "photos").rglob("*")) == before
    again = runner.invoke(app, ["caption", "--model", str(tiny_model), str(tmp_path / "photos"), "-r",
                                "--sidecar", ".txt", "--sidecar-dir", str(out)])
    assert again.exit_code == 0 and "skipping 3 images already captioned" in again.stderr


@pytest.mark.parametrize("suffix", [".txt", ".xmp"])
def test_two_images_that_would_share_a_sidecar_are_both_reported_and_neither_overwritten(tiny_model, tmp_path, suffix):
    from PIL import Image

    [png] = make_images(tmp_path, 1)
    jpeg = png.with_suffix(".jpg")
    Image.open(png).convert("RGB").save(jpeg)
    result = caption(tiny_model, str(tmp_path), "--sidecar", suffix)
    assert result.exit_code == 1 and not png.with_suffix(suffix).exists()
    assert all(f"{image}: its sidecar" in result.stderr for image in (png, jpeg)) and "--sidecar-name full" in result.stderr
    kept = caption(tiny_model, str(tmp_path), "--sidecar", suffix, "--sidecar-name", "full")
    assert kept.exit_code == 0, kept.output
    assert (tmp_path / f"{png.name}{suffix}").is_file() and (tmp_path / f"{jpeg.name}{suffix}").is_file()


def test_mirrored_sidecars_that_would_collide_are_reported_too(tiny_model, tmp_path):
    from PIL import Image

    [png] = make_images(tmp_path / "photos", 1)
    Image.open(png).convert("RGB").save(png.with_suffix(".jpg"))
    result = caption(tiny_model, str(tmp_path / "photos"), "--sidecar", ".txt", "--sidecar-dir", str(tmp_path / "out"))
    assert result.exit_code == 1 and result.stderr.count("its sidecar") == 2
    assert not (tmp_path / "out").exists()


def test_keywords_and_outputs_leave_out_unsure_labels_and_objects(tiny_model, tmp_path, colour_detector, read_jsonl):
    [image] = make_images(tmp_path, 1)  # a red shape: the stand-in sees an apple at 0.9
    sure = caption(tiny_model, str(image), "--labels", "-f", "jsonl", "--sidecar", ".xmp", "-o", str(tmp_path / "a.jsonl"))
    assert sure.exit_code == 0, sure.output
    [record] = read_jsonl((tmp_path / "a.jsonl").read_text())
    assert [o["label"] for o in record["objects"]] == ["apple"] and all(s >= 0.5 for _, s in record["labels"])
    assert "apple" in read_xmp(image.with_suffix(".xmp").read_bytes())[1]
    unsure = caption(tiny_model, str(image), "--labels", "-f", "jsonl", "--min-score", "0.95")
    assert read_jsonl(unsure.stdout)[0]["objects"] == []


def test_xmp_packets_round_trip_with_description_and_subjects():
    packet = xmp_packet('A cat on a "red" mat <3 & more', ["cat", "mat"])
    assert packet.startswith(b"<?xpacket begin=") and packet.rstrip().endswith(b'<?xpacket end="w"?>')
    assert read_xmp(packet) == ('A cat on a "red" mat <3 & more', ["cat", "mat"])
    assert read_xmp(b"not xml at all") == (None, [])


def test_xmp_sidecars_hold_the_caption(tiny_model, tmp_path):
    image, = make_images(tmp_path, 1)
    result = caption(tiny_model, str(image), "--sidecar", ".xmp", "-f", "jsonl", "-o", str(tmp_path / "c.jsonl"))
    assert result.exit_code == 0, result.output
    description, subjects = read_xmp(image.with_suffix(".xmp").read_bytes())
    assert description == records((tmp_path / "c.jsonl").read_text())[str(image)] and subjects == []
    if EXIFTOOL:  # what photo managers read
        shown = subprocess.run([EXIFTOOL, "-s3", "-XMP-dc:Description", str(image.with_suffix(".xmp"))],
                               capture_output=True, text=True, check=True).stdout.strip()
        assert shown == description


def photos_with_metadata(folder: Path) -> list[Path]:
    """A JPEG with EXIF camera make, a PNG and a WebP."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    shapes = make_images(folder / "src", 3)
    jpeg, png, webp = folder / "camera.jpg", folder / "scan.png", folder / "web.webp"
    img = Image.open(shapes[0]).convert("RGB")
    exif = img.getexif()
    exif[271] = "TestCam"  # Make
    img.save(jpeg, quality=90, exif=exif)
    Image.open(shapes[1]).save(png)
    Image.open(shapes[2]).save(webp)
    shutil.rmtree(folder / "src")
    return [jpeg, png, webp]


def pixels(path: Path) -> bytes:
    from PIL import Image

    with Image.open(path) as img:
        return img.tobytes()


@needs_exiftool
def test_embed_writes_the_description_keeps_pixels_and_metadata_and_skips_described_files(tiny_model, tmp_path):
    from PIL import Image

    jpeg, png, webp = photos_with_metadata(tmp_path / "photos")
    before = {p: pixels(p) for p in (jpeg, png, webp)}
    result = caption(tiny_model, str(tmp_path / "photos"), "--embed", "-f", "jsonl", "-o", str(tmp_path / "c.jsonl"))
    assert result.exit_code == 0, result.output
    written = records((tmp_path / "c.jsonl").read_text())
    for path in (jpeg, png, webp):
        assert pixels(path) == before[path]
        with Image.open(path) as img:
            assert read_xmp(img.info["xmp"])[0] == written[str(path)]
    with Image.open(jpeg) as img:
        assert img.getexif()[271] == "TestCam" and img.getexif()[270] == written[str(jpeg)]
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["camera.jpg", "scan.png", "web.webp"]  # no temp files

    again = runner.invoke(app, ["caption", "--model", str(tiny_model), str(tmp_path / "photos"), "--embed"])
    assert again.exit_code == 0 and "skipping 3 images already captioned" in again.stderr
    over = caption(tiny_model, str(jpeg), "--embed", "--existing", "overwrite", "--caption-prefix", "NEW ")
    assert over.exit_code == 0, over.output
    with Image.open(jpeg) as img:
        assert read_xmp(img.info["xmp"])[0].startswith("NEW ")
    assert pixels(jpeg) == before[jpeg]


@needs_exiftool
def test_embed_reports_a_file_it_cannot_write_and_goes_on(tiny_model, tmp_path):
    from PIL import Image

    good, = make_images(tmp_path, 1)
    Image.open(good).save(tmp_path / "old.bmp")  # exiftool reads BMP but cannot write it
    result = caption(tiny_model, str(tmp_path), "--embed")
    assert result.exit_code == 1
    assert "old.bmp: cannot embed the caption" in result.stderr and result.stderr.count("\n") == 1
    with Image.open(good) as img:
        assert read_xmp(img.info["xmp"])[0]


def test_embed_without_exiftool_stops_with_one_line(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr("capcli.outputs.metadata.shutil.which", lambda name: None)
    make_images(tmp_path, 1)
    result = caption(tiny_model, str(tmp_path), "--embed")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "--embed needs exiftool" in result.stderr


def test_options_that_do_not_go_together_stop_with_one_line(tiny_model, tmp_path):
    make_images(tmp_path, 1)
    for args, message in [(["--sidecar", ".xmp", "--existing", "append"], "applies to text sidecars"),
                          (["--sidecar-dir", str(tmp_path / "x")], "--sidecar-dir needs --sidecar"),
                          (["-f", "html", "-o", str(tmp_path / "p.html"), "--resume"], "cannot continue an HTML")]:
        result = caption(tiny_model, str(tmp_path), *args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, args


def solid_photos(folder: Path) -> dict[str, Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rgb in (("red", (230, 20, 20)), ("blue", (20, 20, 230))):
        paths[name] = folder / f"{name}.png"
        Image.new("RGB", (300, 200), rgb).save(paths[name])
    (folder / "broken.png").write_bytes(b"not a png")
    return paths


def test_the_contact_sheet_is_one_page_with_thumbnails_captions_and_failures(tiny_model, tmp_path):
    solid_photos(tmp_path / "photos")
    sheet = tmp_path / "sheet.html"
    result = caption(tiny_model, str(tmp_path / "photos"), "-f", "html", "-o", str(sheet))
    assert result.exit_code == 1  # broken.png
    page = sheet.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<figure") == 2
    assert page.count('src="data:image/jpeg;base64,') == 2 and "http" not in page.replace("http-equiv", "")
    assert "1 failed" in page and "broken.png" in page.split("1 failed")[1]
    assert len(page) < 40_000  # thumbnails, not the photos
    assert f'<a href="{(tmp_path / "photos" / "red.png").resolve().as_uri()}"><img' in page  # links to the photo


def screenshot(page: Path, out: Path, fragment: str = "") -> dict[str, int]:
    """Load the page in headless Chromium; count the clearly red and clearly blue pixels on screen."""
    from PIL import Image

    subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1000,700", f"--screenshot={out}", page.as_uri() + fragment],
                   capture_output=True, timeout=120, check=True)
    counts = {"red": 0, "blue": 0}
    data = Image.open(out).convert("RGB").tobytes()
    for r, g, b in zip(data[0::3], data[1::3], data[2::3]):
        if r > 180 and g < 80 and b < 80:
            counts["red"] += 1
        elif b > 180 and r < 80 and g < 80:
            counts["blue"] += 1
    return counts


@pytest.mark.skipif(BROWSER is None, reason="no Chromium to load the page (apt install chromium); .ci/run installs it")
def test_the_contact_sheet_shows_its_thumbnails_in_a_browser_and_filters_them(tiny_model, tmp_path):
    solid_photos(tmp_path / "photos")
    sheet = tmp_path / "sheet.html"
    caption(tiny_model, str(tmp_path / "photos"), "-f", "html", "-o", str(sheet))
    shown = screenshot(sheet, tmp_path / "all.png")
    assert shown["red"] > 5000 and shown["blue"] > 5000, shown  # a thumbnail is about 192 x 128 pixels
    filtered = screenshot(sheet, tmp_path / "red.png", "#q=red.png")
    assert filtered["red"] > 5000 and filtered["blue"] == 0, filtered
    part_of_a_word = screenshot(sheet, tmp_path / "re.png", "#q=re")  # whole words only: "re" is not "red"
    assert part_of_a_word["red"] < 5000 and part_of_a_word["blue"] == 0, part_of_a_word  # the red: failures' text


def test_a_second_job_writing_the_same_output_stops_naming_the_first(tiny_model, tmp_path):
    make_images(tmp_path / "photos", 1)
    out = tmp_path / "captions.jsonl"
    with exclusive(out, "output"):
        result = caption(tiny_model, str(tmp_path / "photos"), "-o", str(out))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"another capcli job (pid {os.getpid()}) is writing its output" in result.stderr
    assert not out.exists()  # the running job's file is not touched
    assert caption(tiny_model, str(tmp_path / "photos"), "-o", str(out)).exit_code == 0  # released


def test_appending_to_sidecars_in_a_folder_another_job_appends_to_is_refused(tiny_model, tmp_path):
    images = make_images(tmp_path / "photos", 2)
    with exclusive(tmp_path / "photos", "sidecars"):
        result = caption(tiny_model, str(tmp_path / "photos"), "--sidecar", ".txt", "--existing", "append")
    assert result.exit_code == 2 and "is writing its sidecars" in result.stderr
    assert not any(p.with_suffix(".txt").exists() for p in images)


def test_the_lock_of_a_job_that_crashed_is_free_again(tiny_model, tmp_path):
    out = tmp_path / "captions.txt"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from capcli.outputs.locks import exclusive\n"
                               f"with exclusive(Path({str(out)!r}), 'output'):\n print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_path(out).read_text().strip() == str(holder.pid)
        make_images(tmp_path / "photos", 1)
        assert caption(tiny_model, str(tmp_path / "photos"), "-o", str(out)).exit_code == 2
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    result = caption(tiny_model, str(tmp_path / "photos"), "-o", str(out))  # the kernel released the lock
    assert result.exit_code == 0, result.output
