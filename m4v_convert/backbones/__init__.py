"""The backbone families, each registered once with :mod:`m4v_convert.backbones.registry`.

Adding a family: its folder here (loader, converted class, distillation adapter, FLOPs model, its
side of the conversion job) plus one ``register`` call below; see docs/architecture.md.
"""

from m4v_convert.backbones.registry import Backbone, register

# calibration through a diffusers pipeline: PyramidFlow has no diffusers pipeline; generic recipes take
# --prompts where their pipeline: section names one (not --videos: each VAE normalises its latents its own way)
PROMPT_FLAGS = ("prompts", "calib_size", "calib_frames", "guidance_scale")

register(Backbone(
    name="wan",
    converts="Wan2.1",
    conversion="m4v_convert.backbones.wan.conversion:WanConversion",
    flags_not_offered=("model",),
    check_flags="m4v_convert.backbones.wan.conversion:check_flags",
    published_flops="m4v_convert.backbones.wan.flops:published_flops",
    converted_class="m4v_convert.backbones.wan.model:converted_class_for_config",
    load="m4v_convert.backbones.wan.load:load_wan_transformer",
    command="wan2.1",
    eval_options="m4v_convert.jobs.eval:EvalOptions",
    evaluate="m4v_convert.jobs.eval:run_eval",
    eval_refusal="PyramidFlow eval options; a Wan eval draws its inputs from the synthetic task (--prompts, --task)",
    # stage 2 on the student's own samples: a flow-match Euler sampler of Wan's inputs (wan/distill.py)
    recipe_fields=("distill.stage2.on_policy", "distill.stage2.on_policy_steps"),
))
register(Backbone(
    name="pyramidflow",
    converts="PyramidFlow (use e.g. --recipe pyramidflow-miniflux-768p)",
    conversion="m4v_convert.backbones.pyramidflow.conversion:PyramidFlowConversion",
    # fsdp: the teacher's records read weights outside its forward (a sharded weight there is not whole)
    flags_not_offered=("model", "report_size", "report_frames", "deterministic", "videos", "fsdp", "flops_budget",
                       "probe_steps", *PROMPT_FLAGS),
    check_flags="m4v_convert.backbones.pyramidflow.conversion:check_flags",
    published_flops="m4v_convert.backbones.pyramidflow.conversion:published_flops",
    converted_class="m4v_convert.backbones.pyramidflow.converted:converted_class_for_config",
    load="m4v_convert.backbones.pyramidflow.loader:load_pyramidflow",
    command="pyramidflow",
    eval_options="m4v_convert.backbones.pyramidflow.evaluate:PyramidEvalOptions",
    evaluate="m4v_convert.backbones.pyramidflow.evaluate:run_pyramid_eval",
    eval_refusal="Wan eval options (the synthetic task); a PyramidFlow eval takes its text conditions from --calib",
    recipe_fields=("variant", "resolution", "allow_double_stream", "calib.corrupt_ratio",
                   "calib.teacher_first_frame_steps"),
    recipe_required=("variant", "resolution"),
    refused_mmdim=(("bidirectional", "must be false for PyramidFlow: its attention is causal over frames "
                    "(autoregressive generation), and a reversed scan would let every frame read the frames after it"),
                   ("scan", "must be 'space' for PyramidFlow: its attention is causal over frames, and a time-major "
                    "scan runs back through the frames at every other position (earlier frames would read later ones)")),
))
register(Backbone(
    name="generic",
    converts="any model a backbone: generic recipe describes",
    flags_not_offered=("num_processes", "fsdp", "deterministic", "videos", "flops_budget", "probe_steps"),
    conversion="m4v_convert.backbones.generic.conversion:GenericConversion",
    check_flags="m4v_convert.backbones.generic.conversion:check_flags",
    default_stages="1,2",  # no stage 3 for generic recipes
    published_flops="m4v_convert.backbones.generic.conversion:published_flops",
    converted_class="m4v_convert.backbones.generic.model:converted_class_for_config",
    check_recipe="m4v_convert.backbones.generic.conversion:check_recipe",
    recipe_fields=("model", "attention", "tokens", "grid", "rope", "inputs", "pipeline"),
    recipe_required=("model", "attention", "tokens", "grid"),
))
