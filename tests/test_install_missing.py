"""skipnet_jax.install_missing: what the Colab install cell keeps, installs and pins."""

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from skipnet_jax import install_missing as im

X86 = {"platform_machine": "x86_64"}
ARM = {"platform_machine": "aarch64"}
TF_LINES = [
    'tensorflow-cpu==2.21.*; platform_machine == "x86_64" or platform_machine == "AMD64"',
    'tensorflow==2.21.*; platform_machine != "x86_64" and platform_machine != "AMD64"',
]


def actions(plan):
    return {d.requirement.split(";")[0]: d.action for d in plan.decisions}


def test_installed_jax_is_kept_even_outside_the_tested_range():
    installed = {"jax": "0.7.2", "jaxlib": "0.7.2", "jax-cuda12-plugin": "0.7.2", "jax-cuda12-pjrt": "0.7.2"}
    plan = im.make_plan(["jax>=0.10,<0.13", "flax>=0.12,<0.13"], installed)
    (jax, flax) = plan.decisions
    assert (jax.action, jax.installed) == ("keep", "jax 0.7.2")
    assert jax.warning.startswith("warning: keeping the installed jax 0.7.2") and "jax>=0.10,<0.13" in jax.warning
    assert "\n" not in jax.warning
    assert flax.action == "install"
    assert plan.missing == ["flax<0.13,>=0.12"]  # jax is not among what pip is asked for
    assert dict(plan.pins) == installed  # the CUDA plugin and its PJRT pinned with jax


def test_installed_jax_in_range_is_kept_without_warning():
    plan = im.make_plan(["jax>=0.10,<0.13"], {"jax": "0.12.0.1", "jaxlib": "0.12.0"})
    assert plan.decisions[0].action == "keep" and plan.warnings == []
    assert plan.pins == (("jax", "0.12.0.1"), ("jaxlib", "0.12.0"))


def test_missing_and_wrong_version_packages_are_installed():
    plan = im.make_plan(
        ["optax==0.2.8", "chex==0.1.92", "numpy>=1.26", "jax>=0.10,<0.13", "importlib_resources"],
        {"optax": "0.2.5", "numpy": "2.1.0"},
    )
    assert actions(plan) == {
        "optax==0.2.8": "install", "chex==0.1.92": "install", "numpy>=1.26": "ok",
        "jax>=0.10,<0.13": "install", "importlib_resources": "install",
    }  # fmt: skip
    assert plan.decisions[0].installed == "optax 0.2.5"
    assert plan.missing == ["optax==0.2.8", "chex==0.1.92", "jax<0.13,>=0.10", "importlib_resources"]
    assert plan.pins == ()  # no JAX or TensorFlow installed: nothing to keep


@pytest.mark.parametrize("build", ["tensorflow", "tensorflow-cpu", "tf-nightly", "tensorflow_gpu"])
def test_any_tensorflow_build_satisfies_the_tensorflow_requirement(build):
    plan = im.make_plan(TF_LINES, {build: "2.19.0"}, environment=X86)
    assert actions(plan) == {"tensorflow-cpu==2.21.*": "keep", "tensorflow==2.21.*": "skip"}
    name = build.replace("_", "-")
    assert plan.decisions[0].installed == f"{name} 2.19.0"
    assert plan.warnings == [
        (
            f"warning: keeping the installed {name} 2.19.0; skipnet_jax is tested with tensorflow-cpu==2.21.* "
            "(if something fails, install a tensorflow-cpu in that range)"
        )
    ]
    assert plan.missing == [] and plan.pins == ((name, "2.19.0"),)


def test_markers_pick_the_tensorflow_build_to_install():
    assert im.make_plan(TF_LINES, {}, environment=X86).missing == ["tensorflow-cpu==2.21.*"]
    assert im.make_plan(TF_LINES, {}, environment=ARM).missing == ["tensorflow==2.21.*"]
    assert actions(im.make_plan(TF_LINES, {"tensorflow": "2.21.0"}, environment=ARM)) == {
        "tensorflow-cpu==2.21.*": "skip", "tensorflow==2.21.*": "keep",
    }  # fmt: skip
    plan = im.make_plan(['onnx>=1.17; python_version < "3.0"', "onnx>=1.17; extra == 'x'"], {})
    assert [d.action for d in plan.decisions] == ["skip", "skip"]


def test_tensorboard_of_the_installed_tensorflow_is_kept():
    plan = im.make_plan(["tensorboard>=2.21,<2.22"], {"tensorflow": "2.19.0", "tensorboard": "2.19.0"})
    assert plan.decisions[0].action == "keep" and plan.missing == []
    assert dict(plan.pins) == {"tensorflow": "2.19.0", "tensorboard": "2.19.0"}


def test_constraints_pin_the_stack_and_its_installed_dependencies():
    installed = {
        "jax": "0.11.2", "jaxlib": "0.11.2", "jax-cuda12-plugin": "0.11.2", "jax-cuda12-pjrt": "0.11.2",
        "nvidia-cudnn-cu12": "9.8.0.87", "libtpu": "0.0.30", "tensorflow": "2.21.0", "keras": "3.15.1",
        "numpy": "2.1.3", "ml-dtypes": "0.6.0", "protobuf": "5.29.4", "scipy": "1.15.2",
        "requests": "2.32.3", "urllib3": "2.3.0", "rich": "13.9.4", "absl-py": "1.4.0",
        "pandas": "2.2.2",  # nothing of the stack needs it: not pinned
    }  # fmt: skip
    requires = {
        "jax": ["jaxlib<=0.11.2,>=0.11.1", "ml_dtypes>=0.5.0", "numpy>=2.0", "scipy>=1.14", "kubernetes; extra == 'k8s'"],
        "jaxlib": ["numpy>=2.0", "scipy>=1.14"],
        "tensorflow": ["protobuf<8,>=5", "requests<3", "absl-py>=1.0", "keras>=3",
                       "tensorflow-io-gcs-filesystem; python_version < '3.0'"],
        "keras": ["rich", "numpy"],
        "requests": ["urllib3<3"],
    }  # fmt: skip
    requirements = ["jax>=0.10,<0.13", "absl-py>=2.1", "flax>=0.12", "numpy>=1.26", *TF_LINES]
    plan = im.make_plan(requirements, installed, requires, environment=X86)
    text = im.constraints_text(plan)
    pins = [line for line in text.splitlines() if not line.startswith("#")]
    assert pins == [
        "jax==0.11.2", "jax-cuda12-pjrt==0.11.2", "jax-cuda12-plugin==0.11.2", "jaxlib==0.11.2",
        "keras==3.15.1", "libtpu==0.0.30", "ml-dtypes==0.6.0", "numpy==2.1.3", "nvidia-cudnn-cu12==9.8.0.87",
        "protobuf==5.29.4", "requests==2.32.3", "rich==13.9.4", "scipy==1.15.2", "tensorflow==2.21.0",
        "urllib3==2.3.0",
    ]  # fmt: skip
    # absl-py (a TensorFlow dependency) is below our range: upgraded, so not pinned; pandas is unrelated
    assert plan.missing == ["absl-py>=2.1", "flax>=0.12"]


def test_pip_commands_and_the_constraints_file_they_use(tmp_path):
    plan = im.make_plan(["jax>=0.10", "flax>=0.12"], {"jax": "0.11.2"})
    ran = []

    def run(command):
        constraints = command[command.index("-c") + 1] if "-c" in command else None
        if constraints:
            with open(constraints) as f:
                constraints = f.read()
        ran.append((command, constraints))
        return 0

    assert im.install(plan, "/content/skipnet_jax", run=run) == 0
    (editable, _), (missing, constraints) = ran
    assert editable == [sys.executable, "-m", "pip", "install", "--no-deps", "-e", "/content/skipnet_jax"]
    assert missing[:4] == [sys.executable, "-m", "pip", "install"] and missing[-1] == "flax>=0.12"
    assert constraints.splitlines()[-1] == "jax==0.11.2"

    ran.clear()
    everything_there = im.make_plan(["jax>=0.10"], {"jax": "0.11.2"})
    assert im.install(everything_there, "/content/skipnet_jax", install_package=False, run=run) == 0
    assert ran == []
    assert im.install(plan, "/content/skipnet_jax", run=lambda command: 1) == 1  # pip's failure is returned


def test_reads_setup_cfg_requirements_with_markers_and_extras(tmp_path):
    cfg = tmp_path / "setup.cfg"
    cfg.write_text(
        "[options]\ninstall_requires =\n    jax>=0.10\n    # a comment line\n"
        '    tensorflow==2.21.*; platform_machine != "x86_64"\n    importlib_resources  # why\n'
        "[options.extras_require]\nexport =\n    onnx>=1.17\n"
    )
    assert im.read_requirements(str(cfg)) == [
        "jax>=0.10",
        'tensorflow==2.21.*; platform_machine != "x86_64"',
        "importlib_resources",
    ]
    assert im.read_requirements(str(cfg), ["export"])[-1] == "onnx>=1.17"
    with pytest.raises(ValueError, match="no extra 'gpu'"):
        im.read_requirements(str(cfg), ["gpu"])


@pytest.mark.parametrize("how", ["module", "path"])
def test_dry_run_against_the_real_setup_cfg(how, tmp_path):
    """Everything setup.cfg asks for is installed in the test environment: all kept or met."""
    command = (
        ["-m", "skipnet_jax.install_missing"]
        if how == "module"
        else [os.path.join(REPO_ROOT, "skipnet_jax", "install_missing.py")]
    )
    result = subprocess.run(
        [sys.executable, *command, "--dry-run", "--extra", "export"],
        cwd=REPO_ROOT if how == "module" else tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("skipnet_jax install plan (Python ") and os.path.join(REPO_ROOT, "setup.cfg") in lines[0]
    plan = [line.split() for line in lines[1:] if line.startswith("  ")]
    assert ["keep", "jax>=0.10,<0.13"] == plan[0][:2]
    assert {row[0] for row in plan} <= {"keep", "ok", "skip"}, result.stdout
    tensorflow = [row for row in plan if row[1] in ("tensorflow-cpu==2.21.*", "tensorflow==2.21.*")]
    assert sorted(row[0] for row in tensorflow) == ["keep", "skip"]  # one build for this machine, kept
    assert any(row[1] == "tf2onnx==1.17.0" for row in plan)  # the extra was read
    assert "pip install -c" not in result.stdout  # nothing missing here


def _fake_environment(monkeypatch, tmp_path, pip_installs):
    """A repository with a small setup.cfg, and an environment holding a Colab-like JAX and TensorFlow
    where running pip adds (or changes) the distributions in `pip_installs`."""
    (tmp_path / "setup.cfg").write_text(
        "[options]\npython_requires = >=3.11\ninstall_requires =\n    jax>=0.10,<0.13\n    tensorflow-cpu==2.21.*\n"
        "    flax>=0.12,<0.13\n    numpy>=1.26\n[options.extras_require]\nexport =\n    onnx>=1.17\n"
    )
    env = {"jax": "0.9.0", "jaxlib": "0.9.0", "jax-cuda12-plugin": "0.9.0", "tensorflow": "2.21.0", "numpy": "2.1.0"}
    requires = {"jax": ["jaxlib<=0.9.0", "numpy>=2.0"]}
    ran = []

    def run(command):
        ran.append(command)
        if "-c" in command:
            env.update(pip_installs)
        return 0

    monkeypatch.setattr(im, "installed_distributions", lambda: (dict(env), requires))
    monkeypatch.setattr(im, "editable_location", lambda name=im.PACKAGE: None)
    monkeypatch.setattr(im, "_run", run)
    return ran


def test_main_installs_the_missing_and_reports_what_it_kept(monkeypatch, tmp_path, capsys):
    ran = _fake_environment(monkeypatch, tmp_path, {"flax": "0.12.8", "onnx": "1.20.0", "skipnet-jax": "0.1.0"})
    assert im.main(["--repo", str(tmp_path), "--extra", "export", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert [command[command.index("install") + 1 :] for command in ran] == [
        ["-q", "--no-deps", "-e", str(tmp_path)],
        ["-q", "-c", ran[1][ran[1].index("-c") + 1], "flax<0.13,>=0.12", "onnx>=1.17"],
    ]
    assert "warning: keeping the installed jax 0.9.0; skipnet_jax is tested with jax>=0.10,<0.13" in out
    assert "Kept: jax 0.9.0, jax-cuda12-plugin 0.9.0, jaxlib 0.9.0, tensorflow 2.21.0\n" in out
    assert (
        "requires tensorflow-cpu, which is not installed, is expected: the installed tensorflow 2.21.0 provides it"
        in out
    )
    assert out.endswith("Done: every requirement is installed.\n")


def test_main_fails_when_pip_changed_a_kept_package(monkeypatch, tmp_path, capsys):
    _fake_environment(monkeypatch, tmp_path, {"flax": "0.12.8", "jax": "0.12.0"})
    assert im.main(["--repo", str(tmp_path)]) == 1
    assert "error: pinned packages changed: jax 0.9.0 -> 0.12.0" in capsys.readouterr().err
