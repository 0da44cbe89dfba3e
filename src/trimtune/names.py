"""Names the command line needs before anything heavy is imported (no torch here).

The modules that implement them import these tuples, so each list is written once.
"""

METHODS = ("snella", "snell", "lora", "dora", "adalora", "full", "linear", "bitfit",
           "masked-sparse")
SNELL_METHODS = ("snella", "snell")
KERNELS = ("piecewise", "mixture", "inner", "rbf", "sigmoid")
