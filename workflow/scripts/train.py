"""Train one job of a run: a duration's checkpoint or its trunk (learnforget.train.launch.finetune_job)."""

from learnforget.study import config as lfconfig
from learnforget.train import keep
from learnforget.train.launch import finetune_job
from learnforget.core.logs import setup

log = setup(snakemake.log[0])
spec = snakemake.params.spec
run = {r.name: r for r in lfconfig.expand_runs(snakemake.config)}[spec["run"]]
gpus = int(snakemake.resources.get("gpu", 0) or 0)
resources = snakemake.config["resources"]
manifest = finetune_job(
    dict(
        base_dir=snakemake.input.base,
        token_dir=snakemake.input.tokens,
        regime=spec["regime"],
        method=spec["method"],
        train_cfg={**spec["train"], **run.runtime(), "threads": snakemake.threads},
        duration=spec["duration"],
        unit=spec["unit"],
        durations=spec["durations"] or list(run.durations),
        part=spec["part"],
        prev_checkpoint_dir=snakemake.input.get("previous"),
        out_dir=snakemake.output[0],
        resume_dir=snakemake.params.resume,
        seed=spec["seed"],
        run_name=spec["run"],
        packing=spec["packing"],
    ),
    processes=gpus or resources["cpu_processes"],
    device="cuda" if gpus else "cpu",
)
log.info("%s %s to %s %s (%s): step %d, %.0f tokens/s, MFU %s, final loss %.3f, continued from %s%s",
         spec["run"], spec["part"], spec["duration"], spec["unit"], manifest["mode"], manifest["step"],
         manifest["tokens_per_s"] or 0, manifest["mfu"], manifest["final_loss"] or float("nan"),
         manifest["continued_from"],
         f", resumed at step {manifest['resumed_from_step']}" if manifest["resumed_from_step"] else "")
# the keep policy: older checkpoints of this run that this one supersedes drop their training state
keep.prune_run(run, snakemake.config["output_dir"], snakemake.config["keep"]["optimizer_state"], log=log.info)
