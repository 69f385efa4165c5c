"""Synthetic, labelled chest X-ray and retinal OCT phantoms for the nine classes.

The demo checkpoint, the tests and the benchmarks need images with known labels and known
lesion locations, without downloading patient data. Every image is drawn analytically on
a randomly posed coordinate grid (no per-pixel Python loops), so it is fast at any size,
and every image comes with a boolean lesion mask: the ground truth that explanation tests
compare attribution maps against (all False for the normal classes).

Each synthetic patient has its own anatomy (seeded by the patient number); each image of
that patient has its own pose, exposure, noise and findings (seeded by the image seed).
Same arguments, same pixels.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "lung-covid", "lung-normal", "lung-oct-cnv", "lung-oct-dme", "lung-oct-drusen",
    "lung-oct-normal", "lung-opacity", "lung-tuberculosis", "lung-viral-pneumonia",
)
OCT_CLASSES = frozenset(c for c in CLASS_NAMES if c.startswith("lung-oct-"))
NORMAL_CLASSES = frozenset({"lung-normal", "lung-oct-normal"})


@dataclass
class Phantom:
    """One synthetic scan.

    Attributes:
        image: (H, W) float32 in [0, 1], display convention (air / vitreous dark).
        mask: (H, W) bool, True on lesion pixels; all False for normal classes.
        region: (H, W) bool, the body (X-ray) or retina (OCT): lesions lie inside it.
        label: class name from :data:`CLASS_NAMES`.
        label_index: index of ``label`` in :data:`CLASS_NAMES`.
        modality: DICOM modality, "DX" for chest X-rays and "OPT" for OCT.
        patient_id: synthetic patient identifier such as "P0003".
        seed: the image seed it was drawn from.
    """

    image: np.ndarray
    mask: np.ndarray
    region: np.ndarray
    label: str
    label_index: int
    modality: str
    patient_id: str
    seed: int


# ---------------------------------------------------------------- shared helpers

def _box(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Mean over a window of 2r+1 samples along ``axis`` (edges replicated)."""
    if r < 1:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r + 1, r)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis)
    n = a.shape[axis]
    hi = np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis)
    lo = np.take(c, np.arange(n), axis=axis)
    return (hi - lo) / (2 * r + 1)


def _blur(a: np.ndarray, sigma_y: float, sigma_x: float | None = None) -> np.ndarray:
    """Approximate Gaussian blur (three box passes per axis), sigmas in pixels."""
    out = a
    for axis, sigma in ((0, sigma_y), (1, sigma_y if sigma_x is None else sigma_x)):
        r = int(round((np.sqrt(12.0 * sigma * sigma / 3.0 + 1.0) - 1.0) / 2.0))
        for _ in range(3):
            out = _box(out, r, axis)
    return out


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std noise correlated over ``scale`` (a fraction of the image side)."""
    n = _blur(rng.standard_normal((size, size)).astype(np.float32), max(scale * size, 0.5))
    return (n - n.mean()) / (n.std() + 1e-8)


def _grid(size: int, rng: np.random.Generator, *, rot_deg: float, shift: float,
          scale: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Randomly posed normalised coordinates: x left->right, y top->bottom, about [-1, 1]."""
    t = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2.0 - 1.0
    yy, xx = np.meshgrid(t, t, indexing="ij")
    ang = np.deg2rad(rng.uniform(-rot_deg, rot_deg))
    s = rng.uniform(*scale)
    dx, dy = rng.uniform(-shift, shift, 2)
    c, si = np.cos(ang), np.sin(ang)
    x = (c * (xx - dx) + si * (yy - dy)) / s
    y = (-si * (xx - dx) + c * (yy - dy)) / s
    return x.astype(np.float32), y.astype(np.float32)


def _finish(img: np.ndarray, rng: np.random.Generator, size: int, *, noise: tuple[float, float],
            blur: tuple[float, float]) -> np.ndarray:
    """Acquisition: blur, exposure (contrast, offset, gamma) and quantum noise."""
    img = _blur(img, rng.uniform(*blur) * size / 128.0)
    img = (img - 0.5) * rng.uniform(0.8, 1.2) + 0.5 + rng.uniform(-0.06, 0.06)
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.75, 1.35)
    img = img + rng.normal(0.0, rng.uniform(*noise), img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float
             ) -> np.ndarray:
    """Squared normalised radius of an axis-aligned ellipse (< 1 inside)."""
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2


# ---------------------------------------------------------------- chest X-ray

def _chest(label: str, size: int, anat: np.random.Generator, rng: np.random.Generator,
           lrng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A PA chest radiograph: body, two lung fields, heart, spine, ribs, clavicles."""
    x, y = _grid(size, rng, rot_deg=7.0, shift=0.07, scale=(0.9, 1.08))
    ax = np.abs(x)
    bw, bh = anat.uniform(0.8, 0.93), anat.uniform(1.1, 1.25)
    body = (np.abs(x / bw) ** 2.6 + np.abs((y - 0.2) / bh) ** 2.6 < 1.0) | \
        ((ax < anat.uniform(0.17, 0.24)) & (y < -0.5))
    lung_y, lung_h = anat.uniform(-0.1, 0.0), anat.uniform(0.5, 0.6)
    lungs = []  # (side, cx, cy, a, b): side -1 is the image's left (patient's right)
    lung = np.zeros(x.shape, bool)
    heart = _ellipse(x, y, anat.uniform(0.06, 0.14), anat.uniform(0.22, 0.3),
                     anat.uniform(0.28, 0.36), anat.uniform(0.2, 0.27)) < 1
    mediastinum = heart | ((ax < anat.uniform(0.11, 0.15)) & (y < 0.4))
    for side in (-1, 1):
        cx = side * anat.uniform(0.36, 0.44)
        a, b = anat.uniform(0.22, 0.28), lung_h * anat.uniform(0.95, 1.05)
        cy = lung_y + anat.uniform(-0.02, 0.02)
        dome = cy + b * anat.uniform(0.7, 0.85) - 0.25 * b * (1 - ((x - cx) / a) ** 2)
        lung |= (_ellipse(x, y, cx, cy, a, b) < 1) & (y < dome) & (side * x > 0.1)
        lungs.append((side, cx, cy, a, b))
    lung &= ~mediastinum & body
    img = np.where(body, 0.58, 0.05).astype(np.float32)
    img += 0.05 * _smooth_noise(rng, size, 0.06) * body
    soft_lung = _blur(lung.astype(np.float32), 0.012 * size)
    img -= 0.36 * soft_lung
    img += 0.03 * _smooth_noise(rng, size, 0.015) * soft_lung  # vascular markings
    img += 0.1 * _blur(heart.astype(np.float32), 0.01 * size) * body
    img += 0.1 * ((ax < 0.06) & body)  # spine
    # Posterior ribs: arcs from the spine, fading below the diaphragm.
    rib_gap, rib0 = anat.uniform(0.13, 0.16), anat.uniform(-0.8, -0.72)
    t = ax / bw
    ribs = np.zeros_like(img)
    for i in range(9):
        yr = rib0 + i * rib_gap - 0.25 * t + 0.6 * t * t + 0.02 * np.sign(x)
        ribs = np.maximum(ribs, np.exp(-(((y - yr) / (0.022 + 0.003 * i)) ** 2)))
    fade = 1.0 / (1.0 + np.exp((y - (lung_y + lung_h)) / 0.05))
    img += 0.12 * ribs * fade * body * (ax > 0.06)
    clav = np.exp(-(((y + 0.68 - 0.7 * (ax - 0.35) ** 2) / 0.03) ** 2)) * (ax > 0.08) * (ax < 0.62)
    img += 0.15 * clav * body

    lesion = np.zeros_like(img)  # additive density of the findings
    extent = np.zeros_like(img)  # where the findings are (thresholded into the mask)

    def local(side: int, cx: float, cy: float, a: float, b: float
              ) -> tuple[np.ndarray, np.ndarray]:
        return side * (x - cx) / a, (y - cy) / b  # +lx lateral, +ly lower

    if label == "lung-covid":  # bilateral peripheral ground glass in the lower zones
        for side, cx, cy, a, b in lungs:
            for _ in range(lrng.integers(2, 5)):
                lx, ly = local(side, cx, cy, a, b)
                r = lrng.uniform(0.4, 0.6)
                d = (lx - lrng.uniform(0.35, 0.8)) ** 2 \
                    + ((ly - lrng.uniform(0.1, 0.7)) * a / b) ** 2
                lesion = np.maximum(lesion, lrng.uniform(0.2, 0.28) * np.exp(-d / (r * r)))
        extent = lesion.copy()
        lesion *= 0.75 + 0.25 * _smooth_noise(lrng, size, 0.02).clip(-1, 1)
    elif label == "lung-opacity":  # one dense lobar consolidation
        side, cx, cy, a, b = lungs[lrng.integers(2)]
        lx, ly = local(side, cx, cy, a, b)
        zone = lrng.choice([-0.5, 0.05, 0.5])
        edge = 0.15 * _smooth_noise(lrng, size, 0.04)
        inside = _ellipse(lx, ly, lrng.uniform(-0.2, 0.3), zone, lrng.uniform(0.7, 1.0),
                          lrng.uniform(0.4, 0.55)) + edge < 1
        lesion = lrng.uniform(0.3, 0.38) * _blur(inside.astype(np.float32), 0.01 * size)
        extent = lesion
    elif label == "lung-tuberculosis":  # upper-zone cavities (rings) and nodules
        for _ in range(lrng.integers(1, 4)):
            side, cx, cy, a, b = lungs[lrng.integers(2)]
            lx, ly = local(side, cx, cy, a, b)
            px, py = lrng.uniform(-0.3, 0.5), lrng.uniform(-0.75, -0.35)
            rr = np.sqrt((lx - px) ** 2 + ((ly - py) * b / a) ** 2) * a  # normalised units
            ro = lrng.uniform(0.07, 0.1)
            wall = np.exp(-(((rr - 0.75 * ro) / (0.3 * ro)) ** 2))
            lesion += 0.34 * wall - 0.08 * (rr < 0.5 * ro) + 0.08 * np.exp(-((rr / (2 * ro)) ** 2))
            extent = np.maximum(extent, 0.3 * (rr < 1.1 * ro))
        for side, cx, cy, a, b in lungs:
            for _ in range(lrng.integers(2, 5)):
                lx, ly = local(side, cx, cy, a, b)
                rr = np.sqrt((lx - lrng.uniform(-0.5, 0.7)) ** 2
                             + ((ly - lrng.uniform(-0.85, -0.3)) * b / a) ** 2) * a
                nodule = 0.3 * np.exp(-((rr / lrng.uniform(0.018, 0.03)) ** 2))
                lesion += nodule
                extent = np.maximum(extent, nodule)
    elif label == "lung-viral-pneumonia":  # diffuse bilateral perihilar streaky pattern
        reticular = np.clip(_smooth_noise(lrng, size, 0.01), 0, None)
        for side, cx, cy, a, b in lungs:
            hx, hy = cx - side * 0.55 * a, cy + lrng.uniform(0.0, 0.1)
            r = np.sqrt((x - hx) ** 2 + (y - hy) ** 2)
            theta = np.arctan2(y - hy, side * (x - hx))
            wobble = 0.8 * _smooth_noise(lrng, size, 0.04)
            streak = (0.5 + 0.5 * np.cos(lrng.integers(12, 20) * theta + wobble)) ** 3
            env = lrng.uniform(0.28, 0.36) * np.exp(-((r / (lrng.uniform(0.45, 0.6) * b)) ** 2))
            lesion += env * (0.2 + 0.5 * streak + 0.3 * reticular)
            extent = np.maximum(extent, env)
    lesion *= soft_lung
    img += lesion
    mask = (extent > 0.06) & lung  # the involved region, not each streak or ring
    return img, mask, body


# ---------------------------------------------------------------- retinal OCT

# Reflectivity of the neural retina by relative depth d (0 at the ILM, 1 at the RPE).
_LAYER_D = np.array([0.0, 0.07, 0.09, 0.3, 0.32, 0.42, 0.44, 0.5, 0.52, 0.8, 0.82, 0.85,
                     0.87, 0.92, 0.94, 1.0], np.float32)
_LAYER_V = np.array([0.8, 0.75, 0.5, 0.45, 0.22, 0.2, 0.5, 0.5, 0.15, 0.14, 0.35, 0.3,
                     0.72, 0.7, 0.3, 0.3], np.float32)


def _oct(label: str, size: int, anat: np.random.Generator, rng: np.random.Generator,
         lrng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A foveal OCT B-scan: layered retina with a pit, RPE band, choroid, speckle."""
    x, y = _grid(size, rng, rot_deg=5.0, shift=0.1, scale=(0.92, 1.08))
    y0, curve = anat.uniform(0.1, 0.25), anat.uniform(-0.05, 0.15)
    thick0 = anat.uniform(0.3, 0.4)
    xf, pw, pd = anat.uniform(-0.15, 0.15), anat.uniform(0.12, 0.2), anat.uniform(0.45, 0.65)
    rpe_t = anat.uniform(0.03, 0.045)
    xc = xf + lrng.uniform(-0.25, 0.25)  # centre of a macular finding
    w = lrng.uniform(0.3, 0.5) if label == "lung-oct-dme" else lrng.uniform(0.22, 0.35)
    swell_h = lrng.uniform(0.5, 0.9) if label == "lung-oct-dme" else 0.0

    def layers(xv: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Height of Bruch's membrane and neural-retina thickness at horizontal position x."""
        swell = swell_h * np.exp(-(((xv - xc) / w) ** 2))
        pit = pd * np.exp(-(((xv - xf) / pw) ** 2)) * (1 - np.clip(swell, 0, 0.9))
        return y0 + curve * xv * xv, thick0 * (1 + swell) * (1 - pit)

    rpe0, thick = layers(x)
    lift = np.zeros_like(x)        # upward displacement of the neural retina
    rpe = rpe0                     # top of the RPE band (drusen lift it)
    mask = np.zeros(x.shape, bool)
    extra = np.full(x.shape, np.nan, np.float32)  # lesion reflectivity (NaN = none)
    if label == "lung-oct-cnv":  # fusiform hyper-reflective lesion with fluid above
        b = lrng.uniform(0.08, 0.14) * np.clip(1 - ((x - xc) / w) ** 2, 0, None) ** 1.5
        f = lrng.uniform(0.05, 0.1) * np.clip(1 - ((x - xc) / (0.8 * w)) ** 2, 0, None) ** 1.5
        lift = b + f
        lesion = (y >= rpe0 - b) & (y < rpe0) & (b > 0.004)
        fluid = (y >= rpe0 - b - f) & (y < rpe0 - b) & (f > 0.004)
        extra[lesion] = 0.8 + 0.15 * _smooth_noise(lrng, size, 0.01)[lesion]
        extra[fluid] = 0.04
        mask = lesion | fluid
    elif label == "lung-oct-drusen":  # dome elevations of the RPE
        bumps = np.zeros_like(x)
        for _ in range(lrng.integers(5, 10)):
            xi, wi = lrng.uniform(-0.7, 0.7), lrng.uniform(0.06, 0.11)
            bumps = np.maximum(bumps, lrng.uniform(0.06, 0.1)
                               * np.clip(1 - ((x - xi) / wi) ** 2, 0, None) ** 0.7)
        rpe, lift = rpe0 - bumps, bumps
        druse = (y >= rpe + rpe_t) & (y < rpe0 + rpe_t) & (bumps > 0.01)
        extra[druse] = 0.6
        mask = druse

    top = rpe0 - lift  # bottom of the neural retina
    ilm = top - thick
    d = (y - ilm) / np.maximum(thick, 1e-3)
    retina = (d >= 0) & (d < 1)
    img = np.full(x.shape, 0.03, np.float32)  # vitreous
    img[retina] = np.interp(d[retina], _LAYER_D, _LAYER_V)
    rpe_band = (y >= rpe) & (y < rpe + rpe_t)
    img[rpe_band] = 0.95
    depth = np.clip(y - (rpe0 + rpe_t), 0, None)
    choroid = 0.45 * np.exp(-depth / anat.uniform(0.15, 0.3)) * \
        (0.75 + 0.25 * _smooth_noise(rng, size, 0.02))
    img = np.where((y >= np.maximum(rpe + rpe_t, rpe0)) & ~rpe_band, choroid, img)
    if label == "lung-oct-dme":  # dark intraretinal cysts in the swollen retina
        for _ in range(lrng.integers(3, 8)):
            cx = xc + lrng.uniform(-0.8, 0.8) * w
            bruch, th = layers(cx)
            cy = bruch - th * (1 - lrng.uniform(0.3, 0.7))
            rx, ry = lrng.uniform(0.03, 0.07), lrng.uniform(0.025, 0.05)
            cyst = (_ellipse(x, y, cx, cy, rx, ry) < 1) & retina
            extra[cyst] = 0.03
            mask |= cyst
    img = np.where(np.isnan(extra), img, extra)
    # Speckle, whose variance falls as pixels grow (a small image averages more of it).
    k = 3.0 * max(1.0, (256.0 / size) ** 2)
    img = img * rng.gamma(k, 1 / k, img.shape).astype(np.float32)
    img = _blur(img, 0.35 * size / 128, 0.8 * size / 128)
    region = (y >= ilm - 0.02) & (y < rpe0 + rpe_t + 0.02)
    return img, mask, region


# ---------------------------------------------------------------- public API

def label_index(label: str | int) -> int:
    """Index of a class name (or a valid index) in :data:`CLASS_NAMES`."""
    if isinstance(label, (int, np.integer)):
        if not 0 <= label < len(CLASS_NAMES):
            raise ValueError(f"class index {label} is outside 0..{len(CLASS_NAMES) - 1}")
        return int(label)
    if label not in CLASS_NAMES:
        raise ValueError(f"unknown class {label!r}; expected one of {', '.join(CLASS_NAMES)}")
    return CLASS_NAMES.index(label)


def make_phantom(label: str | int, *, size: int = 256, seed: int, patient: int | None = None
                 ) -> Phantom:
    """Draw one labelled phantom.

    Args:
        label: class name or index in :data:`CLASS_NAMES`.
        size: side of the square image in pixels (>= 16).
        seed: image seed: pose, exposure, noise and findings.
        patient: synthetic patient number, which fixes the anatomy; defaults to ``seed``.

    Returns:
        The phantom, its lesion mask and its body/retina region.
    """
    idx = label_index(label)
    name = CLASS_NAMES[idx]
    if size < 16:
        raise ValueError("phantoms need at least 16x16 pixels")
    patient = seed if patient is None else patient
    anat = np.random.default_rng([int(patient), 7919])
    # Pose, exposure and noise depend on the seed alone, findings on seed and class: the
    # same seed and patient under another class of the same modality differ only by the
    # finding (a counterfactual pair for explanation tests).
    rng = np.random.default_rng([int(seed), 104729])
    lrng = np.random.default_rng([int(seed), 1299709, idx])
    if name in OCT_CLASSES:
        img, mask, region = _oct(name, size, anat, rng, lrng)
        img = _finish(img, rng, size, noise=(0.01, 0.03), blur=(0.2, 0.5))
        modality = "OPT"
    else:
        img, mask, region = _chest(name, size, anat, rng, lrng)
        img = _finish(img, rng, size, noise=(0.008, 0.03), blur=(0.3, 0.9))
        modality = "DX"
    return Phantom(image=img, mask=mask & region, region=region, label=name, label_index=idx,
                   modality=modality, patient_id=f"P{patient:04d}", seed=int(seed))


def make_dataset(per_class: int, *, size: int = 256, seed: int = 0,
                 classes: Sequence[str] = CLASS_NAMES, max_images_per_patient: int = 4
                 ) -> Iterator[Phantom]:
    """Yield ``per_class`` phantoms of each class, class by class.

    Images are grouped into synthetic patients of 1..``max_images_per_patient`` images
    (same anatomy, different pose and findings), so patient-level splits are meaningful.
    Patient numbers are unique within one ``seed``.
    """
    names = [CLASS_NAMES[label_index(c)] for c in classes]
    grouping = np.random.default_rng([int(seed), 31337])
    patient = int(seed) * 100_000
    image_seed = int(seed) * 10_000_000
    for name in names:
        left = 0
        for _ in range(per_class):
            if left == 0:
                patient += 1
                left = int(grouping.integers(1, max_images_per_patient + 1))
            left -= 1
            image_seed += 1
            yield make_phantom(name, size=size, seed=image_seed, patient=patient)
