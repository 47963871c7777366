"""The head of the GPU check's summary: card, versions, commit, date, and the test counts."""

from __future__ import annotations

import datetime
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from transformer_kernels.info import environment

from .common import git_commit


def test_counts(junit: Path) -> str:
    """'N passed, ...' of a junit report, then the failing tests, one a line (30 at most)."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError) as e:
        return f"no report ({e})"
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    failing = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    lines = [f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"]
    lines += [f"  - FAILED {name}" for name in failing[:30]]
    if len(failing) > 30:
        lines.append(f"  - ... and {len(failing) - 30} more (see the xml)")
    return "\n".join(lines)


def main(out_dir: str) -> None:
    env = environment()
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(
        f"- card: {env['gpu']}\n- driver: {env['driver']}\n"
        f"- torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env['triton']}\n"
        f"- extension: {env['extension']} ({env['extension_archs']})\n"
        f"- commit: {git_commit()}\n- date: {now}"
    )
    parts = (
        ("kernels", "tests_kernels.xml"),
        ("autotuned kernels", "tests_kernels_autotuned.xml"),
        ("the rest", "tests_rest.xml"),
    )
    for part, name in parts:
        print(f"- tests ({part}): {test_counts(Path(out_dir) / name)}")


if __name__ == "__main__":
    main(sys.argv[1])
