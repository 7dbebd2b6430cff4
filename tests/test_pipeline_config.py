"""The input pipeline and the config schema: dropping each epoch's incomplete train batch,
fields a config lacks taken from the schema, and no second default anywhere else."""

import ast
import itertools
import pathlib

import ml_collections
import numpy as np
import pytest

from skipnet_jax import config_validation, optim
from skipnet_jax.data import pipeline, streams
from skipnet_jax.default_config import get_default_config

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "skipnet_jax"
DIGITS_TRAIN = 1437


def _stream(num_examples, batch, start_step=0, drop_remainder=False, n=16):
    stream = streams.train_stream(num_examples, batch, start_step, seed=0, drop_remainder=drop_remainder)
    return [{k: int(v) for k, v in e.items()} for e in itertools.islice(stream.as_numpy_iterator(), n)]


def test_drop_remainder_stream_is_whole_batches_of_each_epochs_permutation():
    elements = _stream(10, 4, drop_remainder=True)  # 2 batches an epoch, 2 examples left out of each
    assert [e["position"] for e in elements] == list(range(16))
    assert [e["epoch"] for e in elements] == [0] * 8 + [1] * 8
    assert [e["offset"] for e in elements] == list(range(8)) * 2
    for epoch in (elements[:8], elements[8:]):
        assert len({e["index"] for e in epoch}) == 8
    # each epoch uses the head of the same permutation as without dropping
    full = _stream(10, 4, n=20)
    assert [e["index"] for e in elements[:8]] == [e["index"] for e in full[:8]]
    assert [e["index"] for e in elements[8:]] == [e["index"] for e in full[10:18]]
    # a resume at step 3 starts at position 12, in the second epoch
    assert _stream(10, 4, start_step=3, drop_remainder=True, n=4) == elements[12:16]


def test_drop_remainder_epoch_length_matches_the_step_count():
    config = get_default_config()
    config.batch_size = 4
    config.data.drop_remainder = True
    steps_per_epoch, _ = optim.steps_for(config, 10)
    elements = _stream(10, 4, drop_remainder=True, n=3 * steps_per_epoch * 4)
    first_of_epoch = [e["epoch"] for e in elements[:: steps_per_epoch * 4]]
    assert first_of_epoch == [0, 1, 2]


def _digits_config(data_dir, **data):
    config = get_default_config()
    config.data_dir = data_dir
    config.image_size = 32
    config.batch_size = 256
    config.data.prefetch = 0
    config.data.update(data)
    return config


def _batches(config, n, start_step=0):
    return list(itertools.islice(pipeline.create_train_iterator(config, start_step=start_step), n))


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_drop_remainder_train_iterator(digits_data_dir):
    # 1437 digits, batch 256: 5 whole batches an epoch (1280 examples), the 6th batch starts epoch 1
    dropped = _batches(_digits_config(digits_data_dir, drop_remainder=True), 7)
    kept = _batches(_digits_config(digits_data_dir), 7)
    assert _same(dropped[:5], kept[:5])
    assert not np.array_equal(dropped[5]["label"], kept[5]["label"])
    resumed = _batches(_digits_config(digits_data_dir, drop_remainder=True), 2, start_step=5)
    assert _same(resumed, dropped[5:7])


def test_drop_remainder_with_a_batch_larger_than_the_split_is_a_config_error(digits_data_dir):
    config = _digits_config(digits_data_dir, drop_remainder=True)
    config.batch_size = 2048
    with pytest.raises(config_validation.ConfigError, match=r"config\.data\.drop_remainder=True .*1437") as info:
        pipeline.get_dataset_info(config)
    assert "\n" not in str(info.value)


def test_a_field_the_config_lacks_takes_the_schemas_default(digits_data_dir):
    """A config without data.randaugment_magnitude (built by hand, or by an earlier version)
    augments with the schema's magnitude 9, not with some other default."""
    full = _digits_config(digits_data_dir, randaugment_num_layers=2)
    full.batch_size = 8
    partial = ml_collections.ConfigDict(full.to_dict())
    del partial.data["randaugment_magnitude"]
    assert get_default_config().data.randaugment_magnitude == 9.0
    zero = ml_collections.ConfigDict(full.to_dict())
    zero.data.randaugment_magnitude = 0.0
    with_schema_default = _batches(partial, 1)
    assert _same(with_schema_default, _batches(full, 1))
    assert not _same(with_schema_default, _batches(zero, 1))


def _shadow_defaults(path: pathlib.Path) -> list[str]:
    """``<config expression>.get(...)`` calls: a second default for a schema field."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            receiver = ast.unparse(node.func.value)
            if "config" in receiver or receiver.split(".")[0] == "data":
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


DATA_MODULES = sorted(f"data/{p.name}" for p in (PACKAGE / "data").glob("*.py"))


@pytest.mark.parametrize("module", [*DATA_MODULES, "optim.py", "recipes.py", "config_validation.py"])
def test_schema_fields_are_read_without_a_second_default(module):
    assert _shadow_defaults(PACKAGE / module) == []
