"""`featcache report` on a root with hundreds to thousands of run records: how long it takes.

Writes synthetic records shaped like the probe's (the paper's 9 models × 20 datasets ×
linear/concat/alf/layers × seeds, ALF with attention, `layers` with per-layer rows), then
times reading + summarising, and the whole report (CSV, Markdown, HTML with figures).
No caches exist, so CKA is off (it is computed once per cache and kept in cka.json).

    .venv/bin/python benchmarks/report.py            # 9 models x 20 datasets x 4 methods x 3 seeds
    .venv/bin/python benchmarks/report.py --seeds 1  # 720 runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from featcache.registry import MODELS  # noqa: E402
from featcache.reporting.build import build_report, prepare_report  # noqa: E402
from tests.runrecords import tokens_for, write_record  # noqa: E402

DATASETS = ("stl10", "cifar10", "caltech101", "voc2007", "imagenet1k", "cifar100",
            "country211", "pets", "flowers", "cars", "fgvc_aircraft", "gtsrb", "svhn", "pcam",
            "eurosat", "resisc45", "diabetic_retinopathy", "dtd", "fer2013", "dmlab")
PAPER_MODELS = ("clip-vit-b32", "clip-vit-b16", "clip-vit-l14", "dinov2-vit-s14",
                "dinov2-vit-b14", "dinov2-vit-l14", "vit-s16", "vit-b16", "vit-l16")
METHODS = (("linear", "last"), ("concat", "all"), ("alf", "all"), ("layers", "every"))


def write_runs(root: Path, seeds: int, rng: np.random.Generator) -> int:
    count = 0
    for model in PAPER_MODELS:
        assert model in MODELS
        for dataset in DATASETS:
            base = rng.uniform(40, 90)
            for method, layer_set in METHODS:
                tokens = tokens_for(method, "all" if layer_set == "every" else layer_set)
                for seed in range(seeds):
                    acc = float(base + {"linear": 0, "concat": 2, "alf": 5, "layers": 1}[method]
                                + rng.normal(0, 0.5))
                    extra: dict = {}
                    if method == "alf":
                        weights = rng.dirichlet(np.ones(len(tokens)))
                        extra["attention"] = {"tokens": tokens, "mean": weights.tolist()}
                    if method == "layers":
                        extra["per_layer"] = [
                            {"layer": f"block{i}" if i < 12 else "final", "token": "cls",
                             "balanced_top1": acc - rng.uniform(0, 10), "top1": acc,
                             "val_balanced_top1": acc - rng.uniform(0, 10)}
                            for i in range(13)]
                    write_record(root, model=model, dataset=dataset, method=method,
                                 layer_set=layer_set, seed=seed, tokens=tokens,
                                 metrics={"top1": acc, "top5": 99.0, "balanced_top1": acc,
                                          "balanced_top5": 98.0}, **extra)
                    count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="save the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        started = time.perf_counter()
        n = write_runs(root, args.seeds, np.random.default_rng(0))
        print(f"wrote {n} run records in {time.perf_counter() - started:.1f} s "
              f"(load avg {os.getloadavg()[0]:.2f})")
        started = time.perf_counter()
        data = prepare_report(root, None, cka=False)
        t_read = time.perf_counter() - started
        figures = {}
        for formats in ("csv", "html,md,csv"):
            started = time.perf_counter()
            build_report(root, Path(tmp) / f"out-{formats.replace(',', '-')}", formats,
                         cka=False)
            figures[formats] = time.perf_counter() - started
    result = {"runs": n, "rows": len(data.rows), "read_and_summarise_s": t_read,
              "report_csv_s": figures["csv"], "report_all_s": figures["html,md,csv"],
              "load_avg": os.getloadavg()[0]}
    print(f"{n} runs, {len(data.rows)} model x dataset rows")
    print(f"  read + summarise:            {t_read:6.2f} s")
    print(f"  report, csv only:            {figures['csv']:6.2f} s")
    print(f"  report, html + md + csv:     {figures['html,md,csv']:6.2f} s (figures included)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
