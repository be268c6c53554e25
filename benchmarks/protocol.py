"""How much each known difference from the authors' code moves a probe's numbers.

Measured in one run on real images (sklearn's digits) through the offline demo's backbone
(a 12-block, width-192 random ViT at 64 px), so the features have a real ViT's structure
if not a trained one's. For each difference, the same probe is trained both ways over
several seeds, and the script prints the test balanced top-1 of each and their mean
absolute difference next to the seed-to-seed spread (the scale below which a difference
cannot be told from a change of seed):

1. validation on jittered (paper) vs clean features: linear (paper grid) and ALF;
2. all-tokens features normalised per channel (paper) vs per token: the attentive baseline;
3. the float16 cache vs float32 features: linear and ALF;

    python benchmarks/protocol.py [--seeds 5] [--alf-grid quick|paper]

docs/method.md ("Differences from the authors' code") holds the figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featcache.extracting.run import extract  # noqa: E402
from featcache.offline_demo import DEMO_MODEL, DEMO_MODEL_KWARGS  # noqa: E402
from featcache.probing.pairs import token_list  # noqa: E402
from featcache.probing.run import ProbeOptions, train_config  # noqa: E402
from featcache.probing.selection import all_test_metrics, fit_and_select  # noqa: E402
from featcache.probing.tokens.features import FeatureSource, load_source  # noqa: E402


def score(src_train, y_train, src_test, y_test, head: str, opts: ProbeOptions, seed: int,
          heads: int | None) -> float:
    cfg = train_config(opts, seed)
    torch.manual_seed(seed)
    fit = fit_and_select(src_train, y_train, int(y_train.max()) + 1, head, cfg, opts, seed,
                         heads)
    return all_test_metrics(fit.final, src_test, y_test)[0]["balanced_top1"]


def compare(label: str, a: list[float], b: list[float], names: tuple[str, str]) -> None:
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
    spread = max(statistics.stdev(a), statistics.stdev(b)) if len(a) > 1 else float("nan")
    print(f"{label:<38} {names[0]} {statistics.mean(a):6.2f}  {names[1]} "
          f"{statistics.mean(b):6.2f}  mean |Δ| {statistics.mean(diffs):5.2f}  "
          f"max |Δ| {max(diffs):5.2f}  seed std {spread:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--alf-grid", default="quick", choices=("quick", "paper"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train, test = (r.path for r in extract(
            model=DEMO_MODEL, dataset="digits", weights="random", model_arg=DEMO_MODEL_KWARGS,
            cache=tmp, all_tokens=True))
        from featcache.cache.store import open_cache

        train, test = open_cache(train), open_cache(test)
        y_tr = torch.as_tensor(train.labels())
        y_te = torch.as_tensor(test.labels())
        cpu = torch.device("cpu")
        print(f"digits: {train.n} train / {test.n} test images, {len(train.layer_names)} "
              f"layers of width {train.dim}; {len(seeds)} seeds; ALF grid {args.alf_grid}\n")

        def runs(tokens, head, opts, heads=None, norm="token", fp32=False) -> list[float]:
            src = load_source(train, tokens, cpu, normalise=norm)
            tst = load_source(test, tokens, cpu, normalise=norm)
            if fp32:
                src, tst = (FeatureSource(s.raw.float(), cpu, normalise=norm) for s in (src, tst))
            return [score(src, y_tr, tst, y_te, head, opts, s, heads) for s in seeds]

        linear = token_list("linear", "last", train)
        alf = token_list("alf", "all", train)
        lin_opts = ProbeOptions(method="linear")
        alf_opts = ProbeOptions(method="alf", grid=args.alf_grid)
        # 1. validation jitter
        compare("1. val jitter, linear (paper grid)",
                runs(linear, "linear", lin_opts), runs(linear, "linear",
                                                       replace(lin_opts, protocol="clean")),
                ("paper", "clean"))
        compare(f"1. val jitter, ALF ({args.alf_grid} grid)",
                runs(alf, "attentive", alf_opts),
                runs(alf, "attentive", replace(alf_opts, protocol="clean")), ("paper", "clean"))
        # 2. all-tokens normalisation (attentive baseline, 8 heads)
        att_opts = ProbeOptions(method="attentive", grid="quick")
        compare("2. all tokens: per channel vs per token",
                runs([("final", "all")], "attentive", att_opts, 8, "channel"),
                runs([("final", "all")], "attentive", att_opts, 8, "token"),
                ("chan.", "token"))
        # 3. fp16 cache vs fp32 features
        compare("3. fp16 vs fp32 features, linear", runs(linear, "linear", lin_opts),
                runs(linear, "linear", lin_opts, fp32=True), ("fp16", "fp32"))
        compare(f"3. fp16 vs fp32 features, ALF ({args.alf_grid})",
                runs(alf, "attentive", alf_opts), runs(alf, "attentive", alf_opts, fp32=True),
                ("fp16", "fp32"))
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
