"""How an image file becomes a model's input tensor: one definition for the workstation and the board.

The commonest way to lose accuracy on an edge device is to feed it images prepared
differently from the ones it was calibrated and measured on (another resize, BGR for RGB,
0-255 for 0-1). So the converter takes image folders as calibration and evaluation data
only with an explicit `--preprocess` spec, records the spec in the bundle's manifest
(`preprocessing.image`), and the board's batch jobs (`edgeward infer --model NAME --input
photos/`) apply that same spec with this same code.

A spec is a preset and/or key=value overrides, comma-separated:

    unit                     pixels / 255                        -> [0, 1]
    signed                   pixels / 127.5 - 1                  -> [-1, 1]
    imagenet                 (pixels / 255 - mean) / std, ImageNet's mean and std, resize=crop
    raw                      pixels as they are                  -> [0, 255] (uint8 models too)
    imagenet,color=bgr,resize=stretch
    scale=1/255,mean=0.5,std=0.5,size=96x96
    scale=1/255,mean=0.485:0.456:0.406,std=0.229:0.224:0.225

Keys: scale (a number or 1/N), mean and std (one value, or one per channel joined by ":"), color (rgb, bgr,
gray), resize (stretch: to the size, ignoring the aspect ratio; crop: the shorter side to the
size, then the centre; letterbox: the longer side to the size, the rest black), size (HxW;
by default the model's), layout (nchw, nhwc; by default read off the model's input shape),
jpeg (scaled, the default: a large JPEG is decoded at 1/2, 1/4 or 1/8 of its size where that
still covers the model's; full: every pixel). A value is computed as
(pixel * scale - mean) / std, per channel, in float32.

Pillow decodes the files (EXIF orientation applied). It is imported only here and only when
an image is read: the agent's daemon never loads it, and a board installs it only for image
batch jobs (`pip install pillow`, or the `images` extra).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import ImageError

SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PRESETS = {
    "unit": {"scale": 1 / 255},
    "signed": {"scale": 1 / 127.5, "mean": [1.0], "std": [1.0]},
    "imagenet": {"scale": 1 / 255, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resize": "crop"},
    "raw": {"scale": 1.0},
}
NETWORK_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "PPM")  # what decode() opens: cameras send these
MAX_MESSAGE_PIXELS = 4096 * 4096  # 48 MB decoded in RGB: larger photos are refused, not decoded
MAX_TARGET_PIXELS = 2048 * 2048  # the size a network image is prepared at: 48 MB as float32 RGB
RESIZES = ("stretch", "crop", "letterbox")
JPEG_DECODES = ("scaled", "full")  # jpeg=full: decode every pixel (ImageSpec.jpeg_scaling)
COLORS = ("rgb", "bgr", "gray")
LAYOUTS = ("nchw", "nhwc")
HOW = "a preset (unit, signed, imagenet, raw) and/or key=value pairs, e.g. --preprocess imagenet,resize=stretch"


@dataclass
class ImageSpec:
    """What the bundle's manifest stores under preprocessing.image."""
    height: int
    width: int
    layout: str = "nchw"
    color: str = "rgb"
    resize: str = "stretch"
    scale: float = 1 / 255
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    dtype: str = "float32"
    # JPEGs decoded at 1/2, 1/4 or 1/8 scale where that still covers the model's size (the
    # decoder's DCT scaling): 1.8x faster for a VGA photo into a 128x128 model, 2.3x for
    # 1280x960, values within ~1 % of a full decode. Recorded, because the board must do what
    # calibration did: bundles from before it was an option decode in full.
    jpeg_scaling: bool = False

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    def shape(self) -> list[int]:
        """One sample's shape, without the batch axis."""
        h, w, c = self.height, self.width, self.channels
        return [c, h, w] if self.layout == "nchw" else [h, w, c]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSpec":
        """A spec read back from a manifest (the board's side); refused whole if anything is off."""
        try:
            spec = cls(**{k: d[k] for k in d if k in cls.__dataclass_fields__})
            spec.height, spec.width, spec.scale = int(spec.height), int(spec.width), float(spec.scale)
            spec.mean, spec.std = [float(v) for v in spec.mean], [float(v) for v in spec.std]
        except (TypeError, ValueError, KeyError) as exc:
            raise ImageError(f"the bundle's image preprocessing cannot be read ({exc})",
                             "re-convert the model with --preprocess") from None
        _check(spec)
        return spec


def parse(text: str, input_shape: list[int], input_dtype: str = "float32") -> ImageSpec:
    """The spec for a model input of `input_shape` (batch axis first) from `--preprocess` text."""
    if not text or not text.strip():
        raise ImageError("image data needs --preprocess: how the model was trained to see its pixels", HOW)
    values: dict = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part:
            if part not in PRESETS:
                raise ImageError(f"--preprocess: no preset named {part!r}", HOW)
            values.update(PRESETS[part])
            continue
        key, _, raw = (s.strip() for s in part.partition("="))
        values[key] = _value(key, raw)
    layout, channels, h, w = _layout_of(input_shape, values.get("layout"))
    size = values.pop("size", None)
    if size:
        h, w = size
    if h is None or w is None:
        raise ImageError(f"the model's input {input_shape} does not fix the image size", "add size=HxW to --preprocess")
    color = values.pop("color", "gray" if channels == 1 else "rgb")
    if (color == "gray") != (channels == 1):
        raise ImageError(f"--preprocess color={color} does not fit a model input with {channels} channel(s)",
                         "use color=gray for 1 channel, rgb or bgr for 3")
    values.pop("layout", None)
    n = channels
    mean, std = values.pop("mean", [0.0]), values.pop("std", [1.0])
    jpeg = values.pop("jpeg", "scaled")
    spec = ImageSpec(height=h, width=w, layout=layout, color=color, dtype=input_dtype,
                     mean=mean * n if len(mean) == 1 else mean, std=std * n if len(std) == 1 else std,
                     jpeg_scaling=jpeg == "scaled", **values)
    _check(spec)
    return spec


def _value(key: str, raw: str):
    try:
        if key == "scale":
            num, _, den = raw.partition("/")
            return float(num) / float(den) if den else float(num)
        if key in ("mean", "std"):
            out = [float(v) for v in raw.replace(" ", ":").split(":") if v]
            if key == "std" and any(v == 0 for v in out):
                raise ValueError("std 0")
            return out
        if key == "size":
            h, _, w = raw.lower().partition("x")
            return int(h), int(w or h)
    except ValueError:
        raise ImageError(f"--preprocess {key}={raw!r} is not valid",
                         "scale=1/255, mean=0.485:0.456:0.406, std=0.229:0.224:0.225, size=224x224") from None
    choices = {"resize": RESIZES, "color": COLORS, "layout": LAYOUTS, "jpeg": JPEG_DECODES}.get(key)
    if choices is None:
        raise ImageError(f"--preprocess: no key named {key!r}",
                         "keys: scale, mean, std, color, resize, size, layout, jpeg")
    if raw not in choices:
        raise ImageError(f"--preprocess {key}={raw!r} is not one of {', '.join(choices)}")
    return raw


def _layout_of(shape: list[int], asked: str | None) -> tuple[str, int, int | None, int | None]:
    """(layout, channels, height, width) of a 4-D image input; a size of -1 is left open."""
    if len(shape) != 4:
        raise ImageError(f"image files need a model input of 4 axes (N,C,H,W or N,H,W,C); this one is {shape}",
                         "pass the data as .npz instead")
    fixed = [d if isinstance(d, int) and d > 0 else None for d in shape]
    nchw, nhwc = fixed[1] in (1, 3), fixed[3] in (1, 3)
    layout = asked or ("nchw" if nchw else "nhwc" if nhwc else None)
    if layout == "nchw" and nchw:
        return "nchw", fixed[1], fixed[2], fixed[3]
    if layout == "nhwc" and nhwc:
        return "nhwc", fixed[3], fixed[1], fixed[2]
    raise ImageError(f"the model's input {shape} has no image channel axis (1 or 3 channels) "
                     f"{'for layout ' + asked if asked else 'at axis 1 or 3'}", "pass the data as .npz instead")


def _check(spec: ImageSpec) -> None:
    if spec.layout not in LAYOUTS or spec.color not in COLORS or spec.resize not in RESIZES:
        raise ImageError(f"image preprocessing {spec.layout}/{spec.color}/{spec.resize} is not supported")
    if not (0 < spec.height <= 8192 and 0 < spec.width <= 8192):
        raise ImageError(f"an image size of {spec.height}x{spec.width} is out of range")
    if len(spec.mean) != spec.channels or len(spec.std) != spec.channels or 0 in spec.std:
        raise ImageError(f"mean and std need 1 or {spec.channels} values (std non-zero) for {spec.color} images")
    if spec.dtype not in ("float32", "uint8"):
        raise ImageError(f"image files feed float32 or uint8 model inputs, not {spec.dtype}",
                         "pass the data as .npz instead")
    if spec.dtype == "uint8" and (spec.scale != 1.0 or any(spec.mean) or any(s != 1 for s in spec.std)):
        raise ImageError("a uint8 model input takes the pixels as they are", "use --preprocess raw")


def _pillow():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ImageError("reading image files needs Pillow, which is not installed",
                         "pip install pillow (on a board: pip install 'edgeward[images]')") from None
    return Image, ImageOps


def load(path: str | Path, spec: ImageSpec) -> np.ndarray:
    """One image file as one sample of the model's input (no batch axis), in its layout and dtype."""
    return load_photo(path, spec)[0]


def load_photo(path: str | Path, spec: ImageSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """load(), and the photo's (width, height) as it stands upright (for photo_box)."""
    Image, ImageOps = _pillow()
    try:
        with Image.open(path) as im:
            im = _upright(im, spec, ImageOps)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read image {path}: {exc}", "remove or replace that file") from None
    return _prepared(im, spec, Image), im.size


def photo_box(size: tuple[int, int], spec: ImageSpec) -> tuple[float, float, float, float] | None:
    """How a point's place in the model's input (a detector's box, as fractions of the input)
    becomes its place in the photo of `size` (width, height, upright) it was prepared from:
    (ky, oy, kx, ox) with photo y = y * ky + oy and x = x * kx + ox, as fractions of the photo.
    None where they are the same (a stretch, or a photo of the input's size): letterbox's black
    bars and crop's cut edges are undone, so boxes can be drawn on the photo as it was sent."""
    iw, ih = size
    h, w = spec.height, spec.width
    if (iw, ih) == (w, h) or spec.resize == "stretch" or not iw or not ih:
        return None
    if spec.resize == "crop":
        k = max(w / iw, h / ih)
        nw, nh = max(w, round(iw * k)), max(h, round(ih * k))
        found = (h / nh, ((nh - h) // 2) / nh, w / nw, ((nw - w) // 2) / nw)
    else:  # letterbox
        k = min(w / iw, h / ih)
        nw, nh = max(1, round(iw * k)), max(1, round(ih * k))
        found = (h / nh, -((h - nh) // 2) / nh, w / nw, -((w - nw) // 2) / nw)
    return None if found == (1.0, 0.0, 1.0, 0.0) else found


def decode(data: bytes, spec: ImageSpec, what: str = "the image", max_pixels: int = MAX_MESSAGE_PIXELS) -> np.ndarray:
    """An encoded image received from outside as one sample of the model's input (decode_photo)."""
    return decode_photo(data, spec, what, max_pixels)[0]


def decode_photo(data: bytes, spec: ImageSpec, what: str = "the image",
                 max_pixels: int = MAX_MESSAGE_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """An encoded image received from outside (a camera pipeline's message, a fleet request, a
    local app's) as one sample, prepared as load() prepares a file, and the photo's upright
    (width, height).
    Only the common camera formats are opened (NETWORK_FORMATS: fewer decoders, less attack
    surface), and an image that says it is larger than `max_pixels` is refused before its
    pixels are decoded: a few kB of PNG can claim gigabytes. The size it is prepared at is
    held to MAX_TARGET_PIXELS as well (a model with an open input size takes the size a
    request's spec names)."""
    import io

    if spec.height * spec.width > MAX_TARGET_PIXELS:
        raise ImageError(f"{what} would be prepared at {spec.width}x{spec.height}, over the limit of "
                         f"{MAX_TARGET_PIXELS} pixels", "ask for a smaller size=HxW")
    Image, ImageOps = _pillow()
    try:
        with Image.open(io.BytesIO(data), formats=NETWORK_FORMATS) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{what} is {w}x{h} pixels, over the limit of {max_pixels}",
                                 "send a smaller image (the model takes "
                                 f"{spec.width}x{spec.height})")
            im = _upright(im, spec, ImageOps)
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours
        raise ImageError(f"{what} says it is larger than Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels, over "
                         f"the limit of {max_pixels}", "send a smaller image") from None
    except (OSError, ValueError, SyntaxError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if first.startswith("cannot identify image file"):
            first = "not an image in a format this agent opens"
        raise ImageError(f"{what} cannot be decoded: {first}",
                         f"send one encoded image ({', '.join(NETWORK_FORMATS)}) per message") from None
    return _prepared(im, spec, Image), im.size  # (a JPEG decoded at a reduced scale keeps its proportions)


def _upright(im, spec: ImageSpec, ImageOps):
    """The decoded image turned as its EXIF orientation says, in the spec's colour mode; in
    place where it can be (a 12-megapixel photo is 36 MB per copy)."""
    if spec.jpeg_scaling:  # the file's own orientation is not known yet: keep both sides >= the larger one
        side = max(spec.height, spec.width)
        im.draft(im.mode, (side, side))
    im.load()
    ImageOps.exif_transpose(im, in_place=True)
    mode = "L" if spec.color == "gray" else "RGB"
    return im if im.mode == mode else im.convert(mode)


def _prepared(im, spec: ImageSpec, Image) -> np.ndarray:
    """A decoded image resized, converted and normalised as the spec says."""
    im = _resized(im, spec, Image)
    pixels = np.asarray(im, dtype=np.float32)
    if spec.color == "gray":
        pixels = pixels[:, :, None]
    elif spec.color == "bgr":
        pixels = pixels[:, :, ::-1]
    if spec.dtype == "uint8":
        out = pixels.astype(np.uint8)
    else:
        mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
        out = ((pixels * np.float32(spec.scale) - mean) / std).astype(np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1) if spec.layout == "nchw" else out)


def _resized(im, spec: ImageSpec, Image):
    h, w = spec.height, spec.width
    if im.size == (w, h):
        return im
    if spec.resize == "stretch":
        return im.resize((w, h), Image.BILINEAR)
    iw, ih = im.size
    if spec.resize == "crop":
        k = max(w / iw, h / ih)
        nw, nh = max(w, round(iw * k)), max(h, round(ih * k))
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - w) // 2, (nh - h) // 2
        return im.crop((left, top, left + w, top + h))
    k = min(w / iw, h / ih)  # letterbox
    nw, nh = max(1, round(iw * k)), max(1, round(ih * k))
    canvas = Image.new(im.mode, (w, h))
    canvas.paste(im.resize((nw, nh), Image.BILINEAR), ((w - nw) // 2, (h - nh) // 2))
    return canvas


def is_image(path: Path) -> bool:
    """Whether a file's name says it is an image Pillow reads."""
    return path.suffix.lower() in SUFFIXES


def files_in(folder: Path) -> list[Path]:
    """The image files under `folder`, in a stable order."""
    return sorted(p for p in Path(folder).rglob("*") if is_image(p) and p.is_file())


def spread(files: list, limit: int | None) -> list:
    """At most `limit` of `files`, evenly spaced over the sorted list (so every class folder
    keeps its share), always the same ones for the same folder."""
    if not limit or len(files) <= limit:
        return files
    step = len(files) / limit
    return [files[int(i * step)] for i in range(limit)]


def load_folder(folder: str | Path, spec: ImageSpec, progress=None,
                limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None, list]:
    """(samples, labels, class names by label id) of an image folder. Images in sub-folders are
    labelled by their sub-folder (the layout ImageNet and most tools use): where every
    sub-folder's name starts with a number (0/, 1/ or 07_dog/), that number is the class id;
    otherwise the ids follow the names' order (cat/, dog/ -> 0, 1). Images directly in the
    folder are unlabelled. Both at once is refused: which is meant? With `limit`, at most that
    many images are read (see spread()), so a folder of 50,000 photos does not fill the RAM."""
    folder = Path(folder)
    files = files_in(folder)
    if not files:
        raise ImageError(f"{folder} holds no image files ({', '.join(SUFFIXES)})")
    top = [p for p in files if p.parent == folder]
    if top and len(top) != len(files):
        raise ImageError(f"{folder} holds images both directly and in sub-folders",
                         "put every image in a sub-folder named after its class, or none")
    ids = {} if top else class_ids(sorted({p.relative_to(folder).parts[0] for p in files}))
    files = spread(files, limit)
    samples = np.empty((len(files), *spec.shape()), dtype=spec.dtype)
    for i, path in enumerate(files):
        samples[i] = load(path, spec)
        if progress:
            progress(i + 1, len(files))
    if top:
        return samples, None, []
    labels = np.array([ids[p.relative_to(folder).parts[0]] for p in files], np.int64)
    classes = [""] * (max(ids.values()) + 1)
    for name, i in ids.items():
        classes[i] = name
    return samples, labels, classes


def class_ids(names: list[str]) -> dict[str, int]:
    """Class id by sub-folder name: the leading number of each where all have a distinct one, else name order."""
    import re

    numbers = [re.match(r"\d+", n) for n in names]
    if all(numbers) and len({int(m.group()) for m in numbers}) == len(names):
        return {n: int(m.group()) for n, m in zip(names, numbers)}
    return {n: i for i, n in enumerate(sorted(names))}


def spec_for(model: str, inputs: list[dict], preprocessing: dict | None, preprocess: str | None) -> ImageSpec:
    """How a serving model's images become its input: `preprocess` text if given, else what its
    bundle says (`preprocessing.image`), checked against its one input ({"shape", "dtype"})."""
    if len(inputs) != 1:
        raise ImageError(f"{model} takes {len(inputs)} inputs; images feed a one-input model",
                         "send the inputs as tensors instead")
    spec_in = inputs[0]
    if preprocess:
        spec, whose = parse(preprocess, spec_in["shape"], spec_in["dtype"]), "--preprocess"
    else:
        stored = (preprocessing or {}).get("image")
        if not stored:
            raise ImageError(f"{model}'s bundle does not say how images become its input",
                             "pass --preprocess (e.g. imagenet or unit), or re-convert the model with --preprocess")
        spec, whose = ImageSpec.from_dict(stored), f"{model}'s bundle"
    want = list(spec_in["shape"][1:])
    if len(want) != 3 or any(w not in (-1, g) for w, g in zip(want, spec.shape())):
        raise ImageError(f"{whose} prepares images as {spec.shape()}, {model}'s input takes {want}",
                         "leave size= out of --preprocess, or set it to the model's" if preprocess else
                         "re-convert the model with --preprocess, or pass --preprocess here")
    return spec


def describe(spec: dict, classes: list | None = None) -> str:
    """One line for reports: how images become the input, and the classes."""
    s = ImageSpec.from_dict(spec)
    norm = f"(pixel * {s.scale:.6g} - mean {_short(s.mean)}) / std {_short(s.std)}" if s.dtype == "float32" \
        else "pixels as they are"
    line = f"{s.width}x{s.height} {s.color} {s.layout.upper()} {s.dtype}, resize {s.resize}, {norm}"
    if s.jpeg_scaling:
        line += ", JPEGs decoded at a reduced scale"
    if classes:
        line += f"; {describe_classes(classes)}"
    return line


def describe_classes(classes: list) -> str:
    """The bundle's class names in a few words: "3 classes (red, green, blue)"."""
    named = [c for c in classes if c]
    shown = ", ".join(named[:4]) + (f", ... {named[-1]}" if len(named) > 4 else "")
    return f"{len(named)} classes ({shown})"


COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60)]  # one per class id, repeating: distinct on photos


def draw_detections(path: str | Path, found: list[dict], out: str | Path) -> None:
    """The photo at `path`, upright, with each detection's box (as fractions of the photo, as
    answers give them) drawn in its class's colour and labelled with its class and score,
    written to `out` (its format by its suffix) through a temporary file."""
    Image, ImageOps = _pillow()
    from PIL import ImageDraw

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read image {path}: {exc}", "remove or replace that file") from None
    draw = ImageDraw.Draw(im)
    w, h = im.size
    line = max(1, round(min(w, h) / 160))
    for d in found:
        ymin, xmin, ymax, xmax = d["box"]
        colour = COLOURS[d["class_id"] % len(COLOURS)] if d["class_id"] >= 0 else (255, 255, 255)
        draw.rectangle([xmin * w, ymin * h, xmax * w, ymax * h], outline=colour, width=line)
        draw.text((xmin * w + line + 1, ymin * h + line), f"{d.get('class', d['class_id'])} {d['score']:.2f}",
                  fill=colour)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        im.save(tmp, format=Image.registered_extensions().get(out.suffix.lower(), "PNG"))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _short(values: list[float]) -> str:
    return ":".join(f"{v:.4g}" for v in values) if len(set(values)) > 1 else f"{values[0]:.4g}"
