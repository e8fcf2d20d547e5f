"""The backbone registry: every entry's code paths resolve, lookups refuse unknown names with
one message, a saved conversion finds its family, and flags map onto a job's options."""

import dataclasses

import pytest

from m4v_convert.backbones import registry
from m4v_convert.backbones.generic.model import converted_class
from m4v_convert.backbones.pyramidflow.converted import M4VPyramidDiffusionMMDiT, M4VPyramidFluxTransformer
from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel
from m4v_convert.errors import M4VError
from m4v_convert.recipes import load_recipe

CODE_FIELDS = ("options", "convert", "published_flops", "converted_class", "load", "check_recipe", "eval_options",
               "evaluate")


def test_every_entry_resolves_and_every_shipped_recipe_has_one():
    assert registry.names() == ["wan", "pyramidflow", "generic"]
    for entry in registry.entries():
        for name in CODE_FIELDS:
            path = getattr(entry, name)
            if path is not None:
                assert callable(registry.resolve(path)), (entry.name, name)
        assert dataclasses.is_dataclass(registry.resolve(entry.options))
    for name in ("wan2.1", "pyramidflow-miniflux-768p", "cogvideox"):
        recipe = load_recipe(name)
        assert registry.for_recipe(recipe).name == recipe.backbone


def test_unknown_backbone_is_one_message():
    with pytest.raises(M4VError, match=r"backbone 'mochi': not a registered backbone \(known: wan, pyramidflow, "
                                       r"generic\)"):
        registry.get("mochi")


@pytest.mark.parametrize("config,family,cls", [
    ({"_class_name": "M4VWanTransformer3DModel", "m4v": {"layers": {}}}, "wan", M4VWanTransformer3DModel),
    ({"_class_name": "M4VPyramidFluxTransformer", "m4v": {}}, "pyramidflow", M4VPyramidFluxTransformer),
    ({"_class_name": "M4VPyramidDiffusionMMDiT", "m4v": {}}, "pyramidflow", M4VPyramidDiffusionMMDiT),
    ({"_class_name": "M4VLTXVideoTransformer3DModel", "m4v": {"generic": True}}, "generic",
     converted_class("LTXVideoTransformer3DModel")),
])
def test_a_saved_conversion_finds_its_family_and_class(config, family, cls):
    entry, found = registry.find_converted(config)
    assert (entry.name, found) == (family, cls)


@pytest.mark.parametrize("config", [{"_class_name": "WanTransformer3DModel"},
                                    {"_class_name": "M4VLTXVideoTransformer3DModel", "m4v": {}}])
def test_a_model_that_is_not_a_conversion_finds_none(config):
    assert registry.find_converted(config) is None


def test_flags_become_the_jobs_options_and_foreign_flags_are_refused(tmp_path):
    wan, pyramid = registry.get("wan"), registry.get("pyramidflow")
    opts = wan.options_from_flags(recipe="wan2.1", checkpoint=tmp_path, out=tmp_path / "o", layers=None,
                                  report_size=(240, 416), overwrite=False)
    assert opts.report_size == (240, 416) and opts.layers is None and opts.report_frames == 81  # default kept
    with pytest.raises(M4VError, match=r"^--report-size, --model: not offered for pyramidflow recipes$"):
        pyramid.options_from_flags(checkpoint=tmp_path, out=tmp_path / "o", report_size=(240, 416), model="x")
    with pytest.raises(M4VError, match="eval: no eval job for generic conversions yet"):
        registry.get("generic").eval_from_flags(teacher=tmp_path, student=tmp_path, out=tmp_path)


def test_recipes_check_of_a_family_with_its_own_command_says_which():
    with pytest.raises(M4VError, match=r"recipe 'wan2.1' is for backbone 'wan', which has its own command "
                                       r"\(m4v-convert wan2.1\); --check validates backbone: generic recipes"):
        registry.get("wan").check(load_recipe("wan2.1"))
