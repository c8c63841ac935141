"""The run around the experiment that train.py holds: its processes and device (launch.py), its output
folder and run.json (folder.py), the record of each epoch and of the end of training (record.py),
checkpoints and --resume (checkpoint.py), and what to run next when a run stops (recovery.py)."""
