"""Batches for training and evaluation.

Small sets live on the device as one uint8 tensor and are augmented a whole batch at a time
(:class:`DeviceLoader`, the fast path on CPU and GPU alike); file-backed sets stream through a ``DataLoader``
with workers (:class:`ImageFileDataset`). Both yield uint8/float batches that :func:`normalize` finishes on the
device, so the model sees the same input either way.
"""

from __future__ import annotations

import functools
import math
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .datasets import Augment, ImageFiles
from .folders import load_image, resize_center_crop
from .sampling import ClassSampler, EpochSampler, shard


def random_crop_flip(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator, rank: int = 0,
                     world_size: int = 1) -> torch.Tensor:
    """Random crop (zero padding ``padding``) and horizontal flip for a whole (B, C, H, W) batch at once.

    Under data parallelism (``world_size`` > 1) every rank draws for the whole global batch of ``B * world_size``
    images (the generators stay in step) and takes its stride of the draws, the rows of the global batch it holds
    (:func:`~ccar.data.sampling.shard`): each image is augmented as one process would, and ranks never repeat each
    other's draws."""
    b, _, h, w = images.shape
    device = images.device
    mine = slice(rank, b * world_size, world_size)
    if padding:
        padded = F.pad(images, (padding, padding, padding, padding))
        draws = torch.randint(0, 2 * padding + 1, (2, b * world_size), generator=generator, device=generator.device)
        offsets = draws[:, mine].to(device)
        rows = (offsets[0, :, None] + torch.arange(h, device=device)).view(b, 1, h, 1)
        cols = (offsets[1, :, None] + torch.arange(w, device=device)).view(b, 1, 1, w)
        # Gather rows, then columns: two index ops for the whole batch instead of a Python loop.
        images = padded.gather(2, rows.expand(b, padded.shape[1], h, padded.shape[3]))
        images = images.gather(3, cols.expand(b, padded.shape[1], h, w))
    if flip:
        draws = torch.rand(b * world_size, generator=generator, device=generator.device)
        mask = (draws[mine] < 0.5).to(device).view(b, 1, 1, 1)
        images = torch.where(mask, images.flip(3), images)
    return images


def normalize(batch: torch.Tensor, augment: Augment, channels_last: bool = False) -> torch.Tensor:
    """uint8 images -> float, scaled to [0, 1] and standardised; float features -> standardised."""
    x = batch.float()
    if batch.dtype == torch.uint8:
        x = x.div_(255.0)
        shape = (1, -1, 1, 1)
    else:
        shape = (1, -1)
    mean, std = _stats_on(tuple(augment.mean), tuple(augment.std), x.device, shape)
    x = (x - mean) / std
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@functools.lru_cache(maxsize=16)
def _stats_on(mean: tuple, std: tuple, device: torch.device, shape: tuple) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as tensors on ``device``, made once instead of copied to the device every batch."""
    return torch.tensor(mean, device=device).view(shape), torch.tensor(std, device=device).view(shape)


class DeviceLoader:
    """Shuffled (or re-sampled) mini-batches of device-resident tensors with batched augmentation; deterministic
    given the seed. ``rank``/``world_size`` take one stride of the epoch's global sequence (distributed training);
    ``set_epoch`` moves to the next epoch's sequence. ``sampler``: see :mod:`ccar.data.sampling`.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
        augment: Optional[Augment] = None,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        sampler: str = "instance",
        sampler_epoch: int = 0,
        epochs: int = 1,
    ):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.sequence = ClassSampler(targets, sampler, sampler_epoch, epochs, seed, shuffle)
        self.images = images.to(device)
        self.targets = targets.to(device)
        self.batch_size, self.augment, self.shuffle, self.drop_last = batch_size, augment, shuffle, drop_last
        self.seed, self.epoch, self.rank, self.world_size = seed, 0, rank, world_size
        self.device = torch.device(device)
        # The augmentation draws: on a GPU, drawn there (a CPU draw copied over each batch would make the host wait
        # for the device every step); on the CPU, the CPU's generator, as always.
        self.generator = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu")
        self.start, self.start_state = 0, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, step: int, generator_state: torch.Tensor) -> None:
        """The next iteration starts at batch ``step``, the augmentation generator in ``generator_state`` (as
        :attr:`generator` was after the batch before it): a run resumed mid-epoch sees the batches it would have."""
        self.start, self.start_state = step, generator_state

    def _order(self) -> torch.Tensor:
        return shard(self.sequence.indices(self.epoch), self.rank, self.world_size)

    def __len__(self) -> int:
        n = math.ceil(len(self.targets) / self.world_size)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = self._order().to(self.device)
        self.generator.manual_seed(self.seed * 7919 + self.epoch + 1)
        start, state, self.start, self.start_state = self.start, self.start_state, 0, None
        if state is not None:
            self.generator.set_state(state)
        for i in range(start, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment is not None and x.ndim == 4 and (self.augment.crop_padding or self.augment.flip):
                x = random_crop_flip(x, self.augment.crop_padding, self.augment.flip, self.generator, self.rank,
                                     self.world_size)
            yield x, self.targets[idx]


class ImageFileDataset(torch.utils.data.Dataset):
    """Decodes images with Pillow on access. Training: random-resized crop + flip; evaluation: resize + center crop.

    Returns uint8 (3, size, size) tensors; normalisation happens on the device. Decode errors name the file;
    Pillow's decompression-bomb guard stays on.
    """

    def __init__(self, files: ImageFiles, train: bool, size: int = 224, seed: int = 0, flip: bool = True):
        self.files, self.train, self.size, self.seed, self.flip = files, train, size, seed, flip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        epoch, i = divmod(int(index), len(self.files))  # EpochSampler's epoch * N + i (plain indexing: epoch 0)
        im = self._transform(load_image(self.files.paths[i]), i, epoch)
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
        return x, int(self.files.targets[i])

    def _transform(self, im, i, epoch=0):
        from PIL import Image

        s = self.size
        if not self.train:  # resize to 256/224 of the crop, centre crop (the ImageNet evaluation transform)
            return resize_center_crop(im, s, short=round(s * 256 / 224))
        rng = np.random.default_rng([self.seed, i, epoch])
        w, h = im.size
        for _ in range(10):  # random-resized crop, scale (0.08, 1), ratio (3/4, 4/3)
            area = w * h * rng.uniform(0.08, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
                break
        else:
            cw = ch = min(w, h)
            left, top = (w - cw) // 2, (h - ch) // 2
        im = im.resize((s, s), Image.BILINEAR, box=(left, top, left + cw, top + ch))
        if rng.random() < 0.5 and self.flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return im


def file_loader(files: ImageFiles, batch_size: int, train: bool, workers: int = 4, seed: int = 0,
                rank: int = 0, world_size: int = 1, size: int = 224, sampler: str = "instance",
                sampler_epoch: int = 0, epochs: int = 1, flip: bool = True):
    """A DataLoader over :class:`ImageFileDataset`; training order (shuffled or re-sampled, one stride per rank
    under data parallelism) from :class:`ccar.data.sampling.EpochSampler`, the same sequence as the device path."""
    dataset = ImageFileDataset(files, train, size, seed, flip)
    sequence = ClassSampler(torch.from_numpy(np.asarray(files.targets)), sampler, sampler_epoch, epochs, seed, train)
    order = EpochSampler(sequence, rank, world_size)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=order,
        num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=False, generator=g,
        persistent_workers=workers > 0,
    )


def loader_state(loader) -> Optional[torch.Tensor]:
    """What resuming ``loader`` mid-epoch needs beyond the step: the device path's augmentation generator (file
    loaders seed each sample's augmentation from its index and the epoch: nothing)."""
    return loader.generator.get_state() if isinstance(loader, DeviceLoader) else None


def resume_loader(loader, step: int, state: Optional[torch.Tensor]) -> None:
    """Make ``loader``'s next epoch start at batch ``step`` (see :func:`loader_state`)."""
    if isinstance(loader, DeviceLoader):
        loader.resume_at(step, state)
    else:
        loader.sampler.skip_next(step * loader.batch_size)
