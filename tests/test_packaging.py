"""The project installs and imports as a user's machine sees it: from the repository root, offline, as declared.

Every process started in the repository root has the root on sys.path, so a top-level folder of ours that is a
package would shadow an installed distribution of the same name (spdf's old `kernels/` package hid Hugging Face's
`kernels`, which transformers imports when it builds a model).
"""
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"spdf", "tests", "benchmarks"}  # our own top-level packages: spdf, and the test/benchmark helpers


def _run_in_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _distribution_installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _importable_names(folder: Path) -> dict[str, Path]:
    """What `import NAME` finds in a folder on sys.path: modules and regular packages (a folder without __init__.py
    is only a namespace portion, which any installed package of that name outranks)."""
    found = {}
    for child in folder.iterdir():
        if child.suffix == ".py":
            found[child.stem] = child
        elif (child / "__init__.py").is_file():
            found[child.name] = child
    return found


def test_nothing_on_our_sys_path_folders_shadows_a_distribution():
    """The root (every process started there), benchmarks/ (each script's own folder) and the test folders (pytest
    puts them on sys.path) must not hold a module named like an installed distribution's: `import kernels` once
    found benchmarks/kernels.py whenever transformers imported Hugging Face's `kernels` from a benchmark."""
    installed = importlib.metadata.packages_distributions()
    folders = [ROOT, ROOT / "benchmarks", ROOT / "tests", *[d for d in (ROOT / "tests").iterdir() if d.is_dir()]]
    clashes = {f"{path.relative_to(ROOT)} (distribution {', '.join(installed[name])})"
               for folder in folders for name, path in _importable_names(folder).items()
               if name in installed and name != "spdf"}
    assert not clashes, f"these shadow installed distributions: {sorted(clashes)}"
    ours = [name for name in _importable_names(ROOT) if name not in OURS]
    assert ours == [], f"top-level modules or packages beside spdf: {ours} (they would shadow any distribution)"


def test_transformers_builds_a_model_from_the_repository_root():
    pytest.importorskip("transformers")
    code = ("from transformers import GPT2Config, GPT2LMHeadModel\n"
            "m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=64,"
            " bos_token_id=0, eos_token_id=0))\n"
            "print(sum(p.numel() for p in m.parameters()))\n")
    result = _run_in_root(code)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.skipif(not _distribution_installed("kernels"), reason="Hugging Face's `kernels` is not installed")
def test_import_kernels_from_the_root_is_hugging_faces():
    result = _run_in_root("import kernels, os; print(os.path.realpath(kernels.__file__))")
    assert result.returncode == 0, result.stderr[-2000:]
    location = Path(result.stdout.strip())
    installed = Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    assert location == installed, f"`import kernels` from the root found {location}, not the distribution's {installed}"


def test_declared_packages_are_every_package_of_the_tree():
    """A subpackage missing from pyproject.toml's list works in the editable install and is absent from a wheel."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "spdf").rglob("__init__.py")}
    mapped = {name: ROOT / folder for name, folder in config["package-dir"].items()}
    assert set(config["packages"]) == found | set(mapped)
    for name, folder in mapped.items():
        assert (folder / "__init__.py").is_file(), f"{name} maps to {folder}, which has no __init__.py"


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -rn` (a network namespace) to cut the network")
def test_editable_install_works_with_the_network_unreachable(tmp_path):
    """`pip install --no-deps --no-build-isolation -e .` on a machine that already holds the dependencies, with no
    network at all (a new network namespace): no second pip, no download of setuptools."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    src = tmp_path / "src"
    for rel in filter(None, tracked.decode().split("\0")):
        if (ROOT / rel).is_file():  # a file deleted in the working tree but still tracked is skipped
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (and pip, setuptools) come from this interpreter's site-packages, as preinstalled ones would
    import setuptools
    Path(site, "preinstalled.pth").write_text(str(Path(setuptools.__file__).parents[1]) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    install = subprocess.run(["unshare", "-rn", str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                              "-e", str(src)], capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    probe = ("import spdf, spdf.kernels, spdf.integrations, os\n"
             "print(os.path.realpath(spdf.kernels.__file__))\n")
    for cwd in (src, tmp_path):  # from the checkout's root, and from elsewhere
        result = subprocess.run(["unshare", "-rn", str(py), "-c", probe], cwd=cwd, capture_output=True, text=True,
                                env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert Path(result.stdout.strip()) == (src / "kernels" / "spdf_kernels" / "__init__.py").resolve()
