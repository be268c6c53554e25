"""The paper's numbers under our names, checked against the headline table of the paper."""

from __future__ import annotations

import pytest

from featcache.reporting import reference as ref

# Headline table of paper.md: mean balanced accuracy over 19 datasets (no ImageNet).
HEADLINE = {
    "clip-vit-b32": (71.95, 77.14, 76.68, 78.66),
    "clip-vit-b16": (74.52, 79.39, 79.10, 80.97),
    "clip-vit-l14": (78.80, 83.27, 82.21, 83.87),
    "dinov2-vit-s14": (75.30, 81.31, 77.91, 80.20),
    "dinov2-vit-b14": (77.76, 83.61, 80.86, 82.99),
    "dinov2-vit-l14": (78.37, 84.90, 82.33, 84.66),
    "vit-s16": (71.90, 76.80, 76.20, 77.37),
    "vit-b16": (74.22, 79.98, 78.67, 80.22),
    "vit-l16": (75.39, 81.70, 79.74, 81.16),
}
METHODS = (("linear", "last"), ("attentive", "last"), ("concat", "all"), ("alf", "all"))


@pytest.mark.parametrize("model", sorted(HEADLINE))
def test_means_match_headline_table(model: str) -> None:
    names = [d for d in ref.paper_dataset_names() if d != "imagenet1k"]
    assert sorted(ref.paper_datasets_of(model)) == sorted(names)
    for (method, layer_set), expected in zip(METHODS, HEADLINE[model], strict=True):
        values = [ref.paper_number(model, d, method, layer_set) for d in names]
        assert None not in values, (model, method)
        assert sum(values) / len(values) == pytest.approx(expected, abs=0.006)


def test_single_numbers_and_absences() -> None:
    assert ref.paper_number("clip-vit-b16", "fer2013", "linear", "last") == pytest.approx(
        64.13665414)
    assert ref.paper_number("clip-vit-b16", "fer2013", "alf", "all") == pytest.approx(
        71.88822627)
    assert ref.paper_number("clip-vit-b16", "dmlab", "concat", "middle+last") == pytest.approx(
        46.93329334)
    assert ref.paper_number("clip-vit-b16", "wds/vtab/svhn", "concat", "quarterly") == \
        pytest.approx(77.617836)
    assert ref.paper_number("clip-vit-b16", "imagenet1k", "linear", "last") is None
    assert ref.paper_number("clip-vit-b16", "digits", "linear", "last") is None
    assert ref.paper_number("mae-vit-b16", "fer2013", "linear", "last") is None
    assert ref.paper_number("clip-vit-b16", "fer2013", "alf", "3,7,11") is None
    assert ref.paper_number("clip-vit-b16", "fer2013", "layers", "all") is None


def test_every_paper_dataset_maps() -> None:
    for model in ref.paper_models():
        table = ref.paper_tables()[ref.paper_model(model)]
        for experiment, by_dataset in table.items():
            assert set(by_dataset) <= set(ref.paper_dataset_names()), (model, experiment)
    assert ref.display_name("dmlab") == "Dmlab"
    assert ref.display_name("voc2007") == "PASCAL VOC 2007"
    assert ref.display_name("my-own-set") == "my-own-set"
    assert ref.normalize_dataset("wds/vtab/diabetic_retinopathy") == "diabetic_retinopathy"
    assert ref.normalize_dataset("Oxford-Pets") == "pets"
    assert ref.dataset_domain("fer2013") == "Structured"


def test_experiment_names() -> None:
    assert ref.paper_experiment("linear") == "CLS last layer"
    assert ref.paper_experiment("attentive", "last") == "All tokens last layer (attentive)"
    assert ref.paper_experiment("concat", "quarterly") == \
        "CLS+AP layers from quarterly blocks (linear)"
    assert ref.paper_experiment("alf", "middle_last") == \
        "CLS+AP layers from middle & last blocks (attentive)"
    assert ref.paper_experiment("alf", "last") == "CLS+AP last layer (attentive)"
