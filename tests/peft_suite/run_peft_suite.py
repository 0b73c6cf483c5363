"""Run PEFT's custom-model test suite against GreenTrainer (see ``greentrainer_peft_suite.py`` for what is swapped).

    python tests/peft_suite/run_peft_suite.py                 # every LoRA case (2 min 18 s on 2 shared CPU cores)
    python tests/peft_suite/run_peft_suite.py --subset ci     # the representative subset CI runs
    python tests/peft_suite/run_peft_suite.py -- -x -k Conv2d  # extra pytest arguments after --

The suite is the ``tests/`` folder of the sdist of the *installed* peft version, fetched once with
``pip download --no-deps --no-binary :all: peft==<version>`` (PyPI) and cached under ``$PEFT_GREENTRAINER_CACHE``
(default ``~/.cache/peft-greentrainer``). PEFT's files are used as shipped; nothing is copied into this repository.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent
SUITE_FILE = "tests/test_custom_models.py"


class SuiteUnavailable(RuntimeError):
    """The sdist could not be fetched (no network, no PyPI): the caller decides whether that is a skip."""


def cache_root() -> Path:
    return Path(os.environ.get("PEFT_GREENTRAINER_CACHE", Path.home() / ".cache" / "peft-greentrainer"))


def fetch_suite(version: str | None = None) -> Path:
    """The extracted sdist root of ``peft==version`` (default: the installed one) holding ``tests/``; cached."""
    version = version or importlib.metadata.version("peft")
    target = cache_root() / "peft-suite" / f"peft-{version}"
    if (target / SUITE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        result = subprocess.run(
            [*command, "--dest", scratch, f"peft=={version}"], capture_output=True, text=True, timeout=600
        )
        archives = list(Path(scratch).glob("peft-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise SuiteUnavailable(
                f"pip could not download the peft {version} sdist (needs PyPI): {result.stderr.strip()[-500:]}"
            )
        extracted = Path(scratch) / "extracted"
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.split("/")[1:2] == ["tests"]]
            archive.extractall(extracted, members=members, filter="data")
        if not (extracted / f"peft-{version}" / SUITE_FILE).is_file():
            raise SuiteUnavailable(f"The peft {version} sdist has no {SUITE_FILE}.")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(extracted / f"peft-{version}", target)
    return target


def pytest_command(root: Path, subset: str, report: Path | None, extra: list[str]) -> list[str]:
    """pytest on the suite with the plugin. ``-c os.devnull``: PEFT's own pytest config (coverage options, warnings
    as errors) belongs to its repository, not to its tests. importlib mode with namespace packages: the sdist lacks
    the repository's ``tests/__init__.py``, and the suite imports its helpers relatively."""
    command = [sys.executable, "-m", "pytest", "-c", os.devnull, "--rootdir", str(root)]
    command += ["-p", "greentrainer_peft_suite"]
    command += ["--import-mode=importlib", "-o", "consider_namespace_packages=true", "-p", "no:cacheprovider"]
    command += ["-q", "-rfE", f"--greentrainer-subset={subset}", str(root / SUITE_FILE)]
    if report is not None:
        command.append(f"--greentrainer-report={report}")
    return command + extra


def run(subset: str = "full", report: Path | None = None, extra: list[str] | None = None) -> int:
    root = fetch_suite()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGIN_DIR), str(root), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: a second thread only contends on a shared machine
    return subprocess.run(pytest_command(root, subset, report, extra or []), cwd=root, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", choices=("ci", "full"), default="full")
    parser.add_argument("--report", type=Path, help="write passed/failed/skipped counts and skip reasons (JSON)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    try:
        code = run(args.subset, args.report, args.pytest_args)
    except SuiteUnavailable as error:
        print(error, file=sys.stderr)
        return 2
    if args.report and args.report.is_file():
        print(json.dumps(json.loads(args.report.read_text())["counts"]))
    return code


if __name__ == "__main__":
    sys.exit(main())
