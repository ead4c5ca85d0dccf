"""Write the hand-in: <name>_assignment3.zip at the repository root, holding the report PDF with the
name on its title page and all Python code with its directory structure (plus the few files that
build and run it), but no data, results, checkpoints, virtual environments, caches or git internals.

    python report/make_submission.py --name lastname      (or: make submission NAME=lastname)

With LaTeX (latexmk) installed, the numbers are regenerated from results/ and the report is built
afresh, with the name as its author, in a temporary folder: report/report.pdf itself keeps the
neutral author. Without LaTeX the zip holds the committed report/report.pdf, which carries no name,
and one line says so.
"""

import argparse
import contextlib
import io
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.files import atomic_write  # noqa: E402
from report import make_numbers  # noqa: E402

# Besides every *.py: what installs and runs the code.
PROJECT_FILES = {"Makefile", "requirements.txt", "pyproject.toml", "README.md"}
PROJECT_SUFFIXES = {".py", ".mk"}
# Folders never shipped: data and outputs (large, regenerated), and tool state.
EXCLUDED_DIRS = {"data", "results", "__pycache__", "generated"}
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
LATEX_PACKAGES = ("texlive-latex-base texlive-latex-recommended texlive-fonts-recommended "
                  "texlive-latex-extra latexmk")


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
    target = root / zip_name(name)
    if not pdf.is_file():
        raise FileNotFoundError(f"{pdf} does not exist: build it first with `make report`")

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.write(pdf, "report.pdf")
            for path in code_files(root):
                archive.write(root / path, path.as_posix())

    atomic_write(target, write)
    return target


def latex_command(name, outdir, latexmk="latexmk"):
    """The latexmk call, run in report/, that builds report.pdf into ``outdir`` with ``name`` as the
    author: report.tex takes \\AuthorName from this definition before its own default."""
    author = make_numbers.latex_escape(name)
    return [latexmk, "-g", "-pdf", "-interaction=nonstopmode", "-halt-on-error", f"-outdir={outdir}",
            f"-usepretex=\\def\\AuthorName{{{author}}}", "report.tex"]


def named_pdf(name, outdir, root=REPO, latexmk="latexmk"):
    """Build the report with ``name`` on its title page into ``outdir``; returns the PDF's path.
    Raises RuntimeError with the end of LaTeX's output when the build fails."""
    zip_name(name)  # the same check of the name as the zip's
    done = subprocess.run(latex_command(name, Path(outdir).resolve(), latexmk), cwd=Path(root) / "report",
                          capture_output=True, text=True)
    pdf = Path(outdir) / "report.pdf"
    if done.returncode != 0 or not pdf.is_file():
        raise RuntimeError("building the named report failed:\n" + (done.stdout + done.stderr)[-2000:])
    return pdf


def submit(name, root=REPO, latexmk=None):
    """The hand-in of ``name``: (zip path, the one line to print). ``latexmk`` is the latexmk
    program, or None where LaTeX is missing; then the committed report/report.pdf is packed."""
    root = Path(root)
    target_name = zip_name(name)
    if latexmk is None:
        target = build(name, root)
        return target, (f"wrote {target_name} with the committed report/report.pdf, which does not carry "
                        f"your name: LaTeX (latexmk) is not installed. To put the name on its title page, "
                        f"install LaTeX (Debian: apt-get install {LATEX_PACKAGES}) and rerun "
                        f"`make submission NAME={name}`.")
    with contextlib.redirect_stdout(io.StringIO()):  # its warnings, on stderr, still show
        make_numbers.write_all(root / "results", root / "report" / "generated")
    with tempfile.TemporaryDirectory(prefix="submission_") as outdir:
        target = build(name, root, named_pdf(name, outdir, root, latexmk))
    with zipfile.ZipFile(target) as archive:
        count = len(archive.namelist())
    return target, f"wrote {target_name} ({count} files), the report with {name} on its title page"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="your last name: the zip is <name>_assignment3.zip")
    args = parser.parse_args(argv)
    try:
        target, line = submit(args.name, REPO, shutil.which("latexmk"))
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        raise SystemExit(f"error: {error}") from error
    print(line)
    return target


if __name__ == "__main__":
    main()
