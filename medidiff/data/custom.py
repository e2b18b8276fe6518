"""Dictionary transforms MONAI does not provide: card-driven loading, label remapping, tissue labels
derived from probability maps, channel selection, RGB -> luma/chroma and seeded degradation.

All keep ``MetaTensor`` metadata; none changes geometry, so MONAI's inverse of the geometric
transforms around them is unaffected.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, SpatialCropd

from medidiff import io
from medidiff.data.cards import DataCard
from medidiff.data.degrade import degrade_with_extras
from medidiff.data.labels import read_stored, to_classes

# ITU-R BT.601 full-range RGB <-> YCbCr, for images in [0, 1]; its first row, LUMA, weighs R, G, B into Y.
LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YCBCR = torch.tensor([LUMA, [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def rgb_to_ycbcr(rgb: torch.Tensor, channel_dim: int = 0) -> torch.Tensor:
    """RGB in [0, 1] to YCbCr with Cb, Cr centred on 0.5 (BT.601, full range).

    Args:
        rgb: ``(3, *spatial)``, or ``(B, 3, *spatial)`` with ``channel_dim=1``.
    """
    return _apply_matrix(_RGB_TO_YCBCR.to(rgb), rgb, channel_dim) + _centre(rgb, channel_dim)


def ycbcr_to_rgb(ycbcr: torch.Tensor, channel_dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`rgb_to_ycbcr`: recombine a (fused) luma with the original chroma.

    Args:
        ycbcr: ``(3, *spatial)`` (luma then Cb, Cr), or ``(B, 3, *spatial)`` with ``channel_dim=1``.
    """
    inverse = torch.linalg.inv(_RGB_TO_YCBCR.double()).to(ycbcr)
    return _apply_matrix(inverse, ycbcr - _centre(ycbcr, channel_dim), channel_dim)


def _centre(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    shape = [1] * x.ndim
    shape[channel_dim] = 3
    return torch.tensor([0.0, 0.5, 0.5], dtype=x.dtype, device=x.device).view(shape)


def _apply_matrix(matrix: torch.Tensor, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    if x.shape[channel_dim] != 3:
        raise ValueError(f"expected 3 colour channels along dim {channel_dim}, got shape {tuple(x.shape)}")
    return torch.tensordot(matrix, x.movedim(channel_dim, 0), dims=1).movedim(0, channel_dim)


def like(reference: torch.Tensor, values: torch.Tensor) -> MetaTensor:
    """``values`` as a MetaTensor with ``reference``'s metadata (affine, file name) and transform record."""
    if not isinstance(reference, MetaTensor):
        return MetaTensor(values)
    return MetaTensor(values, meta=dict(reference.meta), applied_operations=list(reference.applied_operations))


def case_seed(base_seed: int, data: Mapping) -> int:
    """A stable per-case (and per-slice) seed, so validation/test degradations never change between runs."""
    key = f"{data.get('id', '')}/{int(data.get('slice_index', -1))}"
    return (base_seed * 1_000_003 + zlib.crc32(key.encode())) % (2**31 - 1)


class LoadCased(MapTransform):
    """Read every file of a card's case with :func:`medidiff.io.read`, checked against the card.

    Image keys (``card.inputs``) must have the card's channel count; ``label`` is read as the card's stored label
    values (:func:`medidiff.data.labels.read_stored`: its ``label_channel`` of a colour mask; :class:`RemapLabelsd`
    makes them classes), ``fov`` as a label map; any other key (e.g. probability maps for ``derive``) as
    single-channel images.
    """

    def __init__(self, card: DataCard, keys: Sequence[str], inputs: Mapping[str, Any] | None = None):
        super().__init__(keys, allow_missing_keys=True)
        self.card = card
        self.inputs = dict(inputs if inputs is not None else card.inputs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if not isinstance(d[key], (str, bytes)) and hasattr(d[key], "shape"):
                continue  # already loaded (cached or in-memory data)
            spec = self.inputs.get(key)
            channels = len(spec.channels) if spec else 1
            # Multi-channel volumes are 4D on disk, so only single-channel ones can be held to 3D.
            ndim = self.card.spatial_dims if channels == 1 or self.card.spatial_dims == 2 else None
            if key == "label":  # stored values, the card's channel; RemapLabelsd makes them classes
                d[key] = read_stored(d[key], self.card, ndim)
                continue
            kind = "label" if key == "fov" else "image"
            d[key] = io.read(d[key], kind=kind, expected_ndim=ndim, channels=channels)
        return d


class SelectChannelsd(MapTransform):
    """Keep the named channels of an input (e.g. DRIVE's green channel)."""

    def __init__(self, keys: Sequence[str], indices: Sequence[int]):
        super().__init__(keys)
        self.indices = list(indices)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key][self.indices]
        return d


class RemapLabelsd(MapTransform):
    """Stored label values to the card's classes with :func:`medidiff.data.labels.to_classes` (threshold, or
    ``label_remap`` / ``label_others``); values the card does not name are a user error naming the file.

    Args:
        keys: label keys, as :class:`LoadCased` read them.
        card: the card whose label fields apply.
    """

    def __init__(self, keys: Sequence[str], card: DataCard):
        super().__init__(keys)
        self.card = card

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            classes = to_classes(label.detach().cpu().numpy(), self.card, io.source_path(label))
            d[key] = like(label, torch.from_numpy(classes))
        return d


class ForegroundPatchd(MapTransform):
    """Crop ``roi_size`` around the foreground voxel of ``label_key`` nearest the centre of the foreground's
    bounding box (deterministic; the image centre when there is no foreground). Inputs are at least
    ``roi_size`` (pad first)."""

    def __init__(self, keys: Sequence[str], label_key: str, roi_size: Sequence[int]):
        super().__init__(keys)
        self.label_key, self.roi_size = label_key, [int(r) for r in roi_size]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = torch.as_tensor(d[self.label_key])[0]
        spatial = torch.tensor(label.shape)
        found = (label > 0).nonzero()
        if found.numel() == 0:
            centre = spatial // 2
        else:
            middle = (found.min(0).values + found.max(0).values).float() / 2
            centre = found[((found.float() - middle) ** 2).sum(1).argmin()]
        size = torch.tensor(self.roi_size)
        start = (centre - size // 2).clamp(min=0)
        start = torch.minimum(start, spatial - size)
        return SpatialCropd(self.keys, roi_start=start.tolist(), roi_end=(start + size).tolist())(d)


class DeriveTissueLabeld(MapTransform):
    """Background / tissue label map from probability maps: ``1 + argmax`` where the winning
    probability reaches ``threshold``, else 0 (MNI152 GM/WM -> background/GM/WM). Drops the inputs."""

    def __init__(self, out_key: str, from_keys: Sequence[str], threshold: float = 0.5, scale: float = 1.0):
        super().__init__(list(from_keys))
        self.out_key, self.threshold, self.scale = out_key, threshold, scale

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        maps = [d.pop(k) for k in self.keys]
        probs = torch.cat([torch.as_tensor(m).float() for m in maps]) / self.scale
        best, index = probs.max(dim=0, keepdim=True)
        label = torch.where(best >= self.threshold, index + 1, torch.zeros_like(index)).long()
        d[self.out_key] = like(maps[0], label)
        return d


class ToLumad(MapTransform):
    """RGB input -> luma ``key`` (1 channel) and chroma ``key + '_chroma'`` (Cb, Cr), for fusion."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            ycbcr = rgb_to_ycbcr(d[key])
            d[key], d[f"{key}_chroma"] = ycbcr[:1], ycbcr[1:]
        return d


class CheckPaird(MapTransform):
    """Every other spatial key must share the reference key's grid (run after orientation)."""

    def __init__(self, reference: str, keys: Sequence[str]):
        super().__init__(keys, allow_missing_keys=True)
        self.reference = reference

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        for key in self.key_iterator(data):
            if key != self.reference:
                io.check_pair(data[self.reference], data[key], what="label" if key in ("label", "fov") else "source")
        return dict(data)


class Degraded(Randomizable, MapTransform):
    """``condition = degrade(image, spec, seed)`` (see :mod:`medidiff.data.degrade`).

    Args:
        key: the clean image, ``(C, *spatial)`` in [0, 1].
        spec: degradation spec.
        seed: with ``random=False`` the seed is derived from the case id and this base seed
            (validation/test: the same degraded input every run); with ``random=True`` it is drawn
            from the transform's random state (training: fresh degradation each time).
    """

    def __init__(self, key: str, spec: dict[str, Any], seed: int = 0, random: bool = False,
                 out_key: str = "condition"):
        super().__init__([key])
        self.key, self.spec, self.seed, self.random, self.out_key = key, spec, seed, random, out_key
        self._seed = seed

    def randomize(self, data: Any = None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.random:
            self.randomize()
        seed = self._seed if self.random else case_seed(self.seed, d)
        degraded, extras = degrade_with_extras(d[self.key], self.spec, seed)
        d[self.out_key] = degraded
        # what a data-consistency step needs travels with the batch (low_res only for the exact box model,
        # whose shape is fixed by the patch size; the Gaussian model's low-res grid is not used by any hook)
        d.update({k: v for k, v in extras.items() if k == "kspace_mask"})
        if self.spec.get("downsample", {}).get("model") == "average":
            d["low_res"] = extras["low_res"]
        d["degradation_seed"] = seed
        return d
