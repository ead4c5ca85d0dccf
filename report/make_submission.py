"""Write the hand-in: <name>_assignment3.zip at the repository root, holding the report PDF and all
Python code with its directory structure (plus the few files that build and run it), but no data,
results, checkpoints, virtual environments, caches or git internals.

    python report/make_submission.py --name lastname      (or: make submission NAME=lastname)
"""

import argparse
import re
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402

# Besides every *.py: what installs and runs the code.
PROJECT_FILES = {"Makefile", "requirements.txt", "pyproject.toml", "README.md"}
PROJECT_SUFFIXES = {".py", ".mk"}
# Folders never shipped: data and outputs (large, regenerated), and tool state.
EXCLUDED_DIRS = {"data", "results", "__pycache__", "generated"}
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def is_excluded_dir(path):
    """Hidden folders (.git, .venv, caches), the EXCLUDED_DIRS, and any virtual environment."""
    return path.name.startswith(".") or path.name in EXCLUDED_DIRS or (path / "pyvenv.cfg").exists()


def code_files(root):
    """Paths, relative to ``root`` and sorted, of the files to ship."""
    root = Path(root)
    found = []

    def walk(folder):
        for path in sorted(folder.iterdir()):
            if path.is_dir():
                if not is_excluded_dir(path):
                    walk(path)
            elif path.is_file() and (path.suffix in PROJECT_SUFFIXES or path.name in PROJECT_FILES):
                found.append(path.relative_to(root))

    walk(root)
    return found


def zip_name(name):
    if not NAME_PATTERN.fullmatch(name or ""):
        raise ValueError(f"NAME must be your last name in letters (digits, - and _ allowed after the "
                         f"first letter), got {name!r}")
    return f"{name}_assignment3.zip"


def build(name, root=REPO, pdf=None):
    """Write root/<name>_assignment3.zip with report.pdf at its top and the code files at their paths.

    Returns the zip's path. ``pdf`` defaults to root/report/report.pdf.
    """
    root = Path(root)
    pdf = Path(pdf) if pdf else root / "report" / "report.pdf"
    if not pdf.is_file():
        raise FileNotFoundError(f"{pdf} does not exist: build it first with `make report`")
    target = root / zip_name(name)

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.write(pdf, "report.pdf")
            for path in code_files(root):
                archive.write(root / path, path.as_posix())

    common.atomic_write(target, write)
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="your last name: the zip is <name>_assignment3.zip")
    parser.add_argument("--pdf", type=Path, default=None, help="the report (default report/report.pdf)")
    args = parser.parse_args(argv)
    try:
        target = build(args.name, REPO, args.pdf)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    with zipfile.ZipFile(target) as archive:
        print(f"wrote {target} ({len(archive.namelist())} files)")
    return target


if __name__ == "__main__":
    main()
