"""Tests of the digits TFDS builder and the deterministic input pipeline."""

from __future__ import annotations

import itertools
import math

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from skipnet_jax.data import digits, pipeline, preparation, preprocess

NUM_CLASSES = 10


def make_config(data_dir, dataset="digits", **overrides) -> ml_collections.ConfigDict:
    """A pipeline config; ``data__<field>=...`` overrides go to ``config.data``."""
    config = ml_collections.ConfigDict(
        {
            "dataset": dataset,
            "data_dir": str(data_dir),
            "image_size": 32,
            "batch_size": 128,
            "eval_batch_size": 64,
            "seed": 0,
            "data": {
                "train_split": "train",
                "eval_split": "test",
                "augment": True,
                "shuffle_buffer": 1024,
                "cache": True,
                "mean": None,
                "std": None,
                "prefetch": 2,
                "num_threads": 0,
            },
        }
    )
    for key, value in overrides.items():
        if key.startswith("data__"):
            config.data[key.removeprefix("data__")] = value
        else:
            config[key] = value
    return config


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def assert_batches_equal(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def concat_processes(batches_per_process):
    """``[[batch of process k at step t]]`` -> ``[batches concatenated at step t]``."""
    return [
        {key: np.concatenate([batch[key] for batch in step]) for key in step[0]} for step in zip(*batches_per_process)
    ]


def per_process(make_iterator, process_count, n=None):
    """First `n` batches (all if None) of each process's iterator."""
    return [list(itertools.islice(make_iterator(k, process_count), n)) for k in range(process_count)]


def find_augmentation(augmented, original, pad, pad_value):
    """Which pad-and-crop shift (and mirror) turns `original` into `augmented`.

    Returns ``(shift, mirrored)`` with ``shift`` in ``[0, (2*pad+1)**2)``,
    preferring the unmirrored match for symmetric images, or None.
    """
    height, width, channels = original.shape
    for mirrored in (False, True):
        source = original[:, ::-1] if mirrored else original
        padded = np.empty((height + 2 * pad, width + 2 * pad, channels), np.float32)
        padded[...] = pad_value
        padded[pad : pad + height, pad : pad + width] = source
        shifts = itertools.product(range(2 * pad + 1), repeat=2)
        for shift, (dy, dx) in enumerate(shifts):
            crop = padded[dy : dy + height, dx : dx + width]
            if np.allclose(crop, augmented, atol=1e-5):
                return shift, mirrored
    return None


def augmentations(config, num_batches, pad, pad_value):
    """``(shift, mirrored)`` per train row, from augmented vs. plain iterators.

    The stream order does not depend on `config.data.augment`, so row i of
    the unaugmented iterator is the source of row i of the augmented one.
    """
    augmented = take(pipeline.create_train_iterator(config), num_batches)
    plain_config = config.copy_and_resolve_references()
    plain_config.data.augment = False
    plain = take(pipeline.create_train_iterator(plain_config), num_batches)
    found = [
        find_augmentation(aug_image, plain_image, pad, pad_value)
        for aug_batch, plain_batch in zip(augmented, plain)
        for aug_image, plain_image in zip(aug_batch["image"], plain_batch["image"])
    ]
    assert None not in found, "an output is not a shift/mirror of its source"
    return found


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data_dir with digits prepared once for the whole session."""
    path = tmp_path_factory.mktemp("tfds")
    preparation.prepare_dataset(make_config(path))  # Prepares digits.
    return path


@pytest.fixture(scope="session")
def digits_splits(data_dir):
    """Split name -> ``(uint8 images, labels)`` read straight from TFDS, in order."""
    builder = tfds.builder("digits", data_dir=str(data_dir))
    splits = {}
    for split in ("train", "test"):
        ds = builder.as_dataset(split=split, shuffle_files=False).batch(4096)
        batch = next(iter(tfds.as_numpy(ds)))
        splits[split] = (batch["image"], batch["label"])
    return splits


# ------------------------------------------------------------------ builder


def test_digits_split_sizes(data_dir):
    builder = tfds.builder("digits", data_dir=str(data_dir))
    assert builder.info.splits["train"].num_examples == digits.NUM_TRAIN_EXAMPLES
    assert builder.info.splits["test"].num_examples == digits.NUM_TEST_EXAMPLES
    assert (digits.NUM_TRAIN_EXAMPLES, digits.NUM_TEST_EXAMPLES) == (1437, 360)
    assert builder.info.features["label"].names == [str(d) for d in range(10)]
    assert str(builder.info.version) == "1.0.0"


def test_digits_split_is_stratified(digits_splits):
    train = np.bincount(digits_splits["train"][1], minlength=NUM_CLASSES)
    test = np.bincount(digits_splits["test"][1], minlength=NUM_CLASSES)
    test_fraction = digits.NUM_TEST_EXAMPLES / digits.NUM_EXAMPLES
    assert np.all(np.abs(test - (train + test) * test_fraction) <= 1)
    assert np.all(np.abs(train - (train + test) * (1 - test_fraction)) <= 1)


def test_digits_pixels_and_labels(digits_splits):
    images = np.concatenate([digits_splits[s][0] for s in ("train", "test")])
    labels = np.concatenate([digits_splits[s][1] for s in ("train", "test")])
    assert images.shape == (digits.NUM_EXAMPLES, 8, 8, 1)
    assert images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    levels = np.floor(np.arange(17) * 255 / 16 + 0.5).astype(np.uint8)
    assert set(np.unique(images)) <= set(levels)
    assert set(np.unique(labels)) == set(range(NUM_CLASSES))
    # Together the two splits are exactly sklearn's 1,797 images (a multiset).
    raw_images, raw_labels = digits.load_raw()

    def rows(imgs, labs):
        return sorted(img.tobytes() + bytes([lab]) for img, lab in zip(imgs, labs))

    assert rows(images, labels) == rows(raw_images, raw_labels)


def test_digits_normalisation_constants_are_train_statistics(digits_splits):
    pixels = digits_splits["train"][0].astype(np.float64) / 255
    assert pixels.mean() == pytest.approx(preprocess.DIGITS_MEAN[0], abs=1e-3)
    assert pixels.std() == pytest.approx(preprocess.DIGITS_STD[0], abs=1e-3)


# ------------------------------------------------------------------ info, errors


def test_dataset_info(data_dir):
    config = make_config(data_dir)
    assert pipeline.get_dataset_info(config) == pipeline.DatasetInfo(
        name="digits",
        num_classes=10,
        num_train_examples=1437,
        num_eval_examples=360,
        class_names=tuple(str(d) for d in range(10)),
        train_split="train",
        eval_split="test",
    )
    assert pipeline.num_eval_batches(config) == math.ceil(360 / 64)


def test_unknown_dataset_raises_value_error(data_dir):
    config = make_config(data_dir, dataset="no_such_dataset_xyz")
    with pytest.raises(ValueError) as excinfo:
        pipeline.create_train_iterator(config)
    message = str(excinfo.value)
    assert "dataset" in message and "no_such_dataset_xyz" in message
    assert "digits" in message  # Names the locally available choice.
    assert "\n" not in message


def test_unprepared_dataset_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="mnist"):
        pipeline.get_dataset_info(make_config(tmp_path, dataset="mnist"))


def test_batch_size_must_divide_by_process_count(data_dir):
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.create_train_iterator(make_config(data_dir, batch_size=127), process_count=2)
    with pytest.raises(ValueError, match="eval_batch_size"):
        pipeline.create_eval_iterator(make_config(data_dir, eval_batch_size=63), process_count=2)


# ------------------------------------------------------------------ train


def test_train_batch_shapes_and_dtypes(data_dir):
    batch = next(pipeline.create_train_iterator(make_config(data_dir)))
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (128, 32, 32, 3)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (128,)
    assert batch["label"].dtype == np.int32
    assert np.isfinite(batch["image"]).all()
    assert set(np.unique(batch["label"])) <= set(range(NUM_CLASSES))
    # Grayscale is repeated to three identical channels.
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])


def test_train_normalisation_at_native_resolution(data_dir, digits_splits):
    # One global batch of 1437 at 8x8 is exactly the train split, reordered.
    config = make_config(data_dir, image_size=8, batch_size=1437, data__augment=False)
    batch = next(pipeline.create_train_iterator(config))
    mean, std = preprocess.DIGITS_MEAN[0], preprocess.DIGITS_STD[0]
    np.testing.assert_allclose(
        np.sort((batch["image"][..., 0] * std + mean).ravel()),
        np.sort(digits_splits["train"][0].ravel() / 255),
        atol=1e-6,
    )
    assert abs(batch["image"].mean()) < 1e-3
    assert batch["image"].std() == pytest.approx(1.0, abs=1e-3)


def test_mean_std_override(data_dir):
    config = make_config(data_dir, image_size=8, data__mean=(0.0,) * 3, data__std=(1.0,) * 3)
    image = next(pipeline.create_train_iterator(config))["image"]
    assert image.min() >= 0.0 and image.max() == pytest.approx(1.0)


def test_each_epoch_is_a_permutation_of_the_train_split(data_dir, digits_splits):
    config = make_config(data_dir, batch_size=479, image_size=8, data__augment=False)
    batches = take(pipeline.create_train_iterator(config), 6)  # 1437 = 3 * 479.
    first = np.concatenate([b["label"] for b in batches[:3]])
    second = np.concatenate([b["label"] for b in batches[3:]])
    want = np.sort(digits_splits["train"][1])
    np.testing.assert_array_equal(np.sort(first), want)
    np.testing.assert_array_equal(np.sort(second), want)
    assert not np.array_equal(first, second)  # Re-shuffled every epoch.


def test_same_seed_same_batches_different_seed_differs(data_dir):
    first = take(pipeline.create_train_iterator(make_config(data_dir, seed=3)), 3)
    again = take(pipeline.create_train_iterator(make_config(data_dir, seed=3)), 3)
    other = take(pipeline.create_train_iterator(make_config(data_dir, seed=4)), 3)
    assert_batches_equal(again, first)
    for a, b in zip(first, other):
        assert not np.array_equal(a["label"], b["label"])
        assert not np.array_equal(a["image"], b["image"])


@pytest.mark.parametrize("start_step", [1, 11])  # Batch 11 spans epochs 0 and 1.
def test_start_step_equals_skipping_batches(data_dir, start_step):
    config = make_config(data_dir, seed=7)
    reference = take(pipeline.create_train_iterator(config), start_step + 3)
    resumed = take(pipeline.create_train_iterator(config, start_step=start_step), 3)
    assert_batches_equal(resumed, reference[start_step:])


def test_far_start_step_is_constant_time(data_dir):
    # 10**7 batches of 128 are ~890k epochs: only feasible without iterating.
    batch = next(pipeline.create_train_iterator(make_config(data_dir), start_step=10**7))
    assert batch["image"].shape == (128, 32, 32, 3)


@pytest.mark.parametrize("start_step", [0, 11])
def test_two_processes_concatenate_to_one_process_train(data_dir, start_step):
    config = make_config(data_dir, seed=5)
    single = take(pipeline.create_train_iterator(config, start_step=start_step), 3)
    split = per_process(
        lambda k, count: pipeline.create_train_iterator(
            config, start_step=start_step, process_index=k, process_count=count
        ),
        process_count=2,
        n=3,
    )
    assert split[0][0]["image"].shape == (64, 32, 32, 3)
    assert_batches_equal(concat_processes(split), single)


DIGITS_PAD_VALUE = -preprocess.DIGITS_MEAN[0] / preprocess.DIGITS_STD[0]


def test_digits_augmentation_translates_but_never_mirrors(data_dir):
    # At native 8x8 the translation pad is 1 px: 9 possible shifts.
    config = make_config(data_dir, image_size=8, batch_size=256)
    found = augmentations(config, 1, pad=1, pad_value=DIGITS_PAD_VALUE)
    assert not any(mirrored for _, mirrored in found)
    assert {shift for shift, _ in found} == set(range(9))


def test_augmentation_depends_on_epoch_and_offset(data_dir):
    # Batch g == epoch g: the same offsets in two epochs get fresh shifts.
    config = make_config(data_dir, image_size=8, batch_size=1437)
    found = augmentations(config, 2, pad=1, pad_value=DIGITS_PAD_VALUE)
    epoch0, epoch1 = found[:1437], found[1437:]
    same = np.mean([a == b for a, b in zip(epoch0, epoch1)])
    assert same < 0.3  # ~1/9 expected by chance.


# ------------------------------------------------------------------ eval


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_exactly_once(data_dir, digits_splits, process_count):
    config = make_config(data_dir, eval_batch_size=64)  # 360 = 5 * 64 + 40.
    split = per_process(
        lambda k, count: pipeline.create_eval_iterator(config, process_index=k, process_count=count),
        process_count,
    )
    for batches in split:
        assert len(batches) == pipeline.num_eval_batches(config) == 6
        for batch in batches:
            assert batch["image"].shape == (64 // process_count, 32, 32, 3)
            assert batch["label"].dtype == np.int32
            assert batch["mask"].dtype == np.float32
    merged = concat_processes(split)
    mask = np.concatenate([b["mask"] for b in merged])
    labels = np.concatenate([b["label"] for b in merged])
    images = np.concatenate([b["image"] for b in merged])
    np.testing.assert_array_equal(mask, np.arange(6 * 64) < 360)  # Padded at end.
    np.testing.assert_array_equal(
        np.bincount(labels[mask == 1], minlength=NUM_CLASSES),
        np.bincount(digits_splits["test"][1], minlength=NUM_CLASSES),
    )
    np.testing.assert_array_equal(labels[:360], digits_splits["test"][1])  # In order.
    assert not images[360:].any() and not labels[360:].any()  # Zero padding.


def test_two_processes_concatenate_to_one_process_eval(data_dir):
    config = make_config(data_dir, eval_batch_size=100)
    single = list(pipeline.create_eval_iterator(config))
    split = per_process(
        lambda k, count: pipeline.create_eval_iterator(config, process_index=k, process_count=count),
        process_count=2,
    )
    assert_batches_equal(concat_processes(split), single)


# ------------------------------------------------------------------ other TFDS


@pytest.mark.parametrize("dataset, grayscale", [("cifar10", False), ("mnist", True)])
def test_other_tfds_dataset_through_same_path(tmp_path, dataset, grayscale):
    config = make_config(tmp_path, dataset=dataset, batch_size=8, eval_batch_size=16)
    with tfds.testing.mock_data(num_examples=20):
        info = pipeline.get_dataset_info(config)
        train = take(pipeline.create_train_iterator(config), 3)  # Crosses an epoch.
        evals = list(pipeline.create_eval_iterator(config))
    assert info.num_classes == 10 and info.num_train_examples == 20
    assert train[0]["image"].shape == (8, 32, 32, 3)
    assert train[0]["image"].dtype == np.float32
    assert train[0]["label"].dtype == np.int32
    assert len(evals) == 2 and sum(b["mask"].sum() for b in evals) == 20
    same_channels = np.array_equal(train[0]["image"][..., 0], train[0]["image"][..., 1])
    assert same_channels == grayscale


def test_cifar_augmentation_translates_and_mirrors(tmp_path):
    config = make_config(tmp_path, dataset="cifar10", batch_size=32)
    mean, std = preprocess.default_normalization("cifar10")
    pad_value = -np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    with tfds.testing.mock_data(num_examples=16):
        found = augmentations(config, 1, pad=4, pad_value=pad_value)
    mirrored = [m for _, m in found]
    assert any(mirrored) and not all(mirrored)
    assert len({shift for shift, _ in found}) > 1


def test_random_access_matches_in_memory(tmp_path):
    """cache=False (TFDS random access) yields the same batches as cache=True."""
    builder = tfds.builder("digits", data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    cached = make_config(tmp_path, data__cache=True)
    indexed = make_config(tmp_path, data__cache=False)
    assert_batches_equal(
        take(pipeline.create_train_iterator(indexed, start_step=10), 2),
        take(pipeline.create_train_iterator(cached, start_step=10), 2),
    )
    assert_batches_equal(
        list(pipeline.create_eval_iterator(indexed)),
        list(pipeline.create_eval_iterator(cached)),
    )


def test_cache_false_needs_random_access_format(data_dir):
    config = make_config(data_dir, data__cache=False)  # Prepared as tfrecord.
    with pytest.raises(ValueError, match="array_record"):
        pipeline.create_train_iterator(config)
