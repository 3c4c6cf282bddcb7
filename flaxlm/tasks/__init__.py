"""Tasks: what to read, which model to build and which loss to train, for each `task:` of a config."""

from flaxlm.tasks.lm import LMTask

TASKS = {"lm": LMTask}


def build_task(cfg, tokenizer=None):
    """The task object for `cfg.task`; `tokenizer` (from a checkpoint) replaces training a new one."""
    if cfg.task == "classify":
        from flaxlm.tasks.classify import ClassifyTask

        return ClassifyTask(cfg, tokenizer)
    return TASKS[cfg.task](cfg, tokenizer)
