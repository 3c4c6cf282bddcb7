"""Tasks: what to read, which model to build and which loss to train, for each `task:` of a config.

A task object has: `tokenizer`, `tokens_per_batch`, `make_model(rngs)`, `loss_fn(model, batch, dropout_key)`,
`train_iterator()`, `eval_iterator(split)`, `model_flops_per_step()`; optionally `extra_metrics(model, split)`
(metrics that need more than the loss, e.g. BLEU from decoding) and `load_pretrained(model, workdir)` (for
`train.init_from`).
"""

import importlib

TASKS = {
    "lm": ("flaxlm.tasks.lm", "LMTask"),
    "classify": ("flaxlm.tasks.classify", "ClassifyTask"),
    "translate": ("flaxlm.tasks.translate", "TranslateTask"),
    "mlm": ("flaxlm.tasks.mlm", "MLMTask"),
}


def build_task(cfg, tokenizer=None):
    """The task object for `cfg.task`; `tokenizer` (from a checkpoint) replaces training a new one."""
    module, name = TASKS[cfg.task]
    return getattr(importlib.import_module(module), name)(cfg, tokenizer)
