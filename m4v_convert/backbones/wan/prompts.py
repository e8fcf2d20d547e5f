"""How a Wan2.1 pipeline encodes a prompt and samples its transformer, for ``--prompts FILE`` with a
Wan pipeline folder as ``--checkpoint`` (the calibration itself: :mod:`m4v_convert.distill.pipeline_samples`)."""

from m4v_convert.distill.pipeline_samples import PromptPipeline

#: the negative prompt of diffusers' WanPipeline example, used when a prompt brings none
DEFAULT_NEGATIVE = ("Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
                    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
                    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
                    "fused fingers, still picture, messy background, three legs, many people in the background, "
                    "walking backwards")
MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s

WAN_PIPELINE = PromptPipeline(class_name="WanPipeline", max_sequence_length=MAX_SEQUENCE_LENGTH, guidance_scale=5.0,
                              negative_prompt=DEFAULT_NEGATIVE)  # 4k+1 frames, sides multiples of 8 x 2
