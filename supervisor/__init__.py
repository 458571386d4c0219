"""The supervisor process: the process tree, restarts, upgrades, and the operator CLI."""
