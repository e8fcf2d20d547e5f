"""The model card (``README.md``) of a converted model: one card for every backbone, written from
the conversion's summary (``conversion.json``) and the facts the backbone supplies
(:class:`CardFacts`)."""

from __future__ import annotations

from dataclasses import dataclass

from m4v_convert.convert import layer_ranges


@dataclass
class CardFacts:
    """What the card says that only the backbone knows."""

    model: str  # "WanTransformer3DModel, 30 layers, 12 heads × 128"
    inputs_of: str  # the class whose inputs the converted model takes, e.g. "`WanTransformer3DModel`"
    layers_note: str = ""  # after the converted layer list
    load_note: str = ""  # after "Load it with ..." (e.g. the pipeline it drops into)
    teacher_sampler: str = "the teacher's sampler, no guidance"
    batch_note: str = ""  # how calibration batches are shaped, e.g. "; pyramid-shaped batches"
    fine_tune: str = "flow-matching fine-tune on `--data`"  # what stage 3 is
    flops: str = ""  # the FLOPs paragraph (empty: none)


def calibration_line(calibration: str, facts: CardFacts) -> str:
    if calibration == "synthetic":
        return ("- calibration data: **synthetic** — random latents and text embeddings, not real videos: this model "
                "is NOT ready\n  for generation quality; distill it further on real latents (`--calib DIR`)")
    if calibration == "none":
        return "- calibration data: none (nothing was distilled)"
    if calibration.startswith("prompts:"):
        return (f"- calibration data: videos **sampled by the teacher** through its pipeline for the prompts of "
                f"`{calibration.removeprefix('prompts:')}`{facts.batch_note}")
    if calibration.startswith("videos:"):
        return (f"- calibration data: the **real videos** of `{calibration.removeprefix('videos:')}`, encoded by the "
                f"pipeline's VAE, with their captions{facts.batch_note}")
    if calibration.startswith("teacher:"):
        source = calibration.removeprefix("teacher:")
        texts = ("synthetic text conditions" if source == "synthetic"
                 else f"the text conditions of `{source.removeprefix('folder:')}`")
        return f"- calibration data: videos **sampled by the teacher** ({facts.teacher_sampler}) for {texts}{facts.batch_note}"
    return f"- calibration data: `{calibration.removeprefix('folder:')}` (real latents{facts.batch_note})"


def _stage_line(k: int, stage: dict, facts: CardFacts) -> str:
    what = "end-to-end against the teacher's predictions" if k == 2 else facts.fine_tune
    title = f"stage {k} ({what})"
    if not stage.get("steps"):
        return f"{title} not run" + (f" ({stage['skipped']})" if stage.get("skipped") else "")
    line = f"{title}, {stage['steps']} steps"
    if stage.get("end_to_end_before") is not None:
        line += (f": end-to-end error vs the teacher {stage['end_to_end_before']:.4f} → "
                 f"{stage['end_to_end_after']:.4f}")
    return line


def _untrained(summary: dict) -> str:
    if any(stage.get("steps") for stage in summary["stages"].values()):
        return ""
    return ("\n- **nothing was trained**: the MM-DiM layers are as initialized from the attention weights, not "
            "distilled")


def model_card(summary: dict, recipe, facts: CardFacts) -> str:
    d = summary["distill"]
    before, after = summary["error_before"], summary["error_after"]
    rows = "\n".join(f"| {i} | {before[i]:.4f} | {after[i]:.4f} |" for i in before)
    folder = summary.get("transformer_folder")
    where = f"The transformer is in `{folder}/`. " if folder else ""
    pipeline = (", or the whole pipeline with `DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`"
                if summary.get("pipeline") else "")
    flops = f"\n## FLOPs\n\n{facts.flops}\n" if facts.flops else ""
    if summary.get("layer_selection"):
        from m4v_convert.jobs.layer_selection import selection_text

        flops += f"\n## Layer selection (--layers auto)\n\nThe {selection_text(summary['layer_selection'])}"
    return f"""# Converted with m4v-convert {summary['version']}

- source: `{summary['source']}`
- recipe: `{recipe.name}` ({recipe.description})
- model: {facts.model}
- converted layers (MM-DiM): {layer_ranges(summary['layers'])}{facts.layers_note}
- distillation: stage 1 (teacher-forced attention transfer), {d['stage1_steps']} steps, lr {d['lr']};
  {_stage_line(2, d['stage2'], facts)};
  {_stage_line(3, d['stage3'], facts)} (trained in stages 2/3: {d['train']})
{calibration_line(summary['calibration'], facts)}{_untrained(summary)}

{where}Load it with `m4v_convert.load_converted(path)`; it takes exactly the inputs of
{facts.inputs_of}{facts.load_note}. With diffusers alone (m4v-convert installed):
`AutoModel.from_pretrained(transformer_folder, trust_remote_code=True)`{pipeline}.

## Per-layer relative error (held-out calibration batch)

| layer | before distillation | after |
|---:|---:|---:|
{rows}
{flops}"""
