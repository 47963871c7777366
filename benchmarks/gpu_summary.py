"""The head of the GPU check's summary: card, versions, commit, date, and the test counts."""

from __future__ import annotations

import datetime
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

if not __package__:  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import git_commit  # noqa: E402
from transformer_kernels.info import environment  # noqa: E402


def test_counts(junit: Path) -> str:
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError) as e:
        return f"no report ({e})"
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"


def main(out_dir: str) -> None:
    env = environment()
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"- card: {env['gpu']}\n- driver: {env['driver']}\n"
          f"- torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}\n"
          f"- extension: {env['extension']} ({env['extension_archs']})\n"
          f"- commit: {git_commit()}\n- date: {now}\n"
          f"- tests: {test_counts(Path(out_dir) / 'tests.xml')}")


if __name__ == "__main__":
    main(sys.argv[1])
