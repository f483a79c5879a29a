"""Image preprocessing (agent/images.py): the spec, the pixels it makes, folders and their classes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from agent import images
from agent.errors import ImageError


def _png(path, pixels: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def test_presets_and_overrides_make_the_spec_and_the_layout_is_read_off_the_model():
    s = images.parse("imagenet", [-1, 3, 224, 224])
    assert (s.layout, s.color, s.resize, s.height, s.width) == ("nchw", "rgb", "crop", 224, 224)
    assert s.scale == pytest.approx(1 / 255) and s.mean == images.IMAGENET_MEAN and s.std == images.IMAGENET_STD
    s = images.parse("unit,color=bgr,resize=letterbox,size=32x48", [1, 96, 96, 3])
    assert (s.layout, s.color, s.resize, s.height, s.width, s.shape()) == ("nhwc", "bgr", "letterbox", 32, 48,
                                                                           [32, 48, 3])
    s = images.parse("scale=1/127.5,mean=1,std=1", [-1, 1, 8, 8])
    assert (s.color, s.mean, s.std, s.shape()) == ("gray", [1.0], [1.0], [1, 8, 8])
    s = images.parse("signed,mean=0.5:0.4:0.3", [-1, 3, 8, 8])
    assert s.mean == [0.5, 0.4, 0.3] and s.std == [1.0, 1.0, 1.0]
    assert images.parse("raw", [-1, 8, 8, 3], "uint8").dtype == "uint8"
    assert images.ImageSpec.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("text, shape, dtype, words", [
    ("", [-1, 3, 8, 8], "float32", "needs --preprocess"),
    ("vgg", [-1, 3, 8, 8], "float32", "no preset named 'vgg'"),
    ("unit,gamma=2", [-1, 3, 8, 8], "float32", "no key named 'gamma'"),
    ("scale=1/zero", [-1, 3, 8, 8], "float32", "scale='1/zero' is not valid"),
    ("unit,std=0", [-1, 3, 8, 8], "float32", "std='0' is not valid"),
    ("unit,resize=squash", [-1, 3, 8, 8], "float32", "is not one of stretch, crop, letterbox"),
    ("unit,color=rgb", [-1, 1, 8, 8], "float32", "does not fit a model input with 1 channel"),
    ("unit,mean=0.1:0.2", [-1, 3, 8, 8], "float32", "mean and std need 1 or 3 values"),
    ("unit", [-1, 64], "float32", "need a model input of 4 axes"),
    ("unit", [-1, 3, -1, -1], "float32", "add size=HxW"),
    ("unit", [-1, 5, 8, 8], "float32", "no image channel axis"),
    ("unit", [-1, 3, 8, 8], "uint8", "use --preprocess raw"),
    ("raw", [-1, 3, 8, 8], "int8", "float32 or uint8 model inputs"),
])
def test_a_spec_that_cannot_work_is_refused_with_what_to_write(text, shape, dtype, words):
    with pytest.raises(ImageError, match=words.replace("(", r"\(").replace("?", r"\?")):
        images.parse(text, shape, dtype)


def test_pixels_become_the_model_values_in_its_layout_and_channel_order(tmp_path):
    px = np.array([[[255, 0, 128], [0, 255, 0]], [[10, 20, 30], [40, 50, 60]]])  # 2x2 RGB
    path = _png(tmp_path / "a.png", px)
    x = images.load(path, images.parse("unit", [-1, 3, 2, 2]))
    assert x.dtype == np.float32 and x.shape == (3, 2, 2)
    np.testing.assert_allclose(x, px.transpose(2, 0, 1) / 255, rtol=1e-6)
    bgr = images.load(path, images.parse("unit,color=bgr", [-1, 2, 2, 3]))
    np.testing.assert_allclose(bgr, px[:, :, ::-1] / 255, rtol=1e-6)
    net = images.load(path, images.parse("imagenet", [-1, 2, 2, 3]))
    want = (px / 255 - np.array(images.IMAGENET_MEAN)) / np.array(images.IMAGENET_STD)
    np.testing.assert_allclose(net, want, rtol=1e-5)
    raw = images.load(path, images.parse("raw", [-1, 2, 2, 3], "uint8"))
    assert raw.dtype == np.uint8 and (raw == px).all()
    gray = images.load(path, images.parse("unit", [-1, 1, 2, 2]))
    assert gray.shape == (1, 2, 2) and gray[0, 0, 1] == pytest.approx(150 / 255, abs=1 / 255)  # L of pure green


def test_resize_modes_keep_what_each_promises(tmp_path):
    wide = np.zeros((20, 40, 3))  # 40 wide, 20 high: red left half, blue right half
    wide[:, :20, 0] = 255
    wide[:, 20:, 2] = 255
    path = _png(tmp_path / "wide.png", wide)
    crop = images.load(path, images.parse("raw,resize=crop", [-1, 10, 10, 3], "uint8"))
    assert crop.shape == (10, 10, 3)  # the centre: the two halves meet in the middle
    assert (crop[:, :4, 0] > 200).all() and (crop[:, 6:, 2] > 200).all()
    box = images.load(path, images.parse("raw,resize=letterbox", [-1, 10, 10, 3], "uint8"))
    assert (box[:2] == 0).all() and (box[-2:] == 0).all()  # black bars above and below
    assert (box[3:7, :4, 0] > 200).all() and (box[3:7, 6:, 2] > 200).all()  # the whole width, squeezed
    stretch = images.load(path, images.parse("raw", [-1, 10, 10, 3], "uint8"))
    assert (stretch[:, :4, 0] > 200).all() and (stretch[:, 6:, 2] > 200).all() and (stretch[0] > 0).any()


@pytest.mark.parametrize("resize", ["letterbox", "crop", "stretch"])
@pytest.mark.parametrize("photo_w, photo_h", [(120, 60), (60, 120), (90, 90)])
def test_a_place_in_the_prepared_input_maps_back_to_the_same_place_in_the_photo(tmp_path, resize, photo_w, photo_h):
    """photo_box: a detector's box on the model's input, as fractions of the photo it came from.
    A white block is found in the prepared input and mapped back onto the photo, where it was drawn."""
    photo = np.zeros((photo_h, photo_w, 3))
    top, left, bottom, right = photo_h * 3 // 8, photo_w * 3 // 8, photo_h * 5 // 8, photo_w * 5 // 8
    photo[top:bottom, left:right] = 255  # inside any crop's window: the centre of the photo
    path = _png(tmp_path / "p.png", photo)
    spec = images.parse(f"raw,resize={resize}", [-1, 48, 48, 3], "uint8")
    x, size = images.load_photo(path, spec)
    assert size == (photo_w, photo_h)
    rows, cols = np.nonzero(x[:, :, 0] > 127)
    found = np.array([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1]) / 48  # ymin, xmin, ymax, xmax
    box_map = images.photo_box(size, spec)
    if resize == "stretch" or photo_w == photo_h:
        assert box_map is None  # the input's fractions are the photo's
        box_map = (1.0, 0.0, 1.0, 0.0)
    ky, oy, kx, ox = box_map
    on_photo = found * [ky, kx, ky, kx] + [oy, ox, oy, ox]
    drawn = np.array([top / photo_h, left / photo_w, bottom / photo_h, right / photo_w])
    assert np.abs(on_photo - drawn).max() <= 2 / 48 * max(photo_w, photo_h) / min(photo_w, photo_h), (on_photo, drawn)


def test_the_camera_orientation_in_exif_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": a portrait photo stored landscape
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "p.jpg", exif=exif)
    spec = images.parse("raw,resize=letterbox", [-1, 40, 40, 3], "uint8")
    x = images.load(tmp_path / "p.jpg", spec)
    assert (x[:, :5] == 0).all() and (x[:, 12:28, 0] > 150).all()  # now upright: 20 wide, 40 high


def test_folders_label_by_sub_folder_numbered_or_by_name(tmp_path):
    px = np.full((4, 4), 100)
    for name in ("dog", "cat", "emu"):
        _png(tmp_path / "named" / name / "a.png", px)
    _png(tmp_path / "named" / "cat" / "b.png", px)
    spec = images.parse("unit", [-1, 1, 4, 4])
    x, labels, classes = images.load_folder(tmp_path / "named", spec)
    assert x.shape == (4, 1, 4, 4) and classes == ["cat", "dog", "emu"]
    assert labels.tolist() == [0, 0, 1, 2]  # cat/a, cat/b, dog/a, emu/a
    for name in ("10", "2", "0"):
        _png(tmp_path / "numbered" / name / "a.png", px)
    _, labels, classes = images.load_folder(tmp_path / "numbered", spec)
    assert labels.tolist() == [0, 10, 2] and classes[10] == "10" and classes[1] == ""  # the numbers are the ids
    _png(tmp_path / "flat" / "a.png", px)
    _, labels, classes = images.load_folder(tmp_path / "flat", spec)
    assert labels is None and classes == []


def test_a_folder_that_cannot_be_read_says_which_file_or_why(tmp_path):
    spec = images.parse("unit", [-1, 1, 4, 4])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="holds no image files"):
        images.load_folder(tmp_path / "empty", spec)
    _png(tmp_path / "mixed" / "a.png", np.zeros((4, 4)))
    _png(tmp_path / "mixed" / "cat" / "b.png", np.zeros((4, 4)))
    with pytest.raises(ImageError, match="both directly and in sub-folders"):
        images.load_folder(tmp_path / "mixed", spec)
    _png(tmp_path / "bad" / "a.png", np.zeros((4, 4)))
    (tmp_path / "bad" / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageError, match=r"cannot read image .*b\.jpg"):
        images.load_folder(tmp_path / "bad", spec)


def test_a_spec_from_a_manifest_is_checked_like_one_from_the_command_line():
    good = images.parse("unit", [-1, 3, 8, 8]).to_dict()
    with pytest.raises(ImageError, match="cannot be read"):
        images.ImageSpec.from_dict({**good, "height": "tall"})
    with pytest.raises(ImageError, match="mean and std need"):
        images.ImageSpec.from_dict({**good, "mean": [0.1, 0.2]})
    with pytest.raises(ImageError, match="out of range"):
        images.ImageSpec.from_dict({**good, "width": 10 ** 6})


def test_an_image_from_the_network_is_prepared_as_a_file_is_within_its_limits(tmp_path):
    """images.decode (pipelines, MQTT and local image requests): the same values as images.load
    for the same bytes; sizes that would take the board's memory are refused before decoding."""
    import io

    rng = np.random.default_rng(0)
    pixels = (rng.random((30, 40, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    spec = images.parse("imagenet", [-1, 3, 16, 16])
    (tmp_path / "p.png").write_bytes(buf.getvalue())
    np.testing.assert_array_equal(images.decode(buf.getvalue(), spec), images.load(tmp_path / "p.png", spec))
    open_size = images.parse("unit,size=3000x3000", [-1, 3, -1, -1])  # a model with an open input size
    with pytest.raises(ImageError, match="prepared at 3000x3000, over the limit of 4194304"):
        images.decode(buf.getvalue(), open_size)
    with pytest.raises(ImageError, match="is 40x30 pixels, over the limit of 100"):
        images.decode(buf.getvalue(), spec, max_pixels=100)


def test_large_jpegs_decode_at_a_reduced_scale_that_still_covers_the_model(tmp_path):
    """jpeg=scaled (the default for new specs): the decoder's DCT scaling instead of every pixel,
    within ~1 % of a full decode; recorded in the spec, and off for specs that predate it."""
    rng = np.random.default_rng(1)
    low = rng.random((31, 41, 3))
    pixels = np.clip(np.repeat(np.repeat(low, 16, 0), 16, 1)[:480, :640] * 255, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "vga.jpg", quality=90)
    Image.fromarray(pixels).save(tmp_path / "vga.png")
    scaled = images.parse("unit", [-1, 3, 32, 32])
    full = images.parse("unit,jpeg=full", [-1, 3, 32, 32])
    assert scaled.jpeg_scaling and not full.jpeg_scaling
    assert images.ImageSpec.from_dict({k: v for k, v in scaled.to_dict().items() if k != "jpeg_scaling"}) \
        .jpeg_scaling is False  # a bundle from before: decoded in full, as it was calibrated
    assert images.ImageSpec.from_dict(scaled.to_dict()).jpeg_scaling is True
    assert "JPEGs decoded at a reduced scale" in images.describe(scaled.to_dict())
    assert "reduced scale" not in images.describe(full.to_dict())
    a, b = images.load(tmp_path / "vga.jpg", scaled), images.load(tmp_path / "vga.jpg", full)
    assert a.shape == b.shape == (3, 32, 32)
    assert 0 < np.abs(a - b).mean() < 0.01  # another path, nearly the same values
    np.testing.assert_array_equal(images.load(tmp_path / "vga.png", scaled), images.load(tmp_path / "vga.png", full))
    # a portrait photo stored landscape (EXIF 6) is still turned, whatever scale it was decoded at
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", quality=90, exif=exif)
    tall = images.parse("unit,size=48x24", [-1, 3, -1, -1])
    turned_scaled = images.load(tmp_path / "turned.jpg", tall)
    turned_full = images.load(tmp_path / "turned.jpg", images.parse("unit,size=48x24,jpeg=full", [-1, 3, -1, -1]))
    assert turned_scaled.shape == (3, 48, 24) and np.abs(turned_scaled - turned_full).mean() < 0.01
