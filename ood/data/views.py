"""Fixed-size views of images of any size, decoded per batch from a curated dataset.

For datasets too large for memory or whose images differ in size (ImageNet,
its OOD sets): training setting `images: stream`. Every view is one PIL
`resize` of a box of the source image, so cropping and scaling are a single
bilinear (antialiased) resampling:

- eval view: the central square covering `EVAL_CROP` (87.5%) of the shorter
  side, scaled to size x size: ImageNet's usual resize-to-256 then
  centre-crop-224, in one step;
- train view: a random box of 8%-100% of the image area with aspect ratio
  3/4-4/3 (up to 10 tries, else the eval box), scaled to size x size, then
  an optional horizontal flip: the random-resized-crop augmentation of
  ImageNet training. Each image draws a fixed number of uniforms from the
  epoch's generator, so a resumed run replays the same views.

Files are decoded in a thread pool (PIL releases the GIL while decoding and
resizing), `threads` at a time.
"""

from __future__ import annotations

import copy
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ood.data.manifest import read_row, row_file, select_rows

EVAL_CROP = 0.875  # 224 / 256
AREA = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
TRIES = 10
DRAWS = 2 * TRIES + 3  # uniforms per image: (area, log-ratio) per try, placement x y, flip
IMAGE_MODES = ("memory", "stream")  # the `images` setting: decode a split once, or per batch


def check_images_mode(value: str, what: str) -> None:
    """An error naming `what` (e.g. "training setting") unless `value` is an IMAGE_MODES one."""
    if value not in IMAGE_MODES:
        raise ValueError(f"{what} images: {value!r}; known: {', '.join(IMAGE_MODES)}")


def trained_on_streams(train_settings: dict) -> bool:
    """Whether a checkpoint's training settings streamed images (older ones had no key)."""
    return train_settings.get("images", "memory") == "stream"


def eval_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The central square covering EVAL_CROP of the shorter side."""
    side = EVAL_CROP * min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def train_box(width: int, height: int, draws: np.ndarray) -> tuple[float, float, float, float]:
    """A random-resized-crop box from `DRAWS` uniforms in [0, 1) (the last, the flip, unused).

    Per try: area fraction uniform in AREA, log aspect ratio uniform in log RATIO;
    the first box that fits is placed uniformly in the free room.
    """
    area = width * height
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for t in range(TRIES):
        u_area, u_ratio = float(draws[2 * t]), float(draws[2 * t + 1])
        target = area * (AREA[0] + (AREA[1] - AREA[0]) * u_area)
        ratio = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if w <= width and h <= height:
            u_x, u_y = float(draws[2 * TRIES]), float(draws[2 * TRIES + 1])
            left, top = u_x * (width - w), u_y * (height - h)
            return (left, top, left + w, top + h)
    return eval_box(width, height)


def view(
    data: bytes, size: int, draws: np.ndarray | None, where: Path, hflip: bool = True
) -> np.ndarray:
    """One size x size x 3 uint8 view of encoded image bytes: eval view if `draws` is None;
    a train view flips when `hflip` and its last uniform is below 0.5."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
    except OSError as exc:
        raise ValueError(f"{where}: not a readable image ({exc})") from None
    if draws is None:
        box = eval_box(*image.size)
    else:
        box = train_box(*image.size, draws)
    out = image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
    if draws is not None and hflip and draws[-1] < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


class StreamedImages:
    """One split of a curated dataset, decoded per batch into size x size views.

    `labels` and `index` are in manifest order, as `load_images` returns them.
    Indexing (`images[3:7]`, `images[array]`) gives eval views as a uint8
    (B, size, size, 3) array, and `shape` is that of the whole split, so code
    written for `load_images`' array runs on it batch by batch; `take` gives
    a lazily reordered subset; `batch(idx, gen)` gives train views.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        split: str | None,
        size: int,
        threads: int | None = None,
        verify: bool = False,
    ):
        self.dataset_dir = Path(dataset_dir)
        self.rows = select_rows(self.dataset_dir, split)
        self.size = size
        self.verify = verify  # sha256 of every read: off in training (every epoch re-reads)
        self._pool = ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1)

    @property
    def labels(self) -> np.ndarray:
        return np.array([row.label for row in self.rows], dtype=np.int64)

    @property
    def index(self) -> np.ndarray:
        return np.array([row.index for row in self.rows], dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), self.size, self.size, 3)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> np.ndarray:
        return self.batch(np.arange(len(self.rows))[key])

    def take(self, positions) -> StreamedImages:
        """The rows at `positions`, in that order, still undecoded (shares the thread pool)."""
        subset = copy.copy(self)
        subset.rows = [self.rows[int(i)] for i in positions]
        return subset

    def _one(self, i: int, draws: np.ndarray | None, hflip: bool) -> np.ndarray:
        row = self.rows[i]
        data = read_row(self.dataset_dir, row, self.verify)
        return view(data, self.size, draws, row_file(self.dataset_dir, row), hflip)

    def batch(self, idx, gen: torch.Generator | None = None, hflip: bool = True) -> np.ndarray:
        """(B, size, size, 3) uint8 views of rows `idx`: train views drawn from `gen`
        (flipped at random if `hflip`), eval views if `gen` is None."""
        idx = [int(i) for i in np.atleast_1d(idx)]
        draws = None if gen is None else torch.rand((len(idx), DRAWS), generator=gen).numpy()
        return self.batch_from_draws(idx, draws, hflip)

    def batch_from_draws(self, idx, draws: np.ndarray | None, hflip: bool = True) -> np.ndarray:
        """`batch` with the (B, DRAWS) uniforms given (None: eval views)."""
        idx = [int(i) for i in np.atleast_1d(idx)]
        views = self._pool.map(
            lambda k: self._one(idx[k], None if draws is None else draws[k], hflip),
            range(len(idx)),
        )
        return np.stack(list(views)) if idx else np.empty((0, *self.shape[1:]), np.uint8)


def load_eval_views(
    dataset_dir: str | os.PathLike, split: str | None, size: int, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(views N x size x size x 3 uint8, labels, index)` of a split, all decoded: `load_images`
    for datasets of any image size (every file's sha256 is checked, as there)."""
    images = StreamedImages(dataset_dir, split, size, threads, verify=True)
    return images[:], images.labels, images.index
