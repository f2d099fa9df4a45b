"""Pictures of what the digit capsules hold, in the layout of the Chainer port's visualize.py.

- vis.png: 20 real test digits (two per class, green) over their reconstructions (blue).
- vis_all.png: the same green row, then row j reconstructs every input through capsule j.
- vis_tweakedK.png: one digit of class K; column d adds (row - 4) * 0.075 to dimension d of
  its capsule (rows -0.30 .. +0.30); the unperturbed centre row in green.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .errors import CapsNetError
from .files import atomic_write

GREEN = ((0, 68, 27), (240, 252, 236))  # (background, ink) for real or unperturbed images
BLUE = ((8, 48, 107), (240, 246, 255))  # for reconstructions
TWEAK_STEP, TWEAK_ROWS = 0.075, 9  # rows -4..4 times the step: -0.30 .. +0.30
TILE, LINE = 31, 1  # tile size in pixels, white grid line between tiles


def colorize(image: np.ndarray, palette) -> np.ndarray:
    """[c, h, w] in [0, 1] -> [h, w, 3] uint8: one channel through the palette, three as they are."""
    if image.shape[0] == 3:
        return (np.clip(image.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
    bg, ink = (np.array(c, dtype=np.float32) for c in palette)
    v = np.clip(image[0], 0, 1)[..., None]
    return (bg * (1 - v) + ink * v).round().astype(np.uint8)


def grid(rows: list[list[tuple[np.ndarray, tuple]]]):
    """rows of (image [c, h, w], palette) -> a PIL image with white lines between tiles."""
    from PIL import Image

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    canvas = Image.new("RGB", (n_cols * (TILE + LINE) + LINE, n_rows * (TILE + LINE) + LINE), "white")
    for r, row in enumerate(rows):
        for c, (image, palette) in enumerate(row):
            tile = Image.fromarray(colorize(image, palette)).resize((TILE, TILE), Image.BILINEAR)
            canvas.paste(tile, (LINE + c * (TILE + LINE), LINE + r * (TILE + LINE)))
    return canvas


def save_png(image, path: Path) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())
    return path


def pick_examples(labels: torch.Tensor, num_classes: int, per_class: int) -> torch.Tensor:
    """Indices of the first `per_class` test images of each class, in class order."""
    picks = []
    for k in range(num_classes):
        idx = (labels == k).nonzero().flatten()[:per_class]
        if len(idx) < per_class:
            raise CapsNetError(f"the test set has fewer than {per_class} images of class {k}")
        picks.append(idx)
    return torch.cat(picks)


@torch.no_grad()
def reconstructions(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(poses [b, j, d], recon_all [j, b, c, h, w]): every image through every class capsule."""
    poses = model.route(model.encode(images))
    b, j, _ = poses.shape
    recon_all = torch.stack([model.reconstruct(poses, torch.full((b,), k, device=poses.device)) for k in range(j)])
    return poses, recon_all


@torch.no_grad()
def tweaks(model, pose: torch.Tensor, cls: int) -> torch.Tensor:
    """pose [d] of class cls -> [rows, d, c, h, w]: dimension d moved by (row - 4) * step."""
    d = pose.shape[0]
    half = TWEAK_ROWS // 2
    deltas = (torch.arange(TWEAK_ROWS, device=pose.device) - half) * TWEAK_STEP  # [rows]
    poses = pose.repeat(TWEAK_ROWS, d, 1)  # [rows, d(column), d(dim)]
    poses += deltas[:, None, None] * torch.eye(d, device=pose.device)  # column k moves dimension k
    full = pose.new_zeros(TWEAK_ROWS * d, model.cfg.num_classes, d)
    full[:, cls] = poses.reshape(-1, d)
    select = torch.full((TWEAK_ROWS * d,), cls, device=pose.device)
    return model.reconstruct(full, select).view(TWEAK_ROWS, d, *model.decoder.shape)


def write_all(load: Path, data, out: Path, device: torch.device) -> list[Path]:
    """Write vis.png, vis_all.png and vis_tweaked0..K.png for the model at `load`; return their paths."""
    from .checkpoint import load_model
    from .train import to_input

    model = load_model(load).to(device)
    if model.decoder is None:
        raise CapsNetError(f"{load}: this model was trained without reconstruction; there is no decoder to draw with")
    if (model.cfg.in_channels, model.cfg.image_size) != (data.in_channels, data.image_size):
        raise CapsNetError(f"{load}: the model expects {model.cfg.image_size}px images, the data has {data.image_size}")
    out = Path(out)
    k = model.cfg.num_classes
    idx = pick_examples(data.test_labels, k, 2)
    images = to_input(data.test_images[idx], device)  # [2k, c, h, w]
    poses, recon_all = reconstructions(model, images)
    real = [(im, GREEN) for im in images.float().cpu().numpy()]
    winners = poses.norm(dim=-1).argmax(dim=1)
    own = recon_all[winners, torch.arange(len(idx), device=device)].cpu().numpy()
    paths = [save_png(grid([real, [(im, BLUE) for im in own]]), out / "vis.png")]
    rows = [real] + [[(im, BLUE) for im in recon_all[j].cpu().numpy()] for j in range(k)]
    paths.append(save_png(grid(rows), out / "vis_all.png"))
    for cls in range(k):
        first = 2 * cls  # the first of its two examples
        sweep = tweaks(model, poses[first, cls], cls).cpu().numpy()  # [rows, d, c, h, w]
        rows = [[(im, GREEN if r == TWEAK_ROWS // 2 else BLUE) for im in sweep[r]] for r in range(TWEAK_ROWS)]
        paths.append(save_png(grid(rows), out / f"vis_tweaked{cls}.png"))
    return paths
