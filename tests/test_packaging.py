"""The wheel a user installs: built from a copy of the sources without build isolation (setuptools and wheel
of this environment: no registry access), it holds the Triton kernels under incrementer_fast.kernels, the
shipped parity check, the type marker and the licence, and nothing of the repository's tests."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
                              ".pytest_cache", ".benchmarks", "*.whl")


def test_wheel_holds_the_kernels_and_the_type_marker(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=SKIP)  # a copy: no stale build/ of the checkout enters the wheel
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("incrementer_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    kernels = {f"incrementer_fast/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert "incrementer_fast/kernels/__init__.py" in kernels and kernels <= names, kernels - names
    for name in ("incrementer_fast/py.typed", "incrementer_fast/check.py", "incrementer_fast/testing.py",
                 "incrementer_fast/nn.py", "incrementer_fast/continual/logs.py"):
        assert name in names, name
    metadata = [n for n in names if n.endswith(".dist-info/METADATA")]
    assert len(metadata) == 1
    assert any(n.endswith(".dist-info/LICENSE") or n.endswith(".dist-info/licenses/LICENSE") for n in names)
    text = zipfile.ZipFile(wheel).read(metadata[0]).decode()
    assert "Provides-Extra: xformers" in text and "Provides-Extra: tensorboard" in text
    xformers = [line for line in text.splitlines() if line.startswith("Requires-Dist: xformers")]
    assert xformers and all('extra == "xformers"' in line for line in xformers)  # optional, never required
    entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert b"incrementer-fast = incrementer_fast.cli:main" in zipfile.ZipFile(wheel).read(entry_points[0])
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "scripts/", "kernels/"))]
