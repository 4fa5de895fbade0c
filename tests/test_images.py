"""Finding images (files, folders, globs, stdin) and decoding them, with a reason for each failure."""

import io

import pytest
from PIL import Image

from capcli.data.images import find_images, open_image
from capcli.errors import InputError


def test_find_images_in_files_folders_globs_and_stdin(tmp_path):
    for name in ["a.jpg", "b.PNG", "notes.txt", "sub/c.webp"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p, _ in find_images([str(tmp_path)])] == ["a.jpg", "b.PNG"]
    assert [p.name for p, _ in find_images([str(tmp_path)], recursive=True)] == ["a.jpg", "b.PNG", "c.webp"]
    assert [p.name for p, _ in find_images([str(tmp_path / "*.jpg")])] == ["a.jpg"]
    stdin = io.StringIO(f"{tmp_path / 'a.jpg'}\n\n{tmp_path / 'sub' / 'c.webp'}\n")
    assert [p.name for p, _ in find_images(["-"], stdin=stdin)] == ["a.jpg", "c.webp"]
    # a named file is kept even if it is not an image, so that it is reported rather than ignored
    assert [p.name for p, _ in find_images([str(tmp_path / "notes.txt"), str(tmp_path / "gone.jpg")])] == [
        "notes.txt", "gone.jpg"]


def test_recursive_walk_survives_symlink_loops(tmp_path):
    (tmp_path / "d").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "d" / "x.png")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d")
    assert [p.name for p, _ in find_images([str(tmp_path)], recursive=True)] == ["x.png"]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16"])
def test_image_modes_decode_to_rgb(tmp_path, mode):
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    Image.new(mode, (5, 3)).save(path)
    img = open_image(path)
    assert (img.mode, img.size) == ("RGB", (5, 3))


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.new("RGB", (40, 20)).save(path, exif=exif)
    assert open_image(path).size == (20, 40)


@pytest.mark.parametrize("content, reason", [
    (b"", "not an image"),
    (b"<html>404 Not Found</html>", "not an image"),
])
def test_files_that_are_not_images_give_a_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(InputError, match=reason):
        open_image(path)


def test_truncated_image_missing_file_and_folder_give_a_reason(tmp_path):
    good = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(good, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(good.getvalue()[:300])
    with pytest.raises(InputError, match="corrupt or truncated"):
        open_image(tmp_path / "cut.jpg")
    with pytest.raises(InputError, match="no such file"):
        open_image(tmp_path / "gone.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        open_image(tmp_path / "dir.jpg")


def test_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (40_000, 40_000)).save(path)  # 1.6 billion pixels, a few hundred KB on disk
    assert path.stat().st_size < 5_000_000
    with pytest.raises(InputError, match="too large"):
        open_image(path)


@pytest.mark.parametrize("name, save", [
    ("cmyk.jpg", lambda p: Image.new("CMYK", (6, 4), (0, 255, 255, 0)).save(p)),
    ("grey16.png", lambda p: Image.new("I;16", (6, 4), 40000).save(p)),
    ("palette.png", lambda p: Image.new("P", (6, 4)).save(p, transparency=0)),
    ("x.webp", lambda p: Image.new("RGB", (6, 4), "red").save(p)),
    ("x.bmp", lambda p: Image.new("RGB", (6, 4), "red").save(p)),
    ("x.tiff", lambda p: Image.new("RGB", (6, 4), "red").save(p)),
    ("UPPER.JPG", lambda p: Image.new("RGB", (6, 4), "red").save(p, "JPEG")),
    ("name with spaces ü\nnewline.png", lambda p: Image.new("RGB", (6, 4), "red").save(p)),
])
def test_unusual_but_valid_images_decode(tmp_path, name, save):
    save(tmp_path / name)
    img = open_image(tmp_path / name)
    assert (img.mode, img.size) == ("RGB", (6, 4))


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert open_image(tmp_path / "anim.gif").getpixel((0, 0))[0] > 200  # red, not blue


def test_unreadable_file_and_broken_symlink_give_a_reason(tmp_path):
    import os

    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(InputError, match="broken symbolic link"):
        open_image(tmp_path / "dangling.jpg")
    locked = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(locked)
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads anything
        pytest.skip("running as root: permissions are not enforced")
    with pytest.raises(InputError, match="permission denied"):
        open_image(locked)
