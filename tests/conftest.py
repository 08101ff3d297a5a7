import os

from hypothesis import settings

# Triton reads this when kernels are decorated, so it must be set before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Property tests draw the same examples on every run (derandomize: examples follow from the test itself), so a
# failure in CI is a real failure that any machine reproduces. HYPOTHESIS_PROFILE=explore draws new examples.
settings.register_profile("reproducible", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))
