"""`python -m slimquant ...` is the `slimquant` command (what `torchrun ... -m slimquant quantize ...` runs)."""

from slimquant.cli import main

main()
