"""The extraction loop: dataset → DataLoader workers → frozen backbone → writer thread → Zarr.

Batches never straddle a shard, so a shard's values depend only on the shard itself:
resuming, or splitting shards across `torchrun` ranks, gives the same bytes as one run.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from featcache import distributed as dist
from featcache.backbones import create_backbone, parse_weights
from featcache.backbones.base import Backbone
from featcache.backbones.spec import check_tap
from featcache.cache.files import NotWritable, next_path, promote, remove_leftovers, write_lock
from featcache.cache.fingerprint import check_fingerprint
from featcache.cache.store import (
    FORMAT_VERSION,
    Cache,
    Layout,
    cache_path,
    choose_shard_size,
    create_cache,
    model_dir_name,
    open_cache,
)
from featcache.cache.stores import is_remote, resolve_root
from featcache.errors import FeatcacheError, FingerprintMismatch
from featcache.options import check_int, make_options, parse_model_args
from featcache.sources import dataset_dir_name, short_name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExtractOptions:
    """Everything `featcache extract` takes, under the CLI's names; defaults are the CLI's.

    ``split``: "train,test" or a sequence of names; ``model_arg``: a dict of architecture
    overrides or the CLI's KEY=VALUE texts.
    """

    model: str
    dataset: str = "digits"
    split: str | Sequence[str] = "train,test"
    weights: str | None = None
    tap: str = "reference"
    model_arg: dict[str, Any] | Sequence[str] | None = None
    cache: str | Path | None = None
    data_root: str | Path | None = None
    download: bool = True
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    all_tokens: bool = False
    overwrite: bool = False
    skip_bad: bool = False
    shard_size: int | None = None


@dataclass
class ExtractResult:
    path: Path
    split: str
    n: int
    status: str  # "written" | "resumed" | "complete" (nothing to do) | "partial" (rank > 0)
    shards_written: int  # by all ranks together
    seconds: float
    n_skipped: int = 0
    n_written: int = 0  # images run through the backbone, by all ranks together
    ranks: int = 1

    @property
    def images_per_s(self) -> float:
        return 0.0 if self.seconds <= 0 else self.n_written / self.seconds


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 autocast on CUDA (fp16 on GPUs without bf16), fp32 on CPU (bf16 pays off
    on CPUs with AMX, and somewhat with AVX512-BF16: ask for it with --dtype bf16)."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise FeatcacheError(f"bad --dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class _Prepared(Dataset):
    """Decode + preprocess in the worker; an unreadable image comes back as a message."""

    def __init__(self, dataset: Any, transform: Callable, blank_shape: tuple[int, ...]) -> None:
        self.dataset = dataset
        self.transform = transform
        self.blank_shape = blank_shape

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = self.transform(self.dataset.load(index))
            return image, index, ""
        except FeatcacheError as exc:  # the dataset's own message names split, key and index
            return torch.zeros(self.blank_shape), index, str(exc)
        except MemoryError:  # the machine's problem, not the image's
            raise
        except Exception as exc:  # a transform failing on an odd image
            where = (f"{self.dataset.name}: image {self.dataset.key(index)!r} (split "
                     f"{self.dataset.split!r}, index {index})")
            return torch.zeros(self.blank_shape), index, f"{where}: {type(exc).__name__}: {exc}"


class ShardBatches(Sampler[list[int]]):
    """Batches of consecutive indices that never cross a shard boundary."""

    def __init__(self, layout: Layout, shards: list[int], batch_size: int) -> None:
        self.layout, self.shards, self.batch_size = layout, shards, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for shard in self.shards:
            rows = self.layout.rows(shard)
            for start in range(rows.start, rows.stop, self.batch_size):
                yield list(range(start, min(rows.stop, start + self.batch_size)))

    def __len__(self) -> int:
        return sum(-(-len(range(self.layout.rows(s).start, self.layout.rows(s).stop))
                     // self.batch_size) for s in self.shards)


class ShardWriter:
    """A thread that assembles batches into whole shards and writes them, so compute
    never waits for disk. The queue is bounded: memory stays flat however large N is."""

    def __init__(self, cache: Cache, on_shard: Callable[[int, int], None] | None = None) -> None:
        self.cache = cache
        self.layout = cache.layout
        self.on_shard = on_shard
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.buffers: dict[int, dict[str, np.ndarray]] = {}
        self.filled: dict[int, int] = {}
        self.shards_written = 0
        self.thread = threading.Thread(target=self._run, name="featcache-writer", daemon=True)
        self.thread.start()

    def put(self, start: int, arrays: dict[str, Any], ready: Any = None) -> None:
        """Hand over host tensors; `ready` (a CUDA event) says when their copy has landed."""
        if self.error is not None:
            raise self.error
        self.queue.put((start, arrays, ready))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                self._add(*item)
            except BaseException as exc:  # surfaced to the main thread on next put/close
                self.error = exc

    def _add(self, start: int, arrays: dict[str, Any], ready: Any) -> None:
        if ready is not None:
            ready.synchronize()
        arrays = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in arrays.items()}
        self._check_finite(start, arrays)
        shard = start // self.layout.shard_size
        rows = self.layout.rows(shard)
        size = rows.stop - rows.start
        if shard not in self.buffers:
            self.buffers[shard] = {k: np.empty((size, *v.shape[1:]), v.dtype)
                                   for k, v in arrays.items()}
            self.filled[shard] = 0
        count = 0
        for key, value in arrays.items():
            self.buffers[shard][key][start - rows.start:start - rows.start + len(value)] = value
            count = len(value)
        self.filled[shard] += count
        if self.filled[shard] == size:
            try:
                self.cache.write_shard(shard, self.buffers.pop(shard))
            except OSError as exc:  # disk full, permissions, a vanished mount
                raise FeatcacheError(f"writing shard {shard} of {self.cache.path} failed: {exc}."
                                     " Finished shards are kept: fix it and re-run the same "
                                     "command to resume") from exc
            del self.filled[shard]
            self.shards_written += 1
            if self.on_shard is not None:
                self.on_shard(shard, size)

    def _check_finite(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """fp16 holds up to 65504: a larger activation (or a NaN) is an error, not an inf."""
        for key, value in arrays.items():
            if value.dtype != np.float16 or np.isfinite(value).all():
                continue
            row, col = np.argwhere(~np.isfinite(value))[0][:2]
            where = (f"layer {self.cache.layer_names[col]}" if key in ("cls", "ap")
                     else "the pooled embedding" if key == "pool" else f"token {col}")
            raise FeatcacheError(
                f"{key} of image {start + row}, {where}, is not finite in float16 (an activation "
                "beyond ±65504, or NaN); this model's activations do not fit the fp16 cache "
                "at this tap (try --tap reference, or --dtype fp32 if it ran in fp16)")


def build_fingerprint(backbone: Backbone, dataset: Any, compute_dtype: torch.dtype,
                      all_tokens: bool) -> dict[str, Any]:
    """Every setting that changes the cached numbers (and nothing that does not)."""
    return {
        "model": backbone.describe(),
        "dataset": {
            "name": dataset.name,
            "split": dataset.split,
            "n": len(dataset),
            "identity": dataset.identity,
            "class_names": list(dataset.class_names),
        },
        "compute_dtype": str(compute_dtype).replace("torch.", ""),
        "storage_dtype": "float16",
        "all_tokens": bool(all_tokens),
    }


def _available_cpus() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cpus or 1


def plan_workers(device: torch.device, requested: int | None) -> tuple[int, int | None]:
    """(DataLoader workers, intra-op threads while extracting; None: leave torch's).

    On a GPU the CPU only decodes: CPUs - 1 workers (at most 8). On a CPU, decoding and the
    backbone share the same cores, and a worker process preempting one of the compute
    threads stalls the others at their next barrier: up to 4 cores, decoding inline in the
    main process is faster (measured on 2 cores: 1.075x the bare forward against 1.11x
    with one worker; docs/benchmarks.md). With more cores, one worker per 8 cores decodes
    in parallel and the compute threads leave those cores to it.
    """
    cpus = _available_cpus()
    if device.type != "cpu":
        return (max(1, min(8, cpus - 1)) if requested is None else requested), None
    if requested is None:
        requested = 0 if cpus <= 4 else max(1, cpus // 8)
    threads = None
    if requested > 0 and cpus > 4:
        threads = max(1, min(torch.get_num_threads(), cpus - requested))
    return requested, threads


def extract(options: ExtractOptions | None = None, /, *, progress: Any = None,
            on_failure: Callable[[str, str, FeatcacheError], None] | None = None,
            **kwargs: Any) -> list[ExtractResult]:
    """Extract every requested split; returns one result per split.

    ``extract(model="clip-vit-b16", dataset="fer2013")`` or ``extract(ExtractOptions(...))``:
    the keywords are `featcache extract`'s options. ``progress``: a `featcache.progress.Bars`.
    ``model`` and ``dataset`` may be comma lists and collections (`paper`, `natural`): then
    each backbone is built once, a failing pair does not stop the others (``on_failure``
    hears of each: model, dataset, error) and `PairsFailed` names them all at the end.
    """
    from featcache.sources import parse_splits
    from featcache.suites.names import PairsFailed, expand_datasets, expand_models

    opts = make_options(ExtractOptions, options, kwargs)
    check_int(opts.batch_size, "--batch-size")
    check_int(opts.workers, "--workers", 0)
    check_int(opts.shard_size, "--shard-size")
    splits = parse_splits(opts.split if isinstance(opts.split, str) else ",".join(opts.split))
    model_kwargs = parse_model_args(opts.model_arg)
    # Cheap checks first: a typo in the model, tap or weights must not wait for a download.
    models, names = expand_models(opts.model), expand_datasets(opts.dataset)
    parse_weights(opts.weights)
    check_tap(opts.tap)
    resolve_root(opts.cache)  # a URL it cannot serve is refused before any work
    if len(models) == 1 and len(names) == 1:  # one pair: its error is the command's
        return _extract_model(opts, models[0], names, splits, model_kwargs, progress)
    failures: list[tuple[str, str, str]] = []

    def failed(model: str, dataset: str, exc: FeatcacheError) -> None:
        failures.append((model, dataset, str(exc)))
        if on_failure is not None:
            on_failure(model, dataset, exc)

    results = [r for model in models for r in _extract_model(
        opts, model, names, splits, model_kwargs, progress, failed)]
    if failures:
        raise PairsFailed(results, failures, len(models) * len(names))
    return results


def _extract_model(opts: ExtractOptions, model: str, names: list[str], splits: list[str],
                   model_kwargs: dict[str, Any], progress: Any,
                   failed: Callable[[str, str, FeatcacheError], None] | None = None
                   ) -> list[ExtractResult]:
    """One model over datasets, its backbone built once (when the first dataset opens).
    Without ``failed`` an error stops everything; with it, only its pair."""
    from featcache.sources import open_dataset

    with dist.session():
        device = dist.resolve_device(opts.device)
        compute_dtype = resolve_dtype(opts.dtype, device)
        data_root = Path(opts.data_root) if opts.data_root is not None else None
        root = resolve_root(opts.cache)
        backbone: Backbone | FeatcacheError | None = None
        results = []
        for name in names:
            try:
                datasets = [open_dataset(name, split, data_root, opts.download)
                            for split in splits]
                if backbone is None:
                    backbone = _build(model, opts, model_kwargs, device, failed is not None)
                if isinstance(backbone, FeatcacheError):
                    raise backbone  # built once, failed once: each of its pairs says so
                model_dir = model_dir_name(model, opts.tap, backbone.weights_id)
                for dataset in datasets:
                    path = cache_path(root, model_dir, dataset_dir_name(dataset.name),
                                      dataset.split)
                    results.append(_extract_split(backbone, dataset, path, opts, device,
                                                  compute_dtype, progress))
            except (FeatcacheError, OSError) as exc:
                if failed is None:
                    raise
                failed(model, name, exc if isinstance(exc, FeatcacheError)
                       else FeatcacheError(f"{type(exc).__name__}: {exc}"))
        return results


def _build(model: str, opts: ExtractOptions, model_kwargs: dict[str, Any],
           device: torch.device, keep_error: bool) -> Backbone | FeatcacheError:
    try:
        backbone = create_backbone(model, opts.weights, opts.tap, model_kwargs)
    except FeatcacheError as exc:
        if not keep_error:
            raise
        return exc
    return backbone.to(device)


def _open_existing(path: Path, fingerprint: dict[str, Any]) -> tuple[Cache | None, str]:
    """The cache at `path` if it can be added to ("" when it matches), else why not."""
    try:
        cache = open_cache(path, "r+")
    except FeatcacheError as exc:  # damaged metadata, an older reader's format
        return None, str(exc)
    # a format-2 cache of a model with CLS is byte for byte a format-3 one (3 only added
    # the layouts of models without CLS or with a pool), and 4 only adds the identity
    # array: an upgrade mid-extraction resumes (`Cache.add_identity`)
    same_bytes = cache.format == 3 or (cache.format == 2 and cache.token_kinds == ["cls", "ap"])
    if cache.format != FORMAT_VERSION and not same_bytes:
        return None, (f"{path} is a format-{cache.format} cache from an older featcache "
                      f"(it stays readable; new shards need format {FORMAT_VERSION})")
    try:
        check_fingerprint(cache, fingerprint)
    except FeatcacheError as exc:
        return None, str(exc)
    return cache, ""


def _prepare_cache(backbone: Backbone, dataset: Any, path: Path, opts: ExtractOptions,
                   fingerprint: dict[str, Any]) -> tuple[Cache, str]:
    """Open and check, or create, the cache (one process: rank 0).

    `--overwrite` never deletes the old cache before the new one is complete: the new one
    is built beside it (`.NAME.next`, resumed if a kill interrupted it) and put in place
    by `_finish` only when its last shard is written."""
    target = path
    if (path / "zarr.json").exists():
        cache, why = _open_existing(path, fingerprint)
        if cache is not None and cache.complete:
            return cache, "complete"
        if cache is not None:
            cache.add_identity()  # an older cache's new shards record where they belong
            return cache, "resumed"
        if opts.overwrite and is_remote(path):
            raise FeatcacheError(f"{why}. --overwrite cannot swap a cache on an object store "
                                 f"in one step (no renames there): delete {path} first "
                                 "(e.g. `aws s3 rm --recursive`), or extract under another "
                                 "--cache prefix")
        if not opts.overwrite:
            pending = (" An unfinished replacement is kept beside it: --overwrite resumes it."
                       if (next_path(path) / "zarr.json").exists() else "")
            if "Pass --overwrite" in why:
                raise FingerprintMismatch(why + pending)
            raise FeatcacheError(f"{why}. Pass --overwrite to replace it (the old cache stays "
                                 f"until the new one is complete).{pending}")
        target = next_path(path)
        if (target / "zarr.json").exists():
            cache, _ = _open_existing(target, fingerprint)
            if cache is not None:
                cache.add_identity()
                return cache, "resumed"
    token_dim = backbone.final_dim if opts.all_tokens else None
    n_tokens = backbone.n_tokens if opts.all_tokens else None
    per_layer_kinds = 1 + backbone.has_cls  # AP, and CLS where the model has one
    per_sample = 2 * per_layer_kinds * len(backbone.layer_names) * backbone.dim
    if opts.all_tokens:
        per_sample = max(per_sample, 2 * backbone.n_tokens * backbone.final_dim)
    # never larger than the data: one shard then holds everything, with no padding
    shard_size = min(opts.shard_size or choose_shard_size(per_sample), len(dataset))
    layout = Layout(len(dataset), len(backbone.layer_names), backbone.dim, shard_size,
                    n_tokens, token_dim, backbone.has_cls, backbone.pool_dim)
    cache = create_cache(target, fingerprint, layout, dataset.labels,
                         list(dataset.class_names), backbone.layer_names, backbone.layer_dims,
                         {"probe_token": backbone.probe_token,
                          # verify's extract command repeats it: batches of another size
                          # round differently, and a repair must be bitwise
                          "batch_size": opts.batch_size})
    return cache, "written"


def _complete_read_only(path: Path, fingerprint: dict[str, Any]) -> bool:
    """A complete, matching cache in a folder that cannot be written: nothing to do, and
    nothing needs the lock."""
    if not (path / "zarr.json").exists():
        return False
    cache, _ = _open_existing(path, fingerprint)
    return cache is not None and cache.complete


def _extract_split(backbone: Backbone, dataset: Any, path: Path, opts: ExtractOptions,
                   device: torch.device, compute_dtype: torch.dtype,
                   progress: Any) -> ExtractResult:
    """One split: rank 0 locks, checks or creates the cache; every rank runs its shards;
    rank 0 finalises. Without torchrun this process is rank 0 of 1."""
    if len(dataset) == 0:
        raise FeatcacheError(f"{dataset.name} split {dataset.split!r} has no images")
    fingerprint = build_fingerprint(backbone, dataset, compute_dtype, opts.all_tokens)
    started = time.perf_counter()
    rank, world = dist.rank(), dist.world_size()
    with contextlib.ExitStack() as stack:
        status, message, cache, failure = "error", "", None, None
        target = str(path)
        if rank == 0:
            try:
                try:
                    stack.enter_context(write_lock(path))
                except NotWritable:
                    if not _complete_read_only(path, fingerprint):
                        raise
                    status = "complete"
                else:
                    remove_leftovers(path)
                    cache, status = _prepare_cache(backbone, dataset, path, opts, fingerprint)
                    target = str(cache.path)
            except BaseException as exc:  # every rank must hear of it, or they would wait
                failure, message = exc, (str(exc) if isinstance(exc, FeatcacheError)
                                         else f"{type(exc).__name__}: {exc}")
        status, message, target = dist.broadcast_object((status, message, target))
        if failure is not None:
            raise failure
        if status == "error":
            raise FeatcacheError(f"rank 0 could not prepare {path}: {message}")
        if status == "complete":
            done = cache or open_cache(path)
            return ExtractResult(path, dataset.split, len(dataset), "complete", 0, 0.0,
                                 int(done.attrs.get("n_skipped") or 0))
        if cache is None:
            cache = open_cache(target, "r+")
        # Rank 0's view, broadcast: a rank that looked later could see shards another rank
        # had already finished, split a shorter list, and leave a shard to nobody.
        todo = [int(s) for s in np.flatnonzero(~cache.done())] if rank == 0 else []
        todo = dist.broadcast_object(todo)
        mine = dist.split_evenly(todo, rank, world)
        written, n_written = _run_loop(backbone, dataset, cache, mine, opts, device,
                                       compute_dtype, progress)
        # every rank's counts, summed (this also waits for every rank to finish)
        written, n_written = dist.all_sum([written, n_written])
        dist.barrier()
        seconds = time.perf_counter() - started
        if rank != 0:
            return ExtractResult(path, dataset.split, len(dataset), "partial", written, seconds,
                                 0, n_written, world)
        previous = cache.attrs.get("timings", {}).get("extract_s", 0.0)
        valid = cache.valid()
        skipped = [int(i) for i in np.flatnonzero(~valid)]
        complete = cache.finalize({
            "timings": {"extract_s": round(previous + seconds, 3)},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "skipped": [{"index": i, "key": dataset.key(i)} for i in skipped[:MAX_SKIPPED_LISTED]],
            "environment": _environment(device, world),
        })
        if not complete:
            missing = int((~cache.done()).sum())
            raise FeatcacheError(f"{path}: {missing} shards are still missing after extraction;"
                                 " re-run the same command to finish them")
        if cache.path != path:  # a complete replacement (--overwrite) takes the old's place
            promote(cache.path, path)
    return ExtractResult(path, dataset.split, len(dataset), status, written, seconds,
                         len(skipped), n_written, world)


MAX_SKIPPED_LISTED = 1000


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    import platform

    return platform.processor()


def _environment(device: torch.device, world: int) -> dict[str, Any]:
    """Where and with what the cache was computed (recorded, not part of the fingerprint)."""
    import platform

    import timm

    try:
        import open_clip

        oc = open_clip.__version__
    except Exception:  # optional for timm-only users in principle
        oc = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "device_name": name or platform.machine(),
            "world_size": world, "torch": torch.__version__, "timm": timm.__version__,
            "open_clip": oc, "torch_threads": torch.get_num_threads()}


def _run_loop(backbone: Backbone, dataset: Any, cache: Cache, shards: list[int],
              opts: ExtractOptions, device: torch.device, compute_dtype: torch.dtype,
              progress: Any) -> tuple[int, int]:
    """Run the owned shards; returns (shards written, images processed)."""
    if not shards:
        return 0, 0
    layout = cache.layout
    size = backbone.input_size
    prepared = _Prepared(dataset, backbone.transform, size)
    workers, threads = plan_workers(device, opts.workers)
    loader = DataLoader(
        prepared,
        batch_sampler=ShardBatches(layout, shards, opts.batch_size),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=2 if workers > 0 else None,  # 2 batches per worker keep it busy
    )
    total = sum(layout.rows(s).stop - layout.rows(s).start for s in shards)
    label = f"{short_name(dataset.name)} {dataset.split}"
    task = progress.start(label, total) if progress else None
    writer = ShardWriter(cache)
    autocast = compute_dtype != torch.float32
    done_images = 0
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for images, indices, errors in loader:
            bad = [e for e in errors if e]
            if bad and not opts.skip_bad:
                raise FeatcacheError(f"unreadable image: {bad[0]}. Fix or remove it, or pass "
                                     "--skip-bad to skip such images and record them in the cache")
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=compute_dtype, enabled=autocast):
                out = backbone.tokens(images, all_tokens=layout.n_tokens is not None)
            arrays = {k: out[k] for k in ("cls", "ap", "pool") if k in out}
            if "last" in out:
                arrays["last_tokens"] = out["last"]
            valid = torch.tensor([not e for e in errors], dtype=torch.bool)
            if bad:  # a skipped image's row holds zeros, flagged invalid
                arrays = {k: v * valid.to(v.device).view(-1, *[1] * (v.dim() - 1))
                          for k, v in arrays.items()}
            host: dict[str, Any] = {k: v.to(torch.float16).to("cpu", non_blocking=True)
                                    for k, v in arrays.items()}
            host["valid"] = valid.numpy()
            # labels too, so a shard cleared by `verify --repair` is whole again once rewritten
            host["labels"] = np.asarray(dataset.labels[indices.numpy()], dtype=np.int64)
            ready = None
            if device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
            writer.put(int(indices[0]), host, ready)
            done_images += len(indices)
            if task is not None:
                progress.advance(task, len(indices))
    finally:
        torch.set_num_threads(old_threads)
        try:
            writer.close()
        finally:
            if task is not None:
                progress.stop(task)
    return writer.shards_written, done_images
