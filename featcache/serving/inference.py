"""Use a trained probe on images: rebuild its backbone, then score exactly as in training.

`load_trained(run)` turns a run record into its selected head (the fast form it was
trained and scored in, one config) and the tokens it reads. `rebuild_backbone` makes the
backbone the run's caches were made with, from their fingerprint, and refuses when it
cannot get the same one (other weights, another hub revision, another featcache's
preprocessing). `predict` runs images through both: taps, reduction, the cache's float16
rounding, per-token normalisation, the head, in batches the way the record's test scores
were computed, so on the run's own test split it reproduces those scores exactly.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from featcache.errors import FeatcacheError
from featcache.probing.knn import nearest, vote
from featcache.records.schema import RECORD_FILE
from featcache.sources.base import IMAGE_EXTENSIONS, ImageDataset

# The evaluation batch of `FittedGrid.predict_logits`/`evaluate`: scoring the tokens in
# the same batches as the record's test metrics makes the logits identical, not just close.
HEAD_BATCH = 4096
DEFAULT_TOP_K = 5


@dataclass
class TrainedProbe:
    """A run's selected head and what it reads: what `predict` and `export_model` share."""

    path: Path
    record: dict[str, Any]
    tokens: list[tuple[str, str]]  # (layer, kind); [("final", "all")] for every token
    class_names: list[str]
    grid: Any  # a one-config `featcache.probing.train.FittedGrid`
    normalisation: str | None
    dim: int  # the token width the head reads (narrower tokens zero-padded)
    layer_names: list[str]
    fingerprint: dict[str, Any]  # the train cache's

    @property
    def all_tokens(self) -> bool:
        return self.tokens == [("final", "all")]

    @property
    def compute_dtype(self) -> torch.dtype:
        name = str(self.fingerprint.get("compute_dtype") or "float32")
        return getattr(torch, name, torch.float32)

    def assemble(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's (B, T, D) float16 tokens from `Backbone.tokens`' output, as the cache
        stores them (`featcache.probing.tokens.features.load_source` reads the same layout)."""
        if self.all_tokens:
            return out["last"].to(torch.float16)
        parts = []
        for name, kind in self.tokens:
            x = out["pool"][:, 0] if kind == "pool" else out[kind][:, self.layer_names.index(name)]
            x = x.to(torch.float16)
            if x.shape[-1] < self.dim:
                x = torch.nn.functional.pad(x, (0, self.dim - x.shape[-1]))
            parts.append(x)
        return torch.stack(parts, 1)

    def logits(self, raw: torch.Tensor) -> torch.Tensor:
        """(N, C) float32 logits (CPU) of float16 tokens (N, T, D), normalised per batch
        and scored in `HEAD_BATCH` batches, exactly as a record's test metrics."""
        from featcache.probing.tokens.features import FeatureSource

        device = next(self.grid.heads.parameters()).device
        return self.score(FeatureSource(raw.to(device), device, normalise=self.normalisation))

    def score(self, src: Any) -> torch.Tensor:
        """(N, C) logits (CPU) of a `FeatureSource` of this run's tokens, computed as the
        record's test logits were (`featcache evaluate` scores other caches with it)."""
        return self.grid.predict_logits(src, HEAD_BATCH, out_device="cpu")[0]


def load_trained(run: str | Path, device: torch.device | str = "cpu") -> TrainedProbe:
    """A run folder's selected head, rebuilt from `head.safetensors` in the form it was
    trained in. One line (FeatcacheError) for a folder that is not a finished run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from featcache.probing.heads import HEADS
    from featcache.probing.methods import method_of
    from featcache.probing.train import FittedGrid
    from featcache.records.schema import HEAD_FILE, RECORD_FILE
    from featcache.records.store import check_file, read_run

    path = Path(run).expanduser()
    if not (path / RECORD_FILE).is_file():
        raise FeatcacheError(f"{path} is not a run folder (no record.json); `featcache runs` "
                             "lists them (the `path` column)")
    record = read_run(path)
    if not record.get("method"):
        raise FeatcacheError(f"{path}: the record names no method (damaged?); run the same "
                             "`featcache probe` command again with --force")
    spec = method_of(record.get("method"))
    if spec is None:
        raise FeatcacheError(f"{path}: method {record.get('method')!r} is not registered here "
                             "(a plugin's method? install it)")
    if spec.head == "knn":  # no head: the training samples vote (featcache.probing.knn)
        return load_knn(path, record, device)
    try:
        fp = record["fingerprints"]["train"]
        model = fp["model"]
        layer_names = list(model["layer_names"])
        class_names = list(fp["dataset"]["class_names"])
        selected = dict(record["selected"])
        names = list(record["tokens"])
    except (KeyError, TypeError) as exc:
        raise FeatcacheError(f"{path}: the record lacks {exc} (made by an older featcache?); "
                             "run the same `featcache probe` command with --force") from None
    check_file(path, HEAD_FILE, record)
    from featcache.records.predictions import checked_run

    checked_run(record)  # a record edited, or a file gone, is named before any work
    try:
        state = load_file(str(path / HEAD_FILE), device=str(device))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise FeatcacheError(f"cannot read {path / 'head.safetensors'} ({why}); run the same "
                             "`featcache probe` command with --force") from None
    n_classes = len(class_names)
    if spec.needs_all_tokens:
        tokens = [("final", "all")]
        dim = int(model["layer_dims"][-1])  # `last_tokens` keep the final layer's width
    else:
        tokens = [tuple(t.split(".", 1)) for t in names]  # type: ignore[misc]
        dim = max([*model["layer_dims"], *(_pool_dim(model) for _, k in tokens
                                            if k == "pool")])
    if spec.per_layer:
        layer = selected.get("layer")
        kind = next((k for n, k in tokens if n == layer), None)
        if kind is None:
            raise FeatcacheError(f"{path}: the selected layer {layer!r} is not among the "
                                 "record's tokens")
        tokens = [(layer, kind)]
        state = {key.rsplit(".", 1)[-1]: value for key, value in state.items()
                 if key.rsplit(".", 1)[0] == f"{layer}.{kind}"}
    heads = _build_head(HEADS[spec.head], state, len(names), dim, n_classes, spec,
                        record, selected, device, path)
    precision = (record.get("settings") or {}).get("precision", "fp32")
    grid = FittedGrid(heads=heads, points=[selected], curves=torch.zeros(1, 0), plan=None,
                      group_size=1, amp=precision == "bf16-autocast",
                      flatten=spec.head == "linear" and not spec.per_layer)
    return TrainedProbe(path, record, tokens, class_names, grid,
                        record.get("normalisation", "token"), dim, layer_names, fp)


def _pool_dim(model: dict[str, Any]) -> int:
    return int(model.get("pool_dim") or max(model["layer_dims"]))


def _build_head(kind: Any, state: dict[str, torch.Tensor], n_tokens: int, dim: int,
                n_classes: int, spec: Any, record: dict, selected: dict,
                device: torch.device | str, path: Path) -> Any:
    """A one-config head of the kind the run trained (``n_tokens``: the record's token
    count), holding its weights."""
    if spec.head == "linear":
        inputs = [0] if spec.per_layer else None  # a layer's probe reads its one token
        d_in = dim if spec.per_layer else dim * n_tokens
        heads = kind(1, d_in, n_classes, inputs, generator=torch.Generator(), device=device)
    else:
        n_heads = (record.get("settings") or {}).get("heads") or spec.num_heads(n_tokens)
        heads = kind(1, dim, n_tokens, n_classes, int(n_heads),
                     float(selected.get("dropout", 0.0)), generator=torch.Generator(),
                     device=device)
    try:
        heads.load_config(0, state)
    except (KeyError, RuntimeError) as exc:
        raise FeatcacheError(f"{path / 'head.safetensors'} does not fit the record's head "
                             f"({str(exc).splitlines()[0][:160]}); run the same `featcache "
                             "probe` command with --force") from None
    return heads.eval()


def rebuild_backbone(probe: TrainedProbe, weights: str | None = None) -> Any:
    """The backbone the run's caches were made with, or one line saying why it cannot be
    had. ``weights``: the checkpoint file, for runs on a local checkpoint (its SHA-256 must
    match); hub and random weights are found from the fingerprint."""
    from featcache.backbones import create_backbone
    from featcache.cache.fingerprint import fingerprint_diff

    model = probe.fingerprint["model"]
    recorded = str(model.get("weights") or "")
    if weights is None:
        if recorded.startswith("random:"):
            weights = recorded
        elif recorded.startswith("file:"):
            raise FeatcacheError(
                f"{probe.path}: its backbone was loaded from a local checkpoint "
                f"({recorded[:30]}…); pass --weights PATH to that file")
    backbone = create_backbone(model["model"], weights, model.get("tap", "reference"),
                               dict(model.get("model_kwargs") or {}))
    diff = fingerprint_diff(model, backbone.describe())
    if diff:
        weights_line = next((d for d in diff if d.startswith("weights:")), None)
        if weights_line:
            raise FeatcacheError(
                f"{probe.path}: cannot get the backbone its caches were made with: "
                f"{weights_line} (other weights would give other tokens; pass the right "
                "--weights, or fetch the recorded hub revision)")
        raise FeatcacheError(f"{probe.path}: this featcache builds the backbone differently "
                             f"from the one its caches were made with: {'; '.join(diff[:3])}"
                             " — re-extract and probe again with this version")
    return backbone


# -- images in, predictions out -----------------------------------------------------------

class ImageFiles(ImageDataset):
    """Image files to predict on (no labels): a dataset `featcache.extracting.run` can read."""

    def __init__(self, paths: Sequence[Path], class_names: Sequence[str]) -> None:
        self.name = "files"
        self.split = "predict"
        self.class_names = list(class_names)
        self.paths = [Path(p) for p in paths]
        self.labels = np.full(len(self.paths), -1, dtype=np.int64)
        self.identity = {"source": "files", "n": len(self.paths)}

    def key(self, i: int) -> str:
        return str(self.paths[i])

    def load(self, i: int) -> Image.Image:
        try:
            return super().load(i)
        except FeatcacheError as exc:  # name the file, not a dataset index
            raise FeatcacheError(f"cannot read {self.paths[i]}: "
                                 f"{str(exc).rsplit('): ', 1)[-1]}") from None

    def _read(self, i: int) -> Image.Image:
        return Image.open(io.BytesIO(self.paths[i].read_bytes()))


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders walked recursively for image files; glob patterns expanded
    (for shells that leave them). A path that matches nothing is one line naming it."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = _walk_images(path)
            if not found:
                raise FeatcacheError(f"{path} holds no image files (extensions: "
                                     f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
            out += found
        elif path.is_file():
            out.append(path)
        elif glob.has_magic(str(item)):
            out += _glob_images(str(item), path)
        elif path.exists():
            raise FeatcacheError(f"{item} is neither a file nor a folder (a device?)")
        else:
            raise FeatcacheError(f"no such file or folder: {item}")
    if not out:
        raise FeatcacheError("no images given: pass files, folders or globs, or --dataset")
    return out


def _glob_images(item: str, path: Path) -> list[Path]:
    """A pattern's files, and the image files of the folders it matches."""
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    found = [p for p in matches if p.is_file()]
    folders = [p for p in matches if p.is_dir()]
    for folder in folders:
        found += _walk_images(folder)
    if not found:
        raise FeatcacheError(f"no files match {item}" if not folders else
                             f"{item} matches {len(folders)} folder(s) that hold no image "
                             f"files (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return found


def _walk_images(folder: Path) -> list[Path]:
    """Image files under a folder, recursively, hidden ones left out, in sorted order.
    Symlinked folders are followed; one already walked (a link back up: a loop) is not
    walked again."""
    found = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")
                  and f.rpartition(".")[2].lower() in IMAGE_EXTENSIONS]
    return found


@dataclass
class PredictResult:
    """Rows (one per predicted image), and, where labels are known, the metrics."""

    rows: list[dict[str, Any]]
    class_names: list[str]
    logits: torch.Tensor | None = None  # (N, C), rows in order
    index: np.ndarray | None = None  # (N,) dataset index (or file number) of each row
    unreadable: list[str] = field(default_factory=list)
    metrics: dict[str, Any] | None = None  # with labels (a dataset with the run's classes)
    record_metrics: dict[str, Any] | None = None  # the run's own test split: its record's
    agreement: float | None = None  # share of predictions equal to the record's

    @property
    def reproduces_record(self) -> bool | None:
        if self.record_metrics is None or self.metrics is None:
            return None
        from featcache.probing.selection import METRIC_KEYS

        return all(self.metrics.get(k) == self.record_metrics.get(k) for k in METRIC_KEYS)


def predict(run: str | Path, inputs: Sequence[str | Path] = (), *, dataset: str | None = None,
            split: str = "test", top_k: int = DEFAULT_TOP_K, weights: str | None = None,
            batch_size: int = 64, workers: int | None = None, device: str = "auto",
            data_root: str | Path | None = None, download: bool = True,
            csv: str | Path | None = None, overwrite: bool = False,
            progress: Any = None) -> PredictResult:
    """`featcache predict`: the run's probe applied to image files (``inputs``: files,
    folders, globs) or to a dataset split (``dataset``, ``split``). ``csv``: also write
    the rows there (`write_csv`; an existing file only with ``overwrite``)."""
    from featcache import atomic
    from featcache.distributed import one_process_only, resolve_device
    from featcache.options import check_int

    one_process_only("predict")

    reads = [Path(run).expanduser() / RECORD_FILE, *(Path(str(i)) for i in inputs
                                                       if Path(str(i)).is_file())]
    if weights:
        reads.append(Path(weights))
    if csv is not None:
        csv = atomic.check_target(csv, "--csv", overwrite, inputs=reads)

    check_int(top_k, "--top-k")
    check_int(batch_size, "--batch-size")
    check_int(workers, "--workers", 0)
    if bool(inputs) == bool(dataset):
        raise FeatcacheError("give images (files, folders, globs) or --dataset, not both"
                             if inputs else "nothing to predict: give images (files, "
                             "folders, globs) or --dataset NAME [--split test]")
    with stop_on_interrupt() as stop:
        return _predict(run, inputs, dataset, split, top_k, weights, batch_size, workers,
                        resolve_device(device), data_root, download, csv, overwrite, progress,
                        stop)


class Stopper:
    """Ctrl-C always stops. A SIGINT is remembered as well as raised, and calling the
    stopper raises it again where work goes on: an interrupt that lands while DataLoader
    workers start was swallowed on its way (2 of 11 tries finished, wrote their CSV and
    exited 0), or raised inside a finalizer ('Exception ignored in …', a traceback).
    Inside `deferred()` (the DataLoader's loop) the first SIGINT is only remembered, and
    raised at the next batch (a second one raises at once)."""

    def __init__(self) -> None:
        self.hits = 0
        self.deferring = False
        self.main = os.getpid()

    def __call__(self) -> None:
        if self.hits:
            raise KeyboardInterrupt

    def handler(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.main:  # a DataLoader worker forked before its own handler
            return
        self.hits += 1
        if not self.deferring or self.hits > 1:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[Callable[[], None]]:
    """A `Stopper` for the duration (off the main thread, where no signal arrives, one
    that never stops)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    stop = Stopper()
    previous = signal.signal(signal.SIGINT, stop.handler)
    try:
        yield stop
        stop()
    except Exception:
        stop()  # what an interrupt broke on its way ("DataLoader worker exited"): Ctrl-C
        raise
    finally:
        if previous is not None:  # None: a handler not set from Python, left as it was
            signal.signal(signal.SIGINT, previous)


def _ignore_interrupts(worker_id: int) -> None:
    """A DataLoader worker leaves Ctrl-C to the main process, which stops them all."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _predict(run: str | Path, inputs: Sequence[str | Path], dataset: str | None, split: str,
             top_k: int, weights: str | None, batch_size: int, workers: int | None,
             dev: torch.device, data_root: str | Path | None, download: bool,
             csv: Path | None, overwrite: bool, progress: Any,
             stop: Callable[[], None]) -> PredictResult:
    probe = load_trained(run, dev)
    if dataset is not None:
        from featcache.sources import open_dataset

        data: ImageDataset = open_dataset(dataset, split, None if data_root is None
                                          else Path(data_root), download)
    else:
        data = ImageFiles(collect_images(inputs), probe.class_names)
    backbone = rebuild_backbone(probe, weights).to(dev).eval()
    logits, index, unreadable = _score(probe, backbone, data, dev, batch_size, workers,
                                       progress, stop)
    if not len(index):
        raise FeatcacheError(f"none of the {len(data)} images could be read; the first: "
                             f"{unreadable[0] if unreadable else 'none given'}")
    result = _rows(probe, data, logits, index, top_k, dataset is not None)
    result.logits, result.index, result.unreadable = logits, index, unreadable
    if dataset is not None and list(data.class_names) == probe.class_names and len(index):
        from featcache.probing.selection import logit_metrics

        y = torch.as_tensor(data.labels[index])
        result.metrics = {k: v for k, v in logit_metrics(logits, y, len(probe.class_names))
                          .items() if k != "per_class"}
        _compare_with_record(probe, data, index, logits, result)
    stop()  # never a CSV of an interrupted run
    if csv is not None:
        write_csv(result.rows, csv, overwrite)
    return result


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV: item, label, pred, prob, then top2, prob2, … (the top-k after the
    first, which is pred and prob)."""
    import csv as csv_module

    k = max((len(r["top_k"]) for r in rows), default=1)
    header = ["item", "label", "pred", "prob"]
    for j in range(2, k + 1):
        header += [f"top{j}", f"prob{j}"]
    buffer = io.StringIO(newline="")
    writer = csv_module.writer(buffer)
    writer.writerow(header)
    for row in rows:
        line = [row["item"], "" if row["label"] is None else row["label"], row["pred"],
                repr(row["prob"])]
        for name, prob in row["top_k"][1:]:
            line += [name, repr(prob)]
        writer.writerow(line)
    return buffer.getvalue()


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path,
              overwrite: bool = False) -> Path:
    """The rows as a CSV file, written whole or not at all."""
    from featcache import atomic

    return atomic.write_text(atomic.check_target(path, "--csv", overwrite), csv_text(rows))


def _score(probe: TrainedProbe, backbone: Any, data: ImageDataset, device: torch.device,
           batch_size: int, workers: int | None, progress: Any,
           stop: Callable[[], None] = lambda: None
           ) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Backbone in batches, tokens gathered in float16, the head every `HEAD_BATCH`
    readable images (the same batches the record's test scores used)."""
    from torch.utils.data import DataLoader

    from featcache.extracting.run import _Prepared, plan_workers

    n_workers, threads = plan_workers(device, workers)
    loader = DataLoader(_Prepared(data, backbone.transform, backbone.input_size),
                        batch_size=batch_size, num_workers=n_workers,
                        pin_memory=device.type == "cuda",
                        worker_init_fn=_ignore_interrupts if n_workers else None)
    dtype = probe.compute_dtype
    label = "predict images" if isinstance(data, ImageFiles) else \
        f"predict {data.name} {data.split}"
    task = progress.start(label, len(data)) if progress else None
    pending: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    index: list[int] = []
    unreadable: list[str] = []
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)

    def flush(final: bool) -> None:
        raw = torch.cat(pending) if pending else None
        pending.clear()
        while raw is not None and (len(raw) >= HEAD_BATCH or (final and len(raw))):
            logits.append(probe.logits(raw[:HEAD_BATCH]))
            raw = raw[HEAD_BATCH:]
        if raw is not None and len(raw):
            pending.append(raw)

    deferred = getattr(stop, "deferred", contextlib.nullcontext)
    try:
        with torch.inference_mode(), deferred():
            for images, indices, errors in loader:
                stop()
                ok = [i for i, e in enumerate(errors) if not e]
                unreadable += [e for e in errors if e]
                if ok:
                    images = images[ok].to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=dtype,
                                        enabled=dtype != torch.float32):
                        out = backbone.tokens(images, all_tokens=probe.all_tokens)
                    pending.append(probe.assemble(out))
                    index += [int(indices[i]) for i in ok]
                if sum(len(p) for p in pending) >= HEAD_BATCH:
                    flush(False)
                if task is not None:
                    progress.advance(task, len(indices))
            stop()
            flush(True)
    finally:
        torch.set_num_threads(old_threads)
        if task is not None:
            progress.stop(task)
    n_classes = len(probe.class_names)
    out_logits = torch.cat(logits) if logits else torch.empty(0, n_classes)
    return out_logits, np.asarray(index, dtype=np.int64), unreadable


def _rows(probe: TrainedProbe, data: ImageDataset, logits: torch.Tensor, index: np.ndarray,
          top_k: int, labelled: bool) -> PredictResult:
    names = probe.class_names
    k = min(top_k, len(names))
    probs = logits.softmax(1)
    top = probs.topk(k, dim=1) if len(probs) else None
    rows = []
    for r, i in enumerate(index.tolist()):
        pairs = [[names[int(c)], float(p)] for c, p in zip(top.indices[r], top.values[r],
                                                           strict=True)]
        label = None
        if labelled:
            label_id = int(data.labels[i])
            label = data.class_names[label_id] if 0 <= label_id < len(data.class_names) else None
        rows.append({"item": i if labelled else str(data.key(i)), "label": label,
                     "pred": pairs[0][0], "prob": pairs[0][1], "top_k": pairs})
    return PredictResult(rows, names)


def _compare_with_record(probe: TrainedProbe, data: ImageDataset, index: np.ndarray,
                         logits: torch.Tensor, result: PredictResult) -> None:
    """On the run's own test split (same content hash), set the record's metrics beside
    ours and the share of per-image predictions that agree with the stored ones."""
    from featcache.records.predictions import load_predictions

    test = (probe.record.get("fingerprints") or {}).get("test") or {}
    identity = (test.get("dataset") or {}).get("identity") or {}
    if not identity.get("sha256") or identity.get("sha256") != data.identity.get("sha256"):
        return
    result.record_metrics = {k: v for k, v in (probe.record.get("metrics") or {}).items()}
    stored = load_predictions(probe.path, logits=False, record=probe.record)
    if stored is not None and np.array_equal(stored.index, index):
        result.agreement = float(np.mean(stored.pred == logits.argmax(1).numpy()))


# -- a k-NN run as a trained probe (`featcache.probing.knn` runs and scores it) ----------

def load_knn(path: Path, record: dict[str, Any], device: torch.device | str = "cpu") -> Any:
    """A k-NN run as a `featcache.serving.inference.TrainedProbe`: its chosen token and k, and the
    training samples it votes with (rows `head.safetensors` names, of the train cache its
    record names, which must still be the cache it was run on)."""
    from featcache.probing.tokens.features import load_source
    from featcache.records.store import HEAD_FILE, check_file

    fp, kinds, k = _knn_parts(path, record)
    train = _train_cache(path, record)
    check_file(path, HEAD_FILE, record)
    head = _read_head(path / HEAD_FILE, device)
    model = fp["model"]
    layer_names = list(model["layer_names"])
    dim = max([*model["layer_dims"], *([int(model.get("pool_dim") or 0)]
                                        if kinds[0][1] == "pool" else [])])
    bank = load_source(train, kinds, torch.device(device), normalise="token")
    bank = bank.subset(head["train_index"].cpu().numpy())
    return KnnProbe(path, record, kinds, list(fp["dataset"]["class_names"]), None, "token",
                    dim, layer_names, fp, bank=bank,
                    bank_labels=head["train_labels"].to(bank.device), k=k)


def _knn_parts(path: Path, record: dict[str, Any]) -> tuple[dict, list[tuple[str, str]], int]:
    """The train fingerprint, the token read (the selected one for `knn-layers`), k."""
    try:
        fp = record["fingerprints"]["train"]
        selected = dict(record["selected"])
        names = [tuple(t.split(".", 1)) for t in record["tokens"]]
        k = int(selected["k"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FeatcacheError(f"{path}: the record lacks {exc}; run the same `featcache "
                             "probe` command with --force") from None
    if selected.get("layer") is not None:
        names = [(str(selected["layer"]), str(selected.get("token") or names[0][1]))]
    if len(names) != 1:
        raise FeatcacheError(f"{path}: a k-NN record names {len(names)} tokens, not one")
    return fp, names, k  # type: ignore[return-value]


def _train_cache(path: Path, record: dict[str, Any]) -> Any:
    """The cache the run's neighbours live in, checked against its record."""
    from featcache.cache.store import open_cache
    from featcache.records.store import settings_id

    where = (record.get("caches") or {}).get("train")
    if not where or not Path(where).is_dir():
        raise FeatcacheError(f"{path}: a k-NN run votes with its training samples, read from "
                             f"the train cache {where or '(not named)'}, which is not there; "
                             "put it back (or extract it again) and retry")
    train = open_cache(Path(where))
    want = (record.get("settings") or {}).get("caches", {}).get("train")
    if want and settings_id(train.fingerprint) != want:
        raise FeatcacheError(f"{path}: the train cache {where} is not the one the run was "
                             "made from (its fingerprint differs); run the same `featcache "
                             "probe --method knn` command again with --force")
    return train


def _read_head(file: Path, device: torch.device | str) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        head = load_file(str(file), device=str(device))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise FeatcacheError(f"cannot read {file} ({exc}); run the same `featcache probe` "
                             "command with --force") from None
    if set(head) != {"train_index", "train_labels"}:
        raise FeatcacheError(f"{file} is not a k-NN run's file (keys {sorted(head)}); run "
                             "the same `featcache probe` command with --force")
    return head


@dataclass
class KnnProbe(TrainedProbe):
    """A k-NN run: scores tokens by their neighbours among its training samples."""

    bank: Any = None  # the training samples' tokens (a FeatureSource)
    bank_labels: Tensor | None = None
    k: int = 10

    def score(self, src: Any) -> Tensor:
        """(N, C) vote shares (CPU) of a source of this run's token, as in its record."""
        sims, idx = nearest(src, self.bank, self.k)
        return vote(sims[0], idx[0], self.bank_labels, len(self.class_names), self.k).cpu()

    def logits(self, raw: Tensor) -> Tensor:
        from featcache.probing.tokens.features import FeatureSource

        return self.score(FeatureSource(raw.to(self.bank.device), self.bank.device,
                                        normalise="token"))
