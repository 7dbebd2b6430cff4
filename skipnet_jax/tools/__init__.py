"""The parts of the measuring tools :mod:`skipnet_jax.benchmark` and :mod:`skipnet_jax.accelerator_check`.

``step_timing`` and ``torch_timing`` time the JAX and the PyTorch steps (both tools);
``check_environment``, ``check_tests``, ``digits_input``, ``check_digits``, ``check_bench``
and ``check_report`` are the accelerator check's probe, parts and report.
"""
