"""Pictures of what the digit capsules hold, in the layout of the Chainer port's visualize.py.

- vis.png: 20 real test digits (two per class, green) over their reconstructions (blue).
- vis_all.png: the same green row, then row j reconstructs every input through capsule j.
- vis_tweakedK.png: one digit of class K; column d adds (row - 4) * 0.075 to dimension d of
  its capsule (rows -0.30 .. +0.30); the unperturbed centre row in green.
- vis_errors.png (ours): the test digits the model gets wrong, in test order, each over its
  reconstruction through the capsule that won and through the capsule of its true class.
- vis_multi.png, for multimnist alone (the layout of the paper's Figure 5): test pairs, each over
  its reconstructions through the two longest capsules, one in red and one in green. For
  multimnist, vis_errors.png shows the first 100 pairs it gets wrong in that layout, and
  vis_tweakedK.png the capsule of digit K in the first test pair that holds one.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
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


def caption_row(texts: list[str]):
    """A row of white tiles, each with a short centred caption (PIL's built-in font)."""
    from PIL import Image, ImageDraw

    row = Image.new("RGB", (len(texts) * (TILE + LINE) + LINE, TILE + 2 * LINE), "white")
    draw = ImageDraw.Draw(row)
    for c, text in enumerate(texts):
        left, top, right, bottom = draw.textbbox((0, 0), text)
        x = LINE + c * (TILE + LINE) + (TILE - (right - left)) // 2
        draw.text((x, LINE + (TILE - (bottom - top)) // 2 - top), text, fill=(0, 0, 0))
    return row


def stack(images: list):
    """PIL images top to bottom, left-aligned on white (the shared grid line drawn once)."""
    from PIL import Image

    canvas = Image.new("RGB", (max(im.width for im in images), sum(im.height - LINE for im in images) + LINE),
                       "white")
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height - LINE
    return canvas


def save_png(image, path: Path) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())
    return path


def pick_examples(labels: torch.Tensor, num_classes: int, per_class: int) -> torch.Tensor:
    """Indices of the first `per_class` test images of each class, in class order. labels: [n], or
    [n, m] for images of m digits (an image counts for each class it holds)."""
    picks = []
    for k in range(num_classes):
        holds = labels == k  # [n] or [n, m]
        idx = (holds if holds.dim() == 1 else holds.any(dim=1)).nonzero().flatten()[:per_class]
        if len(idx) < per_class:
            what = "images of" if holds.dim() == 1 else "images holding"
            raise CapsNetError(f"the test set has fewer than {per_class} {what} class {k}")
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


ERROR_COLUMNS, MAX_ERRORS = 20, 100


@torch.no_grad()
def misclassified(model, images_u8: torch.Tensor, labels: torch.Tensor, precision: str,
                  batch: int = TrainConfig.eval_batch_size) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, predicted classes) of the images the model gets wrong, as `capsnet evaluate` counts them."""
    from .train import matches, objects, predict

    predicted = predict(model, images_u8, batch, precision, objects(labels)).cpu()
    wrong = (~matches(predicted, labels.cpu())).nonzero().flatten()
    return wrong, predicted[wrong]


def error_picture(model, data, precision: str):
    """vis_errors.png's image and the number of test errors (at most MAX_ERRORS are drawn): blocks of
    ERROR_COLUMNS columns, each a caption 'true>predicted', the digit (green), its reconstruction
    through the winning capsule and through its true class's capsule (blue)."""
    from .train import to_input

    device = next(model.parameters()).device
    wrong, predicted = misclassified(model, data.test_images, data.test_labels, precision)
    blocks = []
    for first in range(0, min(len(wrong), MAX_ERRORS), ERROR_COLUMNS):
        idx, pred = wrong[first:first + ERROR_COLUMNS], predicted[first:first + ERROR_COLUMNS]
        true = data.test_labels[idx]
        images = to_input(data.test_images[idx], device)
        _, recon_all = reconstructions(model, images)  # [j, b, c, h, w]
        cols = torch.arange(len(idx), device=device)
        as_pred = recon_all[pred.to(device), cols].float().cpu().numpy()
        as_true = recon_all[true.to(device), cols].float().cpu().numpy()
        tiles = grid([[(im, GREEN) for im in images.float().cpu().numpy()], [(im, BLUE) for im in as_pred],
                      [(im, BLUE) for im in as_true]])
        captions = caption_row([f"{t}>{p}" for t, p in zip(true.tolist(), pred.tolist())])
        blocks.append(stack([captions, tiles]))
    return (stack(blocks) if blocks else None), len(wrong)


MULTI_COLUMNS, MULTI_BLOCKS = 20, 2


@torch.no_grad()
def multi_picture(model, data, precision: str, indices: torch.Tensor | None = None,
                  chosen: torch.Tensor | None = None):
    """vis_multi.png's image: the test pairs at `indices` (default: the first MULTI_COLUMNS *
    MULTI_BLOCKS) in blocks of columns, each block a caption row of the true classes, the images
    (green), the reconstructions through the two longest capsules (the longer in red, the other in
    green, yellow where both draw) and a caption row of those two classes, marked '!' where they are
    not the true ones. chosen [len(indices), 2], if given, are those two classes as already counted
    (vis_errors.png passes misclassified's, so the picture shows the very pairs counted wrong)."""
    from .runtime import autocast
    from .train import matches, to_input, top_classes

    device = next(model.parameters()).device
    if indices is None:
        indices = torch.arange(min(MULTI_COLUMNS * MULTI_BLOCKS, data.test_images.shape[0]))
    blocks = []
    for first in range(0, len(indices), MULTI_COLUMNS):
        idx = indices[first:first + MULTI_COLUMNS]
        labels = data.test_labels[idx]  # [b, 2]
        images = to_input(data.test_images[idx], device)  # [b, 1, h, w]
        with autocast(device, precision):
            poses = model.route(model.encode(images))
            top = (top_classes(poses.norm(dim=-1), 2) if chosen is None  # [b, 2], longest first
                   else chosen[first:first + MULTI_COLUMNS].to(device))
            recon = [model.reconstruct(poses, top[:, m]).float() for m in range(2)]  # 2 x [b, 1, h, w]
        rgb = torch.cat([recon[0], recon[1], torch.zeros_like(recon[0])], dim=1).cpu().numpy()  # [b, 3, h, w]
        right = matches(top.cpu(), labels).tolist()
        tiles = grid([[(im, GREEN) for im in images.float().cpu().numpy()], [(im, None) for im in rgb]])
        blocks.append(stack([caption_row([f"{a},{b}" for a, b in labels.tolist()]), tiles,
                             caption_row([f"{p},{q}" + ("" if ok else "!") for (p, q), ok in zip(top.tolist(), right)])]))
    return stack(blocks)


def write_all(load: Path, data, out: Path, device: torch.device, precision: str = "auto", *,
              model=None) -> list[Path]:
    """Write vis.png, vis_all.png, vis_tweaked0..K.png and vis_errors.png (if the model makes any
    test errors) for the model at `load` (or `model`, already loaded from there); return their paths.
    For multimnist, vis_multi.png, vis_tweaked0..K.png and vis_errors.png."""
    from .checkpoint import check_fits, load_model
    from .runtime import resolve_precision
    from .train import to_input

    model = (model if model is not None else load_model(load)).to(device)
    if model.decoder is None:
        raise CapsNetError(f"{load}: this model was trained without reconstruction; there is no decoder to draw with")
    check_fits(model, data, load)
    precision = resolve_precision(precision, device)  # refused here, before any picture is overwritten
    out = Path(out)
    k = model.cfg.num_classes
    if data.digits > 1:  # pairs: vis.png and vis_all.png assume one class per image
        idx = pick_examples(data.test_labels, k, 1)  # the first pair that holds each class (or refused)
        paths = [save_png(multi_picture(model, data, precision), out / "vis_multi.png")]
        with torch.no_grad():
            poses = model.route(model.encode(to_input(data.test_images[idx], device)))  # [k, k, d]
        paths += tweak_pictures(model, poses, torch.arange(k), out)
        wrong, chosen = misclassified(model, data.test_images, data.test_labels, precision)
        if len(wrong):  # (at most MAX_ERRORS drawn)
            picture = multi_picture(model, data, precision, wrong[:MAX_ERRORS], chosen[:MAX_ERRORS])
            paths.append(save_png(picture, out / "vis_errors.png"))
        return paths
    idx = pick_examples(data.test_labels, k, 2)
    images = to_input(data.test_images[idx], device)  # [2k, c, h, w]
    poses, recon_all = reconstructions(model, images)
    real = [(im, GREEN) for im in images.float().cpu().numpy()]
    winners = poses.norm(dim=-1).argmax(dim=1)
    own = recon_all[winners, torch.arange(len(idx), device=device)].cpu().numpy()
    paths = [save_png(grid([real, [(im, BLUE) for im in own]]), out / "vis.png")]
    rows = [real] + [[(im, BLUE) for im in recon_all[j].cpu().numpy()] for j in range(k)]
    paths.append(save_png(grid(rows), out / "vis_all.png"))
    paths += tweak_pictures(model, poses, torch.arange(0, 2 * k, 2), out)  # the first of each class's two
    picture, _ = error_picture(model, data, precision)
    if picture is not None:
        paths.append(save_png(picture, out / "vis_errors.png"))
    return paths


@torch.no_grad()
def tweak_pictures(model, poses: torch.Tensor, example: torch.Tensor, out: Path) -> list[Path]:
    """Write vis_tweaked0..K.png: for each class k, the pose poses[example[k], k] swept by tweaks."""
    paths = []
    for cls in range(poses.shape[1]):
        sweep = tweaks(model, poses[example[cls], cls], cls).cpu().numpy()  # [rows, d, c, h, w]
        rows = [[(im, GREEN if r == TWEAK_ROWS // 2 else BLUE) for im in sweep[r]] for r in range(TWEAK_ROWS)]
        paths.append(save_png(grid(rows), out / f"vis_tweaked{cls}.png"))
    return paths
