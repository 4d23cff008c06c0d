"""Datasets for the training script: Cityscapes, ADE20K and procedural scenes.

Every dataset exposes the same small interface: ``len(ds)``, ``ds.load(i)`` ->
``(image (H, W, 3) uint8, label (H, W) uint8)``, ``ds.name(i)``,
``ds.class_names``, ``ds.palette`` and ``ds.num_classes``. Labels are train ids
in ``[0, C)`` with :data:`IGNORE_INDEX` (255) for unlabeled pixels.

:class:`TrainView` and :class:`EvalView` turn a dataset into tensors for a
``DataLoader``; the training view draws its augmentation (random scale, crop,
flip) from a generator seeded by ``(seed, epoch, index)``, so a batch depends
on nothing but its position in the schedule: not on the number of workers, not
on the process's random state, and the same after a resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

__all__ = [
    "IGNORE_INDEX",
    "DatasetError",
    "CityscapesDataset",
    "ADE20KDataset",
    "SyntheticScenes",
    "look_shares",
    "build_dataset",
    "default_crop",
    "TrainView",
    "EvalView",
    "ScheduleSampler",
    "colorize",
    "export_synthetic",
    "CITYSCAPES_EVAL_IDS",
    "cityscapes_id_to_train_id",
]

IGNORE_INDEX = 255
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255  # ImageNet statistics
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255


class DatasetError(Exception):
    """A dataset on disk is missing, incomplete or unreadable; the message names the file."""


# ----------------------------------------------------------------------------- class tables

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
assert len(CITYSCAPES_CLASSES) == 19 and len(ADE20K_CLASSES) == 150
# Cityscapes labelIds (0-33, as in *_gtFine_labelIds.png) of the 19 evaluated classes, in train-id
# order (the table of cityscapesscripts' helpers/labels.py); every other id is ignored (255)
CITYSCAPES_EVAL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_NUM_IDS = 34  # labelIds 0 (unlabeled) to 33 (bicycle)


def cityscapes_id_to_train_id() -> np.ndarray:
    """``(34,)`` uint8 lookup table: labelId -> trainId (255 for the ids that are not evaluated)."""
    table = np.full(CITYSCAPES_NUM_IDS, IGNORE_INDEX, np.uint8)
    table[list(CITYSCAPES_EVAL_IDS)] = np.arange(len(CITYSCAPES_EVAL_IDS), dtype=np.uint8)
    return table


SYNTHETIC_CLASSES = ("sky", "ground", "building", "tree", "fence", "car", "sign", "ball")
SYNTHETIC_PALETTE = (
    (70, 130, 180), (152, 121, 82), (70, 70, 70), (107, 142, 35), (190, 153, 153),
    (0, 0, 142), (220, 220, 0), (220, 20, 60),
)  # fmt: skip


def generated_palette(n: int) -> Tuple[Tuple[int, int, int], ...]:
    """The PASCAL VOC colour map: distinct colours from the bits of the class id."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i + 1  # skip black, which reads as "unlabeled"
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


def colorize(label: np.ndarray, palette: Sequence[Tuple[int, int, int]]) -> np.ndarray:
    """``(H, W)`` class ids -> ``(H, W, 3)`` uint8 colours; ignored pixels are black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return table[label.astype(np.int64).clip(0, 255)]


# ----------------------------------------------------------------------------- files on disk


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - the train extra installs it
        raise ImportError("reading image files needs pillow: pip install 'protoseg_ext[train]'") from e
    return Image


def read_image(path: Path) -> np.ndarray:
    """An RGB image file as ``(H, W, 3)`` uint8; an unreadable file raises :class:`DatasetError`."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from None


def read_label(path: Path, num_classes: int, shift: bool = False, id_table: Optional[np.ndarray] = None) -> np.ndarray:
    """A single-channel label file as ``(H, W)`` uint8 train ids.

    ``shift`` (ADE20K): file value 0 is "other" and becomes IGNORE_INDEX, value
    v > 0 becomes class v - 1. ``id_table`` (Cityscapes labelIds): file value v
    in ``[0, len(id_table))`` becomes ``id_table[v]``. Values outside ``[0, C)``
    that are not ignored (or outside the id table) raise :class:`DatasetError`,
    naming the file.
    """
    Image = _pil()
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DatasetError(f"label {path} has mode {im.mode}: expected a single-channel image of class ids")
            label = np.asarray(im).astype(np.int64)
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read label {path}: {e}") from None
    if id_table is not None:
        bad = (label < 0) | (label >= len(id_table))
        if bad.any():
            raise DatasetError(
                f"label {path} holds value {int(label[bad][0])}: expected Cityscapes labelIds in [0, {len(id_table)})"
            )
        return id_table[label]
    if shift:
        label = np.where(label == 0, IGNORE_INDEX + 1, label) - 1
    bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= num_classes))
    if bad.any():
        raise DatasetError(
            f"label {path} holds value {int(label[bad][0]) + int(shift)}: expected train ids in [0, {num_classes}) "
            f"or {IGNORE_INDEX} (ignored)"
        )
    return label.astype(np.uint8)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"missing directory {path} ({what})")


class _FileDataset:
    """Pairs of image and label files, checked when the dataset is built."""

    num_classes: int
    class_names: Tuple[str, ...]
    palette: Tuple[Tuple[int, int, int], ...]
    shift_labels = False

    def __init__(self, pairs: List[Tuple[Path, Path]], where: Path):
        if not pairs:
            raise DatasetError(f"no images found in {where}")
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, i: int) -> str:
        return self.pairs[i][0].stem

    def id_table_of(self, label_path: Path) -> Optional[np.ndarray]:
        """File value -> train id for this label file, when the file holds another id space."""
        return None

    def check_labels(self, threads: int = 1) -> None:
        """Read every label file once: a file that cannot be read, or holds a value outside
        the classes, raises :class:`DatasetError` naming it (before any training)."""
        from concurrent.futures import ThreadPoolExecutor

        def check(pair):
            read_label(pair[1], self.num_classes, self.shift_labels, self.id_table_of(pair[1]))

        with ThreadPoolExecutor(max(1, threads)) as pool:
            for _ in pool.map(check, self.pairs):
                pass

    def load(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        img_path, lbl_path = self.pairs[i]
        image = read_image(img_path)
        label = read_label(lbl_path, self.num_classes, self.shift_labels, self.id_table_of(lbl_path))
        if image.shape[:2] != label.shape:
            raise DatasetError(
                f"image {img_path} is {image.shape[1]}x{image.shape[0]} but its label {lbl_path} is "
                f"{label.shape[1]}x{label.shape[0]}"
            )
        return image, label


class CityscapesDataset(_FileDataset):
    """Cityscapes: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with, for each image,
    ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (19 classes, 255 ignored) or, as
    downloaded, ``*_gtFine_labelIds.png`` mapped through the official labelId -> trainId
    table (:data:`CITYSCAPES_EVAL_IDS`; every other id is ignored)."""

    num_classes = 19
    class_names = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE

    def __init__(self, root, split: str = "train"):
        root = Path(root)
        img_dir, lbl_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        _require_dir(img_dir, "Cityscapes images: leftImg8bit/<split>/<city>/*_leftImg8bit.png")
        _require_dir(lbl_dir, "Cityscapes labels: gtFine/<split>/<city>/*_gtFine_labelTrainIds.png or *_gtFine_labelIds.png")
        pairs = []
        for img in sorted(img_dir.glob("*/*_leftImg8bit.png")):
            stem = lbl_dir / img.parent.name / img.name[: -len("_leftImg8bit.png")]
            train_ids, ids = Path(f"{stem}_gtFine_labelTrainIds.png"), Path(f"{stem}_gtFine_labelIds.png")
            if train_ids.is_file():
                pairs.append((img, train_ids))
            elif ids.is_file():
                pairs.append((img, ids))
            else:
                raise DatasetError(f"image {img} has no label: expected {train_ids} or {ids}")
        super().__init__(pairs, img_dir)
        self._id_table = cityscapes_id_to_train_id()

    def id_table_of(self, label_path: Path) -> Optional[np.ndarray]:
        return self._id_table if label_path.name.endswith("_gtFine_labelIds.png") else None

    def name(self, i: int) -> str:
        return self.pairs[i][0].name[: -len("_leftImg8bit.png")]


class ADE20KDataset(_FileDataset):
    """ADE20K (SceneParsing): ``ADEChallengeData2016/images/<split>/*.jpg`` with
    ``annotations/<split>/*.png`` (150 classes; file value 0 is ignored, v becomes v - 1)."""

    num_classes = 150
    class_names = ADE20K_CLASSES
    palette = generated_palette(150)
    shift_labels = True

    def __init__(self, root, split: str = "training"):
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        img_dir, lbl_dir = root / "images" / split, root / "annotations" / split
        _require_dir(img_dir, "ADE20K images: ADEChallengeData2016/images/<split>/*.jpg")
        _require_dir(lbl_dir, "ADE20K labels: ADEChallengeData2016/annotations/<split>/*.png")
        pairs = []
        for img in sorted(img_dir.glob("*.jpg")):
            lbl = lbl_dir / f"{img.stem}.png"
            if not lbl.is_file():
                raise DatasetError(f"image {img} has no label: expected {lbl}")
            pairs.append((img, lbl))
        super().__init__(pairs, img_dir)


# ----------------------------------------------------------------------------- procedural scenes


class SyntheticScenes:
    """Procedural street-like scenes: 8 classes, each with its own shape and texture.

    Sky (vertical gradient) over ground (grainy, low-frequency noise) split at a
    random horizon; buildings (grey boxes with a grid of windows) standing on
    it; trees (clusters of discs, speckled green); a fence (band of vertical
    slats); cars (dark-wheeled boxes of random colour); signs (triangles with a
    border); balls (shaded discs). Colours, sizes and positions are jittered, so
    no single cue gives the class away. Image ``i`` of a split depends only on
    ``(seed, split, i, looks)``.

    ``looks`` (1 to 3): with more than one, every class comes in that many
    distinct looks (colour, texture and shape), drawn per object in uneven
    shares (:func:`look_shares`; 3 looks: 57%, 29%, 14% of the objects), e.g.
    sky blue, overcast or sunset; ground earth, asphalt or sand; buildings grey
    blocks, brick houses or glass towers; cars, buses or small round cars. A
    class then has several sub-centres for its K prototypes to find.
    :meth:`load_looks` gives the look of every pixel.
    """

    num_classes = len(SYNTHETIC_CLASSES)
    class_names = SYNTHETIC_CLASSES
    palette = SYNTHETIC_PALETTE

    def __init__(
        self, split: str = "train", size: Tuple[int, int] = (128, 256), count: int = 256, seed: int = 0, looks: int = 1
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        look_shares(looks)  # checks it
        self.split, self.size, self.count, self.seed, self.looks = split, tuple(size), count, seed, int(looks)

    def __len__(self) -> int:
        return self.count

    def name(self, i: int) -> str:
        return f"synthetic_{self.split}_{i:05d}"

    def load(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.load_looks(i)[:2]

    def load_looks(self, i: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image, label, look (H, W) uint8)``: :meth:`load` and the look of every pixel."""
        if not 0 <= i < self.count:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, i])
        return render_scene(rng, *self.size, looks=self.looks, return_looks=True)


def _noise(rng: np.random.Generator, H: int, W: int, cell: int) -> np.ndarray:
    """Smooth value noise in [0, 1]: a random grid of ``cell`` pixels, bilinearly upsampled."""
    gh, gw = H // cell + 2, W // cell + 2
    grid = rng.random((gh, gw), dtype=np.float32)
    y = np.arange(H, dtype=np.float32) / cell
    x = np.arange(W, dtype=np.float32) / cell
    y0, x0 = y.astype(np.int64), x.astype(np.int64)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    a = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    b = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return a * (1 - fy) + b * fy


MAX_LOOKS = 3


def look_shares(looks: int) -> np.ndarray:
    """How often each look of a class is drawn: ``2^-k``, normalised (3 looks: 4/7, 2/7, 1/7)."""
    if isinstance(looks, bool) or not isinstance(looks, (int, np.integer)) or not 1 <= looks <= MAX_LOOKS:
        raise ValueError(f"looks must be an int in [1, {MAX_LOOKS}], got {looks!r}")
    w = 0.5 ** np.arange(looks)
    return w / w.sum()


class _Canvas:
    """A scene being painted: the pixel grids, the image, label and look arrays, and the scene's random draws."""

    def __init__(self, rng: np.random.Generator, H: int, W: int, looks: int):
        self.rng, self.H, self.W, self.looks = rng, H, W, looks
        self.shares = look_shares(looks)
        self.yy, self.xx = np.mgrid[0:H, 0:W].astype(np.float32)
        self.img = np.zeros((H, W, 3), np.float32)
        self.lbl = np.zeros((H, W), np.uint8)
        self.lk = np.zeros((H, W), np.uint8)
        self.s = min(H, W)  # the unit of object sizes
        self.look = 0  # the look of the object being painted

    def pick(self) -> int:
        """Draw the next object's look (no draw with one look)."""
        self.look = int(self.rng.choice(self.looks, p=self.shares)) if self.looks > 1 else 0
        return self.look

    def paint(self, mask, colour, c):
        """Paint class ``c`` in the current look where ``mask`` holds: a colour per pixel or one for all."""
        self.img[mask] = colour[mask] if colour.ndim == 3 else colour
        self.lbl[mask] = c
        self.lk[mask] = self.look

    def jitter(self, rgb, amount=25.0):
        """``rgb`` moved by up to ``amount`` on each channel, within [0, 255]."""
        return np.clip(np.asarray(rgb, np.float32) + self.rng.uniform(-amount, amount, 3), 0, 255)

    def full(self, rgb):
        """``rgb`` at every pixel: an (H, W, 3) image."""
        return np.asarray(rgb, np.float32) + np.zeros((self.H, self.W, 3), np.float32)


def _paint_sky(cv: _Canvas, horizon: float) -> None:
    """Class 0 above the horizon: a blue gradient, an overcast grey or a sunset."""
    rng, H, W, s, yy, jitter = cv.rng, cv.H, cv.W, cv.s, cv.yy, cv.jitter
    look = cv.pick()
    t = (yy / max(horizon, 1.0)).clip(0, 1)[..., None]
    if look == 0:  # sky: vertical gradient from a jittered blue to a paler one
        top, bottom = jitter((60, 110, 190)), jitter((170, 200, 235))
        cv.paint(yy < horizon, top * (1 - t) + bottom * t, 0)
    elif look == 1:  # overcast: flat pale grey with soft clouds
        clouds = _noise(rng, H, W, max(4, s // 4))[..., None]
        cv.paint(yy < horizon, jitter((190, 190, 198), 15) * (0.85 + 0.3 * clouds), 0)
    else:  # sunset: orange at the horizon up to purple
        top, bottom = jitter((110, 50, 120), 15), jitter((245, 150, 60), 15)
        cv.paint(yy < horizon, top * (1 - t) + bottom * t, 0)


def _paint_ground(cv: _Canvas, horizon: float) -> None:
    """Class 1 below the horizon: earth, asphalt with dashes, or rippled sand."""
    rng, H, W, s, yy, xx, jitter = cv.rng, cv.H, cv.W, cv.s, cv.yy, cv.xx, cv.jitter
    look = cv.pick()
    if look == 0:  # ground: brown, grainy, with low-frequency blotches
        grain = rng.normal(0, 12, (H, W, 1)).astype(np.float32)
        blotch = _noise(rng, H, W, max(4, s // 6))[..., None]
        cv.paint(yy >= horizon, jitter((140, 115, 80)) * (0.75 + 0.5 * blotch) + grain, 1)
    elif look == 1:  # asphalt: dark grey, fine grain, white dashes along the middle
        grain = rng.normal(0, 6, (H, W, 1)).astype(np.float32)
        road = jitter((70, 70, 76), 10) + grain
        mid = horizon + rng.uniform(0.3, 0.7) * (H - horizon)
        dash = (np.abs(yy - mid) < 0.02 * s + 0.5) & ((xx + rng.uniform(0, W)) % (0.2 * W) < 0.1 * W)
        cv.paint(yy >= horizon, np.where(dash[..., None], np.float32(235), road), 1)
    else:  # sand: pale yellow with wind ripples
        ripple = np.sin((yy + 0.3 * xx) / max(1.0, 0.03 * s))[..., None]
        cv.paint(yy >= horizon, jitter((215, 190, 135), 15) * (0.92 + 0.08 * ripple), 1)


def _paint_buildings(cv: _Canvas, horizon: float) -> None:
    """Class 2: one to three boxes on the horizon (office block, brick house, glass tower)."""
    rng, H, W, s, yy, xx, jitter = cv.rng, cv.H, cv.W, cv.s, cv.yy, cv.xx, cv.jitter
    for _ in range(rng.integers(1, 4)):
        look = cv.pick()
        w, h = rng.uniform(0.15, 0.4) * W, rng.uniform(0.2, 0.5) * H
        x0 = rng.uniform(-0.1, 0.9) * W
        y1 = horizon + rng.uniform(0, 0.05) * H
        if look == 0:  # grey with a grid of dark windows
            box = (xx >= x0) & (xx < x0 + w) & (yy >= y1 - h) & (yy < y1)
            pitch = rng.uniform(0.06, 0.12) * s
            window = ((xx - x0) % pitch < 0.55 * pitch) & ((yy - y1) % pitch < 0.5 * pitch)
            grey = jitter((110, 110, 115), 30)
            cv.paint(box, np.where(window[..., None], grey * 0.35, grey), 2)
        elif look == 1:  # brick house: red, brick courses, a triangular roof
            box = (xx >= x0) & (xx < x0 + w) & (yy >= y1 - 0.7 * h) & (yy < y1)
            roof = (yy >= y1 - h) & (yy < y1 - 0.7 * h) & (np.abs(xx - x0 - w / 2) < (yy - y1 + h) / (0.3 * h) * w / 2)
            course = max(2.0, 0.03 * s)
            mortar = (yy - y1) % course < 0.3 * course
            brick = jitter((160, 65, 45), 15)
            cv.paint(box | roof, np.where(mortar[..., None], brick * 0.55 + 60, brick), 2)
        else:  # glass tower: narrow, tall, teal with vertical bands
            w = 0.45 * w
            box = (xx >= x0) & (xx < x0 + w) & (yy >= y1 - 1.6 * h) & (yy < y1)
            band = (xx - x0) % max(2.0, 0.04 * s) < max(1.0, 0.015 * s)
            glass = jitter((60, 150, 160), 15) * (0.8 + 0.4 * (yy / H))[..., None]
            cv.paint(box, np.where(band[..., None], glass * 0.5, glass), 2)


def _paint_trees(cv: _Canvas, horizon: float) -> None:
    """Class 3: up to three trees near the horizon (green or autumn blobs, or a conifer)."""
    rng, H, W, s, yy, xx, jitter = cv.rng, cv.H, cv.W, cv.s, cv.yy, cv.xx, cv.jitter
    for _ in range(rng.integers(0, 4)):
        look = cv.pick()
        cx, cy = rng.uniform(0, W), horizon - rng.uniform(0, 0.15) * H
        r = rng.uniform(0.08, 0.18) * s
        if look == 2:  # conifer: a tall dark blue-green triangle
            up = (yy - cy + 1.5 * r) / (2.5 * r)  # 0 at the tip, 1 at the base
            crown = (up >= 0) & (up <= 1) & (np.abs(xx - cx) <= up * 0.6 * r)
            cv.paint(crown, jitter((25, 65, 60), 10) * (0.8 + 0.4 * rng.random((H, W, 1), dtype=np.float32)), 3)
            continue
        blob = np.zeros((H, W), bool)
        for _ in range(4):
            ox, oy = rng.normal(0, 0.6 * r, 2)
            blob |= (xx - cx - ox) ** 2 + (yy - cy - oy) ** 2 < (r * rng.uniform(0.6, 1.0)) ** 2
        base = (60, 120, 40) if look == 0 else (210, 110, 30)  # green, or autumn orange
        leaves = jitter(base, 20) * (0.6 + 0.6 * rng.random((H, W, 1), dtype=np.float32))
        cv.paint(blob, leaves, 3)


def _paint_fence(cv: _Canvas, horizon: float) -> None:
    """Class 4, in 60% of the scenes: a band across the horizon (slats, metal mesh or boards)."""
    rng, H, W, s, yy, xx, jitter = cv.rng, cv.H, cv.W, cv.s, cv.yy, cv.xx, cv.jitter
    if rng.random() >= 0.6:
        return
    look = cv.pick()
    y1 = horizon + rng.uniform(0.02, 0.12) * H
    h = rng.uniform(0.06, 0.15) * H
    x0, x1 = sorted(rng.uniform(0, W, 2))
    pitch = rng.uniform(0.03, 0.06) * s
    span = (yy >= y1 - h) & (yy < y1) & (xx >= x0) & (xx < x1 + 0.2 * W)
    if look == 0:  # light vertical slats on a rail
        slats = ((xx - x0) % pitch < 0.5 * pitch) & span
        rail = (np.abs(yy - (y1 - 0.7 * h)) < 0.1 * h) & (xx >= x0) & (xx < x1 + 0.2 * W)
        cv.paint(slats | rail, jitter((200, 170, 150), 20), 4)
    elif look == 1:  # dark metal mesh: a diagonal lattice
        mesh = (((xx + yy) % pitch < 0.25 * pitch) | ((xx - yy) % pitch < 0.25 * pitch)) & span
        cv.paint(mesh, jitter((45, 50, 60), 10), 4)
    else:  # solid wooden boards, horizontal, with dark seams
        seam = (yy - y1) % max(2.0, 0.3 * h) < 1
        wood = jitter((135, 80, 35), 15)
        cv.paint(span, np.where(seam[..., None], wood * 0.5, wood), 4)


def _paint_cars(cv: _Canvas, horizon: float) -> None:
    """Class 5: up to two vehicles on the ground (car, bus or small round car), each on two wheels."""
    rng, H, W, yy, xx, jitter = cv.rng, cv.H, cv.W, cv.yy, cv.xx, cv.jitter
    for _ in range(rng.integers(0, 3)):
        look = cv.pick()
        w = rng.uniform(0.12, 0.25) * W
        h = w * rng.uniform(0.35, 0.5)
        x0 = rng.uniform(-0.05, 0.95) * W - w / 2
        y1 = rng.uniform(horizon + 0.1 * (H - horizon), H)
        r = 0.22 * h
        if look == 0:  # a body of random colour with a cabin and two dark wheels
            body = (xx >= x0) & (xx < x0 + w) & (yy >= y1 - h) & (yy < y1 - 0.2 * h)
            cabin = (xx >= x0 + 0.2 * w) & (xx < x0 + 0.75 * w) & (yy >= y1 - 1.45 * h) & (yy < y1 - h)
            wx = (0.22, 0.78)
            colour = rng.uniform(30, 230, 3).astype(np.float32)
            shade = np.where(cabin[..., None], colour * 0.6 + 60, colour)
            cv.paint(body | cabin, shade, 5)
        elif look == 1:  # bus: long, tall, yellow, a row of windows
            w = 1.8 * w
            body = (xx >= x0) & (xx < x0 + w) & (yy >= y1 - 1.6 * h) & (yy < y1 - 0.2 * h)
            win = body & (yy < y1 - 1.0 * h) & (yy >= y1 - 1.4 * h) & ((xx - x0) % (0.12 * w) < 0.08 * w)
            wx = (0.15, 0.85)
            yellow = jitter((235, 185, 25), 15)
            cv.paint(body, np.where(win[..., None], np.float32([40, 50, 70]), yellow), 5)
        else:  # small round car: a silver ellipse with a dark window band
            cy = y1 - 0.7 * h
            body = ((xx - x0 - w / 2) / (0.45 * w)) ** 2 + ((yy - cy) / (0.6 * h)) ** 2 < 1
            win = body & (yy < cy - 0.15 * h) & (yy > cy - 0.35 * h)
            wx = (0.25, 0.75)
            silver = jitter((240, 240, 244), 8)
            cv.paint(body, np.where(win[..., None], np.float32([30, 30, 40]), silver), 5)
        wheels = ((xx - x0 - wx[0] * w) ** 2 + (yy - y1 + r) ** 2 < r**2) | (
            (xx - x0 - wx[1] * w) ** 2 + (yy - y1 + r) ** 2 < r**2
        )
        cv.paint(wheels, cv.full((25, 25, 25)), 5)


def _paint_signs(cv: _Canvas, horizon: float) -> None:
    """Class 6: up to two signs on the ground (warning triangle, blue disc, green plate)."""
    rng, H, W, s, yy, xx, jitter = cv.rng, cv.H, cv.W, cv.s, cv.yy, cv.xx, cv.jitter
    for _ in range(rng.integers(0, 3)):
        look = cv.pick()
        cx, cy = rng.uniform(0, W), rng.uniform(horizon - 0.1 * H, H)
        r = rng.uniform(0.07, 0.13) * s
        if look == 0:  # yellow or red triangles with a dark border
            up = (yy - cy) / r + 0.5  # 0 at the apex, 1.5 at the base
            inside = (up >= 0) & (up <= 1.5) & (np.abs(xx - cx) <= up * r * 0.7)
            inner = (up >= 0.3) & (up <= 1.3) & (np.abs(xx - cx) <= (up - 0.15) * r * 0.55)
            face = jitter((230, 200, 30) if rng.random() < 0.5 else (210, 40, 40), 15)
            cv.paint(inside, np.where(inner[..., None], face, np.float32([30, 30, 30])), 6)
        elif look == 1:  # blue disc with a white bar
            d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / r**2
            bar = (np.abs(yy - cy) < 0.18 * r) & (np.abs(xx - cx) < 0.6 * r)
            cv.paint(d2 < 1, np.where(bar[..., None], np.float32(240), jitter((30, 70, 200), 15)), 6)
        else:  # green plate with white lines of text
            plate = (np.abs(xx - cx) < 1.1 * r) & (np.abs(yy - cy) < 0.55 * r)
            text = plate & ((yy - cy) % (0.35 * r) < 0.12 * r) & (np.abs(xx - cx) < 0.85 * r)
            cv.paint(plate, np.where(text[..., None], np.float32(235), jitter((20, 120, 60), 15)), 6)


def _paint_balls(cv: _Canvas) -> None:
    """Class 7: up to three balls anywhere, lit from the top left (plain disc, football, ring)."""
    rng, H, W, s, yy, xx, jitter = cv.rng, cv.H, cv.W, cv.s, cv.yy, cv.xx, cv.jitter
    for _ in range(rng.integers(0, 4)):
        look = cv.pick()
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        r = rng.uniform(0.05, 0.11) * s
        d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / r**2
        light = 1.3 - 0.8 * np.sqrt((((xx - cx + 0.4 * r) ** 2 + (yy - cy + 0.4 * r) ** 2) / r**2).clip(0, 4)) / 2
        if look == 0:  # discs of random colour lit from the top left
            colour = rng.uniform(60, 255, 3).astype(np.float32) * light[..., None]
            cv.paint(d2 < 1, colour, 7)
        elif look == 1:  # football: white with black patches
            patch = np.sin(3.0 * (xx - cx) / r) * np.sin(3.0 * (yy - cy) / r) > 0.55
            colour = np.where(patch[..., None], np.float32(20), jitter((235, 235, 235), 10)) * light[..., None]
            cv.paint(d2 < 1, colour, 7)
        else:  # ring: an orange torus
            cv.paint((d2 < 1) & (d2 > 0.3), jitter((245, 125, 20), 10) * light[..., None], 7)


def render_scene(rng: np.random.Generator, H: int, W: int, looks: int = 1, return_looks: bool = False):
    """One scene: ``(image (H, W, 3) uint8, label (H, W) uint8)``.

    ``looks`` (1 to 3): each object (the sky and the ground: each image) takes
    one of its class's first ``looks`` looks, drawn with the shares of
    :func:`look_shares`; the looks of a class differ in colour, texture and
    shape (look 0 is the one-look scene, which ``looks=1`` renders exactly as
    before). ``return_looks`` adds a third array, ``(H, W)`` uint8: the look of
    every pixel.
    """
    cv = _Canvas(rng, H, W, looks)
    horizon = rng.uniform(0.35, 0.6) * H
    # back to front, each painted over what is behind it: the draws' order fixes the scene of a seed
    for paint in (_paint_sky, _paint_ground, _paint_buildings, _paint_trees, _paint_fence, _paint_cars,
                  _paint_signs):
        paint(cv, horizon)
    _paint_balls(cv)
    # global brightness, contrast and sensor noise
    img = cv.img
    img = img * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20) + rng.normal(0, 4, img.shape).astype(np.float32)
    out = np.clip(img, 0, 255).astype(np.uint8), cv.lbl
    return (*out, cv.lk) if return_looks else out


# ----------------------------------------------------------------------------- building blocks

DEFAULT_CROPS = {"cityscapes": (256, 512), "ade20k": (256, 256)}


def build_dataset(
    name: str, split: str, root: Optional[str] = None, synthetic_size=(128, 256), synthetic_count=None, seed=0,
    synthetic_looks: int = 1,
):  # fmt: skip
    """The ``train`` or ``val`` split of ``name`` ("synthetic", "cityscapes" or "ade20k")."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name == "synthetic":
        count = (synthetic_count or (256, 32))[0 if split == "train" else 1]
        return SyntheticScenes(split, synthetic_size, count, seed, synthetic_looks)
    if root is None:
        raise DatasetError(f"--dataset {name} needs --data-root")
    if name == "cityscapes":
        return CityscapesDataset(root, split)
    if name == "ade20k":
        return ADE20KDataset(root, "training" if split == "train" else "validation")
    raise ValueError(f"unknown dataset {name!r}")


def default_crop(name: str, synthetic_size=(128, 256)) -> Tuple[int, int]:
    """Training crop ``(H, W)``: the image size for synthetic scenes, else a CPU-friendly crop."""
    return tuple(synthetic_size) if name == "synthetic" else DEFAULT_CROPS[name]


def to_tensors(image: np.ndarray, label: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(H, W, 3)`` uint8, ``(H, W)`` uint8 -> normalised ``(3, H, W)`` float32, ``(H, W)`` int64."""
    x = (image.astype(np.float32) - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), torch.from_numpy(label.astype(np.int64))


def random_scale_crop_flip(image, label, rng, crop, scale_range=(0.5, 2.0), flip=True, aspect_range=(1.0, 1.0),
                           brightness=0):  # fmt: skip
    """Official augmentation: resize by a random factor, pad to the crop (label: ignored),
    take a random crop, flip horizontally with probability 1/2, shift the brightness.

    ``aspect_range`` (official Cityscapes 0.9-1.1): the resize draws an aspect
    ratio ``a`` too and scales the width by ``sqrt(a) * s``, the height by
    ``s / sqrt(a)`` (the official RandomResize). ``brightness`` (official 10):
    an integer shift drawn from ``[-brightness, brightness]`` added to every
    channel, clipped to [0, 255] (the official RandomBrightness). Their defaults
    draw nothing, so the other settings' random streams are unchanged."""
    Image = _pil()
    ch, cw = crop
    s = rng.uniform(*scale_range)
    sh = sw = s
    if tuple(aspect_range) != (1.0, 1.0):
        a = rng.uniform(*aspect_range)
        sh, sw = s / np.sqrt(a), s * np.sqrt(a)
    h, w = label.shape
    nh, nw = max(1, int(round(h * sh))), max(1, int(round(w * sw)))
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
    ph, pw = max(ch - nh, 0), max(cw - nw, 0)
    if ph or pw:  # pad with the mean colour (0 after normalisation) and ignored labels
        image = np.concatenate([image, np.broadcast_to(MEAN.astype(np.uint8), (nh, pw, 3))], 1) if pw else image
        image = np.concatenate([image, np.broadcast_to(MEAN.astype(np.uint8), (ph, nw + pw, 3))], 0) if ph else image
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
    y = int(rng.integers(0, label.shape[0] - ch + 1))
    x = int(rng.integers(0, label.shape[1] - cw + 1))
    image, label = image[y : y + ch, x : x + cw], label[y : y + ch, x : x + cw]
    if flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    if brightness:
        shift = int(rng.integers(-brightness, brightness + 1))
        image = np.clip(image.astype(np.int16) + shift, 0, 255).astype(np.uint8)
    return image, label


class TrainView(Dataset):
    """Augmented training samples. Indexed by ``(i, epoch)`` (see :class:`ScheduleSampler`):
    the augmentation of image ``i`` in ``epoch`` comes from a generator seeded by
    ``(seed, epoch, i)``."""

    def __init__(self, base, crop, scale_range=(0.5, 2.0), flip=True, seed=0, aspect_range=(1.0, 1.0), brightness=0):
        self.base, self.crop, self.scale_range, self.flip, self.seed = base, tuple(crop), scale_range, flip, seed
        self.aspect_range, self.brightness = tuple(aspect_range), int(brightness)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        i, epoch = key
        image, label = self.base.load(i)
        rng = np.random.default_rng([self.seed, epoch, i])
        image, label = random_scale_crop_flip(image, label, rng, self.crop, self.scale_range, self.flip,
                                              self.aspect_range, self.brightness)  # fmt: skip
        return to_tensors(image, label)


class EvalView(Dataset):
    """Whole images for evaluation: ``(image (3, H, W), label (H, W), index)``."""

    def __init__(self, base, indices: Optional[Sequence[int]] = None):
        self.base = base
        self.indices = list(range(len(base))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j):
        i = self.indices[j]
        image, label = to_tensors(*self.base.load(i))
        return image, label, i


class ScheduleSampler(Sampler):
    """Endless ``(index, epoch)`` keys for one rank, starting ``start`` samples into the schedule.

    Epoch ``e`` is the shard of ``DistributedSampler(shuffle=True, seed, drop_last=True)``
    at ``set_epoch(e)``; every rank sees ``len(dataset) // world_size`` images per epoch.
    Resuming at iteration ``it`` with batch size ``B`` is ``start = it * B``.
    """

    def __init__(self, dataset, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0):
        self.dataset, self.rank, self.world_size, self.seed, self.start = dataset, rank, world_size, seed, start
        self.per_epoch = len(dataset) // world_size
        if self.per_epoch == 0:
            raise DatasetError(f"{len(dataset)} training images cannot be shared by {world_size} processes")

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch, skip = divmod(self.start, self.per_epoch)
        while True:
            shard = DistributedSampler(
                self.dataset, self.world_size, self.rank, shuffle=True, seed=self.seed, drop_last=True
            )
            shard.set_epoch(epoch)
            for i in list(shard)[skip:]:
                yield i, epoch
            epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------- export to disk

# synthetic class -> the class of the same name (or role) in each file layout
_EXPORT_NAMES = {
    "cityscapes": ("sky", "road", "building", "vegetation", "fence", "car", "traffic sign", "person"),
    "ade20k": ("sky", "earth", "building", "tree", "fence", "car", "signboard", "ball"),
}


def export_synthetic(
    root, layout: str, train: int = 24, val: int = 8, size=(256, 512), seed: int = 0, label_ids: bool = False,
    looks: int = 1,
) -> Path:  # fmt: skip
    """Write synthetic scenes to ``root`` in the Cityscapes or ADE20K file layout.

    A stand-in for the real datasets (to try the file readers, or to time
    training on files of a known size): labels are remapped to the train ids
    of the classes named in ``_EXPORT_NAMES``. ``label_ids`` (Cityscapes): write
    ``*_gtFine_labelIds.png`` holding Cityscapes labelIds, as downloaded, instead
    of ``*_gtFine_labelTrainIds.png``. ``looks``: the scenes'
    looks per class (:class:`SyntheticScenes`). Returns the ``--data-root`` to use.
    """
    Image = _pil()
    root = Path(root)
    if layout == "cityscapes":
        ids = np.array([CITYSCAPES_CLASSES.index(n) for n in _EXPORT_NAMES[layout]], np.uint8)
        if label_ids:
            ids = np.array(CITYSCAPES_EVAL_IDS, np.uint8)[ids]
    elif layout == "ade20k":
        ids = np.array([ADE20K_CLASSES.index(n) + 1 for n in _EXPORT_NAMES[layout]], np.uint8)  # 0 = other
    else:
        raise ValueError(f"layout must be 'cityscapes' or 'ade20k', got {layout!r}")
    for split, count in (("train", train), ("val", val)):
        scenes = SyntheticScenes(split, size, count, seed, looks)
        for i in range(count):
            image, label = scenes.load(i)
            if layout == "cityscapes":
                stem = f"synth_{i:06d}_000019"
                img = root / "leftImg8bit" / split / "synth" / f"{stem}_leftImg8bit.png"
                kind = "labelIds" if label_ids else "labelTrainIds"
                lbl = root / "gtFine" / split / "synth" / f"{stem}_gtFine_{kind}.png"
            else:
                sub = "training" if split == "train" else "validation"
                stem = f"ADE_{split}_{i + 1:08d}"
                img = root / "ADEChallengeData2016" / "images" / sub / f"{stem}.jpg"
                lbl = root / "ADEChallengeData2016" / "annotations" / sub / f"{stem}.png"
            img.parent.mkdir(parents=True, exist_ok=True)
            lbl.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(img, **({"quality": 95} if img.suffix == ".jpg" else {}))
            Image.fromarray(ids[label]).save(lbl)
    return root


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m protoseg_ext.train.data",
        description="Write synthetic scenes to disk in the Cityscapes or ADE20K layout.",
    )
    p.add_argument("layout", choices=["cityscapes", "ade20k"])
    p.add_argument("root", help="directory to write (becomes --data-root)")
    p.add_argument("--train", type=int, default=24, help="training images (default 24)")
    p.add_argument("--val", type=int, default=8, help="validation images (default 8)")
    p.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--looks", type=int, choices=range(1, MAX_LOOKS + 1), default=1,
                   help="distinct looks per class, in uneven shares (default 1)")  # fmt: skip
    p.add_argument("--label-ids", action="store_true",
                   help="cityscapes: write *_gtFine_labelIds.png (as downloaded) instead of *_gtFine_labelTrainIds.png")  # fmt: skip
    a = p.parse_args()
    if a.label_ids and a.layout != "cityscapes":
        p.error("--label-ids is for the cityscapes layout")
    export_synthetic(a.root, a.layout, a.train, a.val, a.size, a.seed, a.label_ids, a.looks)
    print(f"wrote {a.train} + {a.val} {a.layout} images to {a.root}")
