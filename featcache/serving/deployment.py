"""A trained probe as one deployable file: backbone, taps, normalisation, head.

`export_model(run, out)` composes the run's backbone (with its tap hooks) and its
selected head into one module, images (B, 3, H, W) → class probabilities (B, C), and
saves it with `torch.export` (a dynamic batch axis). Loading needs torch only:
`torch.export.load(out).module()(batch)`. The preprocessing an image needs before it
(resize, crop, interpolation, mean, std, as steps) and the class names are written
beside it as JSON (`<out>.json`) and inside it (`extra_files`, "featcache.json").

The head is the straightforward form of the trained one (`ReferenceAttentiveHead` for
attentive heads, a plain linear layer otherwise): the same function as the fast form
`predict` uses, in operations `torch.export` traces without specialising on the batch.
ONNX is left out: torch's exporter needs the `onnx` and `onnxscript` packages, which
featcache does not otherwise need.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featcache import __version__, atomic
from featcache.errors import FeatcacheError
from featcache.probing.tokens.features import NORM_EPS
from featcache.records.schema import RECORD_FILE, RUN_FILES
from featcache.serving.inference import TrainedProbe, load_trained, rebuild_backbone

EXTRA_FILE = "featcache.json"
MAX_BATCH = None  # the exported batch axis: 1 … any (None: torch.export sets no bound)


class DeployedProbe(nn.Module):
    """images (B, 3, H, W), preprocessed → class probabilities (B, C)."""

    def __init__(self, backbone: nn.Module, probe: TrainedProbe) -> None:
        super().__init__()
        self.backbone = backbone
        self.probe_tokens = probe.tokens
        self.all_tokens = probe.all_tokens
        self.layer_index = [probe.layer_names.index(n) if k in ("cls", "ap") else 0
                            for n, k in probe.tokens] if not probe.all_tokens else []
        self.dim = probe.dim
        self.channel = probe.normalisation == "channel"
        self.normalise = probe.normalisation is not None
        self.flatten = probe.grid.flatten
        self.head = _plain_head(probe)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.backbone.tokens(images, all_tokens=self.all_tokens)
        if self.all_tokens:
            x = out["last"]
        else:
            parts = []
            for (_, kind), layer in zip(self.probe_tokens, self.layer_index, strict=True):
                t = out["pool"][:, 0] if kind == "pool" else out[kind][:, layer]
                parts.append(nn.functional.pad(t, (0, self.dim - t.shape[-1])))
            x = torch.stack(parts, 1)
        x = x.to(torch.float16).to(torch.float32)  # the cache's rounding, as in training
        if self.normalise:
            norm = torch.linalg.vector_norm(x, dim=-2 if self.channel else -1, keepdim=True)
            x = x / norm.clamp_min(NORM_EPS)
        if self.flatten:
            x = x.flatten(1)
        elif x.shape[1] == 1 and isinstance(self.head, nn.Linear):  # a layer's own probe
            x = x[:, 0]
        return self.head(x).softmax(-1)


def _plain_head(probe: TrainedProbe) -> nn.Module:
    """The trained head in plain torch modules (weights copied from the fast form)."""
    from featcache.probing.heads import ReferenceAttentiveHead

    state = probe.grid.export(0)
    heads = probe.grid.heads
    if hasattr(heads, "num_heads"):
        head = ReferenceAttentiveHead(heads.dim, heads.n_tokens, heads.n_classes,
                                      heads.num_heads)
        head.load_state_dict(state)
        return head.eval()
    linear = nn.Linear(heads.d_in, heads.n_classes)
    linear.load_state_dict({"weight": state["weight"].reshape(heads.n_classes, heads.d_in),
                            "bias": state["bias"].reshape(heads.n_classes)})
    return linear.eval()


def preprocessing_steps(transform: Any) -> list[dict[str, Any]]:
    """The image transform as data: what a deployment without featcache must do."""
    steps: list[dict[str, Any]] = [{"op": "convert", "mode": "RGB"}]
    for t in getattr(transform, "transforms", [transform]):
        name = type(t).__name__
        if name == "Resize":
            size = t.size if isinstance(t.size, int) else list(t.size)
            steps.append({"op": "resize", "size": size,
                          "note": "an int resizes the shorter side to it, keeping the "
                                  "aspect ratio" if isinstance(t.size, int) else "exact size",
                          "interpolation": str(t.interpolation.value),
                          "antialias": bool(t.antialias), "max_size": t.max_size})
        elif name == "CenterCrop":
            steps.append({"op": "center_crop", "size": list(t.size)})
        elif name in ("ToTensor", "MaybeToTensor"):
            steps.append({"op": "to_tensor", "note": "uint8 HWC → float32 CHW in [0, 1]"})
        elif name == "Normalize":
            steps.append({"op": "normalize", "mean": [float(v) for v in t.mean],
                          "std": [float(v) for v in t.std]})
        elif name in ("MaybeConvertMode", "Lambda") or "rgb" in name.lower():
            continue  # RGB conversion: the first step
        else:
            steps.append({"op": name, "repr": repr(t)})
    return steps


def export_model(run: str | Path, out: str | Path | None = None, weights: str | None = None,
                 overwrite: bool = False) -> Path:
    """`featcache export-model`: the run's backbone and head as one `torch.export` file
    (default `<run>/model.pt2`), its preprocessing and classes in `<out>.json`. Returns
    the file."""
    from featcache.distributed import one_process_only

    one_process_only("export-model")
    run = Path(run).expanduser()
    target = Path(out).expanduser() if out else run / "model.pt2"
    if target.suffix != ".pt2":
        raise FeatcacheError(f"--out {target}: torch.export files end in .pt2")
    meta_path = target.with_suffix(".json")
    if not (run / RECORD_FILE).is_file():  # the run first: --out may not have been given
        raise FeatcacheError(f"{run} is not a run folder (no record.json); `featcache runs` "
                             "lists them (the `path` column)")
    reads = [run / name for name in RUN_FILES] + ([weights] if weights else [])
    for path in (target, meta_path):
        atomic.check_target(path, "--out", overwrite, inputs=reads)
    probe = load_trained(run, "cpu")
    if probe.grid is None:  # featcache.serving.knn.KnnProbe
        raise FeatcacheError(f"{run}: a k-NN run has no head to export (its classifier is "
                             "its training set); use `featcache predict` on it")
    backbone = rebuild_backbone(probe, weights).eval()
    module = DeployedProbe(backbone, probe).eval()
    example = torch.zeros(2, *backbone.input_size)
    # no upper bound: the graph has no loop over batches (4,096 was an arbitrary bound;
    # tests/test_hostile.py runs a batch beyond it through the exported file)
    batch = torch.export.Dim("batch", min=1, **({"max": MAX_BATCH} if MAX_BATCH else {}))
    try:
        with torch.no_grad():
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},),
                                          strict=False)
    except Exception as exc:  # a backbone torch.export cannot trace: say which, plainly
        raise FeatcacheError(f"torch.export could not trace {probe.fingerprint['model']['model']}"
                             f" ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    meta = {
        "featcache_version": __version__,
        "run": str(run),
        "model": probe.fingerprint["model"]["model"],
        "weights": probe.fingerprint["model"].get("weights"),
        "method": probe.record.get("method"),
        "layer_set": probe.record.get("layer_set"),
        "tokens": [f"{n}.{k}" for n, k in probe.tokens],
        "class_names": probe.class_names,
        "input": {"shape": ["batch", *backbone.input_size], "dtype": "float32",
                  "batch": [1, MAX_BATCH]},  # null: no upper bound
        "output": "class probabilities (batch, classes), softmax of the logits",
        "preprocess": probe.fingerprint["model"].get("preprocess"),
        "preprocess_steps": preprocessing_steps(backbone.transform),
        "test_metrics": probe.record.get("metrics"),
    }
    text = json.dumps(meta, indent=1)
    buffer = io.BytesIO()  # (torch.export wants a .pt2 name or a buffer, not our tmp name)
    torch.export.save(program, buffer, extra_files={EXTRA_FILE: text})
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(target, buffer.getvalue())
    atomic.write_text(meta_path, text + "\n")
    return target
