import io
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageFile

from audit import images
from audit.errors import ImageError


def _png(array, mode=None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_grayscale_and_rgba_become_rgb():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = images.decode(_png(gray))
    assert rgb.shape == (3, 4, 3) and np.array_equal(rgb[..., 0], gray) and np.array_equal(rgb[..., 2], gray)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent becomes white
    rgba[1, 0] = (0, 0, 0, 128)  # half transparent black on white: 255 * (1 - 128/255) = 127
    out = images.decode(_png(rgba))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, 1]) == (255, 255, 255)
    assert tuple(out[1, 0]) == (127, 127, 127)
    assert images.to_rgb(np.array([[True, False]])).tolist() == [[[255] * 3, [0] * 3]]


def test_undecodable_and_huge_images_raise_image_error(monkeypatch):
    with pytest.raises(ImageError, match="cannot be read"):
        images.decode(b"this is not a png", "notes.png")
    with pytest.raises(ImageError, match="cannot be read"):
        images.decode(_png(np.zeros((8, 8, 3), np.uint8))[:40], "truncated.png")
    monkeypatch.setenv("CNN_AUDIT_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ImageError, match=r"bomb.png \(50 x 50\): 2,500 pixels, over this server's limit of 1,000 "
                                         r"\(set CNN_AUDIT_MAX_IMAGE_PIXELS"):
        images.decode(_png(np.zeros((50, 50), np.uint8)), "bomb.png")
    with pytest.raises(ImageError):
        images.to_rgb(np.zeros((4, 4, 5)))


def test_samples_ship_with_scikit_image():
    chelsea = images.sample("chelsea")
    assert chelsea.shape == (300, 451, 3) and chelsea.dtype == np.uint8
    assert images.sample("camera").shape == (512, 512, 3)  # grayscale made RGB
    assert images.sample("logo").shape == (500, 500, 3)  # RGBA made RGB
    with pytest.raises(ImageError):
        images.sample("../../etc/passwd")


def test_fit_crops_the_centre_or_squashes():
    image = np.zeros((10, 20, 3), np.uint8)
    image[:, 5:15] = 255  # a white centre square between black side bands
    cropped = images.fit(image, (10, 10), "crop")
    assert cropped.shape == (10, 10, 3) and cropped.min() == 255
    squashed = images.fit(image, (10, 10), "squash")
    assert squashed[:, 0].max() == 0 and squashed[:, 5].min() == 255


def test_preprocessing_modes_against_hand_computed_values():
    pixel = np.array([[[[10, 20, 30]]]], np.uint8)
    np.testing.assert_allclose(images.preprocess(pixel, "unit"), [[[[10 / 255, 20 / 255, 30 / 255]]]], rtol=1e-6)
    np.testing.assert_allclose(images.preprocess(pixel, "tf"), [[[[10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1]]]],
                               rtol=1e-6)
    np.testing.assert_allclose(images.preprocess(pixel, "caffe"), [[[[30 - 103.939, 20 - 116.779, 10 - 123.68]]]],
                               rtol=1e-5)
    torch = [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225]
    np.testing.assert_allclose(images.preprocess(pixel, "torch"), [[[torch]]], rtol=1e-5)
    np.testing.assert_allclose(images.preprocess(pixel, "raw"), pixel.astype(np.float32))
    with pytest.raises(ValueError):
        images.preprocess(pixel, "imagenet")


def test_folders_and_zips_give_labelled_images(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(2):
            (tmp_path / label / f"{i}.png").write_bytes(_png(np.full((4, 4, 3), i * 50, np.uint8)))
    (tmp_path / "notes.txt").write_text("ignored")
    found = images.read_folder(tmp_path)
    assert [(item.name, item.label) for item in found] == [
        ("cat/0.png", "cat"), ("cat/1.png", "cat"), ("dog/0.png", "dog"), ("dog/1.png", "dog")]
    assert found[1].pixels[0, 0, 0] == 50
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("set/bird/a.png", _png(np.zeros((3, 3), np.uint8)))
        archive.writestr("__MACOSX/set/bird/._a.png", b"junk")
    zipped = images.read_zip(buffer.getvalue())
    assert [(item.name, item.label) for item in zipped] == [("set/bird/a.png", "bird")]
    with pytest.raises(ImageError):
        images.read_zip(b"not a zip")


def test_image_hash_depends_on_every_pixel():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[3, 3, 2] = 1
    assert images.image_hash(a) == images.image_hash(a.copy()) != images.image_hash(b)
    assert images.image_hash([a, b]) != images.image_hash([b, a])


def test_a_long_thin_image_is_refused_before_it_costs_anything():
    """A 300000 x 1 PNG is a few hundred bytes; resized to fill 64 x 64 it was 19M x 64 pixels."""
    thin = _png(np.zeros((1, 300_000), np.uint8))
    assert len(thin) < 2000
    with pytest.raises(ImageError, match="thin.png .300000 x 1.: 300,000 times longer than wide"):
        images.decode(thin, "thin.png")
    # within the ratio, fitting never makes an intermediate larger than the target
    wide = images.decode(_png(np.zeros((20, 900, 3), np.uint8)), "wide.png")
    assert images.fit(wide, (64, 64)).shape == (64, 64, 3)


def test_sixteen_bit_images_are_scaled_not_clipped():
    ramp = (np.arange(1024).reshape(16, 64) * 64).astype(np.uint16)  # 0 .. 65472
    decoded = images.decode(_png(ramp), "ramp16.png")[..., 0]
    np.testing.assert_array_equal(decoded, np.round(ramp / 257.0).astype(np.uint8))
    assert decoded[0, 1] == 0 and decoded[15, 63] == 255 and len(np.unique(decoded)) > 200


def test_exif_orientation_is_applied():
    from PIL import Image

    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, :10] = (255, 0, 0)  # red on the left
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", exif=exif.tobytes())
    upright = images.decode(buffer.getvalue(), "portrait.png")
    assert upright.shape == (30, 10, 3) and tuple(upright[0, 5]) == (255, 0, 0)  # the red band is on top


def test_zip_members_are_checked_from_the_directory_and_bad_ones_skipped(monkeypatch):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("cats/a.png", _png(np.zeros((8, 8), np.uint8)))
        archive.writestr("cats/empty.png", b"")
        archive.writestr("cats/big.png", b"\0" * 5_000_000)  # 5 MB of zeros: a few kB compressed
    monkeypatch.setenv("CNN_AUDIT_MAX_ZIP_MEMBER_BYTES", "1000000")
    found, skipped = images.read_zip_report(buffer.getvalue(), name="cats.zip")
    assert [item.name for item in found] == ["cats/a.png"]
    assert any("cats/big.png: 5,000,000 bytes once decompressed" in reason for reason in skipped)
    assert any(reason.startswith("cats/empty.png: cannot be read") for reason in skipped)
    assert not any("BytesIO" in reason for reason in skipped)
    monkeypatch.setenv("CNN_AUDIT_MAX_ZIP_PIXELS", "10")
    with pytest.raises(ImageError, match="cats.zip: 64 pixels"):
        images.read_zip_report(buffer.getvalue(), name="cats.zip")


def test_only_the_listed_formats_are_opened():
    """A PostScript file named .png would go to Pillow's EPS reader, which runs Ghostscript where installed."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
    with pytest.raises(ImageError, match="PNG, JPEG, WEBP, BMP, GIF, TIFF are read"):
        images.decode(eps, "evil.png")
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PPM")  # a real image, of a format we do not list
    with pytest.raises(ImageError):
        images.decode(buffer.getvalue(), "image.ppm")


def test_a_zip_of_huge_blank_pngs_is_refused_from_the_headers_in_milliseconds():
    """40 blank 7000 x 7000 PNGs: a 26 KB zip that decoded in 72 s at 6.78 GB before the headers were summed."""
    import time

    png = io.BytesIO()
    Image.new("L", (7000, 7000)).save(png, format="PNG", optimize=True)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for index in range(40):
            out.writestr(f"blank/{index}.png", png.getvalue())
    assert len(archive.getvalue()) < 2_000_000
    start = time.perf_counter()
    with pytest.raises(ImageError, match="CNN_AUDIT_MAX_ZIP_PIXELS"):
        images.read_zip(archive.getvalue())
    assert time.perf_counter() - start < 10


def test_large_images_in_a_zip_are_kept_at_the_pages_size(monkeypatch):
    monkeypatch.setenv("CNN_AUDIT_MAX_IMAGE_SIDE", "100")
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (1200, 800), (200, 10, 10)).save(jpeg, format="JPEG")
    Image.new("RGB", (300, 900), (10, 200, 10)).save(png, format="PNG")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("a.jpg", jpeg.getvalue())
        out.writestr("b.png", png.getvalue())
    found = {item.name: item.pixels for item in images.read_zip(archive.getvalue())}
    assert found["a.jpg"].shape == (67, 100, 3) and found["b.png"].shape == (100, 33, 3)
    assert abs(int(found["a.jpg"][30, 50, 0]) - 200) < 8  # the picture itself, reduced


def test_a_progressive_jpeg_of_thousands_of_scans_is_refused_before_it_is_decoded(monkeypatch):
    """The scan bomb: a progressive JPEG repeating a tiny scan thousands of times, each walking every block of a
    large declared image (20,000 scans of a 7000 x 7000 image took 133 s of a core). Ordinary JPEGs pass:
    baseline 1 scan, Pillow's progressive colour 10, grey 6 (counted by hand from libjpeg's scan script)."""
    import skimage.data

    def jpeg(array, **options) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", **options)
        return buffer.getvalue()

    chelsea = skimage.data.chelsea()
    assert images.jpeg_scans(jpeg(chelsea)) == 1
    assert images.jpeg_scans(jpeg(chelsea, progressive=True)) == 10
    assert images.jpeg_scans(jpeg(skimage.data.camera(), progressive=True)) == 6
    assert images.decode(jpeg(chelsea, progressive=True)).shape == chelsea.shape

    progressive = jpeg(np.zeros((64, 64, 3), np.uint8), progressive=True)
    last_scan = progressive.rindex(b"\xff\xda")
    bomb = progressive[:last_scan] + progressive[last_scan:-2] * 3000 + b"\xff\xd9"
    assert images.jpeg_scans(bomb) == 9 + 3000

    def never(*args):
        raise AssertionError("decoded")

    monkeypatch.setattr(Image.Image, "load", never)
    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    with pytest.raises(ImageError, match="3,009 scans in one JPEG.*CNN_AUDIT_MAX_JPEG_SCANS"):
        images.decode(bomb, "bomb.jpg")
