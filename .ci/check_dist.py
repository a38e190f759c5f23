"""Build the sdist and the wheel, check what each holds, and install the wheel into a
clean virtual environment, where it must import and report the project's version.

Run by .ci/run: ``python .ci/check_dist.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tempfile
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fail(message: str) -> None:
    print(f"dist check failed: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)
    if found is None:
        fail("no version in pyproject.toml")
    assert found is not None
    version = found[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dist"
        subprocess.run(
            [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (wheel,) = out.glob("*.whl")
        (sdist,) = out.glob("*.tar.gz")

        names = zipfile.ZipFile(wheel).namelist()
        info = f"buttress-{version}.dist-info/"
        stray = [n for n in names if not n.startswith(("buttress/", info))]
        if stray:
            fail(f"the wheel holds files outside the package: {stray[:5]}")
        for needed in ("buttress/py.typed", "buttress/__init__.py", f"{info}licenses/LICENSE"):
            if needed not in names:
                fail(f"the wheel lacks {needed}")

        with tarfile.open(sdist) as archive:
            members = archive.getnames()
        top = f"buttress-{version}/"
        for needed in ("src/buttress/__init__.py", "tests/conftest.py", "LICENSE", "CHANGELOG.md"):
            if top + needed not in members:
                fail(f"the sdist lacks {needed}")
        junk = [m for m in members if "/.venv/" in m or "__pycache__" in m or "/.ci/" in m]
        if junk:
            fail(f"the sdist holds build or CI leftovers: {junk[:5]}")

        env = Path(tmp) / "venv"
        venv.create(env, with_pip=True)
        python = env / "bin" / "python"
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True
        )
        shown = subprocess.run(
            [str(python), "-m", "buttress", "--version"],
            check=True,
            capture_output=True,
            text=True,
            cwd=tmp,  # not the checkout: the installed wheel must be what is imported
        ).stdout.strip()
        if shown != f"buttress {version}":
            fail(f"python -m buttress --version printed {shown!r}, expected buttress {version}")
        probe = "import buttress, buttress.backends.sqlite; print(buttress.__version__)"
        imported = subprocess.run(
            [str(python), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp
        ).stdout.strip()
        if imported != version:
            fail(f"buttress.__version__ is {imported!r}, expected {version}")
    print(f"dist check passed: buttress {version} (sdist and wheel contents, clean install)")


if __name__ == "__main__":
    main()
