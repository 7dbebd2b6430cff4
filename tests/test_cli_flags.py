"""Every command parses absl flags: ``--help`` lists its flags, a bad flag is one line.

The commands that used argparse (benchmark, input_benchmark, accelerator_check, plots) keep
their flag names; they are called in-process (`main(argv)`), each with flags of its own so
that they do not meet the global ``FLAGS`` other modules define.  (`install_missing` stays
on argparse: it runs from a fresh clone before absl is installed.)
"""

import re

import pytest

from skipnet_jax import accelerator_check, benchmark, input_benchmark
from skipnet_jax.plots import files as plots

COMMANDS = {
    "benchmark": (
        benchmark.main,
        "model batch_size image_size mode dtype loss steps warmup rounds json compare compare_loss torch_threads "
        "torch_device torch_channels_last torch_compile malloc seed",
    ),
    "input_benchmark": (input_benchmark.main, "folder num_images workers batch_size image_size batches rounds json"),
    "accelerator_check": (
        accelerator_check.main,
        "out parts tiny seed tests test_workers tests_timeout test_precision digits_config digits_dtype "
        "digits_model digits_steps digits_threshold bench_model bench_batch bench_image_size bench_dtype "
        "bench_loss bench_modes bench_steps bench_warmup bench_rounds torch_device torch_compile "
        "torch_compile_mode channels_last peak_tflops",
    ),
    "plots": (plots.main, "workdir"),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_lists_every_flag(name, capsys):
    main, names = COMMANDS[name]
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m skipnet_jax.{name} ")
    listed = set(re.findall(r"^  --(?:\[no\])?(\w+)", out, re.MULTILINE))
    assert listed == set(names.split())


@pytest.mark.parametrize("name", sorted(COMMANDS))
@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--no_such_flag=1"], "error: Unknown command line flag 'no_such_flag'"),
        (["stray"], "error: unexpected arguments ['stray']"),
    ],
)
def test_a_bad_flag_is_one_line(name, argv, expected, capsys):
    main, _ = COMMANDS[name]
    extra = ["--workdir=/tmp"] if name == "plots" else []
    with pytest.raises(SystemExit) as exited:
        main([*extra, *argv])
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(expected) and captured.err.count("\n") == 1


def test_a_bad_value_names_the_flag_and_the_choices(capsys):
    with pytest.raises(SystemExit) as exited:
        benchmark.main(["--mode=fit"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: flag --mode=fit: value should be one of <train|eval>\n"
