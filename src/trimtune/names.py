"""Names the command line needs before anything heavy is imported (no torch here).

The modules that implement them import these tuples, so each list is written once.
:data:`METHODS` is the one list of fine-tuning methods: ``trimtune.tuners.registry`` holds one
entry per name here (and checks it), the CLI's ``--method`` choices and help come from it.
"""

#: method -> one line: what trains (CLI help, README's methods table, registry docs)
METHOD_SUMMARIES = {
    "snella": "SNELL + mixture kernel + a cross-layer sparsity allocator (a PEFT tuner)",
    "snell": "kernelised sparse update dW = k(A, B), fixed per-unit sparsity (a PEFT tuner)",
    "lora": "low-rank update B A (PEFT's LoRA)",
    "dora": "LoRA with a learned per-column magnitude (PEFT's DoRA)",
    "adalora": "LoRA with a budgeted SVD rank allocation (PEFT's AdaLoRA)",
    "full": "every parameter",
    "linear": "the classifier head only (a linear probe)",
    "bitfit": "every bias plus the head",
    "masked-sparse": "dense target weights through a fixed gradient mask (SPT/GPS memory)",
}
METHODS = tuple(METHOD_SUMMARIES)
SNELL_METHODS = ("snella", "snell")
#: what is learned (classification; segmentation: trimtune.segment): the CLI's --task choices
TASKS = ("classification", "segmentation")
#: segmentation decode heads (trimtune.heads): DINOv2's linear (last block) and linear4
SEG_HEADS = ("linear", "linear4")
KERNELS = ("piecewise", "mixture", "inner", "rbf", "sigmoid")
#: how SNELL's competition keeps the surviving update entries (trimtune.tuners.snell.delta)
SPARSIFY = ("code", "squared", "soft", "mask", "none")
