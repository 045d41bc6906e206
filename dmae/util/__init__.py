"""Utilities every other package may use: errors, atomic file writes, seeds, progress and logs, precision,
distributed processes, speed knobs, figures and resume state. Imports nothing else of dmae."""
