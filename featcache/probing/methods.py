"""Probe methods as specs: what a method reads from the cache, which head it trains, and
how the report names it. `probe`, `train`, `report` and `figures` read these instead of
switching on method names; a plugin adds a method with `register_method`.

The built-ins are the paper's: `linear` (the baseline), `concat`, `attentive` (all tokens
of the last layer), `alf` (attentive layer fusion) and `layers` (a linear probe per layer);
and `knn`, `knn-layers`: DINOv2's k-NN protocol, no training (`featcache.probing.knn`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from featcache.errors import FeatcacheError
from featcache.registry import METHODS

TOKEN_RULES = ("probe", "cls+ap", "all")
# The named layer sets, in the paper's order (the report's column order): their one
# definition; `pairs` resolves them to blocks, the report orders and labels by them.
LAYER_SETS = ("last", "middle+last", "quarterly", "all")
_LAYER_SET_ALIASES: dict[str, str] = {
    "last": "last", "final": "last",
    "middle+last": "middle+last", "middle_last": "middle+last", "middle-last": "middle+last",
    "mid+last": "middle+last",
    "quarterly": "quarterly", "quarters": "quarterly",
    "all": "all",
}


def normalize_layer_set(layer_set: str | None) -> str | None:
    """Canonical named layer set, or None for an explicit list like "3,7,11"."""
    if layer_set is None:
        return None
    return _LAYER_SET_ALIASES.get(str(layer_set).strip().lower())


@dataclass(frozen=True)
class Method:
    """A probe method.

    ``tokens``: what the head reads per layer of its layer set: "probe" (the model's own
    probe token: CLS, or AP for MAE; `--token` overrides), "cls+ap" (both), or "all"
    (every token of the last layer; needs `extract --all-tokens`).
    ``head``: a head kind of `featcache.probing.heads.HEADS` ("linear" reads its tokens
    concatenated; "attentive" reads them as a sequence).
    ``attention_heads``: the attentive head's number of attention heads; None: one per
    input token (the ALF rule).
    ``per_layer``: one probe per input token instead of one for all (`layers`).
    ``show_layers``: when the report column names the layer set: "always" (`alf:all`),
    "other" (only one that is not the default: `attentive:middle+last`) or "never" (the
    `layers` number is the best single layer, whichever set it came from).
    ``paper``: the paper's experiment label per named layer set, for its numbers.
    ``heatmap``: the report draws its attention per layer and token kind."""

    name: str
    head: str
    default_layers: str
    tokens: str
    description: str = ""
    attention_heads: int | None = None
    per_layer: bool = False
    takes_layers: bool = True
    show_layers: str = "other"
    paper: dict[str, str] = field(default_factory=dict)
    heatmap: bool = False

    def __post_init__(self) -> None:
        if self.tokens not in TOKEN_RULES:
            raise FeatcacheError(f"method {self.name!r}: tokens must be one of "
                                 f"{', '.join(TOKEN_RULES)}, got {self.tokens!r}")
        if self.show_layers not in ("always", "other", "never"):
            raise FeatcacheError(f"method {self.name!r}: show_layers must be always, other or "
                                 f"never, got {self.show_layers!r}")

    @property
    def attentive(self) -> bool:
        """Trains an attentive head (its grid has an attention-dropout axis)."""
        return self.head == "attentive"

    @property
    def needs_all_tokens(self) -> bool:
        return self.tokens == "all"

    def num_heads(self, n_tokens: int) -> int | None:
        if not self.attentive:
            return None
        return self.attention_heads or n_tokens

    def normalisation(self, protocol: str) -> str:
        """How a sample's tokens are L2-normalised: per token vector, except the paper
        protocol's all-tokens features, which the authors normalise per channel across the
        tokens (`normalize(dim=1)` on (N, T, D))."""
        return "channel" if self.needs_all_tokens and protocol == "paper" else "token"

    def column(self, layer_set: str | None) -> str:
        """The report column of a run with this layer set: "linear", "alf:all", …"""
        ls = normalize_layer_set(layer_set) or (str(layer_set) if layer_set else None)
        if self.show_layers == "never" or (self.show_layers == "other"
                                           and ls in (None, self.default_layers)):
            return self.name
        return f"{self.name}:{ls or self.default_layers}"

    def paper_experiment(self, layer_set: str | None) -> str | None:
        ls = normalize_layer_set(layer_set if layer_set is not None else self.default_layers)
        return self.paper.get(ls) if ls is not None else None


def register_method(method: Method, replace_existing: bool = False) -> Method:
    """Add a probe method: `featcache probe --method NAME` trains it, the report shows it."""
    return METHODS.add(method.name, method, replace=replace_existing)


def get_method(name: str) -> Method:
    return METHODS.get(name)


def method_of(name: object) -> Method | None:
    """The spec of a method named in a record, or None for one not registered here."""
    return METHODS.find(str(name).strip().lower()) if name else None


_PHRASE = {"last": "CLS+AP last layer", "middle+last": "CLS+AP layers from middle & last "
           "blocks", "quarterly": "CLS+AP layers from quarterly blocks",
           "all": "CLS+AP layers from all blocks"}

for _method in (
    Method("linear", "linear", "last", "probe", "the standard linear probe of the last layer",
           paper={"last": "CLS last layer"}),
    Method("attentive", "attentive", "last", "all", "attentive probe over every token of "
           "the last layer", attention_heads=8, takes_layers=False,
           paper={"last": "All tokens last layer (attentive)"}),
    Method("concat", "linear", "all", "cls+ap", "linear probe of CLS+AP of a layer set, "
           "concatenated", show_layers="always",
           paper={k: f"{v} (linear)" for k, v in _PHRASE.items()}),
    Method("alf", "attentive", "all", "cls+ap", "attentive layer fusion: one head per CLS "
           "and AP token of a layer set", show_layers="always",
           paper={k: f"{v} (attentive)" for k, v in _PHRASE.items()}, heatmap=True),
    Method("layers", "linear", "every", "probe", "a linear probe per stored layer, all in "
           "one grid", per_layer=True, show_layers="never"),
    # no training: DINOv2's k-NN protocol from the cache (featcache.probing.knn)
    Method("knn", "knn", "last", "probe", "k-nearest-neighbour vote (DINOv2's protocol) on "
           "the model's own embedding", takes_layers=False),
    Method("knn-layers", "knn", "every", "cls+ap", "a k-NN vote per stored layer's CLS and "
           "AP", per_layer=True, show_layers="never"),
):
    register_method(_method)
