"""tlunet: transfer-learning U-Nets for lower-grade glioma segmentation in brain MRI."""

from omegaconf import OmegaConf

#: 0.2.0: every score at the masks' native resolution (checkpoints say so: "scoring": "native").
#: 0.3.0: the aux head is part of the network (weights ``net.segmenter.*``/``net.aux_head.*``),
#: the module one instantiate of its config; older checkpoints are converted when read.
__version__ = "0.3.0"

# ${tlunet.unless_resume:${resume},NORMAL,RESUMED}: NORMAL for a new run, RESUMED when the
# command resumes a run (conf/hydra/default.yaml: the run directory is the resumed one).
OmegaConf.register_new_resolver(
    "tlunet.unless_resume",
    lambda resume, normal, resumed: resumed if resume else normal,
    replace=True,
)

#: The validation metric a run monitors by default: per-patient Dice, except under the
#: slice-level ``data.split=paper``, whose stages hold scattered slices of every patient
#: (per-patient metrics are not applicable there): tumour Dice over all pixels.
OmegaConf.register_new_resolver(
    "tlunet.default_monitor",
    lambda split: "val/dice" if split == "paper" else "val/dice_per_patient",
    replace=True,
)

#: Per-patient metrics, except under ``data.split=paper`` (scattered slices of every patient).
OmegaConf.register_new_resolver("tlunet.per_patient", lambda split: split != "paper", replace=True)


def _hydra_subdir(output_dir: str, subdir: str, command: str) -> str | None:
    from tlunet.runfolder import hydra_subdir  # here: imported when Hydra starts a job

    return hydra_subdir(output_dir, subdir, command)


# ${tlunet.hydra_subdir:${hydra:runtime.output_dir},.hydra,train}: Hydra's output_subdir, or null
# (no .hydra/ written) where the command (train, resume, evaluate) will be refused: another
# process writes into the folder, or it holds another command's results.
OmegaConf.register_new_resolver("tlunet.hydra_subdir", _hydra_subdir, replace=True)


def _log_file(output_dir: str, name: str, command: str) -> str:
    from tlunet.runfolder import log_file

    return log_file(output_dir, name, command)


def _resume_dir(resume: object) -> str:
    from tlunet.runfolder import resume_dir

    return resume_dir(resume)


# ${tlunet.log_file:${hydra:runtime.output_dir},train.log,train}: Hydra's log file, or the null
# device where the command will be refused (no log started in a folder that is not its own).
OmegaConf.register_new_resolver("tlunet.log_file", _log_file, replace=True)
# ${tlunet.resume_dir:${resume}}: the resumed run's folder, noting whether it existed before.
OmegaConf.register_new_resolver("tlunet.resume_dir", _resume_dir, replace=True)


def _phantom_folder(settings: object) -> str:
    from tlunet.data.synthetic import phantom_folder_name  # here: imported when data=synthetic

    return phantom_folder_name(settings)


# ${tlunet.phantom_folder:${data.synthetic}}: the folder name of these phantoms under tlunet's
# cache (conf/data/synthetic.yaml), one for each setting that changes them.
OmegaConf.register_new_resolver("tlunet.phantom_folder", _phantom_folder, replace=True)
