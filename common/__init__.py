"""What every script shares without loading the data or the model: the command line (common/cli.py)
and safe file names and writes (common/files.py). Imports nothing heavy."""
