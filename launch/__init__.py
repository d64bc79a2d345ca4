"""Command-line entry points (absl apps).

Every ``python -m launch.<entry>`` imports this package first: library noise is quieted here, before
TensorFlow can load (common_jax/quiet.py; TAMING_JAX_VERBOSE=1 or --verbosity=1 brings it back)."""
from common_jax.quiet import quiet_console

quiet_console()
