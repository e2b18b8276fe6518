"""``MedicalDataModule``: train / val / test / predict data for one task, built from a data card.

Batch contract (what the task modules consume):

- segmentation: ``image`` float32 ``(B, C_in, *spatial)``, ``label`` int64 ``(B, 1, *spatial)`` with classes
  ``0..K-1``, plus ``fov`` float32 ``(B, 1, *spatial)`` when the card has field-of-view masks.
- restoration / superres: ``image`` the clean target float32 ``(B, C, *spatial)`` in [0, 1], ``condition`` the
  degraded image on the same grid (+ ``kspace_mask`` ``(B, 1, *spatial)`` for k-space undersampling).
- fusion: train/val ``image`` ``(B, 1, *spatial)`` drawn from both modalities; test/predict ``source_a``,
  ``source_b`` (+ ``source_b_chroma`` ``(B, 2, *spatial)`` when a source is an RGB colour map).

Every batch also carries ``id`` (case ids) and keeps MONAI ``MetaTensor`` metadata; 2D slices of 3D
volumes carry ``slice_index``. Train/val batches are patches of ``patch_size``; test/predict batches are
whole images (batch size 1), on which :meth:`MedicalDataModule.invert` maps predictions back.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, DeleteItemsd
from torch.utils.data import ConcatDataset

from medidiff.data import transforms as T
from medidiff.data.cards import DataCard, load_card
from medidiff.data.custom import LoadCased, RemapLabelsd
from medidiff.errors import MedidiffError
from medidiff.tasks import task_class

__all__ = ["MedicalDataModule", "SliceDataset"]

DEFAULT_PATCH = {2: (64, 64), 3: (64, 64, 32)}


class MedicalDataModule(LightningDataModule):
    """Data for one task from one data card; the task (:mod:`medidiff.tasks`) says which keys a case brings, what
    the card must provide and which degradation is simulated.

    Args:
        card: card name (``load_card``) or path to a card YAML.
        task: a task name of :data:`medidiff.tasks.REGISTRY` (the model's task).
        spatial_dims: 2 or 3; None takes the card's. 2 on a 3D card slices volumes along ``card.slice_axis``.
        patch_size: training/validation patch, one entry per spatial dim (default 64² / 64²x32).
        batch_size: cases per training/validation batch (each gives ``samples_per_case`` patches).
        samples_per_case: patches cut from each loaded case per epoch.
        num_workers: DataLoader workers.
        degradation: degradation spec for restoration/superres (``medidiff.data.degrade``); None: a default.
        cache: keep the deterministic part of the pipeline in memory (MONAI ``CacheDataset``).
        cache_rate: fraction of cases cached when ``cache`` is on.
        seed: seeds patch sampling, augmentation and degradations.
        augment: random flips during training.
        limit_cases: use at most this many cases per split (quick runs, tests).
    """

    def __init__(
        self,
        card: str,
        task: str = "segmentation",
        spatial_dims: int | None = None,
        patch_size: Sequence[int] | None = None,
        batch_size: int = 2,
        samples_per_case: int = 1,
        num_workers: int = 0,
        degradation: dict[str, Any] | None = None,
        cache: bool = False,
        cache_rate: float = 1.0,
        seed: int = 0,
        augment: bool = True,
        limit_cases: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # its seed is not the model's: Lightning would refuse to merge the two
        self.task = task_class(task)
        self.card: DataCard = load_card(card)
        self.spatial_dims = int(spatial_dims or self.card.spatial_dims)
        self._check_options()
        self.patch_size = tuple(patch_size) if patch_size else DEFAULT_PATCH[self.spatial_dims]
        default = self.task.default_degradation(self.spatial_dims)
        self.degradation = copy.deepcopy(degradation if degradation is not None else default)
        self.datasets: dict[str, torch.utils.data.Dataset] = {}
        self.transforms: dict[str, Compose] = {}

    # ------------------------------------------------------------------------------------ Lightning

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for split in wanted.get(stage or "", ("train", "val", "test", "predict")):
            if split not in self.datasets:
                if split == "train" and self._labels:
                    self._check_foreground()
                self.datasets[split] = self._dataset(split)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return self._loader("train", self.hparams.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", 1)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", 1)

    # --------------------------------------------------------------------------------- public helpers

    def invert(self, pred: torch.Tensor, reference: MetaTensor, *, split: str = "test",
               nearest: bool = False) -> MetaTensor:
        """Map one prediction ``(C, *spatial)`` back onto its source scan (see :func:`transforms.invert`).

        Args:
            pred: prediction on the grid of ``reference``.
            reference: the processed input of that case, e.g. ``decollate_batch(batch)[0]["image"]``; for 2D
                slices of volumes, stack the slice predictions along the slice axis and pass
                ``self.volume(i)["image"]``.
            split: ``test`` or ``predict``.
            nearest: nearest-neighbour interpolation (label maps).
        """
        self.setup("test" if split == "test" else "predict")
        return T.invert(pred, reference, self.transforms[split], nearest=nearest)

    def volume(self, index: int, split: str = "test") -> dict[str, Any]:
        """The processed 3D case behind 2D slices (or the whole case in native dimension)."""
        self.setup("test" if split == "test" else "predict")
        ds = self.datasets[split]
        return ds.volumes[index] if isinstance(ds, SliceDataset) else ds[index]

    # ----------------------------------------------------------------------------------- internals

    def _check_options(self) -> None:
        card, name = self.card, self.task.name
        if name not in card.tasks:
            raise MedidiffError(f"card '{card.name}' does not support task '{name}' (tasks: {list(card.tasks)})",
                                card.path)
        if self.spatial_dims not in (2, 3) or self.spatial_dims > card.spatial_dims:
            raise MedidiffError(f"spatial_dims={self.spatial_dims} is not possible for the {card.spatial_dims}D "
                                f"card '{card.name}'", card.path)
        self.task.check_card(card)

    def _cases(self, split: str) -> tuple[list[dict[str, str]], tuple[int, int] | None]:
        name = "test" if split == "predict" else split
        if name not in self.card.splits:
            raise MedidiffError(f"the card has no '{name}' split", self.card.path)
        chosen = self.card.splits[name]
        return chosen.cases[: self.hparams.limit_cases], chosen.slices

    def _dataset(self, split: str) -> torch.utils.data.Dataset:
        cases, slices = self._cases(split)
        sources = self.task.training_sources(self.card)
        if sources and split in ("train", "val"):
            return ConcatDataset([self._single_source(split, cases, slices, key) for key in sources])
        keys = self._keys(cases)
        data = [{"id": c["id"], **{k: c[k] for k in keys if k in c}} for c in cases]
        image_keys, _ = self.task.data_keys(self.card)
        label_keys = [k for k in ("label", "fov") if k in keys or (k == "label" and self._labels)]
        pre = T.preprocess(self.card, inputs={k: self.card.inputs[k] for k in image_keys},
                           with_labels=self._labels, extra_keys=label_keys, slices=slices, luma=self.task.luma)
        return self._build(split, data, pre, image_keys + label_keys, image_keys, label_keys)

    def _single_source(self, split: str, cases: list[dict], slices: Any, key: str) -> torch.utils.data.Dataset:
        """One input of every case as ``image`` (a prior trained on several modalities, one image at a time)."""
        data = [{"id": f"{c['id']}/{key}", "image": c[key]} for c in cases]
        pre = T.preprocess(self.card, inputs={"image": self.card.inputs[key]}, with_labels=False,
                           slices=slices, luma=self.task.luma)
        # the prior trains on luma only; dropping the colour source's chroma lets MRI and PET items share a batch
        pre.append(DeleteItemsd(["image_chroma"]))
        return self._build(split, data, pre, ["image"], ["image"], [])

    def _build(self, split: str, data: list[dict], pre: list, spatial_keys: list[str], image_keys: list[str],
               label_keys: list[str]) -> torch.utils.data.Dataset:
        train = split == "train"
        finish = T.finish(self.task.degrades, image_keys=image_keys, label_keys=label_keys,
                          degradation=self.degradation, seed=self.hparams.seed, random=train)
        sliced = self.spatial_dims < self.card.spatial_dims
        if train:
            sample = T.train_sampling(spatial_keys, self.patch_size, card=self.card, spatial_dims=self.spatial_dims,
                                      label_key="label" if self._labels else None,
                                      num_samples=self.hparams.samples_per_case, flips=self.hparams.augment)
            return self._dataset_of(data, self._compose(split, pre + sample + finish), patches=True)
        foreground = "label" if self._labels else None
        crop = T.centre_patch(spatial_keys, self.patch_size, foreground) if split == "val" else []
        if not sliced:
            return self._dataset_of(data, self._compose(split, pre + crop + finish))
        volumes = self._dataset_of(data, self._compose(split, pre))
        return SliceDataset(volumes, self.card.slice_axis, spatial_keys, Compose(crop + finish))

    def _compose(self, split: str, transforms: list) -> Compose:
        compose = Compose(transforms)
        compose.set_random_state(seed=self.hparams.seed)
        self.transforms[split] = compose
        return compose

    def _dataset_of(self, data: list[dict], transform: Compose, patches: bool = False) -> torch.utils.data.Dataset:
        """``patches``: a training set of random patches; cached, its random part runs without MetaTensors."""
        if self.hparams.cache:
            # copy_cache=False: the random transforms after the cache (crops, flips, degradations) build new
            # tensors and dicts and never write into the cached ones; deep-copying whole cached scans per
            # patch cost more than the network step on DRIVE
            dataset = _CacheDataset(data, transform, cache_rate=self.hparams.cache_rate, progress=False,
                                    copy_cache=False)
            dataset.track_meta = not patches
            return dataset
        return _Dataset(data, transform)

    def _check_foreground(self) -> None:
        """Training on label maps that are all background teaches nothing and fails silently: refuse it. Reads
        the label files only (as stored, through the card's channel, threshold and remap)."""
        if self.card.derive.get("label"):
            return  # derived labels come from probability maps; their pipeline checks them
        cases, _ = self._cases("train")
        read = Compose([LoadCased(self.card, ["label"]), RemapLabelsd(["label"], self.card)])
        for case in cases:
            if bool((T.apply(read, {"label": case["label"]})["label"] > 0).any()):
                return
        raise MedidiffError(f"every training label map holds only background (no foreground in "
                            f"{len(cases)} case(s)); check the card's label_remap / label_threshold and the files",
                            self.card.path)

    def _keys(self, cases: list[dict]) -> list[str]:
        keys = list(self.task.data_keys(self.card)[0])
        if self._labels:
            derive = self.card.derive.get("label")
            keys += list(derive["from"]) if derive else ["label"]
            keys += ["fov"] if cases and "fov" in cases[0] else []
        return keys

    @property
    def _labels(self) -> bool:
        """Whether the task trains on label maps (and their field-of-view masks)."""
        return "label" in self.task.data_keys(self.card)[1]

    def _loader(self, split: str, batch_size: int, shuffle: bool = False, generator: Any = None) -> DataLoader:
        stage = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split]
        self.setup(stage)
        return DataLoader(self.datasets[split], batch_size=batch_size, shuffle=shuffle, generator=generator,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)


class SliceDataset(torch.utils.data.Dataset):
    """2D slices of processed 3D cases, in order: case 0 slice 0, 0/1, ... (validation, test, prediction).

    Args:
        volumes: dataset of processed 3D cases ``{key: (C, X, Y, Z)}``.
        axis: spatial axis sliced (0, 1 or 2).
        keys: spatial keys to slice.
        transform: applied to each 2D slice dict.
    """

    def __init__(self, volumes: torch.utils.data.Dataset, axis: int, keys: Sequence[str], transform: Callable):
        self.volumes, self.axis, self.keys, self.transform = volumes, axis, list(keys), transform
        self._last: tuple[int, dict] | None = None
        self.index = [(i, z) for i in range(len(volumes)) for z in range(self._depth(i))]

    def _depth(self, i: int) -> int:
        return int(self._volume(i)[self.keys[0]].shape[self.axis + 1])

    def _volume(self, i: int) -> dict:
        if self._last is None or self._last[0] != i:  # slices are read in order: keep one volume
            self._last = (i, self.volumes[i])
        return self._last[1]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict:
        i, z = self.index[item]
        d = Compose(T.slice_of(self.keys, self.axis, z))(dict(self._volume(i)))
        d["slice_index"] = z
        return self.transform(d)


class _Dataset(Dataset):
    def _transform(self, index: int) -> Any:
        return T.user_errors(lambda: super(_Dataset, self)._transform(index))


class _CacheDataset(CacheDataset):
    track_meta = True  # for the transforms after the cache

    def _load_cache_item(self, idx: int) -> Any:
        with T.metadata_tracking(True):  # loading and resampling need the scan's geometry
            return T.user_errors(lambda: super(_CacheDataset, self)._load_cache_item(idx))

    def _transform(self, index: int) -> Any:
        cached = index % len(self) < self.cache_num  # (cache_rate < 1) the others run the whole pipeline
        with T.metadata_tracking(self.track_meta or not cached):
            return T.user_errors(lambda: super(_CacheDataset, self)._transform(index))
