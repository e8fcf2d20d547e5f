"""The backbone families, each registered once with :mod:`m4v_convert.backbones.registry`.

Adding a family: its folder here (loader, converted class, distillation adapter, FLOPs model,
conversion job) plus one ``register`` call below; see docs/architecture.md.
"""

from m4v_convert.backbones.registry import Backbone, register

register(Backbone(
    name="wan",
    options="m4v_convert.pipeline:ConvertOptions",
    convert="m4v_convert.pipeline:convert",
    published_flops="m4v_convert.pipeline:published_flops",
    converted_class="m4v_convert.backbones.wan:converted_class_for_config",
    load="m4v_convert.backbones.wan_io:load_wan_transformer",
    command="wan2.1",
    eval_options="m4v_convert.eval:EvalOptions",
    evaluate="m4v_convert.eval:run_eval",
    eval_refusal="PyramidFlow eval options; a Wan eval draws its inputs from the synthetic task (--prompts, --task)",
))
register(Backbone(
    name="pyramidflow",
    options="m4v_convert.backbones.pyramidflow.pipeline:PyramidFlowOptions",
    convert="m4v_convert.backbones.pyramidflow.pipeline:convert_pyramidflow",
    published_flops="m4v_convert.backbones.pyramidflow.pipeline:published_flops",
    converted_class="m4v_convert.backbones.pyramidflow.converted:converted_class_for_config",
    load="m4v_convert.backbones.pyramidflow.loader:load_pyramidflow",
    command="pyramidflow",
    eval_options="m4v_convert.backbones.pyramidflow.evaluate:PyramidEvalOptions",
    evaluate="m4v_convert.backbones.pyramidflow.evaluate:run_pyramid_eval",
    eval_refusal="Wan eval options (the synthetic task); a PyramidFlow eval takes its text conditions from --calib",
))
register(Backbone(
    name="generic",
    options="m4v_convert.backbones.generic_pipeline:GenericOptions",
    convert="m4v_convert.backbones.generic_pipeline:convert_generic",
    published_flops="m4v_convert.backbones.generic_pipeline:published_flops",
    converted_class="m4v_convert.backbones.generic:converted_class_for_config",
    check_recipe="m4v_convert.backbones.generic_pipeline:check_recipe",
))
