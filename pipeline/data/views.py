"""Views: deterministic augmentation parameters and the ONE replay function used by every stage.

A view's parameters are a pure function of (seed, image key, view index, image size, recipe): a
``numpy.random.Generator`` seeded from a blake2b hash of those (never global RNG state or a worker id). They are
stored explicitly as a float32 row of ``PARAM_COLUMNS`` and replayed from that row, so what the teacher saw in
stage 1 is exactly what the student sees in stage 3. All pixel work goes through :func:`replay_view`.

Replay order (fixed): crop box -> resize to (res, res) with antialias on uint8 (bilinear, or bicubic where the
``interp`` column says so) -> horizontal flip -> float in [0, 1] -> colour jitter (brightness, contrast, saturation,
hue in the stored order) -> grayscale -> Gaussian blur -> PCA lighting, then clamp to [0, 1] -> ImageNet mean/std
normalisation. The clamp is the KDEP reference's (``InputNormalize`` of the robustness library clamps every input
to [0, 1] before normalising). Only lighting moves pixels out of [0, 1] by more than rounding (jitter and blur stay
within 1 ulp of it), and only the KDEP code clamps (CoSS's MoCo-v2 views are normalised unclamped), so the clamp is
tied to the lighting step: every ``kdep-reference`` view is clamped, views without lighting are untouched.

Centre views (deterministic, no randomness), stored as a crop box in source pixels and resized to (res, res):

- ``center`` is ImageNet evaluation's Resize(res / 0.875) + CenterCrop(res), bilinear: a square of side
  round(short side x 0.875) centred with floor((h - side) / 2) (up to one source pixel off torchvision's placement).
- ``center-coss`` is CoSS's neighbour-mining view (coss-pytorch ``compute_close_far.py``: Resize(235, bicubic) +
  CenterCrop(224)), bicubic. Its box is that geometry mapped back to the source (:func:`resize_crop_box`): the
  resized size as torchvision's Resize computes it (short side 235, long side int(235 x long / short)), the crop's
  corner as CenterCrop places it (int(round((235 - 224) / 2.0)) = 6 resized pixels, Python's round), both edges of
  the crop scaled by source / resized size per axis and rounded to the nearest source pixel. At 224 px this is
  torchvision's view up to sub-pixel rounding of the edges (a 235-px short side: exactly). The box is that of the
  224-px reference at every resolution (one box per view, whatever the teacher's or student's resolution).
  Caches written before this rule (no ``center_box`` in their views provenance) hold the older box, a floor-centred
  square of round(short side x 224/235), up to 1.2 source pixels off; they replay what they recorded.

DataLoader workers send :func:`replay_for_transport`'s output: uint8 before normalisation when the view has no
colour ops (its pixels are then exactly uint8), which the consumer finishes on its device with
:func:`normalize_views`, bit-identically to :func:`replay_view`; views with colour ops travel normalised float32.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from pipeline.data.params import COL, N_PARAMS, PARAM_COLUMNS
from pipeline.errors import KdepError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# AlexNet PCA lighting on ImageNet RGB (as in the KDEP reference code's Lighting transform).
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))
CENTER_CROP_FRACTION = 0.875  # resize to res / 0.875 then centre-crop res, as ImageNet evaluation does
COSS_CENTER_FRACTION = 224 / 235  # CoSS: Resize(int(224 * 1.05) = 235, bicubic) then CenterCrop(224)
# Centre recipes whose box is a torchvision Resize(short side) + CenterCrop(side) geometry mapped to the source, and
# the rule's name in the cache's views provenance (a cache built with another rule is refused on resume).
CENTER_GEOMETRY = {"center-coss": (235, 224)}
CENTER_BOX_RULES = {
    "center-coss": "torchvision Resize(235) + CenterCrop(224) mapped to source pixels, edges rounded"
}
INTERPOLATIONS = {"bilinear": 0, "bicubic": 1}  # value of the interp column


class ReplayError(KdepError):
    """A stored view does not fit the image it is replayed on."""


@dataclass(frozen=True)
class Recipe:
    """How views are drawn. Ranges follow torchvision's transforms of the same names."""

    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio
    flip_p: float = 0.5  # horizontal flip probability
    jitter_p: float = 0.0  # probability of applying colour jitter
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    gray_p: float = 0.0  # grayscale probability
    blur_p: float = 0.0  # Gaussian blur probability
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # blur sigma range (pixels at 224)
    lighting_std: float = 0.0  # PCA lighting alpha std (0 = off); lit pixels are clamped to [0, 1]
    center: bool = False  # deterministic resize + centre crop, no randomness
    center_fraction: float = CENTER_CROP_FRACTION  # centre views: crop side / the image's short side
    interpolation: str = "bilinear"  # resize filter (INTERPOLATIONS), stored per view in the interp column


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(),  # KDEP paper: RandomResizedCrop(0.08-1) + flip
    "kdep-reference": Recipe(jitter_p=1.0, jitter=(0.1, 0.1, 0.1, 0.0), lighting_std=0.05),  # KDEP code
    "coss": Recipe(
        scale=(0.2, 1.0), jitter_p=0.8, jitter=(0.4, 0.4, 0.4, 0.1), gray_p=0.2, blur_p=0.5
    ),  # MoCo-v2
    "center": Recipe(center=True, flip_p=0.0),  # ImageNet evaluation: 0.875, bilinear
    "center-coss": Recipe(
        center=True, flip_p=0.0, center_fraction=COSS_CENTER_FRACTION, interpolation="bicubic"
    ),  # CoSS neighbour mining
    "light": Recipe(scale=(0.35, 1.0)),  # milder crops for small images (the demo teacher's training views)
}


def view_rng(seed: int, key: str, view: int, height: int, width: int) -> np.random.Generator:
    """The generator of one (image, view): seeded from a stable hash, the same in every process and order."""
    digest = hashlib.blake2b(
        f"{seed}\x1f{key}\x1f{view}\x1f{height}x{width}".encode(), digest_size=16
    ).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _random_resized_crop(rng: np.random.Generator, h: int, w: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params algorithm, drawn from ``rng``: (top, left, height, width)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h  # fallback: central crop with the ratio clamped
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _center_crop(h: int, w: int, fraction: float) -> tuple[int, int, int, int]:
    """(top, left, side, side): a square of ``fraction`` of the short side, centred (floor)."""
    side = max(1, round(min(h, w) * fraction))
    return (h - side) // 2, (w - side) // 2, side, side


def resize_crop_box(h: int, w: int, resize: int, crop: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) in source pixels of torchvision's Resize(resize) + CenterCrop(crop) on an
    h x w image: the resized size as Resize computes it (short side ``resize``, long side int(resize * long /
    short)), the crop's corner as CenterCrop places it (int(round((size - crop) / 2.0))), then the crop's edges
    scaled back by source / resized size per axis and rounded to the nearest source pixel (clamped inside)."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize * long / short)
    new_w, new_h = (resize, new_long) if w <= h else (new_long, resize)
    corner_y, corner_x = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
    sy, sx = h / new_h, w / new_w
    top, left = min(round(corner_y * sy), h - 1), min(round(corner_x * sx), w - 1)
    bottom, right = min(round((corner_y + crop) * sy), h), min(round((corner_x + crop) * sx), w)
    return top, left, max(1, bottom - top), max(1, right - left)


def sample_view_params(recipe: str, seed: int, key: str, view: int, height: int, width: int) -> np.ndarray:
    """One view's parameters as a float32 row of ``PARAM_COLUMNS``; a pure function of its arguments."""
    r = RECIPES[recipe]
    row = np.zeros(N_PARAMS, np.float64)
    row[COL["order0"] : COL["order3"] + 1] = (0, 1, 2, 3)
    row[COL["interp"]] = INTERPOLATIONS[r.interpolation]
    if r.center and recipe in CENTER_GEOMETRY:
        row[:4] = resize_crop_box(height, width, *CENTER_GEOMETRY[recipe])
        return row.astype(np.float32)
    if r.center:
        row[:4] = _center_crop(height, width, r.center_fraction)
        return row.astype(np.float32)
    rng = view_rng(seed, key, view, height, width)
    row[:4] = _random_resized_crop(rng, height, width, r.scale, r.ratio)
    row[COL["flip"]] = rng.uniform() < r.flip_p
    if r.jitter_p > 0 and rng.uniform() < r.jitter_p:
        b, c, s, hue = r.jitter
        row[COL["jitter"]] = 1
        row[COL["order0"] : COL["order3"] + 1] = rng.permutation(4)
        row[COL["brightness"] : COL["hue"] + 1] = (
            rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c), rng.uniform(1 - s, 1 + s), rng.uniform(-hue, hue),
        )  # fmt: skip
    else:
        row[COL["brightness"] : COL["saturation"] + 1] = 1.0
    row[COL["gray"]] = r.gray_p > 0 and rng.uniform() < r.gray_p
    if r.blur_p > 0 and rng.uniform() < r.blur_p:
        row[COL["blur_sigma"]] = rng.uniform(*r.blur_sigma)
    if r.lighting_std > 0:
        row[COL["light0"] : COL["light2"] + 1] = rng.normal(0, r.lighting_std, 3)
    return row.astype(np.float32)


def sample_views(
    recipe: str,
    seed: int,
    key: str,
    views: int,
    height: int,
    width: int,
    center_first: bool,
    center_recipe: str = "center",
) -> np.ndarray:
    """(K, N_PARAMS) float32: all K views of one image; view 0 is the ``center_recipe`` view (``center`` or
    ``center-coss``) when ``center_first``. Row v depends only on v (and the image), so the first k rows of a
    K-view draw are the k-view draw."""
    if not RECIPES[center_recipe].center:
        raise ValueError(f"center_recipe {center_recipe!r} is not a centre-view recipe (center, center-coss)")
    recipes = [center_recipe if (center_first and v == 0) else recipe for v in range(views)]
    return np.stack([sample_view_params(r, seed, key, v, height, width) for v, r in enumerate(recipes)])


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
_SCALE = 1.0 / (255.0 * _STD)  # uint8 -> normalised in one multiply-subtract
_SHIFT = _MEAN / _STD
_LIGHT = torch.tensor(PCA_EIGVEC, dtype=torch.float64) @ torch.diag(
    torch.tensor(PCA_EIGVAL, dtype=torch.float64)
)


def _jitter(x: torch.Tensor, p: np.ndarray) -> torch.Tensor:
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for op_index in p[COL["order0"] : COL["order3"] + 1].astype(int):
        factor = float(p[COL["brightness"] + op_index])
        if (op_index < 3 and factor != 1.0) or (op_index == 3 and factor != 0.0):
            x = ops[op_index](x, factor)
    return x


def transport_bytes(recipe: str, resolution: int) -> int:
    """Bytes one (3, r, r) view of ``recipe`` takes between a DataLoader worker and its rank: 1 per value on the
    uint8 grid, 4 (float32) when the recipe has colour operations (jitter, grayscale, blur, lighting leave the grid;
    one such view makes its whole batch float32)."""
    r = RECIPES[recipe]
    colour = r.jitter_p > 0 or r.gray_p > 0 or r.blur_p > 0 or r.lighting_std > 0
    return 3 * resolution * resolution * (4 if colour else 1)


def has_colour_ops(params: np.ndarray) -> bool:
    """True when the view's pixels leave the uint8 grid (jitter, grayscale, blur or lighting work in float)."""
    return bool(
        params[COL["jitter"]]
        or params[COL["gray"]]
        or params[COL["blur_sigma"]] > 0
        or np.any(params[COL["light0"] : COL["light2"] + 1] != 0)
    )


def interpolation_of(params: np.ndarray) -> F.InterpolationMode:
    """The stored row's resize filter (the ``interp`` column)."""
    code = int(params[COL["interp"]])
    if code not in INTERPOLATIONS.values():
        raise ReplayError(f"stored interp {code} is not one of {INTERPOLATIONS}; the view row is corrupt")
    return F.InterpolationMode.BICUBIC if code == INTERPOLATIONS["bicubic"] else F.InterpolationMode.BILINEAR


def normalize_views(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, r, r) uint8 views -> float32 normalised views on ``x``'s device; float32 passes through unchanged.

    Exactly the fast path of :func:`replay_view` (one multiply by 1 / (255 std), one subtract of mean / std, in
    float32), so normalising on the GPU after a uint8 transfer is bit-identical to normalising in the worker.
    (``(x / 255 - mean) / std`` is NOT: it differs from the cached views' inputs by up to 1 ulp.)
    """
    if x.dtype != torch.uint8:
        return x
    scale, shift = _constants_on(x.device)
    return x.to(torch.float32).mul_(scale).sub_(shift)


@functools.lru_cache(maxsize=8)
def _constants_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 1, 1) scale and shift on ``device``, copied once (not once per batch)."""
    return _SCALE.to(device), _SHIFT.to(device)


def replay_for_transport(image: torch.Tensor, params: np.ndarray, resolution: int) -> torch.Tensor:
    """The view as cheaply as it can travel exactly: (3, r, r) uint8 before normalisation when its pixels are on
    the uint8 grid (no colour ops; 4x smaller through /dev/shm and pinned memory), else today's normalised
    float32. :func:`normalize_views` (or :func:`stack_views`) turns either into :func:`replay_view`'s output."""
    if has_colour_ops(params):
        return replay_view(image, params, resolution)
    return _crop_flip(image, params, resolution)


def stack_views(views: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-view tensors from :func:`replay_for_transport`: (B, 3, r, r) uint8 when all are uint8, else
    float32 normalised (uint8 ones normalised on the CPU exactly as on the device)."""
    if all(v.dtype == torch.uint8 for v in views):
        return torch.stack(views)
    return torch.stack([normalize_views(v) for v in views])


def cat_views(views: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (n_i, 3, r, r) view batches along dim 0 as :func:`stack_views` stacks single views."""
    if all(v.dtype == torch.uint8 for v in views):
        return torch.cat(views)
    return torch.cat([normalize_views(v) for v in views])


def _crop_flip(image: torch.Tensor, params: np.ndarray, resolution: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, res, res) uint8: the stored crop box resized (antialiased, the stored filter), then
    the flip. Bicubic output is rounded and clamped to uint8 by torchvision, so it stays on the uint8 grid."""
    top, left, h, w = (int(v) for v in params[:4])
    H, W = image.shape[-2:]
    if h < 1 or w < 1 or top < 0 or left < 0 or top + h > H or left + w > W:
        raise ReplayError(
            f"stored crop {top, left, h, w} does not fit a {H}x{W} image; the image is not the one cached"
        )
    size, mode = [resolution, resolution], interpolation_of(params)
    x = F.resized_crop(image, top, left, h, w, size, interpolation=mode, antialias=True)
    if params[COL["flip"]]:
        x = F.horizontal_flip(x)
    return x


def replay_view(
    image: torch.Tensor, params: np.ndarray, resolution: int, normalize: bool = True
) -> torch.Tensor:
    """(3, H, W) uint8 decoded image + one stored parameter row -> (3, res, res) float32 view.

    The only function that turns an image into a model input, in every stage. ``normalize=False`` returns the
    view in [0, 1] (for display and tests).
    """
    x = _crop_flip(image, params, resolution)
    if normalize and not has_colour_ops(
        params
    ):  # fast path (paper / center views): one fused scale-and-shift
        return normalize_views(x)
    x = x.float().div_(255.0)
    if params[COL["jitter"]]:
        x = _jitter(x, params)
    if params[COL["gray"]]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    sigma = float(params[COL["blur_sigma"]]) * resolution / 224.0
    if sigma > 0:
        x = F.gaussian_blur(x, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)
    alphas = params[COL["light0"] : COL["light2"] + 1]
    if np.any(alphas != 0):
        rgb = (_LIGHT @ torch.from_numpy(alphas.astype(np.float64))).float()
        x = (x + rgb.view(3, 1, 1)).clamp_(0.0, 1.0)  # the reference's InputNormalize clamp (see above)
    if normalize:
        x = (x - _MEAN) / _STD
    return x.contiguous()


def describe_preprocessing(resolution: int) -> dict:
    """What a reader needs to recompute a view with torchvision alone (stored in the cache metadata)."""
    return {
        "resolution": resolution,
        "decoder": "torchvision.io.decode_image(mode=RGB) on CPU (libjpeg-turbo / libpng)",
        "crop_resize": "torchvision.transforms.v2.functional.resized_crop(uint8, top, left, height, width, [res, res], "
        "interpolation=BILINEAR (interp 0) or BICUBIC (interp 1), antialias=True)",
        "order": "crop_resize, flip, float/255, jitter(order0..3), grayscale, gaussian_blur(k=2*ceil(3*s)+1, "
        "s=blur_sigma*res/224), lighting(eigvec @ diag(eigval) @ alpha) then clamp(0, 1), normalize",
        "interpolation": "per view: the interp column (0 bilinear, 1 bicubic)",
        "antialias": True,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "pca_eigval": PCA_EIGVAL,
        "pca_eigvec": PCA_EIGVEC,
        "param_columns": PARAM_COLUMNS,
    }
