"""Tools beside the pipeline: the benchmark (`dmae bench`), its FLOP counts, and the GPU check. They use the dmae
library; nothing in dmae or stages/ imports them except the command that runs them."""
