"""What `featcache run` costs on top of the work: a tiny suite (random ViT, scikit-learn's
digits, linear + concat probes, a CSV report) run three ways, in one run of this script:

1. by hand: `featcache extract`, `featcache probe` per method, `featcache report`, each
   its own command, as a user's shell loop would;
2. `featcache run SUITE.toml` locally;
3. `featcache run` with `[launcher] name = "slurm"` (skipped without `sbatch`; start the
   test cluster with `.ci/slurm-up.sh`), timing the submission (`--no-wait`) apart.

Prints seconds and the ratios suite / by hand and SLURM / local suite.

    python benchmarks/suite.py [--repeat 1]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEATCACHE = [sys.executable, "-m", "featcache"]
MODEL = "timm:vit_tiny_patch16_224"
ARGS = ["img_size=32", "patch_size=8", "depth=2", "embed_dim=48", "num_heads=3"]
PROBE = ["--grid", "quick", "--epochs", "2", "--min-steps", "1", "--threads", "1"]


def suite_text(cache: Path, launcher: str) -> str:
    return "\n".join([
        f'models = ["{MODEL}"]', 'datasets = ["digits"]', 'methods = ["linear", "concat"]',
        "seeds = [0]", f'cache = "{cache}"', "[extract]", 'weights = "random"',
        f"model_arg = {ARGS!r}".replace("'", '"'), "[probe]", 'grid = "quick"', "epochs = 2",
        "min_steps = 1", "threads = 1", "[report]", "cka = false", "resamples = 0",
        'format = ["csv"]', "[launcher]", f'name = "{launcher}"', 'time = "00:20:00"', ""])


def timed(*commands: list[str]) -> float:
    started = time.perf_counter()
    for command in commands:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def by_hand(cache: Path, out: Path) -> float:
    extract = [*FEATCACHE, "extract", "--model", MODEL, "--dataset", "digits", "--weights",
               "random", "--cache", str(cache), *[x for a in ARGS for x in ("--model-arg", a)]]
    probes = [[*FEATCACHE, "probe", "--method", m, "--cache", str(cache), *PROBE]
              for m in ("linear", "concat")]
    report = [*FEATCACHE, "report", "--cache", str(cache), "--out", str(out), "--format",
              "csv", "--no-cka", "--resamples", "0"]
    return timed(extract, *probes, report)


def suite(folder: Path, launcher: str) -> tuple[float, float, float]:
    """(seconds to the end, seconds to return with --no-wait, seconds of `--status` before
    anything ran: the command's start-up and planning; 0, 0 locally)."""
    path = folder / f"{launcher}.toml"
    path.write_text(suite_text(folder / f"cache-{launcher}", launcher))
    submit = startup = 0.0
    if launcher == "slurm":
        startup = timed([*FEATCACHE, "run", str(path), "--status", "--json"])
        submit = timed([*FEATCACHE, "run", str(path), "--no-wait", "--json"])
    return submit + timed([*FEATCACHE, "run", str(path), "--json"]), submit, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    for _ in range(args.repeat):
        folder = Path(tempfile.mkdtemp(prefix="featcache-suite-bench-"))
        try:
            hand = by_hand(folder / "cache-hand", folder / "report-hand")
            local, _, _ = suite(folder, "local")
            print(f"by hand: {hand:.1f} s; featcache run (local): {local:.1f} s; "
                  f"ratio suite / by hand: {local / hand:.2f}")
            if shutil.which("sbatch") is None:
                print("SLURM: no sbatch here (start the test cluster: .ci/slurm-up.sh)")
                continue
            slurm, submit, startup = suite(folder, "slurm")
            print(f"featcache run (slurm): {slurm:.1f} s, of which submitting 3 jobs "
                  f"(--no-wait) {submit:.1f} s, {startup:.1f} s of it the command's start-up "
                  f"and plan (--status); ratio slurm / local suite: {slurm / local:.2f}; "
                  f"submission beyond start-up / local suite: {(submit - startup) / local:.2f}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
