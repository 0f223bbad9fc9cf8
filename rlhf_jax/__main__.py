"""`python -m rlhf_jax ...` is the `rlhf-jax` command line."""

import sys

from rlhf_jax.cli import main

sys.exit(main())
