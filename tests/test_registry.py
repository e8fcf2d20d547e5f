"""The backbone registry: every entry's code paths resolve, lookups refuse unknown names with
one message, a saved conversion finds its family, and flags map onto a job's options."""

import dataclasses
import json
from pathlib import Path

import pytest

from m4v_convert.backbones import registry
from m4v_convert.backbones.generic.model import converted_class
from m4v_convert.backbones.pyramidflow.converted import M4VPyramidDiffusionMMDiT, M4VPyramidFluxTransformer
from m4v_convert.backbones.wan.model import M4VWanTransformer3DModel
from m4v_convert.errors import M4VError
from m4v_convert.jobs.plan import ConvertFlags, load_for
from m4v_convert.recipes import load_recipe

CODE_FIELDS = ("conversion", "published_flops", "converted_class", "load", "check_flags", "check_recipe",
               "eval_options", "evaluate")


def test_every_entry_resolves_and_every_shipped_recipe_has_one():
    assert registry.names() == ["wan", "pyramidflow", "generic"]
    for entry in registry.entries():
        for name in CODE_FIELDS:
            path = getattr(entry, name)
            if path is not None:
                assert callable(registry.resolve(path)), (entry.name, name)
        assert dataclasses.is_dataclass(registry.resolve(entry.eval_options)) if entry.eval_options else True
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


def test_flags_a_backbone_does_not_take_are_refused_before_anything_is_read(tmp_path):
    """One message for every refused flag, from the registry entry, before the checkpoint (which
    does not exist here) is looked at; a backbone command refuses another family's recipe."""
    flags = ConvertFlags(recipe="pyramidflow-miniflux-768p", checkpoint=tmp_path / "none", out=tmp_path / "o",
                         report_size=(240, 416), model="x")
    with pytest.raises(M4VError, match=r"^--model, --report-size: not offered for pyramidflow recipes$"):
        load_for(flags)
    flags = ConvertFlags(recipe="pyramidflow-miniflux-768p", checkpoint=tmp_path / "none", out=tmp_path / "o")
    with pytest.raises(M4VError, match=r"recipe 'pyramidflow-miniflux-768p' is for backbone 'pyramidflow'; this "
                                       r"command converts Wan2.1$"):
        load_for(flags, command="wan")
    recipe, entry = load_for(flags, command="pyramidflow")
    assert (recipe.name, entry.name) == ("pyramidflow-miniflux-768p", "pyramidflow")
    with pytest.raises(M4VError, match="eval: no eval job for generic conversions yet"):
        registry.get("generic").eval_from_flags(teacher=tmp_path, student=tmp_path, out=tmp_path)


def test_flags_survive_the_trip_to_a_launched_process(tmp_path):
    """What the worker of ``--num-processes N`` rebuilds from JSON is what the command was given."""
    flags = ConvertFlags.from_flags(recipe="wan2.1", checkpoint=tmp_path / "ckpt", out=tmp_path / "out",
                                    report_size=(240, 416), calib=tmp_path / "calib", lr=1e-4, stages="1,2",
                                    teacher_calib=True, num_processes=2, layers=None)
    back = ConvertFlags.from_json(json.loads(json.dumps(flags.to_json())))
    assert back == flags and isinstance(back.calib, Path) and back.report_size == (240, 416)
    assert flags.given() == ["stages", "lr", "calib", "teacher_calib", "report_size", "num_processes"]


def test_recipes_check_of_a_family_with_its_own_command_says_which():
    with pytest.raises(M4VError, match=r"recipe 'wan2.1' is for backbone 'wan', which has its own command "
                                       r"\(m4v-convert wan2.1\); --check validates backbone: generic recipes"):
        registry.get("wan").check(load_recipe("wan2.1"))
