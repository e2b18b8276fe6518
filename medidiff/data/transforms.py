"""MONAI transform pipelines built from a data card, per task and stage, in 2D and 3D.

Order: load (:func:`medidiff.io.read`, checked against the card) -> derived labels -> channel selection
-> label remap -> ``Orientationd`` (3D) -> grid check -> ``Spacingd`` (card spacing) -> split slab ->
intensity normalisation (CT window / MRI percentiles / RGB range, all to [0, 1]) -> luma for RGB fusion
inputs -> patches and flips (training) or a centre patch (validation) -> degradation (restoration,
super-resolution) -> dtypes. The geometric steps are MONAI's invertible transforms, so a prediction on
the processed grid maps back onto the original scan with :func:`invert`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from monai.data import MetaTensor, get_track_meta, set_track_meta
from monai.transforms import (
    AsDiscreted,
    CenterSpatialCropd,
    Compose,
    DeleteItemsd,
    EnsureTyped,
    FgBgToIndicesd,
    Invertd,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialCropd,
    SpatialPadd,
    SqueezeDimd,
)
from monai.transforms.utils_pytorch_numpy_unification import percentile

from medidiff.data.cards import DataCard, InputSpec
from medidiff.data.custom import (
    CheckPaird,
    Degraded,
    DeriveTissueLabeld,
    ForegroundPatchd,
    LoadCased,
    RemapLabelsd,
    SelectChannelsd,
    ToLumad,
)
from medidiff.errors import MedidiffError

__all__ = ["Stage", "preprocess", "standardise", "train_sampling", "centre_patch", "slice_of", "finish",
           "invert", "apply",
           "user_errors"]

Stage = Literal["train", "val", "test", "predict"]
LABEL_KEYS = ("label", "fov")
_BIG = 10**7  # an open-ended crop bound: MONAI clips it to the image


def preprocess(
    card: DataCard,
    *,
    inputs: Mapping[str, InputSpec] | None = None,
    with_labels: bool = True,
    extra_keys: Sequence[str] = (),
    slices: tuple[int, int] | None = None,
    luma: bool = False,
) -> list[MapTransform]:
    """Load and bring one case onto the card's grid and intensity scale.

    Args:
        card: the data card.
        inputs: image keys and their specs (default: the card's ``inputs``; fusion training maps one
            source to ``image``).
        with_labels: load ``label`` (or derive it) — segmentation only.
        extra_keys: further label-like keys present in the cases, e.g. ``("fov",)``.
        slices: keep only this index range along ``card.slice_axis`` (split slabs).
        luma: RGB inputs become luma ``key`` (1 channel) plus ``key_chroma`` (fusion of colour-mapped PET).

    Returns:
        transforms producing ``{key: MetaTensor (C, *spatial)}`` with images in [0, 1].
    """
    inputs = dict(inputs if inputs is not None else card.inputs)
    images = list(inputs)
    labels = (["label"] if with_labels else []) + [k for k in extra_keys if k != "label"]
    derive = card.derive.get("label") if with_labels else None
    loaded = images + [k for k in labels if not (derive and k == "label")] + (list(derive["from"]) if derive else [])
    t: list[MapTransform] = [LoadCased(card, loaded, inputs)]
    if derive:
        t.append(DeriveTissueLabeld("label", derive["from"], derive.get("threshold", 0.5), derive.get("scale", 1.0)))
    t += [SelectChannelsd([k], spec.use_indices) for k, spec in inputs.items() if spec.use != spec.channels]
    if with_labels and not derive:
        t.append(RemapLabelsd(["label"], card))
    if "fov" in labels:  # field-of-view masks are stored 0/255 or 0/1: make them 0/1
        t.append(AsDiscreted(["fov"], threshold=0.5))
    return t + standardise(inputs, labels=labels, spatial_dims=card.spatial_dims, orientation=card.orientation,
                           spacing=card.spacing, slice_axis=card.slice_axis, slices=slices, luma=luma)


def standardise(
    inputs: Mapping[str, InputSpec],
    *,
    labels: Sequence[str] = (),
    spatial_dims: int,
    orientation: str = "RAS",
    spacing: Sequence[float] | None = None,
    slice_axis: int = 2,
    slices: tuple[int, int] | None = None,
    luma: bool = False,
    resample: bool = True,
    record_bounds: bool = False,
) -> list[MapTransform]:
    """The part of :func:`preprocess` after loading, shared by training and inference: orientation (3D), grid
    check, spacing, slab, intensity normalisation to [0, 1], luma for RGB inputs.

    Args:
        inputs: image keys (already holding the channels the network takes) and their specs.
        labels: label-like keys resampled with them (nearest neighbour).
        resample: bring the case onto the training orientation and spacing; False keeps the native voxel grid
            (image tasks at inference, so that outputs line up with their input voxel for voxel).
        record_bounds: store the intensities mapped to 0 and 1 per channel as ``<key>_bounds`` (inference maps
            image outputs back to the input's units with them).
    """
    images = list(inputs)
    spatial_keys = images + list(labels)
    t: list[MapTransform] = []
    if spatial_dims == 3 and resample:
        t.append(Orientationd(spatial_keys, axcodes=orientation, labels=None))  # io.read sets space=RAS
    t.append(CheckPaird(images[0], spatial_keys))
    if spacing is not None and resample:
        modes = ["bilinear"] * len(images) + ["nearest"] * len(labels)
        t.append(Spacingd(spatial_keys, pixdim=spacing, mode=modes, dtype=torch.float32))
    if slices is not None:
        start, stop = [0] * spatial_dims, [_BIG] * spatial_dims
        start[slice_axis], stop[slice_axis] = slices
        t.append(SpatialCropd(spatial_keys, roi_start=start, roi_end=stop))
    if record_bounds:
        t += [IntensityBoundsd([k], spec.normalise) for k, spec in inputs.items()]
    t += [_normaliser(k, spec) for k, spec in inputs.items()]
    t += [ToLumad([k]) for k, spec in inputs.items() if spec.is_rgb and luma]
    return t


def train_sampling(
    keys: Sequence[str],
    patch_size: Sequence[int],
    *,
    card: DataCard,
    spatial_dims: int,
    label_key: str | None,
    num_samples: int = 1,
    flips: bool = True,
) -> list[MapTransform]:
    """Random patches (foreground-balanced when ``label_key`` is given) and flips.

    ``num_samples`` patches are cut from each loaded case (MONAI's ``num_samples``: a batch then holds
    ``batch_size * num_samples`` patches).

    For 2D training from 3D volumes the crop is one voxel thick along ``card.slice_axis`` and that
    axis is squeezed, so a 3D volume yields a 2D patch ``(C, *patch_size)``.
    """
    size = _crop_size(patch_size, card, spatial_dims)
    # Training patches need no metadata: plain tensors make every random transform several times cheaper.
    t: list[MapTransform] = [EnsureTyped(list(keys), track_meta=False), SpatialPadd(keys, spatial_size=size)]
    if label_key:
        # Foreground/background voxel indices are computed once, in the cached deterministic part of the
        # pipeline; without them every crop re-scans the whole label map (0.5 s per DRIVE batch).
        t.append(FgBgToIndicesd(label_key, fg_postfix="_fg", bg_postfix="_bg"))
        t.append(RandCropByPosNegLabeld(keys, label_key=label_key, spatial_size=size, pos=1, neg=1,
                                        num_samples=num_samples, fg_indices_key=f"{label_key}_fg",
                                        bg_indices_key=f"{label_key}_bg"))
        t.append(DeleteItemsd([f"{label_key}_fg", f"{label_key}_bg"]))
    else:
        t.append(RandSpatialCropSamplesd(keys, roi_size=size, num_samples=num_samples, random_size=False))
    if spatial_dims < card.spatial_dims:
        t.append(SqueezeDimd(keys, dim=card.slice_axis + 1))
    if flips:
        t += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]
    return t


def centre_patch(keys: Sequence[str], patch_size: Sequence[int], label_key: str | None = None) -> list[MapTransform]:
    """Deterministic validation patch of ``patch_size``: centred on the foreground of ``label_key`` when it has
    any (the foreground voxel nearest the centre of its bounding box), else on the image centre. A plain centre
    crop can miss a small organ entirely, leaving validation Dice NaN for a whole run."""
    pad = SpatialPadd(keys, spatial_size=patch_size)
    if label_key is None:
        return [pad, CenterSpatialCropd(keys, roi_size=patch_size)]
    return [pad, ForegroundPatchd(keys, label_key, patch_size)]


def slice_of(keys: Sequence[str], axis: int, index: int) -> list[MapTransform]:
    """One 2D slice ``index`` along spatial ``axis`` of a 3D case: ``(C, X, Y, Z) -> (C, *2D)``."""
    start, stop = [0, 0, 0], [_BIG] * 3
    start[axis], stop[axis] = index, index + 1
    return [SpatialCropd(keys, roi_start=start, roi_end=stop), SqueezeDimd(keys, dim=axis + 1)]


def finish(
    degrades: bool,
    *,
    image_keys: Sequence[str],
    label_keys: Sequence[str] = (),
    degradation: dict[str, Any] | None = None,
    seed: int = 0,
    random: bool = False,
) -> list[MapTransform]:
    """With ``degrades``, the simulated degradation of ``image`` (``condition``, for image-to-image tasks trained
    on clean images), then the batch dtypes."""
    t: list[MapTransform] = []
    if degrades:
        t.append(Degraded("image", degradation or {}, seed=seed, random=random))
        image_keys = [*image_keys, "condition"]
    t.append(EnsureTyped(list(image_keys), dtype=torch.float32, allow_missing_keys=True))
    if "label" in label_keys:
        t.append(EnsureTyped(["label"], dtype=torch.int64))
    extra = [k for k in label_keys if k != "label"] + ["kspace_mask"]
    t.append(EnsureTyped(extra, dtype=torch.float32, allow_missing_keys=True))
    return t


def invert(pred: torch.Tensor, reference: MetaTensor, transform: Compose, *, nearest: bool = False) -> MetaTensor:
    """Map a prediction on the processed grid back onto the original scan's grid.

    Args:
        pred: ``(C, *spatial)`` on the grid of ``reference``.
        reference: the processed input (one item of a batch, e.g. ``decollate_batch(batch)[i]["image"]``)
            carrying MONAI's record of the applied transforms.
        transform: the pipeline that produced ``reference``.
        nearest: nearest-neighbour interpolation (label maps) instead of linear.

    Returns:
        ``(C, *original_spatial)`` with the original affine and ``filename_or_obj``: ready for
        :func:`medidiff.io.write` (``like=`` the source file, or on its own).
    """
    data = {"pred": MetaTensor(torch.as_tensor(pred).detach().cpu()), "image": reference}
    inverter = Invertd("pred", transform=transform, orig_keys="image", nearest_interp=nearest)
    with warnings.catch_warnings():
        # a grid that needed no resampling has nothing to invert: the prediction is already on it
        warnings.filterwarnings("ignore", message="inverse has been called but no invertible transforms")
        return inverter(data)["pred"]


def apply(pipeline: Compose, data: dict[str, Any]) -> dict[str, Any]:
    """Run a pipeline on one case; a user error inside it comes out as :class:`MedidiffError`."""
    return user_errors(lambda: pipeline(data))


@contextlib.contextmanager
def metadata_tracking(enabled: bool) -> Iterator[None]:
    """MONAI's global MetaTensor tracking set to ``enabled`` inside the block, restored after it (errors too).

    Training patches carry no geometry worth keeping (the cached scans were already stripped of it), yet with
    tracking on every crop and flip re-wraps them as MetaTensors and records itself: two thirds of the time
    of a DRIVE batch went to that bookkeeping."""
    previous = get_track_meta()
    set_track_meta(enabled)
    try:
        yield
    finally:
        set_track_meta(previous)


def user_errors(call: Callable[[], Any]) -> Any:
    """Run ``call``; a MedidiffError that MONAI wrapped in "applying transform ..." comes out unwrapped."""
    try:
        return call()
    except RuntimeError as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, MedidiffError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


class IntensityBoundsd(MapTransform):
    """Record the intensities that a card's normalisation maps to 0 and 1, per channel, as ``<key>_bounds``
    ``(C, 2)`` float64, so that image outputs can be mapped back to the input's units (:func:`denormalise`).
    Percentiles come from MONAI's own routine, the one ``ScaleIntensityRangePercentilesd`` uses after it."""

    def __init__(self, keys: Sequence[str], normalise: Mapping[str, Any]):
        super().__init__(keys)
        self.normalise = dict(normalise)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}_bounds"] = intensity_bounds(torch.as_tensor(d[key]), self.normalise)
        return d


def intensity_bounds(image: torch.Tensor, normalise: Mapping[str, Any]) -> torch.Tensor:
    """``(C, 2)`` float64: the intensities a card's normalisation maps to 0 and 1, per channel of ``(C, ...)`` —
    a window's bounds, or the image's percentiles through MONAI's own routine (the one
    ``ScaleIntensityRangePercentilesd`` normalises with)."""
    if normalise["method"] == "window":
        rows = [[float(normalise["low"]), float(normalise["high"])]] * image.shape[0]
    else:
        rows = [[float(percentile(channel, normalise["lower"])), float(percentile(channel, normalise["upper"]))]
                for channel in image]
    return torch.tensor(rows, dtype=torch.float64)


def _normaliser(key: str, spec: InputSpec) -> MapTransform:
    norm = spec.normalise
    if norm["method"] == "window":
        return ScaleIntensityRanged([key], a_min=norm["low"], a_max=norm["high"], b_min=0.0, b_max=1.0, clip=True)
    return ScaleIntensityRangePercentilesd([key], lower=norm["lower"], upper=norm["upper"], b_min=0.0, b_max=1.0,
                                           clip=True, channel_wise=True)


def _crop_size(patch_size: Sequence[int], card: DataCard, spatial_dims: int) -> list[int]:
    size = [int(p) for p in patch_size]
    if len(size) != spatial_dims:
        raise ValueError(f"patch_size {tuple(size)} must have {spatial_dims} entries for spatial_dims={spatial_dims}")
    if spatial_dims < card.spatial_dims:
        size.insert(card.slice_axis, 1)
    return size
