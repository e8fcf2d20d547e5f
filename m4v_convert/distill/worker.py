"""One process of a ``--num-processes N`` run: ``python -m m4v_convert.distill.worker OPTIONS.json``.

Started by :func:`m4v_convert.distill.distributed.launch` through accelerate's launcher; runs the
job the parent parsed (``options["job"]``: a backbone's registry name, whose entry gives the
options class and the job) with its options. Only rank 0 prints user errors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _job(options: dict):
    """(run, options object) of the launched job."""
    from m4v_convert.backbones import registry

    entry = registry.get(options.pop("job"))
    # JSON has no tuples: a tuple field (report_size) comes back as a list
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return entry.run, registry.resolve(entry.options)(**options)


def main(argv: list[str] | None = None) -> int:
    from m4v_convert.errors import M4VError

    argv = sys.argv[1:] if argv is None else argv
    options = json.loads(Path(argv[0]).read_text())
    for key in ("checkpoint", "out", "calib", "data", "calib_cache", "run_dir", "resume"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    options["num_processes"] = 1  # already launched
    rank = int(os.environ.get("RANK", "0"))
    try:
        run, opts = _job(options)
        run(opts)
    except M4VError as e:
        if rank == 0:
            from rich.console import Console

            Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {e}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
