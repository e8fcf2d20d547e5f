"""``m4v-convert ablate``: convert the teacher once per MM-DiM variant (each with one component
switched off) at the same distillation budget (same layers, steps, calibration data, seed) through
the conversion job (:func:`m4v_convert.jobs.convert.run_conversion`) with a temporary recipe, and
tabulate the eval's metrics (:mod:`m4v_convert.jobs.eval`) per variant. Finished variants are kept
in a work folder, so an interrupted run continues where it stopped. ``ablate-merge``
(:func:`merge_ablations`) joins runs that each did a share of one ablation into its report.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from m4v_convert.errors import M4VError
from m4v_convert.jobs.eval import (EvalSettings, SamplingOptions, _settings, eval_progress, evaluate, interval_text,
                                   load_task, markdown_table, metrics_table, run_eval, vs_full_text)
from m4v_convert.metrics import metrics_json, paired_psnr_delta
from m4v_convert.synthetic import ShapesTask

#: ablation variants: name → (MMDiMConfig overrides, row label as in the paper's component ablation)
VARIANTS: dict[str, tuple[dict, str]] = {
    "full": ({}, "MM-DiM (all components)"),
    "no-text-sandwich": ({"text_sandwich": False}, "w/o text sandwich"),
    "no-registers": ({"registers": False}, "w/o per-frame registers"),
    "raster": ({"zigzag": False}, "raster scan instead of zigzag"),
    "no-temporal": ({"temporal": False}, "w/o temporal branch"),
    "forward-only": ({"bidirectional": False}, "forward scan only (no reversed scan)"),
    "space-scan": ({"scan": "space"}, "space-major scan at every layer (no time-major layers)"),
    # scan orders to try on a recipe that scans space-major: asked for by name only
    "time-scan": ({"scan": "time"}, "time-major scan (position by position)"),
    "alternate-scan": ({"scan": "alternate"}, "time-major scan at odd layers"),
}
#: the components ``ablate`` switches off one at a time when --variants is not given, each only
#: where the recipe has it on (a variant the recipe already is would repeat "full")
COMPONENTS = ("no-text-sandwich", "no-registers", "raster", "no-temporal", "forward-only", "space-scan")


def repeats_full(name: str, mmdim: dict) -> bool:
    """Whether variant ``name`` changes nothing in these MM-DiM settings."""
    return name != "full" and all(mmdim.get(k) == v for k, v in VARIANTS[name][0].items())


def default_variants(mmdim: dict) -> list[str]:
    """``full`` and every component of :data:`COMPONENTS` that these MM-DiM settings have on."""
    return ["full"] + [name for name in COMPONENTS if not repeats_full(name, mmdim)]


@dataclass(kw_only=True)
class AblateOptions(SamplingOptions):
    teacher: Path
    out: Path
    variants: list[str] | None = None  # default: default_variants(the recipe's MM-DiM settings)
    layers: str | None = None
    distill_steps: int | None = None
    stage2_steps: int | None = None
    recipe: str = "wan2.1"
    calib: Path | None = None
    seed: int = 0
    distill_seeds: list[int] | None = None  # every variant distilled once per seed (default: [seed])

    @property
    def seed_list(self) -> list[int]:
        return list(self.distill_seeds) if self.distill_seeds else [self.seed]


def write_task_calib(task: ShapesTask, folder: Path, n: int = 32, seed: int = 0) -> Path:
    """Clean latents + text of ``n`` training-prompt samples in the ``--calib`` format."""
    from safetensors.torch import save_file

    from m4v_convert.synthetic import train_labels

    labels = train_labels()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(labels), (n,), generator=gen).tolist()
    lat, txt = task.batch([labels[i] for i in idx], gen)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"latents": lat.contiguous(), "text_embeds": txt.contiguous()}, str(folder / "task-calib.safetensors"))
    return folder


def variant_recipe(recipe: str, overrides: dict, name: str, folder: Path) -> Path:
    """Write the recipe with ``mmdim`` ``overrides`` applied as a YAML file under ``folder``."""
    import yaml

    from m4v_convert.recipes import load_recipe

    rec = load_recipe(recipe)
    data = yaml.safe_load(rec.path.read_text())
    data["published"] = {k: str(v) for k, v in rec.published.items()}  # absolute: the file moves
    data["mmdim"] = {**(data.get("mmdim") or {}), **overrides}
    data["description"] = f"{data['description']} [ablation: {name}]"
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def ablate_work_dir(out: Path) -> Path:
    """Where ``ablate`` keeps finished variants until the whole run succeeds (a sibling of ``out``)."""
    out = Path(out)
    return out.parent / f"{out.name}.work"


def _write_json_atomic(path: Path, obj) -> None:
    from m4v_convert.distill.state import atomic_write_text

    atomic_write_text(path, metrics_json(obj) + "\n")


def _ablate_settings(opts: AblateOptions, rec, settings: EvalSettings, calib_label: str, task_source: str,
                     device) -> dict:
    """Everything a finished variant's numbers depend on; a resumed run must match it exactly."""
    import hashlib

    teacher = Path(opts.teacher).resolve()
    files = [teacher] if teacher.is_file() else sorted(f for f in teacher.rglob("*") if f.is_file()
                                                        and f.suffix in (".json", ".safetensors"))
    return {
        "teacher": str(teacher), "teacher_files": {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files},
        "task": task_source, "recipe": str(rec.path.resolve()),
        "recipe_sha256": hashlib.sha256(rec.path.read_bytes()).hexdigest(), "layers": opts.layers,
        "distill_steps": opts.distill_steps, "stage2_steps": opts.stage2_steps, "calibration": calib_label,
        "seed": opts.seed, **({"distill_seeds": opts.seed_list} if opts.distill_seeds else {}), "device": str(device),
        "eval": {"prompts": [lab.prompt for lab in settings.labels], "seeds_per_prompt": settings.seeds,
                 "sampler_steps": settings.steps, "shift": settings.shift},
    }


def _open_ablate_work(work: Path, wanted: dict, overwrite: bool, con) -> list[str]:
    """Create ``work`` or reuse it when it holds a run with the same settings; names of its finished variants."""
    import shutil

    path = work / "settings.json"
    if work.exists():
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            found = None
        if found != wanted:
            differ = sorted(k for k in wanted if found is None or found.get(k) != wanted[k])
            if not overwrite:
                raise M4VError(f"{work} holds an unfinished ablation with other settings "
                               f"({', '.join(differ) or 'unreadable'}); remove it, or pass --overwrite to discard it")
            con.print(f"discarding {work} (an unfinished ablation with other settings: {', '.join(differ)})")
            shutil.rmtree(work)
    (work / "variants").mkdir(parents=True, exist_ok=True)
    if not path.exists():
        _write_json_atomic(path, wanted)
    return sorted(d.name for d in (work / "variants").iterdir() if (d / "metrics.json").exists())


def unit_name(variant: str, seed: int, seeds: list[int]) -> str:
    """Folder name of one (variant, distillation seed): the variant alone when there is one seed."""
    return variant if len(seeds) == 1 else f"{variant}-seed{seed}"


def across_seeds(results: dict, variants: list[str], seeds: list[int]) -> dict:
    """Per variant, its numbers at every distillation seed and their mean / range; ``vs_full`` is each
    seed's paired PSNR difference against the full conversion of the same seed."""
    out = {}
    for name in variants:
        ms = [results[unit_name(name, s, seeds)] for s in seeds]
        row = {"seeds": seeds, "psnr_db": [m["psnr_db"] for m in ms],
               "pred_rel_error_mean": [m["pred_rel_error_mean"] for m in ms],
               "adherence_delta_points": [m["adherence_delta_points"] for m in ms]}
        for k in ("psnr_db", "pred_rel_error_mean", "adherence_delta_points"):
            row[f"{k}_mean"] = sum(row[k]) / len(row[k])
        if all("vs_full" in m for m in ms):
            deltas = [m["vs_full"]["psnr_delta_db"] for m in ms]
            cis = [m["vs_full"]["psnr_delta_db_ci95"] for m in ms]
            row.update(vs_full_psnr_delta_db=deltas, vs_full_psnr_delta_db_ci95=cis,
                       vs_full_psnr_delta_db_mean=sum(deltas) / len(deltas),
                       # every seed's paired interval on the same side of zero: an effect the seed does not flip
                       vs_full_consistent=all(hi < 0 for _, hi in cis) or all(lo > 0 for lo, _ in cis))
        out[name] = row
    return out


def across_seeds_markdown(summary: dict, labels: dict[str, str]) -> str:
    lines = ["| variant | sample PSNR dB, mean [range] | PSNR vs all components, paired, per seed | "
             "same sign at every seed | pred. rel. error, mean [range] | Δ adherence, mean [range] |",
             "|---|---:|---|:---:|---:|---:|"]

    def rng(values, fmt):
        return f"{fmt.format(sum(values) / len(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"

    for name, row in summary.items():
        per_seed = ", ".join(f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]" for d, (lo, hi)
                             in zip(row.get("vs_full_psnr_delta_db", []), row.get("vs_full_psnr_delta_db_ci95", [])))
        same = "" if "vs_full_consistent" not in row else ("yes" if row["vs_full_consistent"] else "no")
        lines.append(f"| {labels[name]} | {rng(row['psnr_db'], '{:.2f}')} | {per_seed} | {same} | "
                     f"{rng(row['pred_rel_error_mean'], '{:.3f}')} | {rng(row['adherence_delta_points'], '{:+.1f}')} |")
    return "\n".join(lines)


def run_ablate(opts: AblateOptions, console=None) -> dict:
    """Convert and evaluate the teacher once per variant. Each finished variant (converted model and
    its metrics) and the teacher's samples are kept in :func:`ablate_work_dir` as they finish, so a
    crashed or interrupted run continues where it stopped when run again with the same settings;
    the folder is removed once ``out`` is written."""
    import shutil

    from safetensors.torch import load_file, save_file

    from m4v_convert.backbones import registry
    from m4v_convert.io.converted import load_converted
    from m4v_convert.io.output import atomic_output_dir, check_output_dir
    from m4v_convert.jobs.convert import run_conversion
    from m4v_convert.jobs.plan import ConvertFlags, console_or_default as _console, resolve_device
    from m4v_convert.recipes import load_recipe

    con = _console(console)
    unknown = [v for v in opts.variants or () if v not in VARIANTS]
    twice = [v for v in opts.variants or () if opts.variants.count(v) > 1]
    if unknown or twice or opts.variants == []:
        what = f"unknown {unknown[0]!r}" if unknown else f"{twice[0]!r} given twice" if twice else "none given"
        raise M4VError(f"--variants: {what} (choose from {', '.join(VARIANTS)})")
    seeds = opts.seed_list
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise M4VError(f"--distill-seeds: expected distinct seeds >= 0, got {','.join(map(str, seeds))}")
    settings = _settings(opts.prompts, opts.seeds, opts.steps, opts.shift)
    rec = load_recipe(opts.recipe)
    mmdim = rec.mmdim_settings
    variants = default_variants(mmdim) if opts.variants is None else list(opts.variants)
    same = [v for v in variants if repeats_full(v, mmdim)]
    if same:
        key, value = next(iter(VARIANTS[same[0]][0].items()))
        raise M4VError(f"--variants {same[0]}: recipe {rec.name} already has mmdim.{key}: {json.dumps(value)} "
                       "(the variant would repeat 'full')")
    entry = registry.for_recipe(rec)
    if entry.evaluate is None or registry.resolve(entry.evaluate) is not run_eval:
        raise M4VError(f"--recipe {rec.name}: ablate measures on the synthetic task, which the {entry.name} "
                       "backbone's eval does not use")
    check_output_dir(opts.out, opts.overwrite, {"teacher": opts.teacher, "recipe": rec.path, "--calib": opts.calib,
                                                "--prompts": opts.prompts, "--task": opts.task})
    device = resolve_device(opts.device)
    teacher = entry.load_teacher(opts.teacher, device=device).requires_grad_(False)
    task, task_source = load_task(opts.teacher, dict(teacher.config), opts.task)
    calib = opts.calib
    if calib is None and (Path(opts.teacher) / "calib").is_dir():
        calib = Path(opts.teacher) / "calib"
    calib_label = "task (generated)" if calib is None else str(Path(calib).resolve())
    work_dir = ablate_work_dir(opts.out)
    wanted = _ablate_settings(opts, rec, settings, calib_label, task_source, device)
    finished = _open_ablate_work(work_dir, wanted, opts.overwrite, con)
    units = [(name, seed, unit_name(name, seed, seeds)) for seed in seeds for name in variants]
    resumed = [u for _, _, u in units if u in finished]
    t0 = time.time()
    try:
        with atomic_output_dir(opts.out, opts.overwrite) as tmp, tempfile.TemporaryDirectory() as work:
            work = Path(work)
            if calib is None:  # regenerated bit for bit by a resumed run (seeded)
                calib = write_task_calib(task, work / "calib", seed=opts.seed)
            con.print(f"ablate: {len(variants)} variants × {len(seeds)} distillation seed(s) "
                      f"({', '.join(map(str, seeds))}), equal budget: layers {opts.layers or 'recipe default'}, "
                      f"stage-1 steps {opts.distill_steps if opts.distill_steps is not None else 'recipe default'}, "
                      f"stage-2 steps {opts.stage2_steps if opts.stage2_steps is not None else 'recipe default'}, "
                      f"calibration {calib_label}; finished variants are kept in {work_dir} "
                      "until the end" + (f" (continuing: {', '.join(resumed)} done)" if resumed else ""))
            cached = work_dir / "teacher_samples.safetensors"
            xs_t = adh_t = None
            if cached.exists() and (work_dir / "teacher_adherence.json").exists():
                xs_t = load_file(str(cached))["samples"].to(device)
                adh_t = json.loads((work_dir / "teacher_adherence.json").read_text())
            rows, results = [], {}
            for name, seed, unit in units:
                overrides, label = VARIANTS[name]
                if len(seeds) > 1:
                    label = f"{label}, seed {seed}"
                con.rule(f"{unit}: {label}")
                vdir = work_dir / "variants" / unit
                if unit in finished:
                    con.print(f"finished in an earlier run: {vdir}")
                    metrics = json.loads((vdir / "metrics.json").read_text())
                else:
                    if not (vdir / "conversion.json").exists():  # convert writes the folder atomically
                        run_conversion(ConvertFlags.from_flags(
                            recipe=str(variant_recipe(opts.recipe, overrides, name, work)),
                            checkpoint=Path(opts.teacher), out=vdir, layers=opts.layers,
                            distill_steps=opts.distill_steps, stage2_steps=opts.stage2_steps, calib=calib,
                            device=opts.device, seed=seed, overwrite=True,
                            report_size=(8 * task.config.height, 8 * task.config.width),
                            report_frames=4 * (task.config.frames - 1) + 1), console=con)
                    summary = json.loads((vdir / "conversion.json").read_text())
                    student = load_converted(vdir, device=device).requires_grad_(False)
                    with eval_progress(con, settings, teacher_sampled=xs_t is not None) as progress:
                        metrics, xs_t_new, _ = evaluate(teacher, student, task, settings, progress=progress,
                                                        teacher_samples=None if xs_t is None else (xs_t, adh_t))
                    if xs_t is None:
                        xs_t, adh_t = xs_t_new, {**metrics["adherence_teacher"], "read": metrics["read_teacher"]}
                        save_file({"samples": xs_t.detach().cpu().contiguous()}, str(cached))
                        _write_json_atomic(work_dir / "teacher_adherence.json", adh_t)
                    metrics.update(variant=name, distill_seed=seed, label=label, mmdim_overrides=overrides,
                                   convert_seconds=summary["seconds"], distill=summary["distill"],
                                   converted_flops=summary["converted_total_flops"])
                    _write_json_atomic(vdir / "metrics.json", metrics)  # this variant is finished
                results[unit] = metrics
                rows.append((label, metrics))
            pair_with_full(results, units, seeds)
            for name, seed, unit in units:
                shutil.copytree(work_dir / "variants" / unit, tmp / "variants" / unit)
                (tmp / "variants" / unit / "metrics.json").write_text(metrics_json(results[unit]) + "\n")
            report = {
                "teacher": str(Path(opts.teacher).resolve()), "task": task_source, "recipe": opts.recipe,
                "layers": opts.layers, "distill_steps": opts.distill_steps, "stage2_steps": opts.stage2_steps,
                "calibration": calib_label, "seed": opts.seed, "distill_seeds": seeds, "eval": wanted["eval"],
                "variants": results, "resumed_variants": resumed, "seconds": round(time.time() - t0, 1),
            }
            summary = write_report(tmp, report, rows, variants)
    except BaseException:
        kept = sorted(d.name for d in (work_dir / "variants").iterdir())  # converted (folders appear whole)
        if not kept:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            con.print(f"ablate stopped; converted variants ({', '.join(kept)}) are kept in {work_dir}: "
                      "the same command continues from them")
        raise
    shutil.rmtree(work_dir, ignore_errors=True)
    print_report(con, rows, summary, Path(opts.out))
    return report


def pair_with_full(results: dict, units: list[tuple[str, int, str]], seeds: list[int]) -> None:
    """Each variant's ``vs_full``: its paired PSNR difference against the full conversion of the same
    distillation seed (the same eval samples), where that seed has one."""
    for name, seed, unit in units:
        full = unit_name("full", seed, seeds)
        results[unit].pop("vs_full", None)
        if full in results and name != "full":
            results[unit]["vs_full"] = paired_psnr_delta(results[full], results[unit])


def write_report(folder: Path, report: dict, rows: list[tuple[str, dict]], variants: list[str]) -> dict | None:
    """``ablation.json`` and ``ablation.md`` of ``report`` into ``folder``; returns the across-seed summary
    (None with one distillation seed), which ``report`` then holds as ``across_seeds``."""
    seeds, results, ev = report["distill_seeds"], report["variants"], report["eval"]
    summary = across_seeds(results, variants, seeds) if len(seeds) > 1 else None
    if summary is not None:
        report["across_seeds"] = summary
    (folder / "ablation.json").write_text(metrics_json(report) + "\n")
    default = "recipe default"
    (folder / "ablation.md").write_text(
        f"# MM-DiM component ablation\n\nteacher `{report['teacher']}`, equal distillation budget per variant "
        f"(layers {report['layers'] or default}, stage-1 steps "
        f"{report['distill_steps'] if report['distill_steps'] is not None else default}, stage-2 steps "
        f"{report['stage2_steps'] if report['stage2_steps'] is not None else default}, calibration "
        f"{report['calibration']}, distillation seed(s) {', '.join(map(str, seeds))}); eval on {len(ev['prompts'])} "
        f"prompts × {ev['seeds_per_prompt']} seeds, {ev['sampler_steps']} Euler steps.\n\n{markdown_table(rows)}\n\n"
        + "".join(f"- {name}: {interval_text(m)}{vs_full_text(m)}\n" for name, m in rows)
        + ("" if summary is None else "\n## Across distillation seeds\n\n" + across_seeds_markdown(
            summary, {n: VARIANTS[n][1] for n in variants}) + "\n"))
    return summary


def print_report(con, rows: list[tuple[str, dict]], summary: dict | None, out: Path) -> None:
    con.print(metrics_table(rows, title="MM-DiM component ablation (equal distillation budget)"),
              width=max(con.width, 120))  # a log file (80 columns by default) keeps the whole table
    for name, m in rows:
        con.print(f"{name}: {interval_text(m)}{vs_full_text(m)}")
    if summary is not None:
        for name, row in summary.items():
            line = f"{VARIANTS[name][1]}: PSNR over seeds {', '.join(f'{v:.2f}' for v in row['psnr_db'])} dB"
            if "vs_full_psnr_delta_db" in row:
                line += (f"; vs all components {', '.join(f'{d:+.2f}' for d in row['vs_full_psnr_delta_db'])} dB "
                         f"({'the same sign at every seed' if row['vs_full_consistent'] else 'the seed flips it'})")
            con.print(line)
    con.print(f"[green]wrote[/] {out.resolve()} (ablation.json, ablation.md, variants/*)")


#: what the parts of one ablation must share to be merged: the same teacher, task, recipe, budget,
#: calibration and eval (so every variant is distilled alike and evaluated on the same samples)
SAME_EXPERIMENT = ("teacher", "task", "recipe", "layers", "distill_steps", "stage2_steps", "calibration", "eval")
GENERATED_CALIB = "task (generated)"


def _comparable(key: str, value):
    """A report's ``key`` as parts compare it: the task file as a resolved path (a run records it as its
    teacher argument was spelled, relative to where it ran: resolved here against this directory)."""
    if key == "task" and isinstance(value, str) and value != "default":
        return str(Path(value).resolve())
    return value


def _read_part(folder: Path) -> dict:
    path = Path(folder) / "ablation.json"
    if not path.is_file():
        raise M4VError(f"{folder}: no ablation.json (not the --out folder of a finished ablate run)")
    try:
        report = json.loads(path.read_text())
        unnamed = [u for u, m in report["variants"].items() if "variant" not in m or "distill_seed" not in m]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise M4VError(f"{path}: not an ablate report ({type(e).__name__}: {e})") from None
    if unnamed:
        raise M4VError(f"{path}: {unnamed[0]} does not say its variant and distillation seed (an ablate report "
                       "older than ablate-merge: run that part again)")
    return report


def merge_ablations(parts: list[Path], out: Path, overwrite: bool = False, console=None) -> dict:
    """One ablation from the ``--out`` folders of ``ablate`` runs that each did a share of it (other
    ``--variants`` or ``--distill-seeds``, e.g. on other machines): every variant paired against the full
    conversion of its distillation seed, whichever part holds it, and the across-seed table, as one
    ``ablate`` run of the whole grid writes them. The parts are only read: their model files are
    hard-linked into ``out`` where the filesystem allows (else copied), their reports left as they are."""
    from m4v_convert.io.output import atomic_output_dir, check_output_dir
    from m4v_convert.io.pipeline import carry_tree
    from m4v_convert.jobs.plan import console_or_default

    con = console_or_default(console)
    parts = [Path(p) for p in parts]
    if len(parts) < 2:
        raise M4VError("ablate-merge: give two or more ablate --out folders to merge")
    if len({p.resolve() for p in parts}) < len(parts):
        raise M4VError("ablate-merge: a folder is given twice")
    reports = [_read_part(p) for p in parts]
    first = reports[0]
    same = SAME_EXPERIMENT + (("seed",) if first.get("calibration") == GENERATED_CALIB else ())
    for part, report in zip(parts[1:], reports[1:]):
        differ = [k for k in same if _comparable(k, report.get(k)) != _comparable(k, first.get(k))]
        if differ:
            hint = (" (the calibration generated from the task follows --seed: run every part with the same --seed "
                    "and choose its distillation seeds with --distill-seeds)" if differ == ["seed"] else "")
            raise M4VError(f"{part} and {parts[0]} are not parts of one ablation: their {', '.join(differ)} "
                           f"differ{hint}")
    found: dict[tuple[str, int], tuple[Path, str, dict]] = {}
    teacher_reads = None
    for part, report in zip(parts, reports):
        for unit, m in report["variants"].items():
            key = (m["variant"], int(m["distill_seed"]))
            if key in found:
                raise M4VError(f"variant {key[0]} at distillation seed {key[1]} is in both {found[key][0]} and {part}: "
                               "merge parts that do not overlap")
            if key[0] not in VARIANTS:
                raise M4VError(f"{part}: unknown variant {key[0]!r}")
            # pairs compare the same eval samples: the teacher's must be the same in every part
            if teacher_reads is None:
                teacher_reads = m.get("read_teacher")
            elif m.get("read_teacher") != teacher_reads:
                raise M4VError(f"{part}: its teacher samples differ from {parts[0]}'s (another device or torch "
                               "version?): its variants cannot be paired with theirs")
            found[key] = (part, unit, m)
    seeds = sorted({s for _, s in found})
    variants = [v for v in VARIANTS if any(name == v for name, _ in found)]
    missing = [f"{v} at seed {s}" for s in seeds for v in variants if (v, s) not in found]
    if missing:
        raise M4VError(f"the parts do not cover every variant at every distillation seed: missing {', '.join(missing)} "
                       "(ablate --variants V --distill-seeds S makes a part that adds them)")
    out = check_output_dir(out, overwrite, {f"part {i + 1}": p for i, p in enumerate(parts)})
    units = [(name, seed, unit_name(name, seed, seeds)) for seed in seeds for name in variants]
    results, rows = {}, []
    for name, seed, unit in units:
        metrics = dict(found[(name, seed)][2])
        metrics["label"] = VARIANTS[name][1] + (f", seed {seed}" if len(seeds) > 1 else "")
        results[unit] = metrics
        rows.append((metrics["label"], metrics))
    pair_with_full(results, units, seeds)
    con.print(f"ablate-merge: {len(variants)} variants × {len(seeds)} distillation seed(s) ({', '.join(map(str, seeds))}) "
              f"from {len(parts)} parts")
    with atomic_output_dir(out, overwrite) as tmp:
        for name, seed, unit in units:
            part, part_unit, _ = found[(name, seed)]
            carry_tree(part / "variants" / part_unit, tmp / "variants" / unit, skip={"metrics.json"})
            (tmp / "variants" / unit / "metrics.json").write_text(metrics_json(results[unit]) + "\n")
        given = {r.get("seed") for r in reports}  # --seed of each part (None where they differ)
        report = {**{k: first.get(k) for k in SAME_EXPERIMENT}, "seed": given.pop() if len(given) == 1 else None,
                  "distill_seeds": seeds,
                  "variants": results, "merged_from": [str(p.resolve()) for p in parts],
                  "resumed_variants": [], "seconds": None}
        summary = write_report(tmp, report, rows, variants)
    print_report(con, rows, summary, out)
    return report
