"""What every stage stands on: errors, atomic writes, folder locks and ownership, default paths,
the process's memory and torchrun. Imports nothing above it."""
