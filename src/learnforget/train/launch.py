"""Launch one finetuning job on one or several processes.

One process runs :func:`learnforget.train.loop.finetune` in this process. Several are started with
``accelerate launch`` (DDP: gloo on CPU, nccl on GPUs), each running ``python -m
learnforget.train.launch SPEC.json``; every process trains its share of each global batch and the
main one writes the checkpoint (see :class:`learnforget.train.loop.Dist`). The Snakemake rule takes
the number of processes from its ``gpu`` resource (or ``resources.cpu_processes`` without GPUs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from learnforget.core import integrity
from learnforget.core.io import read_json
from learnforget.core.logs import setup
from learnforget.train.loop import finetune


def finetune_job(kwargs: dict, processes: int = 1, device: str = "cpu", main_port: int | None = None) -> dict:
    """Run ``finetune(**kwargs)`` on ``processes`` processes; return the checkpoint's manifest."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    # Never train on top of a damaged checkpoint: CorruptCheckpoint fails the job, and the next
    # snakemake call quarantines the checkpoint and rebuilds it (learnforget.core.integrity.scan).
    for key in ("base_dir", "prev_checkpoint_dir"):
        if kwargs.get(key):
            integrity.verify_managed(kwargs[key])
    if processes == 1:
        return finetune(**kwargs, device=device)
    if shutil.which("accelerate") is None and not _module_available("accelerate"):
        raise RuntimeError("multi-process training needs accelerate (pip install accelerate)")
    with tempfile.TemporaryDirectory(prefix="learnforget-launch-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({**{k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()},
                                    "device": device}))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd += ["--multi_gpu"]  # torch.distributed.run; Accelerator(cpu=True) then picks gloo on CPU
        if main_port is not None:
            cmd += ["--main_process_port", str(main_port)]
        cmd += ["-m", "learnforget.train.launch", str(spec)]
        env = {**os.environ, "OMP_NUM_THREADS": str(kwargs.get("train_cfg", {}).get("threads", 1))}
        subprocess.run(cmd, check=True, env=env)
    return read_json(Path(kwargs["out_dir"]) / "manifest.json")


def _module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def main(argv: list[str] | None = None) -> int:
    """The entry point of each process of a multi-process job: ``finetune`` with the spec's arguments."""
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    setup(None)
    finetune(**spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
