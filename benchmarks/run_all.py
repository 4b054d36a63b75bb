"""Every benchmark of the project in one command, and one table of what they found.

Each case is its own script under benchmarks/, run as a subprocess, one after another
(never two at once: they time themselves). A script writes its JSON under
benchmarks/results/; this one reads the JSON back (one small extractor per case) and
builds one row per measurement: case, saeflow, peer or limit, ratio, target, result.

    case        script             what it compares                          target
    ufldl       ufldl_natural.py   natural-image exercise vs numpy/scipy     >= 8x faster
    mnist       mnist_lbfgs.py     784-196-784, 60,000 inputs, L-BFGS        (CUDA: 400 it. < 5 s)
                                   s/iteration vs numpy/scipy
    adam        adam_matmul.py     Adam examples/s vs its matmuls alone      >= 0.80 CPU, 0.50 GPU
    streaming   streaming.py       10M patches streamed vs in memory         RSS < 2 GB, >= 0.70
                                                                             CPU (0.80 GPU)
    patches     patches.py         patch sampling vs scikit-learn
    overhead    overhead.py        orchestration overhead per stage          <= 1.0 s per stage
    penalties   penalties.py       dead latents, FVU, L0 per penalty, after  issue 15's targets
                                   (defaults) vs before (the old start)

A script that is missing is a row "not run (missing)"; one that fails is a row "failed
(exit N: its last stderr line)", and the suite goes on. ``--quick`` passes ``--quick`` to a
script that has that option, else ``--repeats 1`` where it has that one. With
``--from-results`` nothing runs: the table is built from the JSON files already there.
The table is printed, and written to benchmarks/results/run_all.md and run_all.json with
the machine it was made on. Exit status 1 if a case failed or missed its target.

    python benchmarks/run_all.py [--only CASE[,CASE]] [--skip CASE[,CASE]] [--quick]
                                 [--from-results] [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH = ROOT / "benchmarks"
DEFAULT_RESULTS = BENCH / "results"


@dataclass
class Row:
    """One line of the table. ``status`` is "ok" when the case ran and its numbers were
    read; otherwise it says why there are none (and the other fields stay empty)."""

    case: str
    saeflow: str = ""
    peer: str = ""
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    status: str = "ok"
    note: str = ""

    @property
    def result(self) -> str:
        if self.status != "ok":
            return self.status
        if self.passed is None:
            return "-"
        return "pass" if self.passed else "FAIL"

    @property
    def bad(self) -> bool:
        """A failed script, unreadable results or a missed target."""
        return self.status.startswith("failed") or self.passed is False


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    script: str
    results: str
    extract: Callable[[dict], list[Row]]
    ratio_means: str
    out_is_file: bool = False  # the script's --out names its JSON file, not a folder


def on_gpu(record: dict) -> bool:
    """Whether a case's record was measured on a CUDA device (its "device", or the CUDA
    device of its "machine")."""
    machine = record.get("machine")
    machine = machine if isinstance(machine, dict) else {}
    device = str(record.get("device") or machine.get("device") or "")
    return device.startswith("cuda") or bool(machine.get("cuda_device"))


def ufldl_rows(rec: dict) -> list[Row]:
    ref, sae = rec["reference"], rec["saeflow"]
    ratio = rec["speedup_to_reference_objective"]
    reach = sae.get("reach_seconds")
    return [Row(
        "natural-image exercise vs numpy/scipy",
        f"{reach:.2f} s to the reference's f" if reach is not None else "never reached it",
        f"{ref['seconds']:.2f} s (numpy/scipy, {ref['threads']} thread(s), {ref['nit']} it.)",
        ratio if reach is not None else None, ">= 8x", reach is not None and ratio >= 8.0,
        note=f"final f {100 * rec['final_objective_gap']:+.2f}% vs reference",
    )]


def mnist_rows(rec: dict) -> list[Row]:
    ref, sae = rec["reference"], rec["saeflow"]
    full, cuda = rec["saeflow_cpu_400"], rec["saeflow_cuda_400"]
    note = (f"{rec['iterations']} iterations{' (quick)' if rec.get('quick') else ''}; f: "
            f"saeflow {sae['f']:.4f}, reference {ref['f']:.4f}")
    if "seconds" in full:
        note += f"; 400 it. on the CPU {full['seconds']:.1f} s"
    if "skipped" in cuda:
        note += f"; CUDA skipped ({cuda['skipped']})"
    rows = [Row(
        "784-196-784 on 60,000 inputs, L-BFGS s/iteration vs reference",
        f"{sae['s_per_iteration']:.3f} s/it.",
        f"{ref['s_per_iteration']:.3f} s/it. (numpy/scipy, {ref['threads']} thread(s))",
        rec["reference_over_saeflow_per_iteration"], note=note,
    )]
    if "seconds" in cuda:
        rows.append(Row(
            "784-196-784 on 60,000 inputs, 400 L-BFGS iterations on CUDA",
            f"{cuda['seconds']:.2f} s", f"limit {cuda['target_s']:g} s",
            cuda["target_s"] / cuda["seconds"], f"< {cuda['target_s']:g} s",
            cuda["seconds"] < cuda["target_s"], note=f"f {cuda['f']:.4f}",
        ))
    return rows


def adam_rows(rec: dict) -> list[Row]:
    rows, skipped = [], []
    for c in rec["cases"]:
        title = f"Adam vs matmul alone ({c['name']})"
        target = f">= {c['target']:.2f}"
        if "skipped" in c:
            skipped.append(c["skipped"])
        elif "unsupported" in c:
            rows.append(Row(title, target=target, status="unsupported",
                            note=c["unsupported"]))
        else:
            row = Row(
                title, f"{c['saeflow']['examples_per_s']:,.0f} ex/s",
                f"{c['matmul']['examples_per_s']:,.0f} ex/s (the 5 GEMMs alone)",
                c["ratio"], target, c["ratio"] >= c["target"],
            )
            if "ceiling" in c:  # results written before the floor was measured lack it
                row.note = (
                    f"rounds {'/'.join(f'{r:.2f}' for r in c['round_ratios'])}; the floor "
                    f"(the step's unavoidable kernels: gather, GEMMs, elementwise, fused "
                    f"Adam) {c['floor']['examples_per_s']:,.0f} ex/s, so no implementation "
                    f"on torch's kernels exceeds {c['ceiling']:.2f} here; saeflow / floor "
                    f"{c['saeflow_vs_floor']:.2f}"
                )
            rows.append(row)
    if skipped and rows:
        note = f"{len(skipped)} case(s) skipped: {'; '.join(sorted(set(skipped)))}"
        rows[0].note = f"{rows[0].note}; {note}" if rows[0].note else note
    return rows


def streaming_rows(rec: dict) -> list[Row]:
    streamed, memory = rec["streamed"], rec["in_memory"]
    floor = 0.80 if on_gpu(rec) else 0.70
    rss_gb = streamed["peak_rss_bytes"] / 1e9
    ratio = rec["throughput_ratio"]
    return [Row(
        f"{rec['n_patches']:,} patches streamed vs in-memory",
        f"{streamed['examples_per_s']:,.0f} ex/s, peak RSS {rss_gb:.2f} GB",
        f"{memory['examples_per_s']:,.0f} ex/s, peak RSS {memory['peak_rss_bytes'] / 1e9:.2f} GB",
        ratio, f">= {floor:.2f}, RSS < 2 GB", ratio >= floor and rss_gb < 2.0,
    )]


def patches_rows(rec: dict) -> list[Row]:
    s = rec["summary"]["float64"]
    mine = s["contestants"]
    return [Row(
        "patch sampling vs scikit-learn",
        f"{mine['saeflow']['best_cold_s']:.3f} s",
        f"{mine['sklearn']['best_cold_s']:.3f} s (scikit-learn)",
        s["ratios"]["sklearn/saeflow (cold)"],
        note=f"{rec['task']}; first call of a process; np.copy of the output "
        f"{mine['copy']['best_cold_s']:.3f} s",
    )]


def overhead_rows(rec: dict) -> list[Row]:
    worst, mean = rec["max_overhead_per_stage_s"], rec["mean_overhead_per_stage_s"]
    stage = max(rec["per_stage"], key=lambda k: rec["per_stage"][k]["overhead_s"])
    return [Row(
        "orchestration overhead", f"{worst:.2f} s/stage at most ({stage}), mean {mean:.2f}",
        "limit 1.0 s/stage", 1.0 / worst if worst > 0 else None, "<= 1.0 s per stage",
        worst <= 1.0,
    )]


def penalties_rows(rec: dict) -> list[Row]:
    def text(r: dict) -> str:
        return f"{r['dead']}/{r['n_components']} dead, FVU {r['fvu']:.3f}, L0 {r['l0']:.2f}"

    rows = []
    for c in rec["cases"].values():
        target, ok = c.get("target") or ("", None)
        before, after = c["before"], c["after"]
        rows.append(Row(
            c["title"], text(after), "before: " + text(before),
            before["dead"] / after["dead"] if after["dead"] else None, target, ok,
            note="quick" if rec.get("quick") else "",
        ))
    return rows


CASES = (
    Case("ufldl", "natural-image exercise vs numpy/scipy", "ufldl_natural.py",
         "ufldl_natural.json", ufldl_rows,
         "reference wall time / saeflow's time to reach the reference's final objective"),
    Case("mnist", "784-196-784 on 60,000 inputs, L-BFGS s/iteration vs reference",
         "mnist_lbfgs.py", "mnist_lbfgs.json", mnist_rows,
         "reference s/iteration / saeflow s/iteration (CUDA row: 5 s / its time)"),
    Case("adam", "Adam vs matmul alone", "adam_matmul.py", "adam_matmul.json", adam_rows,
         "saeflow's Adam examples/s / examples/s of its five GEMMs alone"),
    Case("streaming", "10M patches streamed vs in-memory", "streaming.py", "streaming.json",
         streaming_rows, "streamed examples/s / in-memory examples/s"),
    Case("patches", "patch sampling vs scikit-learn", "patches.py", "patches.json",
         patches_rows, "scikit-learn time / saeflow time"),
    Case("overhead", "orchestration overhead", "overhead.py", "overhead.json", overhead_rows,
         "1.0 s limit / worst stage's overhead", out_is_file=True),
    Case("penalties", "dead latents per penalty, before and after", "penalties.py",
         "penalties.json", penalties_rows,
         "dead latents before / after (blank when none is dead after)"),
)
BY_KEY = {c.key: c for c in CASES}


def script_options(script: Path) -> str:
    """The script's --help text (its options), or "" where it has none."""
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                          text=True, env=child_env())
    return done.stdout if done.returncode == 0 else ""


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_case(case: Case, quick: bool, results: Path) -> str | None:
    """Run one case's script; None when it exited 0 and wrote its JSON, else the row
    status that says what went wrong. Its stdout and stderr go through to ours."""
    script = BENCH / case.script
    args: list[str] = []
    options = script_options(script) if quick or results != DEFAULT_RESULTS else ""
    if quick and "--quick" in options:
        args.append("--quick")
    elif quick and "--repeats" in options:
        args += ["--repeats", "1"]
    if results != DEFAULT_RESULTS and "--out" in options:
        args += ["--out", str(results / case.results if case.out_is_file else results)]
    path = results / case.results
    before = path.stat().st_mtime_ns if path.exists() else None
    print(f"\n=== {case.key}: {case.script} {' '.join(args)}", flush=True)
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env=child_env(),
                            stderr=subprocess.PIPE, text=True)
    tail: deque[str] = deque(maxlen=50)
    for line in proc.stderr:
        sys.stderr.write(line)
        tail.append(line)
    code = proc.wait()
    if code != 0:
        last = next((x.strip() for x in reversed(tail) if x.strip()), "no stderr")
        return f"failed (exit {code}: {last})"
    if not path.exists() or path.stat().st_mtime_ns == before:
        return f"failed (exit 0 but no new {path.name})"
    return None


def rows_of(case: Case, results: Path) -> list[Row]:
    path = results / case.results
    if not path.exists():
        missing = not (BENCH / case.script).exists()
        return [Row(case.title, status="not run (missing)" if missing else "not run (no results)")]
    try:
        return case.extract(json.loads(path.read_text()))
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
        return [Row(case.title, status=f"failed (unreadable {path.name}: "
                    f"{type(exc).__name__}: {exc})")]


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(rows: list[Row]) -> str:
    lines = ["| case | saeflow | peer or limit | ratio | target | result |",
             "|---|---|---|---:|---|---|"]
    for r in rows:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
        lines.append("| " + " | ".join(cell(x) for x in (
            r.case, r.saeflow, r.peer, ratio, r.target, r.result)) + " |")
    return "\n".join(lines)


def report(rows: list[Row], cases: list[Case], machine: dict, mode: str) -> str:
    cpu = f"{machine['cpu_model']}, {machine['cores_usable']} usable cores"
    ram = f"{machine['ram_bytes'] / 2**30:.0f} GiB RAM" if machine["ram_bytes"] else "RAM ?"
    gpu = machine["cuda_device"] or "no CUDA device"
    out = [
        "# saeflow benchmarks",
        "",
        f"{datetime.date.today().isoformat()}, {mode}. Machine: {cpu}, {ram}, {gpu}; "
        f"{machine['platform']}, Python {machine['python']}, torch {machine['torch']}.",
        "",
        markdown_table(rows),
        "",
        "Ratios (higher is better for saeflow):",
        "",
    ]
    out += [f"- {c.key}: {c.ratio_means}" for c in cases]
    notes = [f"- {r.case}: {r.note}" for r in rows if r.note]
    if notes:
        out += ["", "Notes:", "", *notes]
    return "\n".join(out) + "\n"


def selected(only: str | None, skip: str | None, ap: argparse.ArgumentParser) -> list[Case]:
    def keys(text: str | None) -> set[str]:
        names = {k.strip() for k in (text or "").split(",") if k.strip()}
        unknown = sorted(names - BY_KEY.keys())
        if unknown:
            ap.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(BY_KEY)}")
        return names

    wanted, dropped = keys(only), keys(skip)
    return [c for c in CASES if (not wanted or c.key in wanted) and c.key not in dropped]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", metavar="CASE[,CASE]", help=f"of: {', '.join(BY_KEY)}")
    ap.add_argument("--skip", metavar="CASE[,CASE]")
    ap.add_argument("--quick", action="store_true",
                    help="pass --quick (or --repeats 1) to the scripts that take it")
    ap.add_argument("--from-results", action="store_true",
                    help="run nothing: build the table from the JSON files already there")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                    help="where the cases' JSON files are read (and written)")
    args = ap.parse_args(argv)
    cases = selected(args.only, args.skip, ap)
    results = args.results.resolve()
    rows: list[Row] = []
    for case in cases:
        failure = None
        if not args.from_results:
            if not (BENCH / case.script).exists():
                rows.append(Row(case.title, status="not run (missing)"))
                continue
            failure = run_case(case, args.quick, results)
        rows += [Row(case.title, status=failure)] if failure else rows_of(case, results)

    from benchmarks.machine import machine_record

    machine = machine_record()
    mode = ("from the results already there" if args.from_results
            else "quick run" if args.quick else "full run")
    text = report(rows, cases, machine, mode)
    print("\n" + text, end="")
    results.mkdir(parents=True, exist_ok=True)
    record = {
        "mode": mode,
        "cases": [c.key for c in cases],
        "machine": machine,
        "rows": [{**dataclasses.asdict(r), "result": r.result} for r in rows],
        "ratio_means": {c.key: c.ratio_means for c in cases},
        "failed_or_missed": sum(r.bad for r in rows),
    }
    (results / "run_all.json").write_text(json.dumps(record, indent=2) + "\n")
    (results / "run_all.md").write_text(text)
    print(f"-> {results / 'run_all.md'}, {results / 'run_all.json'}")
    return 1 if any(r.bad for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
