"""The pipeline's stages: one thin Typer command per DVC stage, wired into the `dmae` console script."""
