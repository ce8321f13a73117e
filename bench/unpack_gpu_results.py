#!/usr/bin/env python
"""Unpack the archive of ``bench/gpu_check.sh`` into ``bench/results/gpu-<device>-<date>/``, with
a ``README.md`` that summarises it.

    python bench/unpack_gpu_results.py PATH/gpu-check.tar.gz [--dest bench/results]

The README says which stages ran and passed (the run's ``stages.tsv``), the key numbers of each
(from its JSON, log or JUnit file), what was cut off by its time box, not started for want of
budget, stopped by a signal or never reached (``plan.tsv`` against ``stages.tsv``, and
``running.tsv`` for a run killed mid-stage), the end of each failing stage's log, and whether the
sources that ran are this checkout's (``sources_sha256`` of ``env.txt``, computed here the same
way). A second archive of the same device and day gets ``-2``, ``-3``, ... Standard library only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOP = "gpu-check"  # the one folder the archive holds
SOURCE_FOLDERS = ("zenith_fused", "triton_kernels", "csrc", "bench", "tests")
SOURCE_SUFFIXES = (".py", ".cu", ".cpp", ".h", ".sh")
PASSING = ("PASS", "SKIP")


def source_digest(repo: Path) -> str:
    """gpu_check.sh's ``sources_sha256``: sha256sum of each source file, in byte order of path,
    then sha256 of that listing; 16 hex digits."""
    paths = sorted(
        str(p.relative_to(repo)) for folder in SOURCE_FOLDERS if (repo / folder).is_dir()
        for p in (repo / folder).rglob("*")
        if p.suffix in SOURCE_SUFFIXES and p.is_file() and not p.is_symlink() and "__pycache__" not in p.parts
    )
    paths.sort(key=lambda s: s.encode())
    listing = "".join(f"{hashlib.sha256((repo / p).read_bytes()).hexdigest()}  {p}\n" for p in paths)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def extract(archive: Path, into: Path) -> list[str]:
    """The archive's files under ``into`` (its top folder stripped); refuses anything but plain
    files and folders inside that folder."""
    names = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if not parts or parts[0] != TOP or ".." in parts or Path(member.name).is_absolute():
                raise ValueError(f"{archive}: unexpected member {member.name!r}")
            if member.isdir():
                continue
            if not member.isfile():
                raise ValueError(f"{archive}: {member.name!r} is not a plain file")
            relative = Path(*parts[1:])
            target = into / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            names.append(str(relative))
    return sorted(names)


def read_env(folder: Path) -> dict[str, str]:
    env = {}
    path = folder / "env.txt"
    for line in path.read_text().splitlines() if path.exists() else []:
        key, sep, value = line.partition(": ")
        if sep and key not in env:
            env[key] = value.strip()
    return env


def read_tsv(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def device_slug(gpu: str | None) -> str:
    if not gpu or gpu == "none":
        return "no-gpu"
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower().replace("nvidia", "")).strip("-")
    return slug or "gpu"


def folder_for(dest: Path, env: dict[str, str]) -> Path:
    date = env.get("date", "unknown-date")[:10]
    base = f"gpu-{device_slug(env.get('gpu'))}-{date}"
    candidate, n = dest / base, 1
    while candidate.exists():
        n += 1
        candidate = dest / f"{base}-{n}"
    return candidate


# ------------------------------------------------------------------ key numbers of each stage
def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def checks_numbers(folder: Path, stage: str) -> list[str]:
    path = folder / f"{stage}.json"
    if not path.exists():
        return []
    results = json.loads(path.read_text())
    lines = []
    for r in results:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[r["passed"]]
        detail = r["detail"].splitlines()[0] if r["detail"] else ""
        lines.append(f"- {verdict} `{r['check']}` [{r['backend']}] ({r['seconds']} s): {detail}")
        numbers = r.get("numbers", {})
        if numbers.get("cases"):
            lines += [""] + _table(["case", "passed", "max abs diff", "elements over tolerance", "history off"], [
                [c["case"], c["passed"], c["max_abs_diff"], c["elements_over"], ", ".join(c["history_off"]) or "-"]
                for c in numbers["cases"]]) + [""]
        if numbers.get("rows"):
            lines += [""] + _table(["backend", "kernel", "dtype", "layout", "ms", "GB/s", "x copy", "registers"], [
                [x["backend"], x["kernel"], x["dtype"], x["layout"], x["ms"], x["gb_per_s"], x["vs_copy"],
                 x["registers"]] for x in numbers["rows"]]) + [""]
        if numbers.get("records"):
            lines += [""] + _table(["backend", "kernel", "dtype", "aligned", "momentum", "registers", "report",
                                    "block", "grid"], [
                [x["backend"], x["kind"], x["dtype"], x["aligned"], x["momentum"], x["registers"],
                 x.get("report_registers"), x.get("block"), x.get("grid")] for x in numbers["records"]]) + [""]
    return lines


def bench_numbers(folder: Path) -> list[str]:
    path = folder / "bench" / "step-cuda.json"
    if not path.exists():
        return []
    report = json.loads(path.read_text())
    meta = report.get("meta", {})
    lines = [f"Copy bandwidth {_fmt(meta.get('copy_bandwidth_gbps'))} GB/s; baseline `{meta.get('baseline')}`; "
             f"{_fmt(meta.get('seconds'))} s.", ""]
    lines += _table(["set", "dtype", "method", "ms/step", "p25-p75", "GB/s", "% copy", "x base", "kernels", "syncs",
                     "host ms", "first s"], [
        [r["set"], r["dtype"], r["method"], r.get("median_ms"),
         f"{_fmt(r.get('p25_ms'))}-{_fmt(r.get('p75_ms'))}", r.get("gb_per_s"), r.get("pct_copy_bw"),
         r.get("ratio_to_baseline"), r.get("kernels_per_step"), r.get("syncs_per_step"), r.get("host_ms"),
         r.get("first_step_s")] for r in report.get("rows", [])])
    failed = [c for c in report.get("checks", []) if not c.get("passed")]
    lines += ["", f"Checks against the reference: {len(report.get('checks', [])) - len(failed)} passed, "
                  f"{len(failed)} failed."]
    lines += [f"- skipped {s['method']} on {s.get('set')}/{s.get('dtype')}: {s['reason']}"
              for s in report.get("skipped", [])]
    return lines


def report_numbers(folder: Path) -> list[str]:
    path = folder / "kernel-report.json"
    if not path.exists():
        return []
    report = json.loads(path.read_text())
    rows = report.get("rows", [])
    most = max((r["registers"] or 0 for r in rows), default=0)
    lines = [f"sm_{report.get('arch')}, triton {report.get('triton')}: {len(rows)} kernels, "
             f"{len(report.get('errors', []))} errors, most registers {most}, "
             f"spills {sum(r['spills'] or 0 for r in rows)} bytes.", ""]
    lines += _table(["kernel", "dtype", "aligned", "vectorize", "registers", "spills", "load bits", "store bits",
                     "fma"], [
        [r["kernel"], r["dtype"], r["aligned"], r.get("vectorize"), r["registers"], r["spills"], r["load_bits"],
         r["store_bits"], r.get("fma")] for r in rows])
    return lines


def log_lines(folder: Path, stage: str, pattern: str) -> list[str]:
    path = folder / f"{stage}.log"
    if not path.exists():
        return []
    return [f"    {line.strip()}" for line in path.read_text(errors="replace").splitlines() if re.search(pattern, line)]


def tests_numbers(folder: Path) -> list[str]:
    path = folder / "tests.xml"
    if not path.exists():
        return log_lines(folder, "tests", r"(passed|failed|error)")[-1:]
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    lines = [f"{counts['tests']} tests: {counts['failures']} failures, {counts['errors']} errors, "
             f"{counts['skipped']} skipped."]
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            message = (bad.get("message") or "").splitlines()[0][:200] if bad.get("message") else ""
            lines.append(f"- {case.get('classname')}::{case.get('name')}: {message}")
    return lines


def key_numbers(folder: Path, stage: str) -> list[str]:
    if stage in ("memcheck", "racecheck"):
        return log_lines(folder, stage, r"(ERROR|RACECHECK) SUMMARY|^(PASS|FAIL|SKIP) ")
    if stage == "bench":
        return bench_numbers(folder)
    if stage == "report":
        return report_numbers(folder)
    if stage == "tests":
        return tests_numbers(folder)
    if stage == "build":
        return log_lines(folder, stage, r"ready|unavailable")
    return checks_numbers(folder, stage)


# ------------------------------------------------------------------ the README
def summary(folder: Path, files: list[str]) -> str:
    env = read_env(folder)
    plan = read_tsv(folder / "plan.tsv")
    stages = read_tsv(folder / "stages.tsv")
    running = read_tsv(folder / "running.tsv")
    done = {row[1] for row in stages}
    unreached = [row[1] for row in plan if row[1] not in done]
    gpu = env.get("gpu", "unknown")
    passed = [r for r in stages if r[2] == "PASS"]
    bad = [r for r in stages if r[2] not in PASSING]
    ran = [r for r in stages if r[2] != "SKIP" or "no GPU" not in r[6]]

    no_gpu = gpu in ("none", "unknown")
    lines = [f"# gpu_check.sh {'without a GPU' if no_gpu else 'on ' + gpu}, {env.get('date', '?')}", ""]
    if no_gpu:
        lines += ["**No GPU: nothing GPU-related ran.** Only the CPU selftest of the kit's own code did.", ""]
    if "stopped" in env:
        lines += [f"**The run was stopped {env['stopped']}.**", ""]
    lines.append(f"Stages: {len(passed)} passed, {len(bad)} failed, timed out, cut off or stopped, "
                 f"{len(stages) - len(passed) - len(bad)} skipped, {len(unreached)} never reached. Budget "
                 f"{env.get('budget_s', '?')} s; stages run: {env.get('stages_selected', '?')}.")
    lines.append("")

    here = source_digest(REPO)
    ran_digest = env.get("sources_sha256", "?")
    lines += ["## Machine and software", ""]
    rows = [[key, env[key]] for key in ("gpu", "capability", "sm_count", "memory_gib", "l2_mib", "nvidia_smi", "torch",
                                        "triton", "python", "host", "git", "date") if key in env]
    rows.append(["sources_sha256", f"{ran_digest} ({'the same as' if ran_digest == here else 'differs from'} "
                                   f"this checkout's {here} at unpack time)"])
    lines += _table(["", ""], rows) + [""]

    lines += ["## Stages", "", "In the order they ran; priority 1 is the most important evidence.", ""]
    lines += _table(["priority", "stage", "result", "seconds", "time box", "exit", "note"],
                    [[r[0], r[1], r[2], r[3], r[4], r[5], r[6].replace("|", "/")] for r in stages])
    lines.append("")

    cut = [f"- `{r[1]}`: {r[2]}, {r[6]}" for r in stages if r[2] in ("TIMEOUT", "CUT", "STOPPED")]
    cut += [f"- `{row[1]}`: killed while it ran (its time box was {row[2]} s); its log is missing"
            for row in running if len(row) >= 3]
    cut += [f"- `{name}`: never reached" for name in unreached if not any(name == row[1] for row in running)]
    lines += ["## Cut off or not reached", ""] + (cut or ["Nothing: every planned stage finished."]) + [""]

    lines += ["## Key numbers", ""]
    for r in ran:
        numbers = key_numbers(folder, r[1])
        if numbers:
            lines += [f"### {r[1]} ({r[2]})", ""] + numbers + [""]

    failing = [r for r in stages if r[2] in ("FAIL", "TIMEOUT", "STOPPED")]
    if failing:
        lines += ["## Failures: the end of each log", ""]
        for r in failing:
            log = folder / f"{r[1]}.log"
            tail = log.read_text(errors="replace").splitlines()[-25:] if log.exists() else ["(no log)"]
            lines += [f"### {r[1]} ({r[2]})", "", "```"] + tail + ["```", ""]

    lines += ["## Files", ""] + [f"- `{name}`" for name in files] + [""]
    return "\n".join(lines)


def unpack(archive: Path, dest: Path) -> Path:
    staging = dest / f".unpacking-{archive.stem}"
    if staging.exists():
        raise FileExistsError(f"{staging} exists: a previous unpack was interrupted; remove it")
    staging.mkdir(parents=True)
    try:
        files = extract(archive, staging)
        folder = folder_for(dest, read_env(staging))
        staging.rename(folder)
    except BaseException:
        for path in sorted(staging.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        staging.rmdir()
        raise
    (folder / "README.md").write_text(summary(folder, files + ["README.md"]))
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archive", type=Path, help="gpu-check.tar.gz from bench/gpu_check.sh")
    ap.add_argument("--dest", type=Path, default=REPO / "bench" / "results",
                    help="the folder that gets gpu-<device>-<date>/ (default: bench/results)")
    args = ap.parse_args(argv)
    folder = unpack(args.archive, args.dest)
    print(folder)
    print((folder / "README.md").read_text().split("\n## ", 1)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
