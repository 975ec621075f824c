"""The trainer's data pipeline: epoch order, rank sharding, mid-epoch skipping, per-sample seeding."""

from __future__ import annotations

import open_clip
import pytest
import torch

from harma.data import DatasetError, load_split, train_transform
from harma.data.synthetic import write_synthetic_dataset
from tests.conftest import TINY_NAME
from training.config import DataConfig
from training.data import build_train_loader
from training.sampler import ResumableBatchSampler, epoch_permutation


def test_sampler_shards_the_global_batch_and_skips_done_steps():
    ranks = [ResumableBatchSampler(23, 4, world_size=2, rank=r, seed=1) for r in range(2)]
    assert ranks[0].steps_per_epoch == 2 and ranks[0].global_batch == 8  # drop_last: 23 // 8
    for s in ranks:
        s.set_epoch(3)
    b0, b1 = list(ranks[0]), list(ranks[1])
    perm = epoch_permutation(23, 1, 3).tolist()
    for step in range(2):
        assert [i for _, i in b0[step] + b1[step]] == perm[step * 8 : (step + 1) * 8]
        assert {e for e, _ in b0[step]} == {3}
    ranks[0].set_epoch(3, start_step=1)
    assert len(ranks[0]) == 1 and list(ranks[0]) == b0[1:]
    again = ResumableBatchSampler(23, 4, world_size=2, rank=0, seed=1)
    again.set_epoch(3)
    assert list(again) == b0  # a function of (seed, epoch) only
    again.set_epoch(4)
    assert list(again) != b0


def test_batches_do_not_depend_on_workers_resume_or_global_rng(tmp_path):
    split = load_split(write_synthetic_dataset(tmp_path, n_images=6, image_size=32), "train")  # 30 pairs
    tokenizer = open_clip.get_tokenizer(TINY_NAME)

    def batches(workers: int, start: int) -> list:
        loader, sampler = build_train_loader(split, train_transform(32), tokenizer, DataConfig(num_workers=workers),
                                             batch_size=4, world_size=1, rank=0, seed=5)
        sampler.set_epoch(1, start_step=start)
        return list(loader)

    torch.manual_seed(0)
    rng_before = torch.get_rng_state()
    plain = batches(0, 0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # augmentation leaves the training RNG alone
    resumed = batches(2, 3)
    assert len(plain) == 7 and len(resumed) == 4
    for a, b in zip(plain[3:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch.manual_seed(123)  # a different global RNG state changes nothing
    assert all(torch.equal(x, y) for x, y in zip(batches(0, 0)[0], plain[0]))


def test_dihedral_augment_keeps_every_pixel_of_a_turned_image_and_skips_randaugment():
    import pytest
    from PIL import Image

    from harma.config import ConfigError
    from training.data import build_transforms, image_spec

    clip = open_clip.create_model(TINY_NAME)
    train, _ = build_transforms("dihedral", clip)
    names = [type(t).__name__ for t in train.transforms]
    assert "RandAugment" not in names and "RandomRightAngleRotation" in names
    crop = next(t for t in train.transforms if type(t).__name__ == "RandomResizedCrop")
    assert crop.scale == (0.8, 1.0)
    # a constant image stays constant: no grey fill from rotations or RandAugment
    out = train(Image.new("RGB", (40, 40), (200, 10, 90)))
    size = image_spec(clip)[0]
    assert out.shape == (3, size, size)
    assert torch.allclose(out, out[:, :1, :1].expand_as(out), atol=1e-5)
    with pytest.raises(ConfigError, match="dihedral"):
        DataConfig(augment="dihedral4")


def test_label_batches_hold_whole_chunks_of_one_class_and_stay_resumable():
    groups = [i % 5 for i in range(103)]  # 5 classes of 20-21 samples
    ranks = [ResumableBatchSampler(103, 6, world_size=2, rank=r, seed=2, groups=groups, groups_per_batch=3)
             for r in range(2)]  # global batch 12 = 3 chunks of 4
    assert ranks[0].steps_per_epoch == (5 * 5) // 3  # 5 whole chunks of 4 per class, 3 chunks a batch
    for s in ranks:
        s.set_epoch(1)
    b0, b1 = list(ranks[0]), list(ranks[1])
    seen = []
    for step in range(len(b0)):
        batch = [i for _, i in b0[step] + b1[step]]
        chunks = [batch[k:k + 4] for k in range(0, 12, 4)]
        assert all(len({groups[i] for i in c}) == 1 for c in chunks)  # each chunk is one class
        seen += batch
    assert len(seen) == len(set(seen))  # no sample twice in an epoch
    ranks[0].set_epoch(1, start_step=2)
    assert list(ranks[0]) == b0[2:]  # mid-epoch resume: the same batches
    ranks[0].set_epoch(2)
    assert list(ranks[0]) != b0


def test_label_batches_need_labels_and_a_divisible_batch(tmp_path):
    split = load_split(write_synthetic_dataset(tmp_path, n_images=12, image_size=32), "train")  # 12 classes
    tokenizer = open_clip.get_tokenizer(TINY_NAME)
    loader, sampler = build_train_loader(split, train_transform(32), tokenizer, DataConfig(num_workers=0, label_batches=2),
                                         batch_size=10, world_size=1, rank=0, seed=0)
    sampler.set_epoch(0)
    images, _, image_ids, _ = next(iter(loader))
    labels = [split.labels[i] for i in image_ids.tolist()]
    assert len(set(labels[:5])) == 1 and len(set(labels[5:])) == 1  # two chunks of one class each
    with pytest.raises(DatasetError, match="must divide the global batch 9"):
        build_train_loader(split, train_transform(32), tokenizer, DataConfig(label_batches=2), batch_size=9,
                           world_size=1, rank=0, seed=0)
    split.labels = None
    with pytest.raises(DatasetError, match="needs a class label per image"):
        build_train_loader(split, train_transform(32), tokenizer, DataConfig(label_batches=2), batch_size=10,
                           world_size=1, rank=0, seed=0)
