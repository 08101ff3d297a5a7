import os

# Triton reads this when kernels are decorated, so it must be set before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
