"""Where weights come from, and their identity: a seeded random init, a local checkpoint
(identified by its SHA-256), or the hub (its repo and, when the local cache says, its
revision). Shared by every backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featcache.backbones.spec import ModelSpec
from featcache.cache.fingerprint import file_sha256  # noqa: F401 (the backends' import)
from featcache.errors import FeatcacheError


def hub_error(spec: ModelSpec, exc: Exception, offline: str | None) -> FeatcacheError:
    fix = "go online once, or pass --weights PATH (a local checkpoint) or --weights random"
    if offline is not None:
        return FeatcacheError(f"could not load the hub weights of {spec.name}: the hub is out "
                              f"of reach ({offline}) and they are not in the local cache; {fix}")
    return FeatcacheError(
        f"could not load the hub weights of {spec.name} ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); {fix}")


def kwargs_error(spec: ModelSpec, exc: Exception) -> FeatcacheError:
    text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return FeatcacheError(f"{spec.name}: the architecture does not accept --model-arg "
                          f"{_kwargs_text(spec.kwargs)} ({text})")


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in kwargs.items()) or "(none)"


def hub_revision(repo_id: str | None, filenames: tuple[str, ...]) -> str | None:
    """The commit of a hub file already in the local HF cache (best effort, offline)."""
    if not repo_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        for filename in filenames:
            found = try_to_load_from_cache(repo_id.strip("/"), filename)
            if isinstance(found, str):
                parts = Path(found).parts
                if "snapshots" in parts:
                    return parts[parts.index("snapshots") + 1]
    except Exception:  # any problem here only loses the revision, never the weights
        return None
    return None


def read_state(path: Path) -> dict[str, Any]:
    """A state dict from a safetensors or torch file; anything else is a clear error."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FeatcacheError(f"--weights {path}: not a readable checkpoint (a safetensors "
                             f"file or a torch state dict): {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120] if str(exc) else ''}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FeatcacheError(f"--weights {path}: holds no state dict of tensors")
    return state


def load_state(model: nn.Module, path: Path) -> None:
    """Load a checkpoint (safetensors or torch) holding the model's state dict."""
    state = read_state(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise FeatcacheError(f"--weights {path}: does not fit this architecture "
                             f"({str(exc).splitlines()[0][:200]})") from None
    head_only = all(k.startswith(("head.", "fc_norm.")) for k in missing)
    if (missing and not head_only) or (unexpected and not all(
            k.startswith("head.") for k in unexpected)):
        raise FeatcacheError(f"--weights {path}: does not fit this architecture "
                             f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")




def seeded(seed: int, build: Any) -> nn.Module:
    """`build()` under torch's RNG seeded with `seed`, leaving the caller's RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
