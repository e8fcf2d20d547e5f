"""One process of a ``--num-processes N`` run: ``python -m m4v_convert.jobs.worker FLAGS.json``.

Started by :func:`m4v_convert.distill.distributed.launch` through accelerate's launcher; runs the
conversion the parent checked (its :class:`~m4v_convert.jobs.plan.ConvertFlags`, as JSON) in this
process of the group. Only rank 0 prints user errors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from m4v_convert.errors import M4VError
    from m4v_convert.jobs.convert import run_conversion
    from m4v_convert.jobs.plan import ConvertFlags

    argv = sys.argv[1:] if argv is None else argv
    flags = ConvertFlags.from_json(json.loads(Path(argv[0]).read_text()))
    flags.num_processes = 1  # already launched
    rank = int(os.environ.get("RANK", "0"))
    try:
        run_conversion(flags)
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
